//! Host side of the agent channel: accept the VM's connection, check the agent's hello, and run
//! operations as multiplexed streams.
//!
//! The host speaks every protocol generation of `smol-protocol` ([`Generations::CURRENT`]) and
//! settles on the agent's newest one if that is older than its own: a machine whose initramfs
//! (or restored checkpoint) carries an older agent keeps working, with the operations of its
//! generation; one that needs a newer generation fails with [`AgentError::NotSupported`]
//! before anything is sent. An agent older than [`MIN_PROTOCOL_VERSION`], or newer and unable
//! to go down to this host's generation, is refused at the hello ([`ConnectError`]).

use std::time::Duration;

use smol_protocol::mux::{Closed, Incoming, Mux, OpenError, Stream, StreamSender};
use smol_protocol::{
    Chan, ExecRequest, Frame, Generations, Hello, NotInGeneration, Op, RemoteError,
    VersionMismatch, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ExecEvent, MAX_BUFFERED_OUTPUT};
use crate::error::ErrorCode;

/// Errors of one agent operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The channel ended (VM exited, agent restarted, host closed it).
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The agent answered with an error.
    #[error("{0}")]
    Remote(RemoteError),
    /// The agent sent something the protocol does not allow here.
    #[error("unexpected frame from the agent: {0}")]
    Unexpected(String),
    /// The agent's protocol generation does not have this operation (or a field it uses);
    /// nothing was sent.
    #[error(
        "{} is not supported by this machine's agent (protocol generation {}; it needs \
         generation {} or newer): boot the machine with the current initramfs (make setup \
         installs it)",
        .0.feature,
        .0.generation,
        .0.needs
    )]
    NotSupported(NotInGeneration),
    /// The request does not fit in one protocol frame (argv and env together, encoded);
    /// nothing was sent and the connection is unaffected.
    #[error(
        "the request is {size} bytes encoded (argv, env and options), over the agent channel's \
         limit of {limit} bytes per request: pass large values through stdin or a file \
         (write_file) instead"
    )]
    TooLarge {
        /// The encoded size, in bytes.
        size: usize,
        /// The limit ([`smol_protocol::MAX_FRAME`]).
        limit: usize,
    },
}

impl From<OpenError> for AgentError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Closed(c) => AgentError::Closed(c),
            OpenError::NotInGeneration(n) => AgentError::NotSupported(n),
            OpenError::TooLarge { size, limit } => AgentError::TooLarge { size, limit },
        }
    }
}

/// Errors while waiting for the agent to come up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No connection or hello before the deadline.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// Accepting failed.
    #[error("accepting the agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// The channel ended before the hello.
    #[error("the agent channel closed before the hello")]
    Closed,
    /// The agent speaks only generations older than the oldest this host still speaks.
    #[error(
        "the agent speaks protocol generation {agent}, older than the oldest this host speaks \
         ({host}): rebuild the initramfs with this host's agent (make setup) and boot the \
         machine again"
    )]
    AgentTooOld {
        /// What the agent speaks.
        agent: Generations,
        /// What this host speaks.
        host: Generations,
    },
    /// The agent speaks only generations newer than the newest this host speaks.
    #[error(
        "the agent speaks protocol generation {agent} and cannot go down to {newest}, the \
         newest this host speaks ({host}): use the smol that built the initramfs, or rebuild \
         the initramfs with this one (make setup) and boot the machine again",
        newest = host.max
    )]
    AgentTooNew {
        /// What the agent speaks.
        agent: Generations,
        /// What this host speaks.
        host: Generations,
    },
}

impl ConnectError {
    /// The typed error of an agent that shares no protocol generation with this host (`None`
    /// for every other failure to connect).
    pub fn incompatible(&self, name: &str) -> Option<crate::Error> {
        match self {
            ConnectError::AgentTooOld { agent, host }
            | ConnectError::AgentTooNew { agent, host } => Some(crate::Error::AgentIncompatible {
                name: name.to_string(),
                agent: agent.to_string(),
                host: host.to_string(),
                reason: self.to_string(),
            }),
            ConnectError::Timeout(_) | ConnectError::Io(_) | ConnectError::Closed => None,
        }
    }
}

