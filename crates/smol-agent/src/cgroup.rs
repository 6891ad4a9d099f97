//! The guest's cgroup v2 tree for user commands: every command the host runs (exec, exec in an
//! image, spawn) runs in a cgroup of its own under `/sys/fs/cgroup/smol-user`, never in the root
//! cgroup where PID 1 and the agent live.
//!
//! - `smol-user` has `pids.max` = the guest's `pid_max` less [`PIDS_RESERVE`] and `memory.max` =
//!   the guest's memory less [`memory_reserve`]: a fork bomb or a memory hog meets the limit (the
//!   fork fails with `EAGAIN`, the guest's OOM killer picks inside `smol-user`) while the agent
//!   keeps room to fork, allocate and answer. The cpu controller is on too: the whole of
//!   `smol-user` weighs as much as one of the agent's threads, so a CPU storm leaves the agent
//!   its share.
//! - Each command's own cgroup (`smol-user/c<agent pid>-<n>`) has `pids.max` = [`PIDS_PER_COMMAND`]:
//!   one command's fork bomb leaves later commands room to start.
//! - Killing every process of a command, however it forked, setsid'd or daemonised, is one write
//!   to its `cgroup.kill` (at its timeout, a cancel, or when the host goes away);
//!   [`kill_all`] ends every user process of the machine (at shutdown).
//!
//! The guest's root can leave these cgroups (nothing in the guest is a boundary against its own
//! root): they keep accidents and runaway programs from taking the agent down; the host's limits
//! (the per-machine host cgroup, docs/threat-model.md) are what hold against a hostile guest.
//!
//! Only PID 1 sets the tree up ([`setup`]); the agent forked from it inherits [`enabled`]. Run
//! outside a VM (`smol-agent serve`, the unit tests) nothing is touched.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Where the agent mounts cgroup v2.
pub const MOUNT: &str = "/sys/fs/cgroup";
/// The parent of every user command's cgroup.
pub const USER: &str = "/sys/fs/cgroup/smol-user";
/// Pids kept out of `smol-user`'s reach (kernel threads, PID 1, the agent, its helpers).
pub const PIDS_RESERVE: u64 = 256;
/// `pids.max` of one command's cgroup (a fork bomb in one command leaves room for others).
pub const PIDS_PER_COMMAND: u64 = 1024;

// one command's bomb leaves room for others in the smallest guest (pid_max 4096)
const _: () = assert!(PIDS_PER_COMMAND < 4096 - PIDS_RESERVE);

static ENABLED: AtomicBool = AtomicBool::new(false);
static NEXT: AtomicU64 = AtomicU64::new(0);
/// Whether a command's cgroup may have been left behind (its removal at drop found it busy):
/// only then does the next [`Group::new`] sweep (a directory read per command otherwise).
static LEFT_BEHIND: AtomicBool = AtomicBool::new(true);
/// Command cgroups that emptied, kept for the next commands instead of removed: a mkdir, a
/// `pids.max` write and an rmdir per command (and the kernel's teardown of the cgroup) become
/// one read of `cgroup.events` (~0.6 ms less per exec under TCG, bench/RESULTS.md).
static SPARE: Mutex<Vec<Dir>> = Mutex::new(Vec::new());
/// At most this many spare cgroups are kept (concurrent commands beyond it make their own).
const SPARES: usize = 4;

/// A command cgroup's directory: its path and, for `clone3(CLONE_INTO_CGROUP)`
/// (crate::spawn), the directory itself.
struct Dir {
    path: PathBuf,
    fd: OwnedFd,
}

/// Memory kept out of `smol-user`'s reach, for a guest of `total` bytes: an eighth, at least
/// 32 MiB (the agent, its buffers of up to a few MiB per transfer, the kernel's own needs).
pub fn memory_reserve(total: u64) -> u64 {
    (total / 8).max(32 << 20)
}

/// Whether user commands get cgroups (PID 1 set the tree up).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn write(path: &str, value: &str) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn mem_total() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Mounts cgroup v2 and creates `smol-user` with its limits. Called once by PID 1, before the
/// agent is forked. On a kernel without the controllers, user commands run as before (one
/// console line says so).
pub fn setup() {
    if let Err(e) = try_setup() {
        eprintln!("smol-agent: user commands run without a cgroup ({e})");
    }
}

fn try_setup() -> std::io::Result<()> {
    crate::init::mount_cgroup2(MOUNT).map_err(std::io::Error::other)?;
    write(
        &format!("{MOUNT}/cgroup.subtree_control"),
        "+pids +memory +cpu",
    )?;
    match fs::create_dir(USER) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(std::io::Error::new(e.kind(), format!("{USER}: {e}"))),
    }
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    write(
        &format!("{USER}/pids.max"),
        &pid_max.saturating_sub(PIDS_RESERVE).max(64).to_string(),
    )?;
    if let Some(total) = mem_total() {
        let max = total.saturating_sub(memory_reserve(total)).max(16 << 20);
        write(&format!("{USER}/memory.max"), &max.to_string())?;
    }
    write(&format!("{USER}/cgroup.subtree_control"), "+pids +cpu")?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Writes `1` to `smol-user/cgroup.kill`: every user process of the machine is SIGKILLed, in
