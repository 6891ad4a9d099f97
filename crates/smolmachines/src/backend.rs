//! The typed seam: [`Backend`] (local engine, cloud) and [`MachineBackend`], called alike by the
//! public [`Machine`], the CLI, the bindings and the fleet server.
//!
//! [`Machine`] validates arguments (shapes every target shares: absolute guest paths, argv,
//! port numbers, protocol names) and calls the backend; everything that depends on the target
//! (readiness, endpoint URLs, which protocols are relayed, what is not supported there) is
//! decided behind the seam. The backend is the default one of a [`ConnectOptions`]
//! ([`backend_for`]) or passed in ([`Machine::create_on`], [`Machine::connect_on`],
//! [`Machine::open_on`], [`Machine::list_on`]); `crate::fake` is an in-memory test double of
//! this seam (feature `fake`).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::{
    ConnectOptions, ExecEvent, ExecOptions, ExecResult, MachineConfig, MachineState,
    MachineSummary, PortEndpoint, PortSpec, Target,
};
use crate::error::{Error, Result};

/// A place machines run: the embedded engine or a fleet server.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Which target this is.
    fn target(&self) -> Target;
    /// Creates and starts a machine; returns once it is ready.
    async fn create(&self, config: MachineConfig) -> Result<Arc<dyn MachineBackend>>;
    /// Attaches to an existing machine by name, starting it if it is stopped.
    async fn connect(&self, name: &str) -> Result<Arc<dyn MachineBackend>>;
    /// A handle to an existing machine without starting it.
    async fn open(&self, name: &str) -> Result<Arc<dyn MachineBackend>>;
    /// Every machine this backend knows that carries all of `labels`.
    async fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<MachineSummary>>;
    /// A new running machine `name` from checkpoint `id` (locally a `.smolcheckpoint` path,
    /// verified whole before anything starts). The default: `NotSupported`.
    async fn restore_checkpoint(
        &self,
        _id: &str,
        _name: &str,
        _opts: &crate::config::RestoreOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        Err(Error::NotSupported {
            message: "restore_checkpoint is not available on this target".into(),
        })
    }
    /// Removes checkpoint `id` (a missing one is `NotFound`). The default: `NotSupported`.
    async fn delete_checkpoint(&self, _id: &str) -> Result<()> {
        Err(Error::NotSupported {
            message: "delete_checkpoint is not available on this target".into(),
        })
    }
}

