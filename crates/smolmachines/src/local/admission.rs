//! Admission control: a VMM is started (a create, the start of a stopped machine, a branch's
//! clone, a restore) only when the host can hold it, so a create the host cannot hold fails
//! with [`Error::InsufficientMemory`] instead of letting the OOM killer pick a process.
//!
//! A machine asks for its guest RAM plus [`VMM_OVERHEAD_MIB`] (what QEMU, the TCG translation
//! buffer, virtiofsd and passt take beside it; bench/RESULTS.md has the breakdown). What the
//! host has is the least of
//! - `MemAvailable` of `/proc/meminfo`,
//! - for the memory cgroup the engine runs in and each of its ancestors: its limit (v2
//!   `memory.max`, v1 `memory.limit_in_bytes`) minus its usage (`memory.current`,
//!   `memory.usage_in_bytes`) less its reclaimable page cache (`inactive_file`); machines'
//!   cgroups are made below the engine's own (`local::cgroup`), so their memory is in it,
//!
//! minus what machines of this run directory that are starting right now have reserved (a
//! starting guest has not touched its memory yet, so 10 concurrent creates must not all pass
//! on the same free figure) and minus a headroom kept for the host ([`DEFAULT_HEADROOM_MIB`]).
//! The reservations are a ledger of small files in `<run dir>/admission`, read and written
//! under an exclusive `flock`, one file per starting machine (`<name>.<pid>`), removed when its
//! start ends either way; one whose process is gone, or that is older than [`STALE`], is not
//! counted (and removed).
//!
//! Operator settings (environment of the engine's process):
//! - `SMOL_ADMISSION=off` (or `0`): no check at all;
//! - `SMOL_ADMISSION_HEADROOM_MIB=N`: host memory kept free beyond each machine's ask
//!   (default [`DEFAULT_HEADROOM_MIB`]; `0` admits down to the last MiB).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

const MIB: u64 = 1024 * 1024;

/// Host memory one machine takes beside its guest RAM, charged at admission: QEMU's own heap
/// and code, the TCG translation buffer as it grows, device buffers, virtiofsd and passt. An
/// idle 512 MiB machine's QEMU holds ~60 MiB of its own beside the guest's pages, one whose
/// guest touched all its RAM ~93 MiB (bench/RESULTS.md, `local::cgroup`); rounded up.
pub const VMM_OVERHEAD_MIB: u64 = 128;

/// Host memory kept free beyond the machines' asks, unless `SMOL_ADMISSION_HEADROOM_MIB` says.
pub const DEFAULT_HEADROOM_MIB: u64 = 256;

/// A reservation older than this is a leftover (no start takes so long; the readiness timeout
/// is 2 minutes): not counted.
pub const STALE: Duration = Duration::from_secs(600);

/// What the engine's environment says about admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Whether creates are checked at all.
    pub enabled: bool,
    /// Bytes kept free beyond each ask.
    pub headroom: u64,
}

impl Policy {
    /// From `SMOL_ADMISSION` and `SMOL_ADMISSION_HEADROOM_MIB`; a headroom that is not a number
    /// is an [`Error::InvalidConfig`].
    pub fn from_env() -> Result<Policy> {
        let enabled = !std::env::var("SMOL_ADMISSION")
            .is_ok_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no"));
        let headroom = match std::env::var("SMOL_ADMISSION_HEADROOM_MIB") {
            Ok(v) => {
                v.trim().parse::<u64>().map_err(|_| {
                    Error::invalid(format!(
                        "SMOL_ADMISSION_HEADROOM_MIB={v:?}: not a number of MiB"
                    ))
                })? * MIB
            }
            Err(_) => DEFAULT_HEADROOM_MIB * MIB,
        };
        Ok(Policy { enabled, headroom })
    }
}

