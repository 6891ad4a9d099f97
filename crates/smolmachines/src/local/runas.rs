//! The uid drop of a VMM started as root (issue 14, docs/threat-model.md section 6).
//!
//! An engine running as root (the fleet, CI) starts QEMU with `-runas UID:GID`: QEMU opens
//! everything on its command line as root (`/dev/kvm`, the kernel and initramfs, the disk chain,
//! the RAM file, its sockets, the console log) and then drops to that uid and gid (and no
//! supplementary group) before the guest runs. Each VMM gets **a uid of its own**, claimed from a
//! range ([`DEFAULT_FIRST`] .. +[`DEFAULT_COUNT`], or `SMOL_VMM_UIDS=FIRST-LAST`) that names no
//! user of the host: two machines' VMMs can then neither signal nor trace each other, nor read
//! each other's `/proc`. `SMOL_VMM_USER=name` drops every VMM to that one user instead (the
//! behaviour before per-machine uids); `SMOL_VMM_USER=` (empty) or `root`: nothing drops.
//!
//! A claim is a file `<uid>` in [`claims_dir`] (`/run/smol/vmm-uids`, root's own), made under an
//! exclusive `flock` of the directory's lock file. It is taken over once it is older than
//! [`CLAIM_GRACE`] and no process of the host runs as that uid any more (the VMM exited, the
//! host rebooted, the engine was killed): no release step is needed, and a machine's uid may
//! change from one boot to the next (nothing on disk is owned by it: QEMU opened its files as
//! root, by descriptor after the drop).
//!
//! What changes with the drop:
//! - the seccomp sandbox loses `elevateprivileges=deny` ([`SANDBOX`]): QEMU's own sandbox is
//!   installed before `-runas` drops, and kills QEMU at its `setgid` ("Bad system call", checked
//!   with QEMU 7.2). Once the uid is not root the option adds nothing: no capabilities,
//!   `no_new_privs` and `spawn=deny` leave set*uid only moving between the process's own ids;
//! - the agent chardev connects once at start (no `reconnect=1`: its retries would run as the
//!   dropped user, which cannot reach the engine's socket under a `0700` home), and the engine
//!   reconnects it by handing QEMU a connected descriptor (`getfd` + `chardev-change` to an
//!   `fd` address, `Vmm::reconnect_agent`), never a path;
//! - the disk is opened read-write for good (`auto-read-only=off`, `local::vmm`): with QEMU's
//!   default a migration (a branch, a checkpoint) reopens the image by name read-only when it
//!   inactivates the block nodes, and read-write at `cont`, which the dropped uid cannot (its
//!   path is under a `0700` home): "bdrv_inactivate_all() failed", seen with QEMU 7.2. Branch
//!   sources, clones and restores drop like every other VMM;
//! - Landlock, the cgroup, `oom_score_adj`, no core dumps and the closed descriptors stay as
//!   they are (`local::confine`).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Drop every VMM to this one user instead of a uid per VMM; empty or `root`: no drop.
pub const USER_ENV: &str = "SMOL_VMM_USER";

/// The range of per-VMM uids: `FIRST-LAST` (inclusive).
pub const RANGE_ENV: &str = "SMOL_VMM_UIDS";

/// The first uid of the default range: `0x7000_0000`, above the ranges systemd hands to
/// containers (up to `0x6FFF_FFFF`) and below the sign bit some tools mishandle.
pub const DEFAULT_FIRST: u32 = 0x7000_0000;

/// How many uids the default range has.
pub const DEFAULT_COUNT: u32 = 65_536;

/// A claim younger than this is live even if no process runs as its uid yet (QEMU drops a few
/// milliseconds after the claim; a host this slow is not likely).
pub const CLAIM_GRACE: Duration = Duration::from_secs(120);

/// The seccomp sandbox of a QEMU that drops with `-runas` (see the module's doc).
pub const SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

/// How this process's VMMs drop, if they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// One uid per VMM from `first ..= first + count - 1`, gid the same number.
    Range { first: u32, count: u32 },
    /// Every VMM to this user (`SMOL_VMM_USER`).
    User(String),
}

/// The identity one VMM drops to: QEMU's `-runas` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    Ids { uid: u32, gid: u32 },
    User(String),
}

impl RunAs {
    /// QEMU's `-runas` value: `uid:gid` or a user name.
    pub fn arg(&self) -> String {
        match self {
            RunAs::Ids { uid, gid } => format!("{uid}:{gid}"),
            RunAs::User(u) => u.clone(),
        }
    }

    /// The uid, numeric or looked up.
    pub fn uid(&self) -> Option<u32> {
        match self {
            RunAs::Ids { uid, .. } => Some(*uid),
            RunAs::User(u) => uid_of(u),
        }
    }
}

/// This process's policy: only as root; [`USER_ENV`] (a user that exists) or the uid range.
pub fn policy() -> Option<Policy> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    policy_from(
        euid,
        std::env::var(USER_ENV).ok().as_deref(),
        std::env::var(RANGE_ENV).ok().as_deref(),
        |n| uid_of(n).is_some(),
    )
}

