//! Confinement of the processes a machine runs: its VMM (QEMU), virtiofsd and passt.
//!
//! Each child gets, between `fork` and `exec` ([`apply`], one `pre_exec` of raw system calls,
//! everything it needs prepared beforehand by [`Plan`]):
//! - the machine's cgroup (`local::cgroup`: memory, pids, CPU), joined by writing `0` to its
//!   `cgroup.procs` before the program runs, so none of it runs outside;
//! - `oom_score_adj` raised to [`OOM_SCORE_ADJ`]: the host OOM killer takes a VMM before the
//!   caller (whose own score is untouched);
//! - `RLIMIT_CORE` 0: no core dump of guest memory on the host's disk;
//! - every inherited descriptor above stderr marked close-on-exec (`close_range`): a
//!   descriptor the caller leaked (a binding's host process, a test harness) does not reach it;
//! - `no_new_privs`: no set-uid binary or file capability gains anything in it or its children;
//! - QEMU only: a Landlock domain ([`vmm_rules`]) so only its machine's files (and the system
//!   libraries, the guest assets, the shared disk template) are reachable. Landlock, not a
//!   mount namespace: it needs no privileges (a private mount namespace needs root or a user
//!   namespace), stacks under anything the caller has, and applies to paths already open by
//!   name in QEMU's arguments without bind-mount plumbing. virtiofsd and passt are not put
//!   under Landlock: each sandboxes itself with mount namespaces and `pivot_root` (virtiofsd
//!   `-o sandbox=namespace`, passt's own isolation), which a Landlock domain forbids.
//!
//! QEMU also runs its own seccomp filter ([`SANDBOX`]). Whatever of this cannot be set up on a
//! host (no cgroup access, no Landlock) leaves the machine running with what could be; the
//! engine logs it once at warn level and `smol doctor` says confinement is partial.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::cgroup;
use super::vmm::VmSpec;

/// QEMU's seccomp sandbox: obsolete system calls, privilege changes (`setuid` and kin), new
/// processes (`fork`, `execve`) and scheduler/resource changes denied. `spawn=deny` is why a
/// branch's device state moves over a descriptor (`fd:` migration) instead of `exec:cat`.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The `oom_score_adj` of a machine's processes: the host OOM killer picks one of them before
/// any process of the default score 0 (the caller, the engine).
pub const OOM_SCORE_ADJ: i32 = 500;

/// Landlock access rights (linux/landlock.h), up to ABI 3.
mod ll {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    /// Every right of ABI 1 (bits 0..=12).
    pub const ABI1: u64 = (1 << 13) - 1;
    pub const REFER: u64 = 1 << 13;
    pub const TRUNCATE: u64 = 1 << 14;
    /// The rights a rule on a file (not a directory) may carry.
    pub const FILE: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE;
    pub const READ: u64 = READ_FILE | READ_DIR;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;
    pub const CREATE_RULESET_VERSION: u32 = 1;

    #[repr(C)]
    pub struct RulesetAttr {
        pub handled_access_fs: u64,
    }

    #[repr(C, packed)]
    pub struct PathBeneath {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }
}

/// How a path may be used by a confined VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read (files, directory listings).
    Read,
    /// Read and execute (programs, libraries).
    ReadExec,
    /// Everything but execute: create, write, remove (the machine's own directories).
    ReadWrite,
}

