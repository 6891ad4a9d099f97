//! The tie between a machine that must not outlive its owner and that owner, without the
//! guest's help.
//!
//! The guest agent powers the VM off when its host goes away, but a guest that stopped or
//! wedged its agent (`kill -STOP`, a blocked event loop, a hung kernel) never does, and its VMM
//! would run until some later smol command happened to run the reaper. So every VM booted
//! without `detach` gets a watchdog: a tiny `/bin/sh` process in its own session whose stdin is
//! the read end of a pipe whose only writer is the machine's handle in the owner (close-on-exec,
//! so neither the VMM nor any other child holds it). When the owner dies, however it dies
//! (`kill -9` included), or drops the handle, the pipe reads EOF and the watchdog gives the guest
//! `grace` to power off by itself (the agent syncs and powers off after its linger time), then
//! sends the VMM SIGTERM (QEMU flushes its disks and exits), SIGKILL 3 s later, and SIGKILL to
//! the VM's helpers (passt, virtiofsd). Every process is named by pid *and* start time, checked
//! before each signal, so a recycled pid is never signalled.
//!
//! A shell rather than a fork of the owner: a forked copy of a large owner (a Python process)
//! would pin every page the owner changes after the fork; `sh` costs about a megabyte. While
//! the owner lives, the supervisor ends and reaps the watchdog as soon as the VMM exits.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::record::ProcId;

/// How long the VMM gets between SIGTERM and SIGKILL.
const TERM_WAIT_TENTHS: u64 = 30;

/// The watchdog program. Arguments: grace and TERM wait in tenths of a second, then `pid:start`
/// of the VMM and of each helper. Log lines go to stderr (`watchdog.log`).
const SCRIPT: &str = r#"
grace=$1 termwait=$2 vmm=$3
shift 3
# Blocks until EOF: the owner (the only writer of this pipe) is gone.
while read -r _; do :; done
# alive PID START: that process exists, is not a zombie, and started at START (not a recycled pid)
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    want=$2 line=
    { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
    set -- ${line##*) }
    [ "$1" != Z ] && [ "$1" != X ] && [ "${20}" = "$want" ]
}
# wait_gone PID START TENTHS: true once the process is gone, false after TENTHS tenths
wait_gone() {
    n=0
    while alive "$1" "$2"; do
        [ "$n" -ge "$3" ] && return 1
        sleep 0.1
        n=$((n + 1))
    done
}
pid=${vmm%%:*} start=${vmm#*:}
echo "smol watchdog: the owner of VMM $pid is gone; it has $((grace / 10)).$((grace % 10)) s to power off" >&2
if ! wait_gone "$pid" "$start" "$grace"; then
    echo "smol watchdog: VMM $pid still running: SIGTERM" >&2
    alive "$pid" "$start" && kill -TERM "$pid"
    if ! wait_gone "$pid" "$start" "$termwait"; then
        echo "smol watchdog: VMM $pid still running: SIGKILL" >&2
        alive "$pid" "$start" && kill -KILL "$pid"
    fi
fi
for h in "$@"; do
    if alive "${h%%:*}" "${h#*:}"; then
        echo "smol watchdog: helper ${h%%:*} still running: SIGKILL" >&2
        kill -KILL "${h%%:*}"
    fi
done
echo "smol watchdog: done" >&2
"#;

/// A running watchdog: the process (the supervisor ends and reaps it when the VMM exits) and
/// the write end of its pipe (held by the machine handle: dropping it is the owner going away).
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The watchdog process.
    pub process: Child,
    /// The owner's end of the tie.
    pub tie: OwnedFd,
}

/// A pipe whose both ends are close-on-exec: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn tenths(d: Duration) -> u64 {
    d.as_millis().div_ceil(100) as u64
}