/// The bytes a machine of `memory_mb` MiB asks for.
pub fn ask(memory_mb: u32) -> u64 {
    (u64::from(memory_mb) + VMM_OVERHEAD_MIB) * MIB
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// One limit that bounds what the engine may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// Where it comes from (`/proc/meminfo`, a cgroup directory).
    pub source: String,
    /// The bytes left under it.
    pub available: u64,
    /// Its limit, for a cgroup (`None` for the host's `MemAvailable`).
    pub limit: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `memory.stat` key's value.
fn stat(dir: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join("memory.stat"))
        .ok()?
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
}

/// A v1 limit this large is "no limit" (the kernel's `PAGE_COUNTER_MAX` in bytes, rounded).
const V1_UNLIMITED: u64 = 1 << 62;

/// The limit left in one cgroup directory, when it has a limit: v2 (`memory.max`) or v1
/// (`memory.limit_in_bytes`).
pub fn cgroup_bound(dir: &Path) -> Option<Bound> {
    let (limit, usage, cache) = if dir.join("memory.max").exists() {
        let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
        let limit: u64 = max.trim().parse().ok()?; // "max": no limit
        (
            limit,
            read_u64(&dir.join("memory.current"))?,
            stat(dir, "inactive_file").unwrap_or(0),
        )
    } else {
        let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
        if limit >= V1_UNLIMITED {
            return None;
        }
        (
            limit,
            read_u64(&dir.join("memory.usage_in_bytes"))?,
            stat(dir, "total_inactive_file").unwrap_or(0),
        )
    };
    let used = usage.saturating_sub(cache);
    Some(Bound {
        source: dir.display().to_string(),
        available: limit.saturating_sub(used),
        limit: Some(limit),
    })
}

/// The memory cgroup directory of this process under `root` (`/sys/fs/cgroup`), from a
/// `/proc/self/cgroup` text: the v1 `memory` hierarchy's, else the v2 one's.
pub fn own_memory_cgroup(root: &Path, proc_cgroup: &str) -> Option<(PathBuf, PathBuf)> {
    let mut v2 = None;
    for l in proc_cgroup.lines() {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "memory") && root.join("memory").is_dir() {
            return Some((root.join("memory"), root.join("memory").join(rel)));
        }
        if ctrls.is_empty() {
            v2 = Some(rel.to_string());
        }
    }
    let rel = v2?;
    [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|m| m.join("cgroup.controllers").exists())
        .map(|m| (m.clone(), m.join(rel)))
}

/// Every bound on the engine's memory: the host's `MemAvailable` and each limited cgroup from
/// the engine's own up to the hierarchy's root (`root`, `meminfo` and `proc_cgroup` as read).
pub fn bounds_at(root: &Path, meminfo: &str, proc_cgroup: &str) -> Vec<Bound> {
    let mut out = Vec::new();
    if let Some(a) = mem_available(meminfo) {
        out.push(Bound {
            source: "/proc/meminfo MemAvailable".into(),
            available: a,
            limit: None,
        });
    }
    if let Some((mount, own)) = own_memory_cgroup(root, proc_cgroup) {
        let mut dir = Some(own.as_path());
        while let Some(d) = dir.filter(|d| d.starts_with(&mount)) {
            out.extend(cgroup_bound(d));
            dir = d.parent();
        }
    }
    out
}

/// [`bounds_at`] of this host and process.
pub fn bounds() -> Vec<Bound> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_else(|e| {
        tracing::warn!(error = %e, "admission: cannot read /proc/meminfo");
        String::new()
    });
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    bounds_at(Path::new("/sys/fs/cgroup"), &meminfo, &own)
}