/// What Landlock lets the VMM of `spec` (the program `binary`) reach: its machine's run, home
/// and RAM directories read-write; the guest assets, the root file system image and the
/// images of its run(image) slots, a clone's
/// frozen RAM file and the shared disk templates read-only; the system's programs and
/// libraries, `/sys` and a few devices (a clone's frozen RAM file read-write: see below). Nothing else of the host: not the engine's other
/// machines, not the caller's files, not `/etc`, not other processes in `/proc`.
pub fn vmm_rules(spec: &VmSpec, binary: &Path) -> Vec<(PathBuf, Access)> {
    let mut rules: Vec<(PathBuf, Access)> = ["/usr", "/lib", "/lib64", "/bin"]
        .into_iter()
        .map(|p| (PathBuf::from(p), Access::ReadExec))
        .collect();
    rules.push((binary.to_path_buf(), Access::ReadExec));
    rules.push(("/etc/ld.so.cache".into(), Access::Read));
    if matches!(super::runas::policy(), Some(super::runas::Policy::User(_))) {
        // -runas looks its user up (getpwnam, initgroups) before it drops (local::runas)
        for f in ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"] {
            rules.push((f.into(), Access::Read));
        }
    }
    rules.push(("/sys".into(), Access::Read));
    for dev in ["/dev/urandom", "/dev/random"] {
        rules.push((dev.into(), Access::Read));
    }
    rules.push(("/dev/null".into(), Access::ReadWrite));
    if spec.accel.accel == super::accel::Accel::Kvm {
        rules.push(("/dev/kvm".into(), Access::ReadWrite));
    }
    rules.push((spec.dir.clone(), Access::ReadWrite));
    rules.push((spec.assets.kernel.clone(), Access::Read));
    rules.push((spec.assets.initrd.clone(), Access::Read));
    if let Some(disk) = &spec.disk {
        if let Some(home) = disk.parent() {
            rules.push((home.to_path_buf(), Access::ReadWrite));
            // <home>/machines/<name>/disk.qcow2 -> <home>/templates: the bottom of every chain
            if let Some(engine_home) = home.parent().and_then(Path::parent) {
                rules.push((engine_home.join("templates"), Access::Read));
            }
        }
    }
    if let Some((rootfs, _)) = &spec.image {
        rules.push((rootfs.clone(), Access::Read));
    }
    // the images its run(image) slots hold (local::slots; a missing one boots empty)
    for f in spec.image_slots.iter().flatten().filter(|f| f.exists()) {
        rules.push((f.clone(), Access::Read));
    }
    if let Some(d) = spec.ram_file.as_ref().and_then(|f| f.parent()) {
        rules.push((d.to_path_buf(), Access::ReadWrite));
    }
    if let Some(r) = &spec.restore {
        // QEMU 7.2 opens a memory-backend-file read-write even for share=off (MAP_PRIVATE:
        // its writes never reach the file); a compromised clone could write to a frozen
        // base's RAM file through that descriptor (docs/threat-model.md)
        rules.push((r.ram.clone(), Access::ReadWrite));
        if let Some(d) = r.ram.parent() {
            if r.shared {
                rules.push((d.to_path_buf(), Access::ReadWrite));
            }
        }
    }
    rules
}

