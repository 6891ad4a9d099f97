//! The virtio-serial port that carries the protocol, as a non-blocking tokio I/O object.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Finds `/dev/vportNpM` whose sysfs name is `name` (there is no udev to make a symlink).
pub fn find(name: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in entries.flatten() {
        let port_name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

/// Opens the port, waiting for the device to appear.
pub fn open(name: &str) -> File {
    let mut logged = false;
    loop {
        if let Some(path) = find(name) {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => return f,
                Err(e) if !logged => {
                    eprintln!("smol-agent: open {path}: {e}");
                    logged = true;
                }
                Err(_) => {}
            }
        } else if !logged {
            eprintln!("smol-agent: waiting for virtio port {name}");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the host side of the port is connected (no POLLHUP).
pub fn host_connected(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc >= 0 && p.revents & libc::POLLHUP == 0
}

/// A duplicate of the port fd registered with tokio. Dropping it closes only the duplicate, so
/// the port stays open (a virtio port can be opened only once) across host sessions.
pub struct PortIo {
    fd: AsyncFd<File>,
}

impl PortIo {
    /// Duplicates `fd` and registers the duplicate with the current runtime.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        // SAFETY: fd is a valid open descriptor owned by the caller; F_DUPFD_CLOEXEC returns a new
        // descriptor that we own from here on.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(dup) };
        // SAFETY: `file` owns its descriptor, which stays open and unchanged until the AsyncFd
        // (the file's only owner) is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }
}

impl AsRawFd for PortIo {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut total = 0;
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending if total > 0 => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            // Read straight into the uninitialized tail: a virtio port returns at most one 4 KiB
            // buffer per read, and zeroing the whole (frame-sized) tail each time would cost more
            // than the read. Keep reading while data is there, to hand the decoder big batches.
            // SAFETY: the bytes are only written by read(2) and marked initialized after it.
            let unfilled = unsafe { buf.unfilled_mut() };
            if unfilled.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let res = guard.try_io(|inner| {
                // SAFETY: the pointer and length describe writable memory owned by `buf`.
                let n = unsafe {
                    libc::read(
                        inner.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(0)) => return Poll::Ready(Ok(())),
                Ok(Ok(n)) => {
                    // SAFETY: read(2) initialized the first n bytes of the unfilled region.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    total += n;
                }
                // Hand over what was read first. The error is not lost: readiness stays set,
                // so the next call reads again and a lasting error is returned then.
                Ok(Err(_)) if total > 0 => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if total > 0 => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
