//! Reading guest files: `Op::ReadFile` into one buffer of at most [`READ_FILE_LIMIT`] bytes,
//! and `Op::ReadFileStream` as chunks. Both give up when the agent sends nothing for
//! [`READ_IDLE_TIMEOUT`] (a file on a wedged file system, an agent that stopped), cancelling
//! the read in the guest.
//!
//! The limit is enforced here as well as in the agent: an agent of generation 1 or 2 reads any
//! path (`/dev/zero` for ever), so the host stops at `limit + 1` bytes whatever the agent does.

use std::time::Duration;

use smol_protocol::{Chan, Frame, Op};

#[cfg(doc)]
use smol_protocol::READ_FILE_LIMIT;
use tokio::sync::mpsc;

use super::{guard, AgentConn, AgentError};
use crate::error::Error;

/// How long a read may go without receiving anything from the agent before it fails with
/// [`Error::Timeout`] (the agent's own stall deadline per step is 60 s).
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a read failed: the agent (mapped like every agent error) or a limit of this host.
#[derive(Debug)]
pub enum ReadError {
    /// The agent or its channel failed.
    Agent(AgentError),
    /// A limit of the host: the size cap ([`Error::InvalidConfig`]) or the idle deadline
    /// ([`Error::Timeout`]).
    Host(Error),
}

impl From<AgentError> for ReadError {
    fn from(e: AgentError) -> Self {
        ReadError::Agent(e)
    }
}

impl From<smol_protocol::mux::Closed> for ReadError {
    fn from(e: smol_protocol::mux::Closed) -> Self {
        ReadError::Agent(AgentError::Closed(e))
    }
}

fn stalled(path: &str, idle: Duration) -> ReadError {
    tracing::warn!(path, ?idle, "guest file read stalled: cancelled");
    ReadError::Host(Error::Timeout {
        what: format!(
            "reading {path}: the guest sent nothing for {idle:?} (a stream such as /proc/kmsg, \
             or a wedged file system); the read was cancelled"
        ),
    })
}

impl AgentConn {
    /// Reads the guest's regular file `path` whole: at most `limit` bytes (a bigger file is an
    /// [`Error::InvalidConfig`] naming the limit; memory never holds more than `limit` bytes,
    /// even from an older agent that would send for ever), failing with [`Error::Timeout`]
    /// when nothing arrives for `idle`.
    pub async fn read_file(
        &self,
        path: &str,
        limit: u64,
        idle: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        let mut s = self
            .mux
            .open(Op::ReadFile {
                path: path.to_string(),
            })
            .map_err(AgentError::from)?;
        let mut g = guard(&s);
        let mut buf = Vec::new();
        loop {
            let frame = tokio::time::timeout(idle, s.rx.recv())
                .await
                .map_err(|_| stalled(path, idle))??;
            match frame {
                Frame::Data { data, .. } => {
                    if (buf.len() + data.len()) as u64 > limit {
                        // the guard cancels the read in the guest
                        return Err(ReadError::Host(Error::InvalidConfig {
                            message: format!(
                                "{path} has more than {limit} bytes, over the read limit of \
                                 {limit} bytes: read it with read_file_stream"
                            ),
                        }));
                    }
                    buf.extend_from_slice(&data);
                }
                other => {
                    g.done = true;
                    super::terminal(other)?;
                    return Ok(buf);
                }
            }
        }
    }

    /// Starts reading the guest's regular file `path` as a stream (`Op::ReadFileStream`,
    /// protocol generation 3): its chunks, then the end of the channel; an error (the agent's,
    /// or [`Error::Timeout`] after `idle` without a frame) is the last item. Dropping the
    /// receiver cancels the read in the guest.
    pub fn read_file_stream(
        &self,
        path: &str,
        idle: Duration,
    ) -> Result<mpsc::Receiver<Result<Vec<u8>, ReadError>>, AgentError> {
        let mut s = self.mux.open(Op::ReadFileStream {
            path: path.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(4);
        let path = path.to_string();
        tokio::spawn(async move {
            let mut g = guard(&s);
            loop {
                let item = match tokio::time::timeout(idle, s.rx.recv()).await {
                    Err(_) => Err(stalled(&path, idle)),
                    Ok(Err(closed)) => Err(closed.into()),
                    Ok(Ok(Frame::Data {
                        chan: Chan::File,
                        data,
                        ..
                    })) => Ok(Vec::from(data)),
                    Ok(Ok(Frame::Data { .. })) => continue,
                    Ok(Ok(other)) => {
                        g.done = true;
                        match super::terminal(other) {
                            Ok(()) => return, // the end: the channel closes
                            Err(e) => Err(e.into()),
                        }
                    }
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return; // the reader is gone (the guard cancels) or the error was the end
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    //! The host's deadline and cap against a real mux whose peer misbehaves (a wedged agent,
    //! an old agent streaming `/dev/zero`).
    use smol_protocol::mux::{Incoming, Mux};
    use smol_protocol::{Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

    use super::*;

    /// A host connection to an agent that answers each read with `answer`.
    async fn conn_to(answer: fn(smol_protocol::mux::Stream)) -> AgentConn {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (agent, mut incoming) = Mux::spawn(ar, aw);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: MIN_PROTOCOL_VERSION,
            session: None,
        };
        agent.send_hello(hello.clone()).unwrap();
        tokio::spawn(async move {
            let _agent = agent;
            while let Some(inc) = incoming.recv().await {
                if let Incoming::Open(s, _) = inc {
                    answer(s);
                }
            }
        });
        let (br, bw) = tokio::io::split(b);
        let (mux, mut host_in) = Mux::spawn(br, bw);
        mux.send_hello(hello.clone()).unwrap();
        assert!(matches!(host_in.recv().await, Some(Incoming::Hello(_))));
        tokio::spawn(async move { while host_in.recv().await.is_some() {} });
        AgentConn { mux, hello }
    }

    #[tokio::test]
    async fn a_read_the_agent_never_answers_times_out() {
        let conn = conn_to(|s| {
            tokio::spawn(async move {
                let mut s = s;
                // wedged: never answers; sees the host's cancel
                while let Ok(f) = s.rx.recv().await {
                    if matches!(f, Frame::Cancel { .. }) {
                        return;
                    }
                }
            });
        })
        .await;
        let start = std::time::Instant::now();
        let r = conn
            .read_file("/proc/kmsg", 1024, Duration::from_millis(300))
            .await;
        assert!(
            matches!(&r, Err(ReadError::Host(Error::Timeout { what })) if what.contains("/proc/kmsg")),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(3));
        let mut rx = conn
            .read_file_stream("/x", Duration::from_millis(300))
            .unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Err(ReadError::Host(Error::Timeout { .. })))
        ));
    }

    /// An old agent that sends `/dev/zero` for ever: the host stops at the cap.
    #[tokio::test]
    async fn an_endless_file_stops_at_the_cap() {
        let conn = conn_to(|s| {
            tokio::spawn(async move {
                let chunk = vec![0u8; 64 * 1024];
                while s.tx.send_data(Chan::File, &chunk).await.is_ok() {}
            });
        })
        .await;
        let r = conn
            .read_file("/dev/zero", 1 << 20, Duration::from_secs(5))
            .await;
        match r {
            Err(ReadError::Host(Error::InvalidConfig { message })) => {
                assert!(message.contains("read limit of 1048576 bytes"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
