//! PID 1 system setup: mounts, console, hostname, kernel modules.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// Settings read from the kernel command line (`smol.*` words).
#[derive(Debug, Default)]
pub struct Config {
    /// Machine name, used as the hostname.
    pub name: String,
    /// `agent` (default), `raw` (benchmark echo loop) or `boot-bench`.
    pub mode: String,
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).expect("no NUL in mount argument");
    let (src_c, target_c, fstype_c, data_c) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("smol-agent: mount {fstype} on {target}: {err}");
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
    };
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("smol.name=") {
            cfg.name = v.to_string();
        } else if let Some(v) = word.strip_prefix("smol.mode=") {
            cfg.mode = v.to_string();
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

/// Prepares the guest system. Called once, by PID 1.
pub fn setup() -> Config {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    attach_console();
    mount("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, "");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777");
    mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777");
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755");
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    let _ = fs::create_dir_all("/root");
    let _ = fs::set_permissions("/root", fs::Permissions::from_mode(0o700));
    let cfg = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let name = cfg.name.as_bytes();
    // SAFETY: pointer and length describe a valid byte slice.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    let _ = fs::write("/etc/hostname", format!("{}\n", cfg.name));
    std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
    load_modules();
    cfg
}

/// Flushes file systems and ends the VM. With ACPI (cloud kernel) that is a power-off; without
/// it (smol's kernel, `acpi=off reboot=t`) a reboot, which QEMU's `-no-reboot` turns into an exit.
pub fn power_off() -> ! {
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
    fn cmdline_words() {
        let c = parse_cmdline("console=ttyS0 smol.name=box-1 quiet smol.mode=raw");
        assert_eq!(c.name, "box-1");
        assert_eq!(c.mode, "raw");
        let c = parse_cmdline("console=ttyS0");
        assert_eq!(c.name, "smol");
        assert_eq!(c.mode, "agent");
    }
}
