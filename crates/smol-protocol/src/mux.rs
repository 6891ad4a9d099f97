//! A multiplexed connection: many streams over one frame channel, with per-stream credit-based
//! flow control.
//!
//! Both the host and the agent run the same [`Mux`]. The host opens streams ([`Mux::open`]); the
//! agent receives them as [`Incoming::Open`]. A sender may have at most [`STREAM_WINDOW`] bytes of
//! `Data` in flight on a stream; the receiver hands credit back as its consumer pulls frames
//! ([`StreamReceiver::recv`]), so a slow consumer slows the producer instead of growing memory.
//!
//! Why not yamux or h2: every operation needs typed events (stdout, stderr, exit, error) rather
//! than one opaque byte pipe, and under TCG each frame costs guest CPU, so the frame layout is kept
//! to one postcard header plus large chunks. Framing and serialization are tokio-util and postcard.
//!
//! Each mux speaks a range of protocol generations ([`MuxConfig::speaks`]). The first hello it
//! reads from the peer settles the generation of the connection ([`crate::negotiate`]): from then
//! on every frame is written and read the way that generation does, and [`Mux::open`] refuses an
//! operation the generation does not have ([`OpenError::NotInGeneration`]) instead of sending
//! it. Until then (and when the hellos have no generation in common, [`Mux::negotiated`]) the
//! mux speaks the newest generation of its range.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::codec::{Encoder, FramedRead};

use crate::codec::{encode_data_header, FrameCodec};
use crate::generation::{self, Generations, NotInGeneration, VersionMismatch};
use crate::{Chan, ErrorKind, Frame, Hello, Op, RemoteError, MAX_CHUNK, MAX_FRAME, STREAM_WINDOW};

/// The connection is gone (peer closed, I/O error or malformed frame).
#[derive(Debug, Clone, thiserror::Error)]
#[error("agent connection closed: {reason}")]
pub struct Closed {
    /// Why the connection ended, as far as this side knows.
    pub reason: String,
}

/// The `Goodbye` reason of an agent that PID 1 started again after the previous one died: the
/// host's session with the dead agent is over (its operations fail at once) and the host
/// connects to the new agent.
pub const AGENT_RESTARTED: &str =
    "the guest agent restarted (its previous process was killed or crashed)";

impl Closed {
    /// Whether the peer ended the connection because the guest agent restarted
    /// ([`AGENT_RESTARTED`]).
    pub fn agent_restarted(&self) -> bool {
        self.reason.contains(AGENT_RESTARTED)
    }
}

/// Why [`Mux::open`] did not open a stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The connection is gone.
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The generation spoken with the peer does not have this operation (or a field it uses):
    /// nothing was sent.
    #[error(transparent)]
    NotInGeneration(#[from] NotInGeneration),
    /// The operation encodes to a frame larger than the peer accepts ([`MAX_FRAME`]): nothing
    /// was sent and the connection is unaffected. Such a frame on the wire would end the
    /// connection (the peer's codec refuses it).
    #[error("the request encodes to {size} bytes, over the protocol's limit of {limit} bytes")]
    TooLarge {
        /// The encoded size of the `Open` frame, in bytes.
        size: usize,
        /// The largest frame the peer accepts ([`MAX_FRAME`]).
        limit: usize,
    },
}

/// How a [`Mux`] talks to its peer.
#[derive(Debug, Clone, Default)]
pub struct MuxConfig {
    /// The protocol generations this side speaks ([`Generations::CURRENT`] by default).
    pub speaks: Generations,
    /// The peer's hello when another reader took it already (the agent's next session after a
    /// host said hello to the previous one): the generation is negotiated at once.
    pub peer_hello: Option<Hello>,
}

/// Something the peer started.
#[derive(Debug)]
pub enum Incoming {
    /// The peer's hello.
    Hello(Hello),
    /// A stream opened by the peer (agent side).
    Open(Stream, Op),
}

struct Route {
    tx: mpsc::UnboundedSender<Frame>,
    credit: Arc<Semaphore>,
    /// Data bytes received on this stream and not handed back as credit yet: a peer that
    /// honours flow control never has more than [`STREAM_WINDOW`] of them.
    unacked: Arc<AtomicU32>,
}

struct Shared {
    out: mpsc::UnboundedSender<Frame>,
    /// The reader and writer tasks (for [`Mux::finish`]).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    routes: Mutex<HashMap<u32, Route>>,
    next_id: AtomicU32,
    closed: watch::Sender<Option<String>>,
    /// What this side speaks.
    speaks: Generations,
    /// The generation both codecs use now: `speaks.max` until negotiated.
    generation: Arc<AtomicU16>,
    /// The outcome of the negotiation with the peer's first hello.
    negotiation: OnceLock<Result<u16, VersionMismatch>>,
}

