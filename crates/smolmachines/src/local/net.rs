//! Guest networking, off unless asked. With `network: true` a `passt` process (one per machine,
//! user-mode: no privileges, no host interfaces) gives the guest IPv4 egress and DNS forwarding.
//! `--no-map-gw` keeps the gateway address from being mapped to the host, so the guest never
//! reaches services on the host's loopback (QEMU's slirp maps 10.0.2.2 to it; TCG-NOTES §4).
//! QEMU does not talk to passt directly: the machine's egress filter (`local::egress`) relays
//! every frame and enforces the machine's policy (docs/NETWORK.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Guest address, gateway and DNS forwarder (the agent configures the first three).
pub const GUEST_ADDR: &str = "10.0.2.15";
/// Gateway seen by the guest.
pub const GATEWAY: &str = "10.0.2.2";
/// DNS forwarder seen by the guest.
pub const DNS: &str = "10.0.2.3";

/// The passt binary: `SMOL_PASST`, else `passt` from `PATH`.
pub fn passt() -> PathBuf {
    std::env::var_os("SMOL_PASST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("passt"))
}

/// The socket QEMU's `-netdev stream` connects to: the egress filter's. It lives in a
/// directory of its own: passt started as root switches to `nobody` before it binds, so that
/// directory belongs to nobody.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("net").join("passt.sock")
}

/// QEMU's own listening socket (`-netdev stream,server=on`), to which the egress filter
/// connects: beside the machine's other sockets, not in passt's directory (passt's uid owns
/// that one). QEMU accepts one connection at a time and the next once it ends, so the
/// filter of another process can take the link over ([`resume`]).
pub fn vm_socket(dir: &Path) -> PathBuf {
    dir.join("net-vm.sock")
}

/// The lock the process whose filter serves the machine's link holds (`flock`, exclusive),
/// for as long as that filter runs: a second process does not start another.
pub fn relay_lock(dir: &Path) -> PathBuf {
    dir.join("net-relay.lock")
}

/// The relay lock of `dir`, taken without waiting; `None` while another filter holds it.
fn try_relay_lock(dir: &Path) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let path = relay_lock(dir);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a descriptor owned by `f`; the lock goes with it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(Some(f))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(Error::io(format!("locking {}", path.display()), e))
        }
    }
}

/// passt's own socket, which only the egress filter connects to.
pub fn upstream_socket(dir: &Path) -> PathBuf {
    dir.join("net").join("passt-up.sock")
}

/// Makes the socket's directory, owned by the uid passt runs as: `uid` (a uid of its own,
/// `local::runas`), else nobody (65534), to which passt started as root switches by itself.
fn prepare_dir(sock: &Path, uid: Option<u32>) -> Result<()> {
    let d = sock.parent().expect("socket has a directory");
    std::fs::create_dir_all(d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", d.display()), e))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let uid = uid.unwrap_or(65534);
        std::os::unix::fs::chown(d, Some(uid), Some(uid))
            .map_err(|e| Error::io(format!("chown {}", d.display()), e))?;
    }
    Ok(())
}

/// passt's `--runas`: a uid of its own where the engine's VMMs get one (`local::runas`), so
/// that one machine's passt cannot signal or trace another's; else passt's own choice (nobody
/// when started as root).
fn passt_uid(dir: &Path) -> Option<u32> {
    match super::runas::claim(&dir.join("net"))? {
        super::runas::RunAs::Ids { uid, .. } => Some(uid),
        super::runas::RunAs::User(_) => None,
    }
}