/// Starts the watchdog of `vmm` and its `helpers`, logging to `log`.
pub(crate) fn start(
    vmm: ProcId,
    helpers: &[ProcId],
    grace: Duration,
    log: &Path,
) -> std::io::Result<Watchdog> {
    let (read, tie) = pipe()?;
    let log = std::fs::File::create(log)?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("smol-watchdog")
        .arg(tenths(grace).to_string())
        .arg(TERM_WAIT_TENTHS.to_string())
        .arg(format!("{}:{}", vmm.pid, vmm.start))
        .args(helpers.iter().map(|h| format!("{}:{}", h.pid, h.start)))
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; in its own
    // session the watchdog does not get the terminal's signals meant for the owner (Ctrl-C
    // must end the owner, and then the watchdog ends the VM).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let process = cmd.spawn()?;
    tracing::debug!(pid = process.id(), vmm = vmm.pid, "watchdog started");
    Ok(Watchdog { process, tie })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn spawn(script: &str) -> (Child, ProcId) {
        let c = Command::new("/bin/sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // wait until it runs the script (its start time is readable)
        let id = loop {
            if let Some(id) = ProcId::of(c.id()) {
                break id;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        (c, id)
    }

    /// Waits for `c` to exit, up to `limit`; its exit status.
    fn exited(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn the_owner_going_away_ends_a_vmm_that_ignores_it_then_its_helpers() {
        use std::os::unix::process::ExitStatusExt;
        let d = tempfile::tempdir().unwrap();
        // a "VMM" that ignores SIGTERM (a wedged one): only SIGKILL ends it
        let (mut vmm, vmm_id) = spawn("trap '' TERM; while :; do sleep 0.05; done");
        let (mut helper, helper_id) = spawn("exec sleep 60");
        let log = d.path().join("watchdog.log");
        let mut w = start(vmm_id, &[helper_id], Duration::from_millis(300), &log).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            vmm.try_wait().unwrap().is_none(),
            "nothing happens while the owner holds the tie"
        );
        let t0 = Instant::now();
        drop(w.tie);
        let s = exited(&mut vmm, Duration::from_secs(10)).expect("VMM still running");
        assert_eq!(s.signal(), Some(libc::SIGKILL), "{s:?}");
        // grace 0.3 s + TERM wait 3 s, then SIGKILL
        assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
        let s = exited(&mut helper, Duration::from_secs(5)).expect("helper still running");
        assert_eq!(s.signal(), Some(libc::SIGKILL), "{s:?}");
        assert!(exited(&mut w.process, Duration::from_secs(5)).is_some());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("SIGTERM") && text.contains("SIGKILL"),
            "{text}"
        );
    }

    #[test]
    fn a_vmm_that_powers_off_within_the_grace_gets_no_signal() {
        use std::os::unix::process::ExitStatusExt;
        let d = tempfile::tempdir().unwrap();
        // powers off by itself 1 s after the owner went away, well within its grace
        let (mut vmm, vmm_id) = spawn("trap 'exit 7' TERM; sleep 1; exit 0");
        let log = d.path().join("watchdog.log");
        let mut w = start(vmm_id, &[], Duration::from_secs(5), &log).unwrap();
        drop(w.tie);
        let s = exited(&mut vmm, Duration::from_secs(10)).expect("VMM still running");
        assert_eq!((s.code(), s.signal()), (Some(0), None), "{s:?}");
        assert!(exited(&mut w.process, Duration::from_secs(5)).is_some());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("SIGTERM"), "{text}");
    }

    #[test]
    fn a_recycled_pid_is_never_signalled() {
        let d = tempfile::tempdir().unwrap();
        let (mut other, id) = spawn("exec sleep 30");
        // the same pid with another start time: what a recycled pid looks like
        let stale = ProcId {
            pid: id.pid,
            start: id.start + 1,
        };
        let log = d.path().join("watchdog.log");
        let mut w = start(stale, &[stale], Duration::from_millis(100), &log).unwrap();
        drop(w.tie);
        assert!(exited(&mut w.process, Duration::from_secs(5)).is_some());
        assert!(
            other.try_wait().unwrap().is_none(),
            "an unrelated process was signalled"
        );
        crate::cleanup::kill_quietly(&mut other, "test process");
    }
}