impl Shared {
    fn generation(&self) -> u16 {
        self.generation.load(Ordering::Acquire)
    }

    /// Settles the generation with the peer's first hello; later hellos change nothing.
    fn negotiate(&self, hello: &Hello) -> &Result<u16, VersionMismatch> {
        self.negotiation.get_or_init(|| {
            let outcome = generation::negotiate(self.speaks, hello);
            match &outcome {
                Ok(g) => {
                    self.generation.store(*g, Ordering::Release);
                    tracing::debug!(
                        generation = g,
                        peer = %hello.speaks(),
                        ours = %self.speaks,
                        "protocol generation negotiated"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "no protocol generation in common"),
            }
            outcome
        })
    }

    /// A frame the generation cannot carry is not written: an `Open` fails its own stream at
    /// once (the mux refuses those earlier, but one opened before the hellos may get here), any
    /// other is dropped with a log line (a `Goodbye` to a generation-1 peer: the connection
    /// closes all the same).
    fn refuse(&self, frame: Frame, why: NotInGeneration) {
        match frame {
            Frame::Open { id, .. } => {
                let error = RemoteError::new(ErrorKind::Unsupported, why.to_string());
                if let Some(r) = self.routes.lock().expect("routes lock").get(&id) {
                    if r.tx.send(Frame::Error { id, error }).is_err() {
                        tracing::debug!(id, "stream refused by generation was already dropped");
                    }
                }
            }
            Frame::Goodbye { reason } => {
                tracing::debug!(%reason, %why, "goodbye not sent to this peer's generation")
            }
            other => tracing::warn!(frame = ?other, %why, "frame not sent"),
        }
    }

    /// A frame that could not be encoded (over [`MAX_FRAME`]) is not written: an `Open` fails
    /// its own stream, another frame of a stream is replaced by an `Error` for the peer, so
    /// neither side waits for an answer that will not come; the connection stays up.
    fn unsendable(
        &self,
        id: Option<u32>,
        open: bool,
        why: &str,
        codec: &mut FrameCodec,
        buf: &mut BytesMut,
    ) {
        tracing::warn!(id, error = why, "frame not sent: it does not encode");
        let Some(id) = id else { return };
        let error = RemoteError::new(ErrorKind::Io, format!("a frame was not sent: {why}"));
        if open {
            if let Some(r) = self.routes.lock().expect("routes lock").get(&id) {
                if r.tx.send(Frame::Error { id, error }).is_err() {
                    tracing::debug!(id, "unsendable stream was already dropped");
                }
            }
        } else if let Err(e) = codec.encode(Frame::Error { id, error }, buf) {
            tracing::warn!(id, error = %e, "error frame not sent either");
        }
    }

    /// Queues a `Goodbye` telling the peer why this side ends the connection.
    fn goodbye(&self, reason: &str) {
        let frame = Frame::Goodbye {
            reason: reason.to_string(),
        };
        if self.out.send(frame).is_err() {
            tracing::debug!("writer gone; no goodbye sent");
        }
    }

    fn close(&self, reason: String) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(reason);
                true
            } else {
                false
            }
        });
        let routes: Vec<Route> = self
            .routes
            .lock()
            .expect("routes lock")
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in routes {
            r.credit.close();
        }
    }

    fn closed_error(&self) -> Closed {
        Closed {
            reason: self
                .closed
                .borrow()
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        }
    }

    fn register(self: &Arc<Self>, id: u32) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        let unacked = Arc::new(AtomicU32::new(0));
        let route = Route {
            tx,
            credit: credit.clone(),
            unacked: unacked.clone(),
        };
        if self.closed.borrow().is_some() {
            credit.close();
        } else {
            self.routes.lock().expect("routes lock").insert(id, route);
        }
        Stream {
            tx: StreamSender {
                id,
                shared: self.clone(),
                credit,
            },
            rx: StreamReceiver {
                id,
                shared: self.clone(),
                rx,
                consumed: 0,
                unacked,
            },
        }
    }
}

/// Handle to a running multiplexed connection. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("closed", &self.shared.closed.borrow().is_some())
            .finish()
    }
}

impl Mux {
    /// Starts the reader and writer tasks on the current tokio runtime, speaking every
    /// generation of this crate. Returns the handle and the receiver of what the peer starts.
    pub fn spawn<R, W>(reader: R, writer: W) -> (Mux, mpsc::UnboundedReceiver<Incoming>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::spawn_with(reader, writer, MuxConfig::default())
    }