/// A Landlock ruleset fd for `rules`, or why there is none (an old kernel, Landlock off).
/// Paths that do not exist are skipped (`/lib64` on some systems).
fn landlock_ruleset(rules: &[(PathBuf, Access)]) -> Result<OwnedFd, String> {
    // SAFETY: the version query takes no attribute and returns the ABI version or -1.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<ll::RulesetAttr>(),
            0usize,
            ll::CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        return Err(format!(
            "Landlock unavailable: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut handled = ll::ABI1;
    if abi >= 2 {
        handled |= ll::REFER;
    }
    if abi >= 3 {
        handled |= ll::TRUNCATE;
    }
    let attr = ll::RulesetAttr {
        handled_access_fs: handled,
    };
    // SAFETY: attr is a valid ruleset attribute of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const ll::RulesetAttr,
            std::mem::size_of::<ll::RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(format!(
            "landlock_create_ruleset: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor (close-on-exec) that nothing else owns.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (path, access) in rules {
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: c is a NUL-terminated path; O_PATH opens nothing for reading or writing.
        let pfd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if pfd < 0 {
            continue;
        }
        // SAFETY: pfd was just opened and is owned here.
        let pfd = unsafe { OwnedFd::from_raw_fd(pfd) };
        let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
        let mut allowed = match access {
            Access::Read => ll::READ,
            Access::ReadExec => ll::READ | ll::EXECUTE,
            Access::ReadWrite => handled & !ll::EXECUTE,
        } & handled;
        if !is_dir {
            allowed &= ll::FILE;
        }
        let rule = ll::PathBeneath {
            allowed_access: allowed,
            parent_fd: pfd.as_raw_fd(),
        };
        // SAFETY: rule is a valid path-beneath attribute; both descriptors are open.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                ll::RULE_PATH_BENEATH,
                &rule as *const ll::PathBeneath,
                0u32,
            )
        };
        if r != 0 {
            return Err(format!(
                "landlock_add_rule {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(ruleset)
}

/// Everything a child's confinement needs, prepared before the fork (the `pre_exec` hook may
/// not allocate or take locks).
#[derive(Debug)]
pub struct Plan {
    /// The machine cgroup's `cgroup.procs` files, opened for writing.
    cgroup_procs: Vec<std::fs::File>,
    /// The ASCII of [`OOM_SCORE_ADJ`].
    oom: Vec<u8>,
    /// The Landlock ruleset (QEMU only).
    landlock: Option<OwnedFd>,
    /// What could not be set up (empty: fully confined).
    pub partial: Vec<String>,
}

/// The plan of a helper (virtiofsd, passt) of the machine whose run directory is `dir`: its
/// cgroup (when [`cgroup::create`] made one), the OOM score, no Landlock.
pub fn helper(dir: &Path) -> Plan {
    let mut partial = Vec::new();
    let cgroup_procs = match cgroup::detect() {
        Ok(h) => {
            let dirs = cgroup::machine_dirs(&h, dir);
            if dirs.iter().all(|d| d.is_dir()) {
                cgroup::open_procs(&dirs).unwrap_or_else(|e| {
                    partial.push(format!("cannot join the machine's cgroup: {e}"));
                    Vec::new()
                })
            } else {
                partial.push("the machine has no cgroup".into());
                Vec::new()
            }
        }
        Err(e) => {
            partial.push(e);
            Vec::new()
        }
    };
    Plan {
        cgroup_procs,
        oom: OOM_SCORE_ADJ.to_string().into_bytes(),
        landlock: None,
        partial,
    }
}

/// The plan of the VMM of `spec`: the helpers' plus Landlock ([`vmm_rules`]).
/// `SMOL_NO_LANDLOCK=1` leaves Landlock out (to tell whether it is what breaks a setup).
pub fn vmm(spec: &VmSpec, binary: &Path) -> Plan {
    let mut plan = helper(&spec.dir);
    if std::env::var_os("SMOL_NO_LANDLOCK").is_some_and(|v| v == "1") {
        plan.partial
            .push("Landlock off (SMOL_NO_LANDLOCK=1)".into());
        return plan;
    }
    match landlock_ruleset(&vmm_rules(spec, binary)) {
        Ok(fd) => plan.landlock = Some(fd),
        Err(e) => plan.partial.push(e),
    }
    plan
}

/// Makes the cgroup of the machine whose run directory is `dir` (`local::cgroup`), before any
/// of its processes starts; its directories, empty (and a warn-level line, once) when this host
/// does not let us.
pub fn machine_cgroup(dir: &Path, memory_mb: u32, cpus: u32) -> Vec<PathBuf> {
    let made =
        cgroup::detect().and_then(|h| cgroup::create(&h, dir, cgroup::limits(memory_mb, cpus)));
    match made {
        Ok(dirs) => dirs,
        Err(e) => {
            warn_partial(
                "cgroup",
                &Plan {
                    cgroup_procs: Vec::new(),
                    oom: Vec::new(),
                    landlock: None,
                    partial: vec![e],
                },
            );
            Vec::new()
        }
    }
}

/// Says once per process, at warn level, that confinement is partial on this host.
pub fn warn_partial(what: &str, plan: &Plan) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if plan.partial.is_empty() {
        return;
    }
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(process = what, missing = ?plan.partial, "confinement is partial on this host");
    } else {
        tracing::debug!(process = what, missing = ?plan.partial, "confinement is partial");
    }
}

fn check(r: libc::c_long) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Adds the confinement of `plan` to `cmd` (after its other `pre_exec` hooks). A step that
/// fails in the child fails the spawn: what was prepared must apply.
pub fn apply(cmd: &mut std::process::Command, plan: Plan) {
    use std::os::unix::process::CommandExt;
    let Plan {
        cgroup_procs,
        oom,
        landlock,
        partial: _,
    } = plan;
    // SAFETY: the hook only makes system calls (write, open, setrlimit, close_range, fcntl,
    // prctl, landlock) on descriptors and buffers prepared before the fork: nothing allocates,
    // locks or touches the parent's state.
    unsafe {
        cmd.pre_exec(move || {
            for f in &cgroup_procs {
                check(libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_long)?;
            }
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            check(fd as libc::c_long)?;
            let w = libc::write(fd, oom.as_ptr().cast(), oom.len());
            libc::close(fd);
            check(w as libc::c_long)?;
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            check(libc::setrlimit(libc::RLIMIT_CORE, &zero) as libc::c_long)?;
            // every descriptor above stderr: close-on-exec (std's own error pipe already is)
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..4096 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            if let Some(ruleset) = &landlock {
                check(libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    ruleset.as_raw_fd(),
                    0u32,
                ))?;
            }
            Ok(())
        });
    }
}

/// One line for `smol doctor`: how a machine's processes are confined on this host.
pub fn describe() -> String {
    let cg = match cgroup::detect() {
        Ok(cgroup::Hierarchy::V2(d)) => format!("cgroup v2 under {}", d.display()),
        Ok(cgroup::Hierarchy::V1(d)) => match d.first() {
            Some(m) if access_w(m) => format!("cgroup v1 under {}", m.display()),
            Some(m) => format!("no cgroup ({} not writable): partial", m.display()),
            None => "no cgroup: partial".into(),
        },
        Err(e) => format!("no cgroup ({e}): partial"),
    };
    // SAFETY: the version query takes no attribute.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<ll::RulesetAttr>(),
            0usize,
            ll::CREATE_RULESET_VERSION,
        )
    };
    let ll = if abi >= 1 {
        format!("Landlock ABI {abi}")
    } else {
        "no Landlock: partial".into()
    };
    format!("QEMU seccomp sandbox, no_new_privs, no core dumps, oom_score_adj +{OOM_SCORE_ADJ}, {cg}, {ll}")
}