/// Operations on one machine. Arguments are already validated by [`Machine`].
#[async_trait::async_trait]
pub trait MachineBackend: Send + Sync + std::fmt::Debug {
    /// Machine name.
    fn name(&self) -> &str;
    /// The target's id of the machine: the name locally, `mach-…` on the cloud.
    fn id(&self) -> &str {
        self.name()
    }
    /// Which target the machine is on.
    fn target(&self) -> Target {
        Target::Local
    }
    /// Current state.
    async fn state(&self) -> Result<MachineState>;
    /// Runs a command to completion.
    async fn exec(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecResult>;
    /// Runs a command, streaming its output.
    async fn exec_stream(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecStream>;
    /// Writes a guest file.
    async fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()>;
    /// Writes a guest file from a stream of chunks. The default collects them and calls
    /// [`MachineBackend::write_file`] (memory grows with the file); a backend that can send
    /// chunks as they come overrides it.
    async fn write_file_stream(
        &self,
        path: &str,
        mut chunks: FileChunks,
        mode: Option<u32>,
    ) -> Result<()> {
        use futures::StreamExt;
        let mut data = Vec::new();
        while let Some(chunk) = chunks.next().await {
            data.extend_from_slice(&chunk?);
        }
        self.write_file(path, &data, mode).await
    }
    /// Reads a guest file.
    async fn read_file(&self, path: &str) -> Result<Vec<u8>>;
    /// Reads a guest file as a stream. The default: `NotSupported`.
    async fn read_file_stream(&self, _path: &str) -> Result<crate::FileReader> {
        Err(crate::file_reader::not_supported())
    }
    /// Boots a stopped machine.
    async fn start(&self) -> Result<()>;
    /// Stops the machine (clean guest power-off, killed after a timeout).
    async fn stop(&self) -> Result<()>;
    /// Stops the machine and removes everything it had.
    async fn delete(&self) -> Result<()>;
    /// Public URL of the first published port (cloud); `None` locally.
    fn url(&self) -> Option<String> {
        None
    }
    /// Whether the machine is ready (SPEC §4.2): running, and (where the target can tell) every
    /// published port has a listener behind it. The default: running.
    async fn ready(&self) -> Result<bool> {
        Ok(self.state().await? == MachineState::Running)
    }
    /// The URLs of published guest port `guest_port` (SPEC §4.7), `path` appended. A port that
    /// is not published is an `InvalidConfig` error.
    fn endpoint(&self, _guest_port: u16, _path: Option<&str>) -> Result<PortEndpoint> {
        Err(Error::NotSupported {
            message: "endpoint is not available on this target".into(),
        })
    }
    /// Whether this target publishes ports of `protocol` (`"tcp"` or `"udp"`, already checked
    /// by [`Machine`]); `NotSupported` if not. The default relays both.
    fn check_protocol(&self, _protocol: &str) -> Result<()> {
        Ok(())
    }
    /// The published ports.
    fn ports(&self) -> Vec<PortSpec> {
        Vec::new()
    }
    /// Publishes guest TCP port `guest` on host `127.0.0.1:host` (a free port when `None`) of a
    /// running machine.
    async fn publish(&self, _guest: u16, _host: Option<u16>) -> Result<PortSpec> {
        Err(Error::NotSupported {
            message: "publish is not available on this target".into(),
        })
    }
    /// Stops publishing the ports matching `guest` and/or `host`; open connections carry on.
    async fn unpublish(&self, _guest: Option<u16>, _host: Option<u16>) -> Result<()> {
        Err(Error::NotSupported {
            message: "unpublish is not available on this target".into(),
        })
    }
    /// Runs `argv` in a container of `image` inside this machine (local only).
    async fn run(&self, _image: &str, _argv: &[String], _opts: &ExecOptions) -> Result<ExecResult> {
        Err(Error::NotSupported {
            message: "run(image, ...) is not available on the cloud target; create a machine \
                      from an image (MachineConfig.image) and use exec()"
                .into(),
        })
    }
    /// Stops the machine's vCPUs; it keeps its memory (SPEC §4.2 `pause`). The default:
    /// `NotSupported`.
    async fn pause(&self) -> Result<()> {
        Err(Error::NotSupported {
            message: "pause is not available on this target".into(),
        })
    }
    /// Lets a paused machine go on. The default: `NotSupported`.
    async fn resume(&self) -> Result<()> {
        Err(Error::NotSupported {
            message: "resume is not available on this target".into(),
        })
    }
    /// A running copy-on-write clone of this running, branchable machine named `name` (SPEC
    /// §4.8 `branch`). The default: `NotSupported`.
    async fn branch(
        &self,
        _name: &str,
        _opts: &crate::config::BranchOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        Err(Error::NotSupported {
            message: "branch is not available on this target".into(),
        })
    }
    /// A portable checkpoint of this running (or paused) machine (SPEC §4.8 `checkpoint`);
    /// the machine keeps running. The default: `NotSupported`.
    async fn checkpoint(
        &self,
        _opts: &crate::config::CheckpointOptions,
    ) -> Result<crate::wire::CheckpointInfo> {
        Err(Error::NotSupported {
            message: "checkpoint is not available on this target".into(),
        })
    }
    /// The checkpoints of this machine (cloud). The default: `NotSupported`.
    async fn checkpoints(&self) -> Result<Vec<crate::wire::CheckpointInfo>> {
        Err(Error::NotSupported {
            message: "checkpoints() lists a cloud machine's checkpoints; a local checkpoint is \
                      a file you named"
                .into(),
        })
    }
    /// Pulls an image into the engine's image cache (local only).
    async fn pull_image(&self, _image: &str) -> Result<crate::image::ImageInfo> {
        Err(Error::NotSupported {
            message: "pull_image is not available on this target".into(),
        })
    }
    /// The images in the engine's image cache (local only).
    async fn list_images(&self) -> Result<Vec<crate::image::ImageInfo>> {
        Err(Error::NotSupported {
            message: "list_images is not available on this target".into(),
        })
    }
}

/// The bytes of a streamed file write ([`Machine::write_file_stream`]), chunk by chunk; an
/// error ends the stream and fails (and cancels) the write with that error.
pub type FileChunks = futures::stream::BoxStream<'static, Result<Vec<u8>>>;

/// Live output of a command: `Stdout`/`Stderr` chunks as produced, then one `Exit` (or `Error`).
/// Dropping it, or calling [`ExecStream::kill`], kills the command.
#[derive(Debug)]
pub struct ExecStream {
    rx: mpsc::Receiver<ExecEvent>,
    kill: Option<oneshot::Sender<()>>,
}

impl ExecStream {
    /// Wraps a receiver of events and a kill switch (for backends).
    pub fn new(rx: mpsc::Receiver<ExecEvent>, kill: oneshot::Sender<()>) -> Self {
        Self {
            rx,
            kill: Some(kill),
        }
    }

    /// Next event; `None` after the last one.
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        self.rx.recv().await
    }

    /// Kills the command; no further events are yielded. Idempotent.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            if k.send(()).is_err() {
                tracing::trace!("exec stream killed after its command ended");
            }
        }
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