/// [`policy`] for an effective uid, the two variables' values and a user lookup.
pub fn policy_from(
    euid: u32,
    user: Option<&str>,
    range: Option<&str>,
    exists: impl Fn(&str) -> bool,
) -> Option<Policy> {
    if euid != 0 {
        return None;
    }
    if let Some(name) = user.map(str::trim) {
        if name.is_empty() || name == "root" {
            return None;
        }
        if exists(name) {
            return Some(Policy::User(name.to_string()));
        }
        tracing::warn!(
            user = name,
            "{USER_ENV} names no user of this host: each VMM drops to a uid of its own instead \
             (make the user: adduser --system --group --no-create-home {name})"
        );
    }
    let (first, count) = match range.map(parse_range) {
        None => (DEFAULT_FIRST, DEFAULT_COUNT),
        Some(Ok(r)) => r,
        Some(Err(why)) => {
            tracing::warn!(
                value = range,
                "{RANGE_ENV}: {why}; the default range is used"
            );
            (DEFAULT_FIRST, DEFAULT_COUNT)
        }
    };
    Some(Policy::Range { first, count })
}

/// `FIRST-LAST` (inclusive) -> (first, count); neither 0 (root) nor past `i32::MAX`.
pub fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .trim()
        .split_once('-')
        .ok_or_else(|| "expected FIRST-LAST, e.g. 1879048192-1879113727".to_string())?;
    let first: u32 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a uid"))?;
    let last: u32 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a uid"))?;
    if first == 0 || last < first || last > i32::MAX as u32 {
        return Err("the range must be within 1..=2147483647, FIRST <= LAST".into());
    }
    Ok((first, last - first + 1))
}

/// The identity the VMM of the machine whose run directory is `dir` drops to, claimed now; `None`
/// where nothing drops. A range with no free uid, or a claims directory that cannot be made, is
/// logged and the VMM stays root (confined by seccomp, Landlock and its cgroup), like a host
/// without the drop.
pub fn claim(dir: &Path) -> Option<RunAs> {
    match policy()? {
        Policy::User(u) => Some(RunAs::User(u)),
        Policy::Range { first, count } => {
            // the host's processes are read only if a stale claim has to be checked
            let mut seen: Option<std::collections::HashSet<u32>> = None;
            let mut busy = |u: u32| seen.get_or_insert_with(uids_in_use).contains(&u);
            match claim_in(&claims_dir(), dir, first, count, &mut busy, user_of_uid) {
                Ok(uid) => Some(RunAs::Ids { uid, gid: uid }),
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "no uid could be claimed for this VMM: it stays root");
                    None
                }
            }
        }
    }
}

/// Where the claims live: `SMOL_VMM_UID_CLAIMS` or `/run/smol/vmm-uids`.
pub fn claims_dir() -> PathBuf {
    std::env::var_os("SMOL_VMM_UID_CLAIMS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/smol/vmm-uids"))
}

