//! PID 1 system setup: mounts, console, hostname, kernel modules.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::quiet;

/// Set by [`setup`] (PID 1 of a guest): only then may [`power_off`] reboot.
static IN_GUEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Settings read from the kernel command line (`smol.*` words).
#[derive(Debug, Default)]
pub struct Config {
    /// Machine name, used as the hostname.
    pub name: String,
    /// `agent` (default), `raw` (benchmark echo loop) or `boot-bench`.
    pub mode: String,
    /// A writable disk (virtio-blk serial `smol-disk`) becomes the upper layer of the root.
    pub disk: bool,
    /// Power off when the host stays away this long after a session (machines that must not
    /// outlive their process); `None`: wait for the host forever (detached machines).
    pub linger_ms: Option<u64>,
    /// virtio-fs shares to mount: (tag, guest path, read-only).
    pub mounts: Vec<(String, String, bool)>,
    /// A virtio-net device backed by passt: configure eth0 (10.0.2.15/24 via 10.0.2.2).
    pub net: bool,
    /// File system type of a read-only image (virtio-blk serial `smol-image`) that replaces
    /// the initramfs as the lower layer of the root.
    pub image: Option<String>,
    /// Test-only (`smol.protocol_max=N`): speak at most generation N, as an older agent would
    /// (the engine passes it only under `SMOL_TEST_AGENT_PROTOCOL_MAX`; VERSIONING.md).
    pub protocol_max: Option<u16>,
}

/// Mounts, creating the target; failures are logged (an API file system already mounted is
/// not one).
fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    if !quiet::logged(
        format_args!("creating {target}"),
        fs::create_dir_all(target),
    ) {
        return;
    }
    if let Err(e) = mount_checked(src, target, fstype, flags, data) {
        if !e.contains("busy") {
            eprintln!("smol-agent: {e}");
        }
    }
}

/// Points fds 0, 1, 2 at `/dev/console` (the kernel does so only if the node exists in the
/// initramfs).
fn attach_console() {
    let path = CString::new("/dev/console").expect("static path");
    // SAFETY: valid path pointer; flags are plain ints.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd >= 0 {
        for target in 0..3 {
            // SAFETY: fd is a valid open descriptor; dup2 onto the standard descriptors.
            unsafe { libc::dup2(fd, target) };
        }
        if fd > 2 {
            // SAFETY: fd is ours and no longer needed after dup2.
            unsafe { libc::close(fd) };
        }
    }
}

fn parse_cmdline(cmdline: &str) -> Config {
    let mut cfg = Config {
        name: "smol".into(),
        mode: "agent".into(),
        ..Default::default()
    };
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("smol.name=") {
            cfg.name = v.to_string();
        } else if let Some(v) = word.strip_prefix("smol.mode=") {
            cfg.mode = v.to_string();
        } else if word == "smol.disk=1" {
            cfg.disk = true;
        } else if word == "smol.net=1" {
            cfg.net = true;
        } else if let Some(v) = word.strip_prefix("smol.image=") {
            cfg.image = Some(v.to_string());
        } else if let Some(v) = word.strip_prefix("smol.linger_ms=") {
            cfg.linger_ms = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("smol.protocol_max=") {
            cfg.protocol_max = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("smol.mount=") {
            // tag:target[:ro]
            let mut parts = v.splitn(3, ':');
            if let (Some(tag), Some(target)) = (parts.next(), parts.next()) {
                cfg.mounts.push((
                    tag.to_string(),
                    target.to_string(),
                    parts.next() == Some("ro"),
                ));
            }
        }
    }
    cfg
}

/// Kernel release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Loads the modules listed in `/lib/modules/<release>/smol.order`, when the running kernel has
/// any (the Debian cloud kernel does; smol's own kernel has everything built in).
fn load_modules() {
    let dir = format!("/lib/modules/{}", kernel_release());
    let Ok(order) = fs::read_to_string(format!("{dir}/smol.order")) else {
        return;
    };
    for name in order.split_whitespace() {
        let path = format!("{dir}/{name}");
        let Ok(file) = fs::File::open(&path) else {
            eprintln!("smol-agent: module {path} missing");
            continue;
        };
        use std::os::fd::AsRawFd;
        let params = CString::new("").expect("static");
        // SAFETY: finit_module takes an open fd, a NUL-terminated parameter string and flags.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                eprintln!("smol-agent: loading {name}: {err}");
            }
        }
    }
}