impl futures::Stream for ExecStream {
    type Item = ExecEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ExecEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// Picks the backend for a [`ConnectOptions`] (SPEC §2.2).
pub fn backend_for(conn: &ConnectOptions) -> Result<Arc<dyn Backend>> {
    match conn.resolve_target() {
        Target::Local => Ok(crate::local::LocalBackend::shared()),
        Target::Cloud => Ok(Arc::new(crate::cloud::CloudBackend::from_options(conn)?)),
    }
}

/// A microVM sandbox. Cheap to clone; every clone drives the same machine.
#[derive(Debug, Clone)]
pub struct Machine {
    inner: Arc<dyn MachineBackend>,
}

fn check_guest_path(path: &str) -> Result<()> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "guest paths must be absolute, got {path:?}"
        )))
    }
}

/// The protocol names of SPEC §4.7; whether the target relays one is the backend's call.
fn check_protocol(protocol: &str) -> Result<()> {
    match protocol {
        "tcp" | "udp" => Ok(()),
        other => Err(Error::invalid(format!(
            "protocol must be \"tcp\" or \"udp\", got {other:?}"
        ))),
    }
}

/// The checks of [`Machine::create`] that hold on every target.
fn check_config(config: &MachineConfig) -> Result<()> {
    if let Some(name) = &config.name {
        crate::config::validate_name(name)?;
    }
    config.validate()?;
    if config.ready_timeout.is_some_and(|t| t.is_zero()) {
        return Err(Error::invalid("ready_timeout must be > 0"));
    }
    Ok(())
}

fn check_argv(argv: &[String]) -> Result<()> {
    crate::config::check_argv("command", argv)
}

impl Machine {
    /// Creates and starts a machine on the backend of `conn` ([`backend_for`]); returns once
    /// its agent answers.
    pub async fn create(config: MachineConfig, conn: ConnectOptions) -> Result<Machine> {
        check_config(&config)?;
        Self::create_on(&*backend_for(&conn)?, config).await
    }

    /// Creates and starts a machine on `backend` (an engine of an explicit home, a fleet
    /// client, a test double).
    pub async fn create_on(backend: &dyn Backend, config: MachineConfig) -> Result<Machine> {
        check_config(&config)?;
        Ok(Machine {
            inner: backend.create(config).await?,
        })
    }

