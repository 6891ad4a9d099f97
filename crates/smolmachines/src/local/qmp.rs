//! A minimal QMP (QEMU Machine Protocol) client: greeting, capabilities, commands.

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the socket.
    #[error("QMP connection closed")]
    Closed,
    /// A message was not what QMP sends.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
}

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &std::path::Path) -> Result<Self, QmpError> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Hands `fd` to QEMU under `name` (`getfd`, the descriptor sent with the command as
    /// `SCM_RIGHTS`), for a later `fd:<name>` migration: QEMU's seccomp sandbox
    /// (`spawn=deny`, `local::confine`) refuses the fork of an `exec:` migration.
    pub async fn send_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(|_| ())
    }

    /// Runs `command` with `fd` sent beside it (`SCM_RIGHTS`: `getfd`, `add-fd`) and returns
    /// its `return` value.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        args: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use std::os::fd::AsRawFd;
        let mut line = json!({ "execute": command, "arguments": args }).to_string();
        line.push('\n');
        let sock = self.writer.as_ref();
        loop {
            sock.writable().await?;
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(sock.as_raw_fd(), line.as_bytes(), fd.as_raw_fd())
            });
            match sent {
                Ok(n) if n == line.len() => break,
                Ok(n) => {
                    return Err(QmpError::Protocol(format!(
                        "{command}: sent {n} of {} bytes",
                        line.len()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.reply(command).await
    }

    /// Runs a command and returns its `return` value (events in between are skipped).
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        self.reply(command).await
    }

    /// The answer to `command` (events in between are skipped).
    async fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or_default().to_string(),
                    desc: e["desc"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }
}

/// One `sendmsg` of `bytes` with `fd` attached (`SCM_RIGHTS`).
fn send_with_fd(sock: i32, bytes: &[u8], fd: i32) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes, room for one header with one fd, so the
    // first header exists and its data has room for the fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
    }
    // SAFETY: msg is fully initialised and its buffers are alive; sock is an open socket.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