/// Finds the block device whose virtio serial is `serial`, waiting up to 2 s for it to appear.
fn find_disk(serial: &str) -> Option<String> {
    for _ in 0..100 {
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if s.trim() == serial {
                    return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

fn chdir_chroot(dir: &str) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in path");
    let (dir_c, root_c, dot) = (c(dir), c("/"), c("."));
    // SAFETY: valid NUL-terminated paths; this is the switch_root sequence run by PID 1.
    unsafe {
        if libc::chdir(dir_c.as_ptr()) != 0
            || libc::mount(
                dot.as_ptr(),
                root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) != 0
            || libc::chroot(dot.as_ptr()) != 0
            || libc::chdir(root_c.as_ptr()) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the machine's disk the writable layer of `/`: an overlay whose lower layer is the
/// initramfs (fresh every boot) and whose upper layer lives on the disk (kept across boots).
fn root_on_disk(image: Option<&str>) -> Result<(), String> {
    let lower = match image {
        Some(fstype) => {
            let dev = find_disk("smol-image").ok_or("no disk with serial smol-image")?;
            fs::create_dir_all("/.smol/image").map_err(|e| e.to_string())?;
            mount_checked(&dev, "/.smol/image", fstype, libc::MS_RDONLY, "")?;
            "/.smol/image"
        }
        None => "/",
    };
    let dev = find_disk("smol-disk").ok_or("no disk with serial smol-disk")?;
    fs::create_dir_all("/.smol/disk").map_err(|e| e.to_string())?;
    // `discard`: blocks ext4 frees are discarded through virtio-blk, so the host's qcow2
    // (`discard=unmap`) gives the space back when the guest removes files.
    mount_checked(&dev, "/.smol/disk", "ext4", 0, "discard")?;
    for d in ["/.smol/disk/upper", "/.smol/disk/work", "/.smol/root"] {
        fs::create_dir_all(d).map_err(|e| format!("{d}: {e}"))?;
    }
    mount_checked(
        "overlay",
        "/.smol/root",
        "overlay",
        0,
        &format!("lowerdir={lower},upperdir=/.smol/disk/upper,workdir=/.smol/disk/work"),
    )?;
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("/.smol/root{m}");
        fs::create_dir_all(&target).map_err(|e| format!("{target}: {e}"))?;
        mount_checked(m, &target, "", libc::MS_MOVE, "")?;
    }
    chdir_chroot("/.smol/root").map_err(|e| format!("switching root: {e}"))
}

/// Mounts cgroup v2 on `target` (under `/sys`, after the root moved), for [`crate::cgroup`].
pub fn mount_cgroup2(target: &str) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("{target}: {e}"))?;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    match mount_checked("cgroup2", target, "cgroup2", nosuid_nodev_noexec, "") {
        Err(e) if !e.contains("busy") => Err(e),
        _ => Ok(()),
    }
}

fn mount_checked(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount argument");
    let (src_c, target_c, fstype_c, data_c) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                fstype_c.as_ptr()
            },
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {src} on {target}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Brings the loopback interface up (published ports connect to 127.0.0.1 in the guest).
fn loopback_up() {
    // SAFETY: a plain datagram socket used only for interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: fd is a socket and req a valid ifreq naming "lo"; the union field read is the one
    // SIOCGIFFLAGS wrote.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(fd);
    }
}

/// Configures eth0 for the host's passt (static: no DHCP round trips at boot).
fn network_up() {
    let steps: [&[&str]; 3] = [
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"],
        &["ip", "route", "add", "default", "via", "10.0.2.2"],
    ];
    for args in steps {
        match std::process::Command::new("/bin/busybox")
            .args(args)
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("smol-agent: {}: {other:?}", args.join(" ")),
        }
    }
}

/// The guest's memory-backed mounts: (target, mode, size in percent of RAM). Together they take
/// at most half of RAM (tested: filling all of them leaves the guest running).
pub const TMPFS: [(&str, &str, u32); 3] = [
    ("/tmp", "1777", 30),
    ("/dev/shm", "1777", 15),
    ("/run", "0755", 5),
];