    /// [`Mux::spawn`] with a configuration.
    pub fn spawn_with<R, W>(
        reader: R,
        writer: W,
        config: MuxConfig,
    ) -> (Mux, mpsc::UnboundedReceiver<Incoming>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            out: out_tx,
            tasks: Mutex::new(Vec::new()),
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed,
            speaks: config.speaks,
            generation: Arc::new(AtomicU16::new(config.speaks.max)),
            negotiation: OnceLock::new(),
        });
        if let Some(hello) = &config.peer_hello {
            // Before the reader starts: the next frame it reads is in the agreed generation.
            shared.negotiate(hello);
        }
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(write_loop(shared.clone(), writer, out_rx)),
            tokio::spawn(read_loop(shared.clone(), reader, in_tx)),
        ];
        *shared.tasks.lock().expect("tasks lock") = tasks;
        (Mux { shared }, in_rx)
    }

    /// Sends this side's hello.
    pub fn send_hello(&self, hello: Hello) -> Result<(), Closed> {
        self.send(Frame::Hello(hello))
    }

    /// Opens a stream for `op` (host side). An operation the generation spoken with the peer
    /// does not have is refused here ([`OpenError::NotInGeneration`]) and nothing is sent.
    pub fn open(&self, op: Op) -> Result<Stream, OpenError> {
        if self.is_closed() {
            return Err(self.shared.closed_error().into());
        }
        let feature = op.feature();
        let generation = self.generation();
        if feature.since > generation {
            return Err(OpenError::NotInGeneration(NotInGeneration {
                feature: feature.name,
                needs: feature.since,
                generation,
            }));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::Open { id, op };
        // A frame over the peer's limit would end the connection at the peer's codec (and with
        // it every other operation): refuse it here, before anything is sent.
        let size = encoded_len(&frame, generation);
        if size > MAX_FRAME {
            return Err(OpenError::TooLarge {
                size,
                limit: MAX_FRAME,
            });
        }
        let stream = self.shared.register(id);
        self.send(frame)?;
        Ok(stream)
    }

    /// The generation frames are written and read in now: the negotiated one, or the newest
    /// this side speaks before the peer's hello (or when the hellos had none in common).
    pub fn generation(&self) -> u16 {
        self.shared.generation()
    }

    /// The generations this side speaks.
    pub fn speaks(&self) -> Generations {
        self.shared.speaks
    }

    /// The outcome of the negotiation, once the peer's first hello arrived (it is settled
    /// before that hello is handed out as [`Incoming::Hello`]).
    pub fn negotiated(&self) -> Option<Result<u16, VersionMismatch>> {
        self.shared.negotiation.get().cloned()
    }

    fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.shared
            .out
            .send(frame)
            .map_err(|_| self.shared.closed_error())
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Waits until the connection ends; returns why.
    pub async fn closed(&self) -> Closed {
        let mut rx = self.shared.closed.subscribe();
        // wait_for only fails if the sender is gone, which cannot happen while `self` lives.
        if rx.wait_for(|c| c.is_some()).await.is_err() {
            tracing::debug!("close watch dropped");
        }
        self.shared.closed_error()
    }

    /// Ends the connection from this side: pending and future operations fail with [`Closed`].
    pub fn close(&self, reason: &str) {
        self.shared.close(reason.to_string());
    }

    /// Closes the connection and waits until its reader has stopped and its writer has written
    /// what was queued before the close, for at most `within`; a task still running then is
    /// aborted (false). Afterwards nothing of this mux touches the reader or the writer again,
    /// so a successor on the same channel has it to itself.
    pub async fn finish(&self, within: Duration) -> bool {
        self.close("finished");
        let tasks = std::mem::take(&mut *self.shared.tasks.lock().expect("tasks lock"));
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = async {
            for t in tasks {
                if let Err(e) = t.await {
                    tracing::debug!(error = %e, "mux task ended abnormally");
                }
            }
        };
        if tokio::time::timeout(within, all).await.is_ok() {
            return true;
        }
        for a in aborts {
            a.abort();
        }
        false
    }

    /// Whether `other` is a handle of this same connection.
    pub fn same(&self, other: &Mux) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Ends the connection from this side and tells the peer why (a `Goodbye` with `reason`,
    /// written before the writer stops): the peer's operations fail at once with it.
    pub fn say_goodbye(&self, reason: &str) {
        if self
            .send(Frame::Goodbye {
                reason: reason.to_string(),
            })
            .is_err()
        {
            tracing::debug!("connection already closed; no goodbye sent");
        }
        self.close(reason);
    }

    /// Number of open streams (for tests and diagnostics).
    pub fn open_streams(&self) -> usize {
        self.shared.routes.lock().expect("routes lock").len()
    }
}

/// The encoded size of `frame` in `generation`, without the length prefix (0 when it does not
/// encode at all: the writer then refuses it).
fn encoded_len(frame: &Frame, generation: u16) -> usize {
    let encoded = if generation <= 1 {
        generation::encode(frame.clone(), generation).map(|b| b.len())
    } else {
        postcard::to_allocvec(frame)
            .map(|b| b.len())
            .map_err(Into::into)
    };
    encoded.unwrap_or(0)
}

/// Consumed bytes are handed back as credit in batches of this size: small enough that the
/// sender never runs dry while a credit frame travels back.
const CREDIT_BATCH: u32 = STREAM_WINDOW / 16;

/// Payloads at least this large are written from their own buffer instead of being copied into
/// the batch buffer.
const DIRECT_WRITE: usize = 16 * 1024;
/// Flush the batch buffer once it holds this much.
const BATCH: usize = 64 * 1024;

async fn write_loop<W>(shared: Arc<Shared>, mut writer: W, mut rx: mpsc::UnboundedReceiver<Frame>)
where
    W: AsyncWrite + Unpin,
{
    let mut codec = FrameCodec::shared(shared.generation.clone());
    let mut buf = BytesMut::with_capacity(BATCH);
    let mut closed = shared.closed.subscribe();
    loop {
        // Frames queued before a close still go out (a goodbye is queued just before one).
        let mut frame = tokio::select! {
            biased;
            f = rx.recv() => match f { Some(f) => f, None => return },
            _ = closed.wait_for(|c| c.is_some()) => return,
        };
        let result: std::io::Result<()> = async {
            loop {
                match frame {
                    Frame::Data { id, chan, data } if data.len() >= DIRECT_WRITE => {
                        encode_data_header(id, chan, data.len(), &mut buf);
                        writer.write_all(&buf).await?;
                        buf.clear();
                        writer.write_all(&data).await?;
                    }
                    other => {
                        if let Err(why) = generation::check(&other, codec.generation()) {
                            shared.refuse(other, why);
                        } else {
                            let (id, open) =
                                (other.stream_id(), matches!(other, Frame::Open { .. }));
                            if let Err(e) = codec.encode(other, &mut buf) {
                                // Nothing of it was written (the codec checks first): the
                                // connection stays up and only this frame's stream fails.
                                shared.unsendable(id, open, &e.to_string(), &mut codec, &mut buf);
                            }
                        }
                        if buf.len() >= BATCH {
                            writer.write_all(&buf).await?;
                            buf.clear();
                        }
                    }
                }
                match rx.try_recv() {
                    Ok(f) => frame = f,
                    Err(_) => break,
                }
            }
            if !buf.is_empty() {
                writer.write_all(&buf).await?;
                buf.clear();
            }
            writer.flush().await
        }
        .await;
        if let Err(e) = result {
            shared.close(format!("write failed: {e}"));
            return;
        }
    }
}

async fn read_loop<R>(shared: Arc<Shared>, reader: R, incoming: mpsc::UnboundedSender<Incoming>)
where
    R: AsyncRead + Unpin,
{
    // The codec reads the generation for every frame: once the first hello settled it, the
    // next frame (still in the read buffer, decoded lazily) is read in the agreed one.
    let mut frames = FramedRead::new(reader, FrameCodec::shared(shared.generation.clone()));
    let mut closed = shared.closed.subscribe();
    let reason = loop {
        // Closed first: once a mux is closed its reader must not take another byte. The agent
        // serves one port for successive sessions, each with a reader of its own; a reader left
        // running would steal the next session's frames (an exec that never gets an answer).
        let next = tokio::select! {
            biased;
            _ = closed.wait_for(|c| c.is_some()) => return,
            n = frames.next() => n,
        };
        let frame = match next {
            None => break "peer closed the channel".to_string(),
            Some(Err(e)) => {
                // Tell the peer, so that its operations fail now instead of waiting for
                // answers that will never come (the channel itself may stay up).
                let reason = format!("read failed: {e}");
                shared.goodbye(&reason);
                break reason;
            }
            Some(Ok(f)) => f,
        };
        match frame {
            Frame::Hello(h) => {
                shared.negotiate(&h);
                if incoming.send(Incoming::Hello(h)).is_err() {
                    tracing::debug!("hello dropped: nobody takes incoming frames");
                }
            }
            Frame::Goodbye { reason } => break format!("the peer ended the connection: {reason}"),
            Frame::Open { id, op } => {
                let stream = shared.register(id);
                if incoming.send(Incoming::Open(stream, op)).is_err() {
                    tracing::debug!(id, "stream dropped: nobody takes incoming frames");
                }
            }
            Frame::Credit { id, bytes } => {
                if let Some(r) = shared.routes.lock().expect("routes lock").get(&id) {
                    // An honest peer never grants more than the window it was sent; more
                    // would pile up (tokio panics past its semaphore's limit, which ends this
                    // reader without closing the connection).
                    let room =
                        (STREAM_WINDOW as usize).saturating_sub(r.credit.available_permits());
                    r.credit.add_permits((bytes as usize).min(room));
                }
            }
            other => {
                let id = other.stream_id().unwrap_or_default();
                let mut over = None;
                if let Some(r) = shared.routes.lock().expect("routes lock").get(&id) {
                    // Data past the window would queue without bound for a slow reader.
                    if let Frame::Data { data, .. } = &other {
                        let len = data.len() as u32;
                        let held = r.unacked.fetch_add(len, Ordering::AcqRel) + len;
                        if held > STREAM_WINDOW {
                            over = Some(format!(
                                "the peer sent {held} bytes on stream {id} without credit for \
                                 them (the window is {STREAM_WINDOW} bytes)"
                            ));
                        }
                    }
                    if over.is_none() && r.tx.send(other).is_err() {
                        tracing::trace!(id, "frame for a dropped stream");
                    }
                }
                if let Some(reason) = over {
                    shared.goodbye(&reason);
                    break reason;
                }
            }
        }
    };
    shared.close(reason);
}

/// One operation's stream: a sending and a receiving half.
#[derive(Debug)]
pub struct Stream {
    /// Sending half (cloneable).
    pub tx: StreamSender,
    /// Receiving half; dropping it forgets the stream.
    pub rx: StreamReceiver,
}

impl Stream {
    /// Stream id.
    pub fn id(&self) -> u32 {
        self.tx.id
    }
}

/// Sending half of a [`Stream`].
#[derive(Clone)]
pub struct StreamSender {
    id: u32,
    shared: Arc<Shared>,
    credit: Arc<Semaphore>,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamSender {
    /// Stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends a control frame on this stream.
    pub fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.shared
            .out
            .send(frame)
            .map_err(|_| self.shared.closed_error())
    }

    /// Sends bytes on a sub-channel, waiting for credit as needed.
    pub async fn send_data(&self, chan: Chan, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.send_owned(chan, Bytes::copy_from_slice(chunk)).await?;
        }
        Ok(())
    }

    /// Sends one chunk (at most [`MAX_CHUNK`] bytes) without copying it.
    pub async fn send_owned(&self, chan: Chan, data: impl Into<Bytes>) -> Result<(), Closed> {
        let data = data.into();
        debug_assert!(data.len() <= MAX_CHUNK);
        let permit = self
            .credit
            .acquire_many(data.len() as u32)
            .await
            .map_err(|_| self.shared.closed_error())?;
        permit.forget();
        self.send(Frame::Data {
            id: self.id,
            chan,
            data,
        })
    }

    /// Sends the end of a sub-channel.
    pub fn send_eof(&self, chan: Chan) -> Result<(), Closed> {
        self.send(Frame::Eof { id: self.id, chan })
    }
}