fn access_w(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_child_has_no_new_privs_no_core_a_raised_oom_score_and_no_leaked_fds() {
        // a descriptor without close-on-exec, as a careless caller would leave one
        let leaked = std::fs::File::open("/dev/null").unwrap();
        let raw = leaked.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor we own.
        unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(format!(
            "grep -E '^NoNewPrivs' /proc/self/status; grep 'core file' /proc/self/limits; \
             cat /proc/self/oom_score_adj; ls /proc/self/fd/{raw} 2>/dev/null || echo closed"
        ));
        apply(
            &mut cmd,
            Plan {
                cgroup_procs: Vec::new(),
                oom: OOM_SCORE_ADJ.to_string().into_bytes(),
                landlock: None,
                partial: Vec::new(),
            },
        );
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {out:?}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        let core = text.lines().find(|l| l.contains("core file")).unwrap();
        assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
        assert!(text.contains("\n500\n"), "{text}");
        assert!(text.trim_end().ends_with("closed"), "{text}");
        // the caller keeps its own score
        let own = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        assert_ne!(own.trim(), "500");
    }

    #[test]
    fn landlock_keeps_a_child_to_its_paths() {
        let Ok(ruleset) = landlock_ruleset(&[
            ("/usr".into(), Access::ReadExec),
            ("/lib".into(), Access::ReadExec),
            ("/lib64".into(), Access::ReadExec),
            ("/bin".into(), Access::ReadExec),
            ("/etc/ld.so.cache".into(), Access::Read),
        ]) else {
            eprintln!("no Landlock on this host: skipped");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("secret"), "x").unwrap();
        let mut cmd = std::process::Command::new("/bin/cat");
        cmd.arg(d.path().join("secret"));
        apply(
            &mut cmd,
            Plan {
                cgroup_procs: Vec::new(),
                oom: b"500".to_vec(),
                landlock: Some(ruleset),
                partial: Vec::new(),
            },
        );
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{out:?}"
        );
    }
}