    /// Attaches to an existing machine by name (one of another process too), booting it again
    /// if it is stopped.
    pub async fn connect(name: &str, conn: ConnectOptions) -> Result<Machine> {
        crate::config::validate_name(name)?;
        Self::connect_on(&*backend_for(&conn)?, name).await
    }

    /// [`Machine::connect`] on `backend`. A machine this process already holds is that same
    /// live handle.
    pub async fn connect_on(backend: &dyn Backend, name: &str) -> Result<Machine> {
        crate::config::validate_name(name)?;
        Ok(Machine {
            inner: backend.connect(name).await?,
        })
    }

    /// A handle to an existing machine without booting it (`stop` / `delete` by name).
    pub async fn open(name: &str, conn: ConnectOptions) -> Result<Machine> {
        crate::config::validate_name(name)?;
        Self::open_on(&*backend_for(&conn)?, name).await
    }

    /// [`Machine::open`] on `backend`. A machine this process already holds is that same live
    /// handle, at once.
    pub async fn open_on(backend: &dyn Backend, name: &str) -> Result<Machine> {
        crate::config::validate_name(name)?;
        Ok(Machine {
            inner: backend.open(name).await?,
        })
    }

    /// Lists the machines of the selected backend that carry all of `labels` (all machines of
    /// every process, locally).
    pub async fn list(
        conn: ConnectOptions,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<MachineSummary>> {
        Self::list_on(&*backend_for(&conn)?, labels).await
    }

    /// [`Machine::list`] on `backend`.
    pub async fn list_on(
        backend: &dyn Backend,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<MachineSummary>> {
        backend.list(labels).await
    }

    /// Wraps a backend machine (for backends and tests).
    pub fn from_backend(inner: Arc<dyn MachineBackend>) -> Self {
        Self { inner }
    }

    /// Machine name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The target's id: the name locally, `mach-…` on the cloud.
    pub fn id(&self) -> &str {
        self.inner.id()
    }

    /// Which target the machine is on.
    pub fn target(&self) -> Target {
        self.inner.target()
    }

    /// `"created"`, `"running"`, `"paused"` or `"stopped"` (`"deleted"` after delete).
    pub async fn state(&self) -> Result<MachineState> {
        self.inner.state().await
    }

    /// Whether the machine is ready (SPEC §4.2): running, and every published port accepts a
    /// connection that the guest does not reset at once (the host side accepts before a guest
    /// listener exists; a connection reset within ~100 ms means nothing listens yet).
    pub async fn ready(&self) -> Result<bool> {
        self.inner.ready().await
    }

    /// Polls [`Machine::ready`] every `interval` until it is true; a `Timeout` error after
    /// `timeout`.
    pub async fn wait_until_ready(&self, timeout: Duration, interval: Duration) -> Result<()> {
        if timeout.is_zero() || interval.is_zero() {
            return Err(Error::invalid("timeout and interval must be > 0"));
        }
        // (a timeout past what the clock can hold waits "forever": a century)
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + crate::config::MAX_WAIT);
        loop {
            if self.ready().await? {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "machine {:?} did not become ready in {timeout:?}",
                        self.name()
                    ),
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }

    /// Public URL (cloud); always `None` locally.
    pub fn url(&self) -> Option<String> {
        self.inner.url()
    }

    /// Runs `argv` (not a shell string) to completion. A non-zero exit is not an error; a
    /// timeout gives exit code 124 and the output so far.
    pub async fn exec(&self, argv: &[String], opts: ExecOptions) -> Result<ExecResult> {
        check_argv(argv)?;
        opts.validate()?;
        self.inner.exec(argv, &opts).await
    }

    /// Runs `argv` in a container of `image` inside this running machine (SPEC §4.3, local
    /// only): the image is pulled if needed; its root file system, `Env` and `WorkingDir` apply;
    /// exit code, output and timeout behave as in [`Machine::exec`]. `opts.user` is refused.
    pub async fn run(&self, image: &str, argv: &[String], opts: ExecOptions) -> Result<ExecResult> {
        if image.trim().is_empty() {
            return Err(Error::invalid("image reference must not be empty"));
        }
        if opts.user.is_some() {
            return Err(Error::NotSupported {
                message: "run(image, ...) does not take a user; use exec() in a machine created \
                          from the image"
                    .into(),
            });
        }
        check_argv(argv)?;
        opts.validate()?;
        if opts.background {
            return Err(Error::invalid(
                "run(image, ...) cannot start a background command; use exec()",
            ));
        }
        self.inner.run(image, argv, &opts).await
    }

    /// Publishes guest port `guest` on host `127.0.0.1:host`, or on a free host port when
    /// `host` is `None` (SPEC §4.7; `protocol` is `"tcp"`, or `"udp"`, which the local engine
    /// does not relay). Returns the published port.
    pub async fn publish(&self, guest: u16, host: Option<u16>, protocol: &str) -> Result<PortSpec> {
        check_protocol(protocol)?;
        if guest == 0 || host == Some(0) {
            return Err(Error::invalid("ports must be 1..=65535"));
        }
        self.inner.check_protocol(protocol)?;
        self.inner.publish(guest, host).await
    }

    /// Stops publishing the ports matching `guest` and/or `host` (at least one is needed);
    /// connections already open carry on. No match is a `NotFound` error.
    pub async fn unpublish(
        &self,
        guest: Option<u16>,
        host: Option<u16>,
        protocol: &str,
    ) -> Result<()> {
        check_protocol(protocol)?;
        if guest.is_none() && host.is_none() {
            return Err(Error::invalid("unpublish needs a guest or a host port"));
        }
        self.inner.check_protocol(protocol)?;
        self.inner.unpublish(guest, host).await
    }

    /// The published ports (host -> guest).
    pub fn ports(&self) -> Vec<PortSpec> {
        self.inner.ports()
    }

    /// The URLs of a published guest port (SPEC §4.7): locally `http://127.0.0.1:<host>[/path]`
    /// and its `ws://` twin. A guest port that is not published is an `InvalidConfig` error.
    pub fn endpoint(&self, guest_port: u16, path: Option<&str>) -> Result<PortEndpoint> {
        if guest_port == 0 {
            return Err(Error::invalid("ports must be 1..=65535"));
        }
        self.inner.endpoint(guest_port, path)
    }

    /// Runs `argv`, yielding output as it is produced.
    pub async fn exec_stream(&self, argv: &[String], opts: ExecOptions) -> Result<ExecStream> {
        check_argv(argv)?;
        opts.validate()?;
        if opts.background {
            return Err(Error::invalid(
                "a background command has no output to stream; use exec()",
            ));
        }
        self.inner.exec_stream(argv, &opts).await
    }

    /// Writes `data` to the absolute guest `path` (parents are created), with `mode` or 0o644.
    pub async fn write_file(
        &self,
        path: &str,
        data: impl AsRef<[u8]>,
        mode: Option<u32>,
    ) -> Result<()> {
        check_guest_path(path)?;
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(Error::invalid(format!(
                "mode {:o} is not a permission mode",
                mode.unwrap_or(0)
            )));
        }
        self.inner.write_file(path, data.as_ref(), mode).await
    }

    /// Writes the bytes of `chunks` to the absolute guest `path` as they arrive (parents are
    /// created), with `mode` or 0o644. The local engine sends each chunk on to the agent, paced
    /// by its flow control, so memory stays bounded whatever the size; other targets may
    /// collect the chunks first. A regular guest file is replaced only once every byte arrived:
    /// an error of `chunks` (returned as it is) or of the guest leaves the old content.
    pub async fn write_file_stream(
        &self,
        path: &str,
        chunks: FileChunks,
        mode: Option<u32>,
    ) -> Result<()> {
        check_guest_path(path)?;
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(Error::invalid(format!(
                "mode {:o} is not a permission mode",
                mode.unwrap_or(0)
            )));
        }
        self.inner.write_file_stream(path, chunks, mode).await
    }