impl From<VersionMismatch> for ConnectError {
    fn from(m: VersionMismatch) -> Self {
        match m {
            VersionMismatch::PeerTooOld { peer, ours } => ConnectError::AgentTooOld {
                agent: peer,
                host: ours,
            },
            VersionMismatch::PeerTooNew { peer, ours } => ConnectError::AgentTooNew {
                agent: peer,
                host: ours,
            },
        }
    }
}

/// A finished buffered command, as the agent reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code.
    pub code: i32,
    /// True when the guest's timeout killed the command.
    pub timed_out: bool,
    /// stdout, at most [`MAX_BUFFERED_OUTPUT`] bytes.
    pub stdout: Vec<u8>,
    /// stderr, at most [`MAX_BUFFERED_OUTPUT`] bytes.
    pub stderr: Vec<u8>,
    /// stdout went past the cap: the rest was read and dropped.
    pub stdout_truncated: bool,
    /// stderr went past the cap.
    pub stderr_truncated: bool,
}

/// One output stream of a buffered command: kept up to the cap, then counted and dropped.
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    truncated: bool,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, data: &[u8]) {
        let room = MAX_BUFFERED_OUTPUT.saturating_sub(self.bytes.len());
        let keep = data.len().min(room);
        self.bytes.extend_from_slice(&data[..keep]);
        if keep < data.len() {
            self.truncated = true;
            self.dropped += (data.len() - keep) as u64;
        }
    }
}

/// A live connection to a guest agent.
#[derive(Debug, Clone)]
pub struct AgentConn {
    mux: Mux,
    /// The agent's hello.
    pub hello: Hello,
}

/// Sends `Cancel` for a stream dropped before its terminal frame (the agent then kills the
/// command or abandons the transfer).
struct CancelGuard {
    tx: StreamSender,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Frame::Cancel { id: self.tx.id() });
        }
    }
}

fn guard(stream: &Stream) -> CancelGuard {
    CancelGuard {
        tx: stream.tx.clone(),
        done: false,
    }
}

impl AgentConn {
    /// Accepts the VM's connection on `listener` and waits for a compatible hello.
    pub async fn accept(listener: &UnixListener, deadline: Duration) -> Result<Self, ConnectError> {
        tokio::time::timeout(deadline, async {
            loop {
                let (sock, _) = listener.accept().await?;
                tracing::trace!("agent channel accepted; saying hello");
                match Self::greet(sock).await {
                    // A connection that ends before the hello is a stale attempt (QEMU's own
                    // reconnect racing a chardev swap): wait for the next one.
                    Err(ConnectError::Closed) => continue,
                    other => return other,
                }
            }
        })
        .await
        .map_err(|_| ConnectError::Timeout(deadline))?
    }

