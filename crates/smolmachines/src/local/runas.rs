//! The uid drop of a VMM started as root (issue 14, docs/threat-model.md section 6).
//!
//! An engine running as root (the fleet, CI) starts QEMU with `-runas <user>`: QEMU opens
//! everything on its command line as root (`/dev/kvm`, the kernel and initramfs, the disk chain,
//! the RAM file, its sockets, the console log) and then drops to that user's uid and gid
//! before the guest runs. The user is `SMOL_VMM_USER`, else `smol` (a system user an operator
//! makes: `adduser --system --group --no-create-home smol`); where it does not exist, or
//! `SMOL_VMM_USER` is empty or `root`, nothing drops (today's behaviour). One user for every
//! VMM, not one per machine: QEMU 7.2's `-runas` takes a name only (a `uid:gid` per machine
//! needs QEMU 9, or a drop in the engine before exec with every file made reachable to it).
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
//! - Landlock, the cgroup, `oom_score_adj`, no core dumps and the closed descriptors stay as
//!   they are (`local::confine`).
//!
//! Not dropped yet: branchable machines, clones and restores ([`drops`]).

use std::ffi::CString;

/// The user a root engine's VMMs drop to (`-runas`); empty or `root`: no drop.
pub const USER_ENV: &str = "SMOL_VMM_USER";

/// The user when [`USER_ENV`] is unset, if it exists.
pub const DEFAULT_USER: &str = "smol";

/// The seccomp sandbox of a QEMU that drops with `-runas` (see the module's doc).
pub const SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

/// The user this process's VMMs drop to, if any: only as root, [`USER_ENV`] or
/// [`DEFAULT_USER`], and only a user that exists.
pub fn user() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    user_from(euid, std::env::var(USER_ENV).ok().as_deref(), |n| {
        uid_of(n).is_some()
    })
}

/// Whether a machine's VMM drops at all: not a branchable machine's (its RAM in a file), nor a
/// clone's or a restore's. After a branch or a checkpoint QEMU reopens its disk chain by name
/// (`cont` reactivates the block nodes a migration inactivated), which the dropped user may not
/// reach: "Could not open disk.qcow2: Permission denied" (seen with QEMU 7.2). Those VMMs stay
/// root, confined by seccomp, Landlock and the cgroup, until the disk chain is given to them.
pub fn drops(spec: &super::vmm::VmSpec) -> bool {
    spec.ram_file.is_none() && spec.restore.is_none()
}

/// [`user`] for an effective uid, the environment's value and a user lookup.
pub fn user_from(euid: u32, env: Option<&str>, exists: impl Fn(&str) -> bool) -> Option<String> {
    if euid != 0 {
        return None;
    }
    let name = env.unwrap_or(DEFAULT_USER).trim();
    if name.is_empty() || name == "root" {
        return None;
    }
    if exists(name) {
        Some(name.to_string())
    } else {
        if env.is_some() {
            tracing::warn!(
                user = name,
                "{USER_ENV} names no user of this host: the VMM stays root (make it: adduser \
                 --system --group --no-create-home {name})"
            );
        }
        None
    }
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

/// QEMU's arguments for a VMM that drops to `user`: the sandbox without
/// `elevateprivileges=deny`, the agent chardev without its retries, `-runas user`.
pub fn with_runas(args: Vec<String>, user: &str) -> Vec<String> {
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
    out.extend(["-runas".to_string(), user.to_string()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_drops_and_only_to_a_user_that_exists() {
        let yes = |_: &str| true;
        let no = |_: &str| false;
        assert_eq!(user_from(1000, None, yes), None);
        assert_eq!(user_from(0, None, yes).as_deref(), Some("smol"));
        assert_eq!(user_from(0, None, no), None);
        assert_eq!(user_from(0, Some("vmm"), yes).as_deref(), Some("vmm"));
        assert_eq!(user_from(0, Some(""), yes), None);
        assert_eq!(user_from(0, Some("root"), yes), None);
        assert_eq!(user_from(0, Some("ghost"), no), None);
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
        let out = with_runas(args, "smol");
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
                "smol"
            ]
        );
    }

    #[test]
    fn users_are_looked_up() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-of-smol"), None);
    }
}
