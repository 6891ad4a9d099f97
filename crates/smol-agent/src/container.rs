//! Containers of images inside a running machine: `Op::MountImage` attaches an image file to a
//! loop device and mounts it read-only (or mounts an image slot's device, `slot`); `Op::ExecIn` runs a command whose root is an overlay of a
//! fresh tmpfs over such a mount, in a mount namespace of its own (see [`Setup`]).

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;

use smol_protocol::mux::Stream;
use smol_protocol::{ErrorKind, Frame, RemoteError};
use tokio::sync::Mutex;

// <linux/loop.h>
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Where each container's private tmpfs (its writable layer and its root) is mounted, inside
/// the container's own mount namespace only.
const SCRATCH: &str = "/run/smol-container";

/// Serialises image mounts: two runs of the same image must not both attach it.
static MOUNTS: Mutex<()> = Mutex::const_new(());

fn is_mountpoint(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target)))
        .unwrap_or(false)
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Attaches `file` to a free loop device, read-only, cleared on unmount; returns its path and
/// an open descriptor of it. Keep that open until the device is mounted: with autoclear, the
/// last close of an unmounted loop device detaches it.
fn attach_loop(file: &std::fs::File) -> io::Result<(String, std::fs::File)> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    for _ in 0..16 {
        // SAFETY: ioctl without an argument on a descriptor we own.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = format!("/dev/loop{n}");
        let loopdev = std::fs::OpenOptions::new().read(true).open(&dev)?;
        // SAFETY: LoopConfig is plain old data; all-zero is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = file.as_raw_fd() as u32;
        cfg.info.flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `cfg` is, for the duration
        // of the call.
        let r = unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const _) };
        if r == 0 {
            return Ok((dev, loopdev));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        // another attach took this device between GET_FREE and CONFIGURE: take the next
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

fn mount_image_blocking(path: &str, fstype: &str, size: u64, target: &str) -> io::Result<()> {
    if is_mountpoint(target) {
        return Ok(());
    }
    if let Some(serial) = path.strip_prefix(crate::slot::PREFIX) {
        // an image slot: the device itself, no copy and no loop device
        let dev = crate::slot::resolve(serial, size)?;
        return mount_ro(&dev, target, fstype);
    }
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len != size {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{path} is {len} bytes, expected {size} (incomplete copy)"),
        ));
    }
    let (dev, _held_until_mounted) = attach_loop(&file)?;
    mount_ro(&dev, target, fstype)
}