    async fn greet(sock: tokio::net::UnixStream) -> Result<Self, ConnectError> {
        let (r, w) = sock.into_split();
        let (mux, mut incoming) = Mux::spawn(r, w);
        // Our hello first: an agent still in a session with a previous host takes it as the
        // start of a new session and answers with its own. Nothing else is sent until then.
        // A nonce for this session: the agent's answer echoes it. Anything read before that
        // answer belongs to an earlier session (a clone's channel carries what its source's
        // agent had in flight at the branch, hello included) and is skipped.
        let nonce = rand::random::<u64>().max(1);
        let ours = Hello {
            version: PROTOCOL_VERSION,
            software: env!("CARGO_PKG_VERSION").to_string(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: MIN_PROTOCOL_VERSION,
            session: Some(nonce),
        };
        if mux.send_hello(ours).is_err() {
            return Err(ConnectError::Closed);
        }
        let hello = loop {
            match incoming.recv().await {
                // `None`: an agent from before sessions had nonces, which answers any hello
                Some(Incoming::Hello(h)) if h.session.is_none_or(|s| s == nonce) => break h,
                Some(Incoming::Hello(h)) => {
                    tracing::debug!(
                        session = h.session,
                        "a hello of another session (an unasked one, or one in flight from an \
                         earlier session); waiting for the answer to ours"
                    );
                }
                Some(Incoming::Open(..)) => continue,
                None => return Err(ConnectError::Closed),
            }
        };
        // The mux settled the generation with this (its first) hello before handing it out.
        let negotiated = mux
            .negotiated()
            .unwrap_or_else(|| smol_protocol::negotiate(mux.speaks(), &hello));
        let generation = match negotiated {
            Ok(g) => g,
            Err(mismatch) => {
                mux.close("no protocol generation in common with the agent");
                return Err(mismatch.into());
            }
        };
        if generation < PROTOCOL_VERSION {
            tracing::info!(
                generation,
                agent = %hello.speaks(),
                agent_software = %hello.software,
                "the agent is older than the host: speaking its protocol generation"
            );
        } else {
            tracing::debug!(generation, "agent protocol generation");
        }
        // Keep draining the incoming queue so it never grows (the agent opens no streams).
        tokio::spawn(async move { while incoming.recv().await.is_some() {} });
        Ok(AgentConn { mux, hello })
    }

    /// The protocol generation spoken with the agent.
    pub fn generation(&self) -> u16 {
        self.mux.generation()
    }

    /// Ends the connection from the host side.
    pub fn close(&self, reason: &str) {
        self.mux.close(reason);
    }

    /// Whether `other` is this same connection (a clone of it).
    pub fn same(&self, other: &AgentConn) -> bool {
        self.mux.same(&other.mux)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.mux.is_closed()
    }

    /// Waits for the connection to end.
    pub async fn closed(&self) -> Closed {
        self.mux.closed().await
    }

    /// Round trip through the agent without side effects.
    pub async fn ping(&self) -> Result<(), AgentError> {
        let mut s = self.mux.open(Op::Ping)?;
        let mut g = guard(&s);
        let r = terminal(s.rx.recv().await?);
        g.done = true;
        r
    }

    /// Gives a cloned guest its own identity: hostname, and the kernel RNG reseeded with
    /// `seed` (generation 4; an older agent is `NotSupported`).
    pub async fn identity(&self, hostname: &str, seed: Vec<u8>) -> Result<(), AgentError> {
        let mut s = self.mux.open(Op::Identity {
            hostname: hostname.to_string(),
            seed,
        })?;
        let mut g = guard(&s);
        let r = terminal(s.rx.recv().await?);
        g.done = true;
        r
    }

    /// Asks the guest to flush and power off. No answer is expected.
    pub fn shutdown(&self) -> Result<(), AgentError> {
        let s = self.mux.open(Op::Shutdown)?;
        // The stream ends with the VM; forget it without cancelling.
        std::mem::forget(guard(&s));
        drop(s);
        Ok(())
    }

    /// Runs a command to completion, keeping at most [`MAX_BUFFERED_OUTPUT`] bytes of each
    /// stream.
    pub async fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecOutcome, AgentError> {
        self.exec_op(Op::Exec(req), stdin).await
    }

    /// [`AgentConn::exec`] of an `Op::Exec` or `Op::ExecIn`. Output past the cap of a stream
    /// is still read (so the command runs on, its pipe never fills) and dropped; the stream is
    /// marked truncated.
    pub async fn exec_op(&self, op: Op, stdin: Option<Vec<u8>>) -> Result<ExecOutcome, AgentError> {
        let mut s = self.mux.open(op)?;
        let mut g = guard(&s);
        if let Some(data) = stdin {
            s.tx.send_data(Chan::Stdin, &data).await?;
            s.tx.send_eof(Chan::Stdin)?;
        }
        let (mut out, mut err) = (Capped::default(), Capped::default());
        loop {
            match s.rx.recv().await? {
                Frame::Data {
                    chan: Chan::Stdout,
                    data,
                    ..
                } => out.push(&data),
                Frame::Data {
                    chan: Chan::Stderr,
                    data,
                    ..
                } => err.push(&data),
                Frame::Exit {
                    code, timed_out, ..
                } => {
                    g.done = true;
                    if out.truncated || err.truncated {
                        tracing::info!(
                            stdout_dropped = out.dropped,
                            stderr_dropped = err.dropped,
                            cap = MAX_BUFFERED_OUTPUT,
                            "buffered exec output truncated at the cap"
                        );
                    }
                    return Ok(ExecOutcome {
                        code,
                        timed_out,
                        stdout: out.bytes,
                        stderr: err.bytes,
                        stdout_truncated: out.truncated,
                        stderr_truncated: err.truncated,
                    });
                }
                Frame::Error { error, .. } => {
                    g.done = true;
                    return Err(AgentError::Remote(error));
                }
                _ => {}
            }
        }
    }

    /// Starts a command and returns its events as they come. Dropping the receiver (or sending
    /// on the kill channel) cancels the command. Past `deadline` (the command's timeout plus a
    /// grace, for a guest that cannot enforce it) the stream ends with a `TIMEOUT` error event
    /// and the command is cancelled.
    pub fn exec_stream(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
        deadline: Option<Duration>,
    ) -> Result<(mpsc::Receiver<ExecEvent>, oneshot::Sender<()>), AgentError> {
        self.exec_stream_op(Op::Exec(req), stdin, deadline)
    }

    /// [`AgentConn::exec_stream`] of an `Op::Exec` or `Op::ExecIn`.
    pub fn exec_stream_op(
        &self,
        op: Op,
        stdin: Option<Vec<u8>>,
        deadline: Option<Duration>,
    ) -> Result<(mpsc::Receiver<ExecEvent>, oneshot::Sender<()>), AgentError> {
        let mut s = self.mux.open(op)?;
        let (ev_tx, ev_rx) = mpsc::channel(16);
        let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut g = guard(&s);
            let expired = async move {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            if let Some(data) = stdin {
                if s.tx.send_data(Chan::Stdin, &data).await.is_err()
                    || s.tx.send_eof(Chan::Stdin).is_err()
                {
                    let ev = ExecEvent::Error {
                        code: ErrorCode::Interrupted,
                        message: "agent connection closed while sending stdin".into(),
                    };
                    if ev_tx.send(ev).await.is_err() {
                        tracing::debug!("exec stream dropped before its stdin error");
                    }
                    return;
                }
            }
            loop {
                let frame = tokio::select! {
                    f = s.rx.recv() => f,
                    _ = &mut kill_rx => return, // the guard cancels the command
                    _ = &mut expired => {
                        // the guard cancels the command
                        let message = format!(
                            "the command did not end within {:?} (its timeout and a grace): \
                             the guest did not answer",
                            deadline.unwrap_or_default()
                        );
                        tracing::warn!(%message, "exec stream deadline");
                        let ev = ExecEvent::Error { code: ErrorCode::Timeout, message };
                        if ev_tx.send(ev).await.is_err() {
                            tracing::debug!("exec stream dropped before its deadline error");
                        }
                        return;
                    }
                };
                let (event, last) = match frame {
                    Ok(Frame::Data {
                        chan: Chan::Stdout,
                        data,
                        ..
                    }) => (ExecEvent::Stdout(Vec::from(data)), false),
                    Ok(Frame::Data {
                        chan: Chan::Stderr,
                        data,
                        ..
                    }) => (ExecEvent::Stderr(Vec::from(data)), false),
                    Ok(Frame::Exit { code, .. }) => (ExecEvent::Exit(code), true),
                    Ok(Frame::Error { error, .. }) => {
                        (ExecEvent::error(&crate::Error::from_remote(error)), true)
                    }
                    Ok(_) => continue,
                    Err(closed) => (
                        ExecEvent::Error {
                            code: ErrorCode::Interrupted,
                            message: closed.to_string(),
                        },
                        true,
                    ),
                };
                if last {
                    g.done = true;
                }
                let sent = tokio::select! {
                    r = ev_tx.send(event) => r.is_ok(),
                    _ = &mut kill_rx => false,
                };
                if !sent || last {
                    return;
                }
            }
        });
        Ok((ev_rx, kill_tx))
    }

