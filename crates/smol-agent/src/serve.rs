//! Protocol sessions: one per host connection, many concurrent operations per session.

use std::os::fd::AsRawFd;
use std::time::Duration;

use smol_protocol::mux::{Incoming, Mux, Stream};
use smol_protocol::{ErrorKind, Frame, Hello, Op, RemoteError, PORT_NAME, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::init::Config;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Serves the virtio-serial port forever, one session per host connection.
pub fn serve_port(_cfg: &Config) -> ! {
    let port = crate::port::open(PORT_NAME);
    let fd = port.as_raw_fd();
    let rt = runtime();
    rt.block_on(async move {
        loop {
            while !crate::port::host_connected(fd) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            match crate::port::PortIo::new(fd) {
                Ok(io) => {
                    let (r, w) = tokio::io::split(io);
                    session(r, w).await;
                }
                Err(e) => {
                    eprintln!("smol-agent: port: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Serves one session per connection on a unix socket (the agent outside a VM, for tests).
pub fn serve_unix(path: &str) {
    let _ = std::fs::remove_file(path);
    let rt = runtime();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(path).expect("bind agent socket");
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (r, w) = sock.into_split();
            tokio::spawn(session(r, w));
        }
    });
}

/// Runs one session until the host goes away. Operations still running are cancelled.
pub async fn session<R, W>(reader: R, writer: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (mux, mut incoming) = Mux::spawn(reader, writer);
    let _ = mux.send_hello(Hello {
        version: PROTOCOL_VERSION,
        software: env!("CARGO_PKG_VERSION").to_string(),
        kernel: crate::init::kernel_release(),
        uptime_ms: uptime_ms(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            inc = incoming.recv() => match inc {
                Some(Incoming::Open(stream, op)) => { tasks.spawn(handle(stream, op)); }
                Some(Incoming::Hello(h)) => {
                    if !smol_protocol::compatible(h.version) {
                        eprintln!("smol-agent: host speaks protocol {}, agent {}", h.version, PROTOCOL_VERSION);
                    }
                }
                None => break,
            },
            _ = mux.closed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // Dropping the set aborts the handlers; exec handlers kill their process groups on drop.
    drop(tasks);
}

async fn handle(stream: Stream, op: Op) {
    let id = stream.id();
    let tx = stream.tx.clone();
    let result = match op {
        Op::Exec(req) => crate::exec::run(stream, req).await,
        Op::WriteFile { path, mode } => crate::files::write(stream, &path, mode).await,
        Op::ReadFile { path } => crate::files::read(stream, &path).await,
        Op::Ping => Ok(Frame::Done { id }),
        Op::Shutdown => {
            eprintln!("smol-agent: shutdown requested");
            tokio::task::spawn_blocking(|| crate::init::power_off());
            return;
        }
    };
    let frame = result.unwrap_or_else(|error| Frame::Error { id, error });
    let _ = tx.send(frame);
}

/// Error for a request that is malformed.
pub fn invalid(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidInput, msg)
}