/// The decision on one ask: `Ok` with the tightest bound, or the refusal.
pub fn decide(
    name: &str,
    ask: u64,
    bounds: &[Bound],
    reserved: u64,
    starting: usize,
    headroom: u64,
) -> Result<()> {
    let Some(tight) = bounds.iter().min_by_key(|b| b.available) else {
        // nothing readable: nothing to refuse on (said once at warn level by the caller)
        return Ok(());
    };
    let left = tight.available.saturating_sub(reserved);
    if left >= ask.saturating_add(headroom) {
        return Ok(());
    }
    let limit = match tight.limit {
        Some(l) => format!(" (limit {} MiB)", l / MIB),
        None => String::new(),
    };
    Err(Error::InsufficientMemory {
        name: name.to_string(),
        requested_mib: ask / MIB,
        available_mib: left.saturating_sub(headroom) / MIB,
        reason: format!(
            "{} has {} MiB free{limit}, {} MiB of it reserved by {starting} machine(s) \
             starting, {} MiB kept as headroom (SMOL_ADMISSION_HEADROOM_MIB); the ask is guest \
             RAM + {VMM_OVERHEAD_MIB} MiB for the VMM",
            tight.source,
            tight.available / MIB,
            reserved / MIB,
            headroom / MIB,
        ),
    })
}

/// A starting machine's reservation in the ledger; removed on drop (when the start ends).
#[derive(Debug)]
pub struct Reservation {
    file: PathBuf,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.file.display(), error = %e, "admission: cannot remove a reservation");
            }
        }
    }
}

/// The ledger's directory for machines whose run directories are in `machines`
/// (`<run dir>/machines`): `<run dir>/admission`.
pub fn ledger_dir(machines: &Path) -> PathBuf {
    machines.parent().unwrap_or(machines).join("admission")
}

struct Lock {
    _file: File,
}

fn lock(dir: &Path) -> std::io::Result<Lock> {
    std::fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    loop {
        // SAFETY: the descriptor belongs to `file`, open for the whole call; flock touches no
        // memory of ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Lock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; no memory is involved.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// The bytes and count of the live reservations in `dir` (stale ones are removed).
fn reserved(dir: &Path) -> (u64, usize) {
    let (mut bytes, mut n) = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_suffix(".res")
            .and_then(|s| s.rsplit_once('.'))
            .and_then(|(_, p)| p.parse::<i32>().ok())
        else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE);
        if old || !pid_alive(pid) {
            tracing::info!(reservation = %name, "admission: removed a leftover reservation");
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        if let Some(b) = read_u64(&e.path()) {
            bytes += b;
            n += 1;
        }
    }
    (bytes, n)
}

/// Admits machine `name` of `memory_mb` MiB whose run directory is in `machines`, against
/// `bounds` (see the module documentation), under `policy`: its reservation, held until its
/// start ends, or [`Error::InsufficientMemory`]. `None` when admission is off.
pub fn admit_with(
    machines: &Path,
    name: &str,
    memory_mb: u32,
    policy: Policy,
    bounds: impl FnOnce() -> Vec<Bound>,
) -> Result<Option<Reservation>> {
    if !policy.enabled {
        return Ok(None);
    }
    let dir = ledger_dir(machines);
    let io = |e| Error::io(format!("admission ledger {}", dir.display()), e);
    let _lock = lock(&dir).map_err(io)?;
    let (held, starting) = reserved(&dir);
    let b = bounds();
    if b.is_empty() {
        tracing::warn!("admission: no memory figure readable (/proc/meminfo, cgroup): not checked");
    }
    let want = ask(memory_mb);
    decide(name, want, &b, held, starting, policy.headroom).inspect_err(|e| {
        tracing::warn!(machine = name, error = %e, "admission: refused");
    })?;
    let file = dir.join(format!("{name}.{}.res", std::process::id()));
    std::fs::write(&file, want.to_string()).map_err(io)?;
    tracing::debug!(
        machine = name,
        ask_mib = want / MIB,
        reserved_mib = held / MIB,
        "admission: admitted"
    );
    Ok(Some(Reservation { file }))
}

/// [`admit_with`] this host's figures under the environment's [`Policy`].
pub fn admit(machine_dir: &Path, memory_mb: u32) -> Result<Option<Reservation>> {
    let machines = machine_dir.parent().unwrap_or(machine_dir);
    let name = machine_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    admit_with(machines, &name, memory_mb, Policy::from_env()?, bounds)
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