/// Receiving half of a [`Stream`].
pub struct StreamReceiver {
    id: u32,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Frame>,
    consumed: u32,
    /// The route's count of data bytes not handed back as credit yet.
    unacked: Arc<AtomicU32>,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamReceiver {
    /// Next frame of this stream; `Err` when the connection ended first. Pulling a `Data` frame
    /// hands its bytes back to the sender as credit.
    pub async fn recv(&mut self) -> Result<Frame, Closed> {
        match self.rx.recv().await {
            Some(frame) => {
                if let Frame::Data { data, .. } = &frame {
                    self.consumed += data.len() as u32;
                    if self.consumed >= CREDIT_BATCH {
                        let bytes = std::mem::take(&mut self.consumed);
                        self.unacked.fetch_sub(bytes, Ordering::AcqRel);
                        if self
                            .shared
                            .out
                            .send(Frame::Credit { id: self.id, bytes })
                            .is_err()
                        {
                            tracing::debug!(id = self.id, "credit not sent: connection closed");
                        }
                    }
                }
                Ok(frame)
            }
            None => Err(self.shared.closed_error()),
        }
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.remove(&self.id);
        }
    }
}

#[cfg(test)]
#[path = "mux_limits_tests.rs"]
mod limits_tests;

#[cfg(test)]
#[path = "mux_tests.rs"]
mod tests;