/// The passt arguments (tested: they decide what the guest can reach).
pub fn args(sock: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-f",
        "-q",
        "-1",
        "-4",
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
    ]
    .map(String::from)
    .to_vec();
    a.extend([
        "-s".into(),
        sock.display().to_string(),
        "-a".into(),
        GUEST_ADDR.into(),
        "-n".into(),
        "24".into(),
        "-g".into(),
        GATEWAY.into(),
        // Queries to 10.0.2.3 go to the host's first resolver. No `-D`: with an explicit DNS
        // list passt (2023-03) skips /etc/resolv.conf and has nowhere to forward to. This is
        // the one way the guest reaches a host resolver, on port 53 only, also when that
        // resolver is on the host's loopback (systemd-resolved).
        "--dns-forward".into(),
        DNS.into(),
    ]);
    a
}

/// Starts passt for a machine, waits for its socket and starts the egress filter (`filter`)
/// between it and QEMU's listening socket ([`vm_socket`]), which the filter connects to once
/// QEMU is up. The machine's relay lock is taken (it is fresh: the machine is starting).
pub fn spawn(
    dir: &Path,
    binary: &Path,
    name: &str,
    filter: super::egress::Filter,
) -> Result<Child> {
    if super::egress::bypassed() {
        tracing::warn!(
            machine = name,
            "egress filter bypassed (egress::bypass_for_measurement): QEMU talks to passt directly"
        );
        return spawn_passt_at(dir, binary, &socket(dir));
    }
    // a socket of a previous boot would be connected to before QEMU listens again
    crate::cleanup::remove_if_present(&vm_socket(dir)).map_err(|e| {
        Error::io(
            format!("removing the stale socket {}", vm_socket(dir).display()),
            e,
        )
    })?;
    let Some(hold) = try_relay_lock(dir)? else {
        return Err(Error::io(
            format!("locking {}", relay_lock(dir).display()),
            std::io::Error::other("another process still relays this machine's network"),
        ));
    };
    start_filter(dir, binary, name, filter, hold).map(|(child, _)| child)
}

/// The link of a running networked machine whose filter ended with the process that started
/// it (a detached machine): a new passt and filter, connected to QEMU's socket, held by this
/// process. `None` when another process's filter still serves it, or QEMU has no socket (an
/// older machine, or one of the measurement bypass).
pub fn resume(
    dir: &Path,
    binary: &Path,
    name: &str,
    filter: super::egress::Filter,
) -> Result<Option<Child>> {
    let Some(hold) = free_link(dir)? else {
        tracing::debug!(
            machine = name,
            "no link to serve, or another process serves it"
        );
        return Ok(None);
    };
    tracing::info!(
        machine = name,
        "the network filter ended with its process: starting it again here"
    );
    start_filter(dir, binary, name, filter, hold).map(|(child, _)| Some(child))
}

/// Blocks while this process serves the link of a running networked machine: [`resume`],
/// then until the filter ends (QEMU gone, passt gone). `Ok(false)`: another process serves it.
/// For a process that keeps a detached machine's network alone (`smol machine create`).
pub fn hold(dir: &Path, binary: &Path, name: &str, filter: super::egress::Filter) -> Result<bool> {
    let Some(hold) = free_link(dir)? else {
        return Ok(false);
    };
    let (mut child, relay) = start_filter(dir, binary, name, filter, hold)?;
    if relay.join().is_err() {
        tracing::error!(machine = name, "the egress filter thread panicked");
    }
    crate::cleanup::kill_quietly(&mut child, "passt");
    Ok(true)
}

/// The relay lock of a running machine's link that no filter serves; `None` when QEMU has no
/// listening socket (an older machine, the measurement bypass) or another process holds it.
fn free_link(dir: &Path) -> Result<Option<std::fs::File>> {
    if super::egress::bypassed() || !vm_socket(dir).exists() {
        return Ok(None);
    }
    try_relay_lock(dir)
}

/// Connects to passt's socket, which exists from passt's `bind`, a moment before its
/// `listen`: a refused connection is tried again for up to 5 s.
fn connect_upstream(dir: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let t0 = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(upstream_socket(dir)) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => return r,
        }
    }
}