/// Claims a uid of `first..first+count` in `claims` for `dir`: the first, from a start that
/// depends on `dir` (so machines do not all probe from the same uid), that names no user
/// (`is_user`) and has no claim, or a claim past [`CLAIM_GRACE`] whose uid runs no process
/// (`in_use`, asked only then).
pub fn claim_in(
    claims: &Path,
    dir: &Path,
    first: u32,
    count: u32,
    in_use: &mut dyn FnMut(u32) -> bool,
    is_user: impl Fn(u32) -> bool,
) -> std::io::Result<u32> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(claims)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(claims.join(".lock"))?;
    // SAFETY: flock on a descriptor this function owns; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let start = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        dir.hash(&mut h);
        std::process::id().hash(&mut h);
        (h.finish() % u64::from(count.max(1))) as u32
    };
    for i in 0..count {
        let uid = first + (start + i) % count;
        if is_user(uid) {
            continue;
        }
        let path = claims.join(uid.to_string());
        if let Ok(meta) = std::fs::metadata(&path) {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .unwrap_or_default();
            if age < CLAIM_GRACE || in_use(uid) {
                continue;
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{}", dir.display())?;
        tracing::debug!(uid, dir = %dir.display(), "a uid claimed for a VMM");
        return Ok(uid);
    }
    Err(std::io::Error::other(format!(
        "every uid of {first}-{} is in use (set {RANGE_ENV}=FIRST-LAST to a larger range)",
        first + count - 1
    )))
}

/// The real uids of the host's processes (`/proc/*/status`): a uid some process runs as.
pub fn uids_in_use() -> std::collections::HashSet<u32> {
    let mut out = std::collections::HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            out.extend(
                line[4..]
                    .split_whitespace()
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Whether `uid` names a user of this host (`getpwuid_r`).
pub fn user_of_uid(uid: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data, filled by getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the record, the buffer of the given length
    // for its strings, and the result slot.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    rc == 0 && !out.is_null()
}

/// The uid of user `name` (`getpwnam_r`).
pub fn uid_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data, filled by getpwnam_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name, the record, the buffer of the
    // given length for its strings, and the result slot.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(pw.pw_uid)
}

/// QEMU's arguments for a VMM that drops to `who`: the sandbox without
/// `elevateprivileges=deny`, the agent chardev without its retries, `-runas`.
pub fn with_runas(args: Vec<String>, who: &RunAs) -> Vec<String> {
    let mut out: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a == super::confine::SANDBOX {
                SANDBOX.to_string()
            } else if a.starts_with("socket,id=agent,") {
                a.replace(",reconnect=1", "")
            } else {
                a
            }
        })
        .collect();
    out.extend(["-runas".to_string(), who.arg()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_drops_a_named_user_or_a_uid_of_its_own() {
        let yes = |_: &str| true;
        let no = |_: &str| false;
        let range = Some(Policy::Range {
            first: DEFAULT_FIRST,
            count: DEFAULT_COUNT,
        });
        assert_eq!(policy_from(1000, None, None, yes), None);
        assert_eq!(policy_from(0, None, None, yes), range);
        assert_eq!(
            policy_from(0, Some("vmm"), None, yes),
            Some(Policy::User("vmm".into()))
        );
        assert_eq!(policy_from(0, Some(""), None, yes), None);
        assert_eq!(policy_from(0, Some("root"), None, yes), None);
        // a user that does not exist: a uid of its own, not root
        assert_eq!(policy_from(0, Some("ghost"), None, no), range);
        assert_eq!(
            policy_from(0, None, Some("5000-5009"), no),
            Some(Policy::Range {
                first: 5000,
                count: 10
            })
        );
        // a malformed range falls back to the default, never to root
        assert_eq!(policy_from(0, None, Some("0-10"), no), range);
        assert_eq!(policy_from(0, None, Some("nine"), no), range);
    }

    #[test]
    fn ranges_are_parsed_and_bounded() {
        assert_eq!(parse_range("100-199"), Ok((100, 100)));
        assert_eq!(parse_range(" 7-7 "), Ok((7, 1)));
        for bad in ["", "5", "0-9", "9-5", "a-b", "1-4294967295"] {
            assert!(parse_range(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_claim_gets_a_free_uid_and_stale_ones_are_taken_over() {
        let claims = tempfile::tempdir().unwrap();
        let mut idle = |_: u32| false;
        let take = |d: &str, busy: &mut dyn FnMut(u32) -> bool, users: &dyn Fn(u32) -> bool| {
            claim_in(claims.path(), Path::new(d), 500, 3, busy, users)
        };
        let a = take("/m/a", &mut idle, &|_| false).unwrap();
        let b = take("/m/b", &mut idle, &|_| false).unwrap();
        let c = take("/m/c", &mut idle, &|_| false).unwrap();
        let mut all = vec![a, b, c];
        all.sort();
        assert_eq!(all, [500, 501, 502], "three claims, three uids");
        // every uid claimed within the grace: none left, and the error says what to do
        let e = take("/m/d", &mut idle, &|_| false).unwrap_err();
        assert!(e.to_string().contains("every uid of 500-502"), "{e}");
        assert!(e.to_string().contains(RANGE_ENV), "{e}");
        // past the grace, a claim whose uid still runs a process stays; one whose uid runs
        // nothing is taken over; a uid that names a user is never handed out
        let old = std::time::SystemTime::now() - CLAIM_GRACE - Duration::from_secs(1);
        for u in [a, b, c] {
            let f = std::fs::File::options()
                .write(true)
                .open(claims.path().join(u.to_string()))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        let mut asked = Vec::new();
        let mut busy = |u: u32| {
            asked.push(u);
            u != b
        };
        let d = take("/m/d", &mut busy, &|u| u == c).unwrap();
        assert_eq!(d, b);
        assert!(
            !asked.contains(&c),
            "a user's uid was checked for processes"
        );
        assert_eq!(
            std::fs::read_to_string(claims.path().join(b.to_string())).unwrap(),
            "/m/d\n"
        );
        let e = take("/m/e", &mut |_| true, &|_| false).unwrap_err();
        assert!(e.to_string().contains("every uid"), "{e}");
    }

    #[test]
    fn the_processes_uids_are_seen() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(uids_in_use().contains(&me));
        assert!(user_of_uid(0));
        assert!(!user_of_uid(DEFAULT_FIRST + 12_345));
    }

    #[test]
    fn runas_arguments_drop_elevateprivileges_and_the_agent_retries() {
        let args: Vec<String> = [
            "-chardev",
            "socket,id=agent,path=/r/agent.sock,reconnect=1",
            "-chardev",
            "socket,id=fs0,path=/r/fs0.sock",
            "-sandbox",
            super::super::confine::SANDBOX,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = with_runas(args, &RunAs::Ids { uid: 7, gid: 7 });
        assert_eq!(
            out,
            [
                "-chardev",
                "socket,id=agent,path=/r/agent.sock",
                "-chardev",
                "socket,id=fs0,path=/r/fs0.sock",
                "-sandbox",
                "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
                "-runas",
                "7:7"
            ]
        );
    }

    #[test]
    fn users_are_looked_up() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-of-smol"), None);
    }
}