    /// Reads the absolute guest `path`, byte-exact. Only regular files are read (symlinks are
    /// followed): a device, FIFO or socket is [`Error::NotSupported`] naming the path and its
    /// type. A file of more than [`READ_FILE_LIMIT`](smol_protocol::READ_FILE_LIMIT) bytes
    /// (256 MiB) is [`Error::InvalidConfig`] naming its size and the limit, refused before it
    /// is read (one that grows past it while read stops there): use
    /// [`Machine::read_file_stream`] for bigger files. A read that receives nothing from the
    /// guest for 30 s (a wedged file system) is cancelled with [`Error::Timeout`].
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        check_guest_path(path)?;
        self.inner.read_file(path).await
    }

    /// Reads the absolute guest `path` as a stream of chunks of any size ([`FileReader`],
    /// also an `AsyncRead`), paced by the caller: memory stays bounded whatever the file's
    /// size. The same rules as [`Machine::read_file`] otherwise (regular files only, the idle
    /// deadline); no size limit. Needs an agent of protocol generation 3 (else
    /// `NotSupported`).
    ///
    /// [`FileReader`]: crate::FileReader
    pub async fn read_file_stream(&self, path: &str) -> Result<crate::FileReader> {
        check_guest_path(path)?;
        self.inner.read_file_stream(path).await
    }

    /// Pulls `image` into the engine's image cache (SPEC §4.5; local only).
    pub async fn pull_image(&self, image: &str) -> Result<crate::image::ImageInfo> {
        if image.trim().is_empty() {
            return Err(Error::invalid("image reference must not be empty"));
        }
        self.inner.pull_image(image).await
    }

    /// The images in the engine's image cache (SPEC §4.5; local only).
    pub async fn list_images(&self) -> Result<Vec<crate::image::ImageInfo>> {
        self.inner.list_images().await
    }

    /// Pauses the machine: its vCPUs stop, it keeps its memory; its state is `paused`, and
    /// exec and file operations are [`Error::InvalidState`] until [`Machine::resume`]. `stop`
    /// and `delete` work on a paused machine.
    pub async fn pause(&self) -> Result<()> {
        self.inner.pause().await
    }

    /// Lets a paused machine go on where it was.
    pub async fn resume(&self) -> Result<()> {
        self.inner.resume().await
    }

    /// A running clone of this running, branchable machine (`MachineConfig.branchable`), named
    /// `name`: the source's memory, processes, files and disk as of the branch instant, its
    /// own hostname and a reseeded RNG. The source keeps running (its vCPUs stop only for the
    /// branch's pause window). `ports` are the clone's published ports; empty publishes each
    /// of the source's guest ports on a free host port. See [`Machine::branch_with`].
    pub async fn branch(&self, name: &str, ports: Vec<PortSpec>) -> Result<Machine> {
        self.branch_with(
            name,
            crate::config::BranchOptions {
                ports,
                ..Default::default()
            },
        )
        .await
    }

    /// [`Machine::branch`] with every option (a clone that is a branch source too). See also
    /// [`Machine::branch_batch`] and [`Machine::reward_fork`].
    pub async fn branch_with(
        &self,
        name: &str,
        opts: crate::config::BranchOptions,
    ) -> Result<Machine> {
        Self::check_branch(name, &opts)?;
        Ok(Machine {
            inner: self.inner.branch(name, &opts).await?,
        })
    }

    /// Boots a stopped machine again.
    pub async fn start(&self) -> Result<()> {
        self.inner.start().await
    }

    /// Stops the machine: the guest flushes and powers off; it is killed after a timeout.
    pub async fn stop(&self) -> Result<()> {
        self.inner.stop().await
    }

    /// Stops the machine and removes every process, socket and file it had.
    pub async fn delete(&self) -> Result<()> {
        self.inner.delete().await
    }
}

#[path = "backend_branch.rs"]
mod branching;
#[path = "backend_checkpoint.rs"]
mod checkpointing;
pub use branching::{BranchBatchOptions, DEFAULT_BRANCH_PREFIX, MAX_BRANCH_BATCH};
pub use checkpointing::checkpoint_target;

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