fn start_filter(
    dir: &Path,
    binary: &Path,
    name: &str,
    filter: super::egress::Filter,
    hold: std::fs::File,
) -> Result<(Child, std::thread::JoinHandle<()>)> {
    let mut child = spawn_passt(dir, binary)?;
    let relay = connect_upstream(dir)
        .and_then(|up| super::egress::relay::start_to_vm(name, vm_socket(dir), up, filter, hold));
    match relay {
        Ok(thread) => Ok((child, thread)),
        Err(e) => {
            crate::cleanup::kill_quietly(&mut child, "passt");
            Err(Error::io(
                format!(
                    "connecting the egress filter to passt ({})",
                    upstream_socket(dir).display()
                ),
                e,
            ))
        }
    }
}

fn spawn_passt(dir: &Path, binary: &Path) -> Result<Child> {
    spawn_passt_at(dir, binary, &upstream_socket(dir))
}

fn spawn_passt_at(dir: &Path, binary: &Path, sock: &Path) -> Result<Child> {
    let sock = sock.to_path_buf();
    let uid = passt_uid(dir);
    prepare_dir(&sock, uid)?;
    // A stale socket left in place would end the wait below at once, before passt listens.
    crate::cleanup::remove_if_present(&sock).map_err(|e| {
        Error::io(
            format!("removing the stale passt socket {}", sock.display()),
            e,
        )
    })?;
    let log_path = dir.join("passt.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io("passt log", e))?;
    let mut cmd = Command::new(binary);
    cmd.args(args(&sock));
    if let Some(uid) = uid {
        cmd.arg("--runas").arg(format!("{uid}:{uid}"));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; the helper gets its own session like the VMM.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let plan = super::confine::helper(dir);
    super::confine::warn_partial("passt", &plan);
    super::confine::apply(&mut cmd, plan);
    let fail = |reason: String| Error::NotSupported {
        message: format!("guest networking unavailable: {reason} (Debian: apt-get install passt)"),
    };
    let mut child = cmd.spawn().map_err(|e| {
        super::programs::spawn_error("passt", e, |e| {
            fail(format!("starting {}: {e}", binary.display()))
        })
    })?;
    let t0 = Instant::now();
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(format!(
                "passt exited ({status}): {}",
                super::vmm::tail(&log_path, 5)
            )));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            crate::cleanup::kill_quietly(&mut child, "passt");
            return Err(fail("passt did not start within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_never_the_host() {
        let a = args(Path::new("/run/m/net/passt.sock"));
        assert!(a.iter().any(|x| x == "--no-map-gw"));
        assert!(a.windows(2).any(|w| w == ["-t", "none"]));
        assert!(a.windows(2).any(|w| w == ["-u", "none"]));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-s" && w[1] == "/run/m/net/passt.sock"));
        // DNS is forwarded to the host's resolver; an explicit -D list would break that
        assert!(a.windows(2).any(|w| w == ["--dns-forward", DNS]));
        assert!(!a.iter().any(|x| x == "-D" || x == "--dns"));
    }

    #[test]
    fn a_stale_socket_that_cannot_be_removed_is_an_error_before_passt_starts() {
        let d = tempfile::tempdir().unwrap();
        // In the way of the socket: a directory with content (not removable as a file).
        // Left there, it would end the wait for the socket at once.
        let sock = upstream_socket(d.path());
        std::fs::create_dir_all(&sock).unwrap();
        std::fs::write(sock.join("x"), b"x").unwrap();
        match spawn_passt(d.path(), Path::new("/bin/true")) {
            Err(Error::Io { context, .. }) => {
                assert!(context.contains("stale passt socket"), "{context}");
                assert!(context.contains("passt-up.sock"), "{context}");
            }
            Err(other) => panic!("expected an I/O error naming the socket, got {other:?}"),
            Ok(mut child) => {
                crate::cleanup::kill_quietly(&mut child, "true");
                panic!("spawn returned a helper although its socket path was in the way");
            }
        }
        assert!(!d.path().join("passt.log").exists(), "nothing was started");
    }
}