/// one operation. A no-op where cgroups are off.
pub fn kill_all() {
    if enabled() {
        if let Err(e) = write(&format!("{USER}/cgroup.kill"), "1") {
            eprintln!("smol-agent: killing the user processes: {e}");
        }
    }
}

/// One command's cgroup. Its first process is born in it (crate::spawn, [`Group::dir_fd`]) or,
/// where clone3 is refused, joins it between fork and exec ([`Group::join`]);
/// dropping the handle leaves it (and whatever still runs in it); an empty one is kept for the
/// next command (up to [`SPARES`]) or removed, a busy one removed by a later [`Group::new`].
pub struct Group {
    /// Always there until the drop, which keeps it as a spare or removes it.
    dir: Option<Dir>,
}

/// Whether the cgroup at `dir` holds no process, nor does any cgroup below it
/// (`cgroup.events`: `populated 0`). An unreadable file counts as populated.
fn empty(dir: &std::path::Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|ev| ev.lines().any(|l| l == "populated 0"))
}

impl Group {
    /// A fresh cgroup for one command, or `None` where cgroups are off (or cannot be made: the
    /// command then runs outside, as it did before, and the console says why).
    pub fn new() -> Option<Group> {
        if !enabled() {
            return None;
        }
        sweep();
        // A spare one: emptied when it went back, and nothing joins a command's cgroup but
        // the command's own processes (which were all gone then).
        if let Some(dir) = SPARE.lock().ok().and_then(|mut s| s.pop()) {
            return Some(Group { dir: Some(dir) });
        }
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("{USER}/c{pid}-{n}"));
        let made = fs::create_dir(&dir)
            .and_then(|()| {
                write(
                    &format!("{}/pids.max", dir.display()),
                    &PIDS_PER_COMMAND.to_string(),
                )
            })
            .and_then(|()| fs::File::open(&dir));
        match made {
            Ok(d) => Some(Group {
                dir: Some(Dir {
                    path: dir,
                    fd: d.into(),
                }),
            }),
            Err(e) => {
                eprintln!("smol-agent: a command's cgroup {}: {e}", dir.display());
                let _ = fs::remove_dir(&dir);
                None
            }
        }
    }

    /// Moves the calling process into this cgroup. Meant for `pre_exec` (between fork and exec):
    /// one `write(2)` on a descriptor opened here, before the fork, async-signal-safe.
    pub fn join(
        &self,
    ) -> std::io::Result<impl Fn() -> std::io::Result<()> + Send + Sync + 'static> {
        let procs: OwnedFd = fs::OpenOptions::new()
            .write(true)
            .open(self.dir().path.join("cgroup.procs"))?
            .into();
        Ok(move || {
            // SAFETY: the descriptor is open in the child (inherited: the closure holds it until
            // the command is dropped, after the spawn) and the buffer is a static byte string.
            let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }

    /// The cgroup's directory descriptor, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn dir_fd(&self) -> std::os::fd::RawFd {
        self.dir().fd.as_raw_fd()
    }

    fn dir(&self) -> &Dir {
        self.dir
            .as_ref()
            .expect("a group has its directory until it is dropped")
    }

    /// SIGKILLs every process in this cgroup (`cgroup.kill`), however it forked or detached.
    pub fn kill(&self) {
        if let Err(e) = write(&format!("{}/cgroup.kill", self.dir().path.display()), "1") {
            eprintln!("smol-agent: {e}");
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // Empty (the command and everything it started are gone): kept for the next command,
        // or removed now; else removed by a later sweep.
        if empty(&dir.path) {
            if let Ok(mut spare) = SPARE.lock() {
                if spare.len() < SPARES {
                    spare.push(dir);
                    return;
                }
            }
        }
        if fs::remove_dir(&dir.path).is_err() {
            LEFT_BEHIND.store(true, Ordering::Relaxed);
        }
    }
}

/// Removes the command cgroups that emptied (rmdir of a populated cgroup fails with `EBUSY`,
/// which leaves it, to be tried again by a later sweep), when one was left behind.
fn sweep() {
    if !LEFT_BEHIND.swap(false, Ordering::Relaxed) {
        return;
    }
    let Ok(entries) = fs::read_dir(USER) else {
        return;
    };
    // the spares are empty too, and kept
    let spare: Vec<PathBuf> = SPARE
        .lock()
        .map(|s| s.iter().map(|d| d.path.clone()).collect())
        .unwrap_or_default();
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with('c')
            && e.path().is_dir()
            && !spare.contains(&e.path())
            && fs::remove_dir(e.path()).is_err()
        {
            LEFT_BEHIND.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_an_eighth_of_memory_and_at_least_32_mib() {
        assert_eq!(memory_reserve(128 << 20), 32 << 20);
        assert_eq!(memory_reserve(1 << 30), 128 << 20);
    }

    #[test]
    fn outside_a_vm_no_cgroup_is_made() {
        assert!(!enabled());
        assert!(Group::new().is_none());
    }
}