    /// Writes `data` to `path` in the guest.
    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        let mut s = self.mux.open(Op::WriteFile {
            path: path.to_string(),
            mode,
        })?;
        let mut g = guard(&s);
        let tx = s.tx.clone();
        let send = async move {
            tx.send_data(Chan::File, data).await?;
            tx.send_eof(Chan::File)?;
            Ok::<(), AgentError>(())
        };
        // The agent may refuse early (a directory, a full disk): stop sending then.
        let early = tokio::select! {
            r = send => { r?; None }
            f = s.rx.recv() => Some(f?),
        };
        let frame = match early {
            Some(f) => f,
            None => s.rx.recv().await?,
        };
        g.done = true;
        terminal(frame)
    }

    /// Mounts the guest image file `path` (`size` bytes, `fstype`) read-only on `target`.
    pub async fn mount_image(
        &self,
        path: &str,
        fstype: &str,
        size: u64,
        target: &str,
    ) -> Result<(), AgentError> {
        let mut s = self.mux.open(Op::MountImage {
            path: path.to_string(),
            fstype: fstype.to_string(),
            size,
            target: target.to_string(),
        })?;
        let mut g = guard(&s);
        let r = terminal(s.rx.recv().await?);
        g.done = true;
        r
    }
}

impl AgentConn {
    /// Whether something in the guest accepts connections on `127.0.0.1:port`: a connect
    /// through the agent, cancelled at once. This tree's agent answers an empty data frame once
    /// connected and an error when refused; an older agent sends nothing on success, so a
    /// connect not refused within `wait` counts as accepted.
    pub async fn port_listens(&self, port: u16, wait: Duration) -> Result<bool, AgentError> {
        let mut s = self.mux.open(Op::Connect { port })?;
        let mut g = guard(&s);
        match tokio::time::timeout(wait, s.rx.recv()).await {
            Err(_) => Ok(true),
            Ok(Ok(Frame::Error { .. })) => {
                g.done = true;
                Ok(false)
            }
            Ok(Ok(Frame::Done { .. })) => {
                g.done = true;
                Ok(true)
            }
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Relays a host TCP connection to `127.0.0.1:port` in the guest until both sides close.
    pub async fn relay(&self, sock: tokio::net::TcpStream, port: u16) -> Result<(), AgentError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = self.mux.open(Op::Connect { port })?;
        let mut g = guard(&s);
        let _ = sock.set_nodelay(true);
        let (mut r, mut w) = sock.into_split();
        let tx = s.tx.clone();
        let up = tokio::spawn(async move {
            loop {
                let mut buf = Vec::with_capacity(64 * 1024);
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send_eof(Chan::Stdin);
                        return;
                    }
                    Ok(_) => {
                        if tx.send_owned(Chan::Stdin, buf).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let result = loop {
            match s.rx.recv().await {
                Ok(Frame::Data { data, .. }) => {
                    if w.write_all(&data).await.is_err() {
                        break Ok(()); // the host client went away; the guard cancels
                    }
                }
                Ok(Frame::Eof { .. }) => {
                    let _ = w.shutdown().await;
                }
                Ok(Frame::Done { .. }) => {
                    g.done = true;
                    break Ok(());
                }
                Ok(Frame::Error { error, .. }) => {
                    g.done = true;
                    break Err(AgentError::Remote(error));
                }
                Ok(_) => {}
                Err(e) => break Err(AgentError::Closed(e)),
            }
        };
        up.abort();
        result
    }
}

fn terminal(frame: Frame) -> Result<(), AgentError> {
    match frame {
        Frame::Done { .. } => Ok(()),
        Frame::Error { error, .. } => Err(AgentError::Remote(error)),
        other => Err(AgentError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod generation_tests;
mod read;
mod write;

pub use read::{ReadError, READ_IDLE_TIMEOUT};
pub use write::WriteError;