/// Mounts block device `dev` read-only on `target` (made if missing).
fn mount_ro(dev: &str, target: &str, fstype: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (src, tgt, fs) = (cstr(dev)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: valid NUL-terminated strings for the duration of the call; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `Op::MountImage`.
pub async fn mount_image(
    stream: Stream,
    path: String,
    fstype: String,
    size: u64,
    target: String,
) -> Result<Frame, RemoteError> {
    for p in [&path, &target] {
        if !p.starts_with('/') {
            return Err(crate::serve::invalid(format!(
                "paths must be absolute, got {p:?}"
            )));
        }
    }
    let _one_at_a_time = MOUNTS.lock().await;
    let what = format!("mounting image {path} on {target}");
    tokio::task::spawn_blocking(move || mount_image_blocking(&path, &fstype, size, &target))
        .await
        .map_err(|e| RemoteError::new(ErrorKind::Io, e.to_string()))?
        .map_err(|e| RemoteError::from_io(&e, &what))?;
    Ok(Frame::Done { id: stream.id() })
}

/// The mount namespace of one container, prepared in the agent and applied in the child between
/// fork and exec ([`Setup::apply`] allocates nothing).
pub struct Setup {
    scratch: CString,
    upper: CString,
    work: CString,
    root: CString,
    overlay_opts: CString,
    proc_dir: CString,
    dev_dir: CString,
    tmp_dir: CString,
    dev: CString,
    workdir: CString,
    slash: CString,
    tmpfs: CString,
    overlay: CString,
    proc_fs: CString,
    mode_755: CString,
    mode_1777: CString,
}

/// `rootfs` joined with the absolute path `p` (lexically; the container sees `p`).
pub fn inside(rootfs: &str, p: &str) -> String {
    format!(
        "{}/{}",
        rootfs.trim_end_matches('/'),
        p.trim_start_matches('/')
    )
}

impl Setup {
    /// Prepares a container over the mounted image `rootfs`, starting in `workdir`.
    pub fn new(rootfs: &str, workdir: &str) -> io::Result<Setup> {
        std::fs::create_dir_all(SCRATCH)?;
        let s = |p: &str| cstr(p);
        let root = format!("{SCRATCH}/root");
        Ok(Setup {
            scratch: s(SCRATCH)?,
            upper: s(&format!("{SCRATCH}/upper"))?,
            work: s(&format!("{SCRATCH}/work"))?,
            overlay_opts: s(&format!(
                "lowerdir={rootfs},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work"
            ))?,
            proc_dir: s(&format!("{root}/proc"))?,
            dev_dir: s(&format!("{root}/dev"))?,
            tmp_dir: s(&format!("{root}/tmp"))?,
            root: s(&root)?,
            dev: s("/dev")?,
            workdir: s(workdir)?,
            slash: s("/")?,
            tmpfs: s("tmpfs")?,
            overlay: s("overlay")?,
            proc_fs: s("proc")?,
            mode_755: s("mode=0755")?,
            mode_1777: s("mode=1777")?,
        })
    }

    /// Enters the container: new mount and PID namespaces, private tmpfs, overlay root, `/dev`,
    /// `/tmp`, then a fork (the command becomes PID 1 of its namespace), its `/proc`, chroot,
    /// chdir. Runs in the forked child before exec.
    pub fn apply(&self) -> io::Result<()> {
        fn check(r: libc::c_int) -> io::Result<()> {
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        }
        fn mkdir(p: &CString, mode: libc::mode_t) -> io::Result<()> {
            // SAFETY: valid NUL-terminated path.
            if unsafe { libc::mkdir(p.as_ptr(), mode) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                Ok(())
            } else {
                Err(e)
            }
        }
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain syscalls on NUL-terminated strings owned by `self`, which outlives
        // them; the data arguments are strings or null.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID))?;
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.scratch.as_ptr(),
                self.tmpfs.as_ptr(),
                0,
                self.mode_755.as_ptr().cast(),
            ))?;
            for d in [&self.upper, &self.work, &self.root] {
                mkdir(d, 0o755)?;
            }
            check(libc::mount(
                self.overlay.as_ptr(),
                self.root.as_ptr(),
                self.overlay.as_ptr(),
                0,
                self.overlay_opts.as_ptr().cast(),
            ))?;
            mkdir(&self.proc_dir, 0o555)?;
            mkdir(&self.dev_dir, 0o755)?;
            check(libc::mount(
                self.dev.as_ptr(),
                self.dev_dir.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            mkdir(&self.tmp_dir, 0o1777)?;
            check(libc::mount(
                self.tmpfs.as_ptr(),
                self.tmp_dir.as_ptr(),
                self.tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                self.mode_1777.as_ptr().cast(),
            ))?;
            // The command runs as PID 1 of its own PID namespace (everything it leaves behind
            // dies with it), in a child of this process; this one only waits and passes its
            // status on. Same process group: a timeout or cancel kills both.
            match libc::fork() {
                -1 => return Err(io::Error::last_os_error()),
                0 => {}
                child => {
                    // Not ours to keep: the pipe std reports exec failures on (the command's
                    // copy closes on exec), so the agent learns of the exec at once.
                    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                    let mut status = 0;
                    while libc::waitpid(child, &mut status, 0) < 0 {
                        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                            libc::_exit(126);
                        }
                    }
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    };
                    libc::_exit(code);
                }
            }
            check(libc::mount(
                self.proc_fs.as_ptr(),
                self.proc_dir.as_ptr(),
                self.proc_fs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.workdir.as_ptr()))?;
        }
        Ok(())
    }
}

/// Maps an error of entering the container to the request's error.
pub fn setup_error(e: &io::Error) -> RemoteError {
    RemoteError::from_io(e, "entering the container")
}