/// Prepares the guest system. Called once, by PID 1.
pub fn setup() -> Config {
    IN_GUEST.store(true, std::sync::atomic::Ordering::Relaxed);
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    attach_console();
    mount("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, "");
    let cfg = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    load_modules();
    // Interfaces are kernel state: configure them while busybox (initramfs) is still the root.
    loopback_up();
    if cfg.net {
        network_up();
    }
    if cfg.disk {
        if let Err(e) = root_on_disk(cfg.image.as_deref()) {
            eprintln!("smol-agent: the machine disk is not usable ({e}); the root stays in memory");
        }
    }
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    // Each tmpfs would default to half of RAM: filled together they took 150 % of it and the
    // kernel panicked ("System is deadlocked on memory"). Capped at half of RAM in total, a full
    // /tmp or /dev/shm is ENOSPC and the other half stays for the kernel and the processes.
    for (target, mode, size) in TMPFS {
        mount(
            "tmpfs",
            target,
            "tmpfs",
            nosuid_nodev,
            &format!("mode={mode},size={size}%"),
        );
    }
    // User commands run in cgroups below the agent's (crate::cgroup).
    crate::cgroup::setup();
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            // The initramfs (or the disk, on a later boot) may have it already.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => quiet::warn(format_args!("linking {link} to {target}"), e),
        }
    }
    if quiet::logged("creating /root", fs::create_dir_all("/root")) {
        quiet::logged(
            "making /root private",
            fs::set_permissions("/root", fs::Permissions::from_mode(0o700)),
        );
    }
    let name = cfg.name.as_bytes();
    // SAFETY: pointer and length describe a valid byte slice.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    quiet::logged(
        "writing /etc/hostname",
        fs::write("/etc/hostname", format!("{}\n", cfg.name)),
    );
    std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
    if cfg.net {
        quiet::logged(
            "writing /etc/resolv.conf (the guest has no DNS)",
            fs::write("/etc/resolv.conf", "nameserver 10.0.2.3\n"),
        );
    }
    for (tag, target, ro) in &cfg.mounts {
        if !quiet::logged(
            format_args!("creating mount point {target} of {tag}"),
            fs::create_dir_all(target),
        ) {
            continue;
        }
        let flags = if *ro { libc::MS_RDONLY } else { 0 };
        if let Err(e) = mount_checked(tag, target, "virtiofs", flags, "") {
            eprintln!("smol-agent: {e}");
        }
    }
    cfg
}

/// Flushes file systems and ends the VM. With ACPI (cloud kernel) that is a power-off; without
/// it (smol's kernel, `acpi=off reboot=t`) a reboot, which QEMU's `-no-reboot` turns into an exit.
///
/// Only a guest's agent (PID 1 set the guest up, [`setup`]; the serving child forked from it
/// inherits that) ever reboots: an agent run as a host process (`smol-agent serve|connect`,
/// tests) that is asked to shut down exits instead, so a test can never power off the host it
/// runs on.
pub fn power_off() -> ! {
    if !IN_GUEST.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("smol-agent: not a guest's init: exiting instead of powering off");
        std::process::exit(0);
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let cmd = if std::path::Path::new("/sys/firmware/acpi").exists() {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: reboot only takes a command constant.
    unsafe { libc::reboot(cmd) };
    // Not reached unless we lack CAP_SYS_BOOT.
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_backed_mounts_take_at_most_half_of_ram_together() {
        let total: u32 = TMPFS.iter().map(|(_, _, pct)| pct).sum();
        assert!(total <= 50, "{total} % of RAM");
        assert!(TMPFS.iter().all(|(_, _, pct)| *pct > 0));
    }

    #[test]
    fn cmdline_words() {
        let c = parse_cmdline("console=ttyS0 smol.name=box-1 quiet smol.mode=raw");
        assert_eq!(c.name, "box-1");
        assert_eq!(c.mode, "raw");
        let c = parse_cmdline("console=ttyS0");
        assert_eq!(c.name, "smol");
        assert_eq!(c.mode, "agent");
        assert!(!c.disk);
        assert_eq!(c.linger_ms, None);
        assert_eq!(c.protocol_max, None);
        assert_eq!(parse_cmdline("smol.protocol_max=3").protocol_max, Some(3));
        assert_eq!(parse_cmdline("smol.protocol_max=x").protocol_max, None);
        let c = parse_cmdline(
            "smol.disk=1 smol.linger_ms=3000 smol.mount=m0:/work:ro smol.mount=m1:/data",
        );
        assert!(c.disk);
        assert_eq!(c.linger_ms, Some(3000));
        assert_eq!(
            c.mounts,
            vec![
                ("m0".into(), "/work".into(), true),
                ("m1".into(), "/data".into(), false)
            ]
        );
    }
}
