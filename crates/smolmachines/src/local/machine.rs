//! A machine of the local engine: one supervised VMM process, one agent connection.
//!
//! Its lifecycle is a [`Phase`] changed only through [`Phase::on`]; `start`, `stop` and
//! `delete` run one at a time per machine (an async lock), so two concurrent `start()`s boot
//! one VM and a `stop()` racing a `start()` ends in whichever came last. The public
//! [`MachineState`] is derived from the phase.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use smol_protocol::{ExecRequest, Op};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::agent::{AgentConn, AgentError};
use super::phase::{Event, Phase};
use super::record::{ProcId, Record};
use super::registry::Shared;
use super::state::StateDb;
use super::teardown::{
    close_ports, describe_exit, end_children, remove_dir_logged, remove_file_logged,
};
use super::vmm::{tail, VmSpec, Vmm};
use crate::backend::{ExecStream, MachineBackend};
use crate::config::{ExecOptions, ExecResult, MachineState};
use crate::error::{Error, Result};

/// Guest file collecting the output of the machine's workload.
pub const WORKLOAD_LOG: &str = "/var/log/smol/workload.log";
/// How long a clean guest power-off may take before the VMM is told to quit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the VMM to exit after quit / kill.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long an operation that lost its channel waits to learn whether the VM exited.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long past its timeout a command may take before the host gives up on it (a guest that
/// cannot enforce the timeout): `exec` fails with `Timeout`, `exec_stream` ends with a `TIMEOUT`
/// error event.
pub(crate) const EXEC_GRACE: Duration = Duration::from_secs(10);
/// How long the guest gets, beyond its linger time, to power off by itself once its owner is
/// gone before the watchdog ends the VMM.
const POWER_OFF_GRACE: Duration = Duration::from_secs(4);

struct Vm {
    pid: u32,
    /// `Some(description)` once the VMM process has exited.
    exit: watch::Receiver<Option<String>>,
    /// The owner's end of the VM's watchdog tie (machines that must not outlive their owner):
    /// dropped with this handle or this process, the watchdog ends the VM (`local::watchdog`).
    _tie: Option<std::os::fd::OwnedFd>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) spec: VmSpec,
    vmm: Arc<dyn Vmm>,
    db: Arc<StateDb>,
    passt: PathBuf,
    /// `<home>/machines/<name>`: the disk.
    home_dir: PathBuf,
    /// Created by this process: a non-persistent machine then dies with its last handle.
    owned: bool,
    ready_timeout: Duration,
    record: Mutex<Record>,
    phase: Mutex<Phase>,
    /// Held by `start`, `stop` and `delete`: one lifecycle operation at a time.
    pub(super) lifecycle: tokio::sync::Mutex<()>,
    /// VMs booted by this handle (tests: concurrent starts boot one).
    boots: AtomicU32,
    /// The engine whose live machines this one is among.
    engine: Arc<Shared>,
    conn: Mutex<Option<AgentConn>>,
    vm: Mutex<Option<Vm>>,
    /// Published-port listeners.
    ports: Mutex<Vec<(u16, tokio::task::JoinHandle<()>)>>,
    /// Helper processes of the running VM (virtiofsd per mount).
    helpers: Mutex<Vec<std::process::Child>>,
    /// Lets the port listeners notice the machine is gone.
    alive: Arc<()>,
    /// Serialises copying image files into the guest (`run(image, ..)`).
    pub(super) images: tokio::sync::Mutex<()>,
    /// Held while this process drives the machine (flock on `attach.lock`).
    _lock: std::fs::File,
}

/// A local machine. Cheap to clone.
#[derive(Clone)]
pub struct LocalMachine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMachine")
            .field("name", &self.inner.name)
            .field("phase", &self.phase())
            .finish()
    }
}

/// Takes the attach lock of a machine directory, waiting up to `wait`.
pub(crate) async fn lock_attach(
    dir: &std::path::Path,
    name: &str,
    wait: Duration,
) -> Result<std::fs::File> {
    let path = dir.join("attach.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::InvalidState {
                name: name.to_string(),
                state: "attached elsewhere (by another process, or another handle of this one)"
                    .into(),
                op: "attach".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a new handle is made of.
pub(crate) struct Parts {
    pub spec: VmSpec,
    pub vmm: Arc<dyn Vmm>,
    pub db: Arc<StateDb>,
    pub passt: PathBuf,
    pub home_dir: PathBuf,
    pub record: Record,
    pub ready_timeout: Duration,
    pub owned: bool,
    pub lock: std::fs::File,
    pub engine: Arc<Shared>,
    /// `Creating` for a new machine, `Stopped` for a handle of an existing one.
    pub phase: Phase,
}

impl LocalMachine {
    pub(crate) fn new(p: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: p.spec.name.clone(),
                spec: p.spec,
                vmm: p.vmm,
                db: p.db,
                passt: p.passt,
                home_dir: p.home_dir,
                owned: p.owned,
                ready_timeout: p.ready_timeout,
                record: Mutex::new(p.record),
                phase: Mutex::new(p.phase),
                lifecycle: tokio::sync::Mutex::new(()),
                boots: AtomicU32::new(0),
                engine: p.engine,
                conn: Mutex::new(None),
                vm: Mutex::new(None),
                ports: Mutex::new(Vec::new()),
                helpers: Mutex::new(Vec::new()),
                alive: Arc::new(()),
                images: tokio::sync::Mutex::new(()),
                _lock: p.lock,
            }),
        }
    }

    /// Starts serving published ports (listeners bound at create).
    pub(crate) fn serve_ports(&self, listeners: Vec<(tokio::net::TcpListener, u16)>) {
        let weak = Arc::downgrade(&self.inner);
        let conn = move || {
            weak.upgrade()
                .and_then(|i| i.conn.lock().expect("conn lock").clone())
        };
        let tasks = super::ports::serve(listeners, Arc::downgrade(&self.inner.alive), conn);
        self.inner.ports.lock().expect("ports lock").extend(tasks);
    }

    fn stop_helpers(inner: &Inner) {
        let children: Vec<_> = inner
            .helpers
            .lock()
            .expect("helpers lock")
            .drain(..)
            .collect();
        end_children(children);
    }

    /// Changes the record and stores it (on the blocking pool). A failed write is logged: the
    /// in-memory record stays authoritative for this handle.
    pub(super) async fn save_record(&self, f: impl FnOnce(&mut Record)) {
        let rec = {
            let mut r = self.inner.record.lock().expect("record lock");
            f(&mut r);
            r.clone()
        };
        if let Err(e) = self.inner.db.call(move |db| db.update(&rec)).await {
            tracing::warn!(machine = %self.inner.name, error = %e, "cannot store the machine record");
        }
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.lock().expect("phase lock")
    }

    /// Whether `other` is this very handle (the engine gives one live handle per machine).
    pub fn same_handle(&self, other: &LocalMachine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// How many VMs this handle has booted.
    pub fn boots(&self) -> u32 {
        self.inner.boots.load(Ordering::SeqCst)
    }

    /// The public state, derived from the phase.
    pub(crate) fn public_state(&self) -> MachineState {
        let booted = self.inner.record.lock().expect("record lock").booted;
        self.phase().public(booted)
    }

    fn current_state(&self) -> MachineState {
        self.public_state()
    }

    /// Applies `event`; a refused transition is an `InvalidState` error for `op`.
    fn apply(&self, event: Event, op: &str) -> Result<Phase> {
        let mut p = self.inner.phase.lock().expect("phase lock");
        match p.on(event) {
            Ok(next) => {
                tracing::debug!(machine = %self.inner.name, from = %*p, to = %next, ?event, "phase");
                *p = next;
                Ok(next)
            }
            Err(refused) => {
                drop(p);
                tracing::debug!(machine = %self.inner.name, %refused, op, "refused");
                Err(self.invalid_state(op))
            }
        }
    }

    /// Applies an event that reports a fact (the VMM ended, a boot failed); a refusal only
    /// means the phase already says so, and is logged.
    fn note(inner: &Inner, event: Event) -> Phase {
        let mut p = inner.phase.lock().expect("phase lock");
        match p.on(event) {
            Ok(next) => {
                tracing::debug!(machine = %inner.name, from = %*p, to = %next, ?event, "phase");
                *p = next;
            }
            Err(refused) => tracing::debug!(machine = %inner.name, %refused, "ignored"),
        }
        *p
    }

    fn vm_pid(&self) -> Option<u32> {
        self.inner
            .vm
            .lock()
            .expect("vm lock")
            .as_ref()
            .map(|v| v.pid)
    }

    fn exit_watch(&self) -> Option<watch::Receiver<Option<String>>> {
        self.inner
            .vm
            .lock()
            .expect("vm lock")
            .as_ref()
            .map(|v| v.exit.clone())
    }

    /// The VMM's process id while the VM runs.
    pub fn pid(&self) -> Option<u32> {
        self.vm_pid()
    }

    /// The machine's directory (record, sockets, logs).
    pub fn dir(&self) -> PathBuf {
        self.inner.spec.dir.clone()
    }

    /// The agent's hello (kernel release, protocol generation, boot uptime).
    pub fn hello(&self) -> Option<smol_protocol::Hello> {
        self.inner
            .conn
            .lock()
            .expect("conn lock")
            .as_ref()
            .map(|c| c.hello.clone())
    }

    /// The image cache of this machine's engine home (`<home>/machines/<name>` -> `<home>`).
    pub(super) fn image_store(&self) -> Result<crate::image::ImageStore> {
        let home = self
            .inner
            .home_dir
            .parent()
            .and_then(|p| p.parent())
            .ok_or_else(|| Error::invalid("machine without an engine home"))?;
        Ok(crate::image::ImageStore::open(home)?)
    }

    /// The record as stored in the state database.
    pub fn record(&self) -> Record {
        self.inner.record.lock().expect("record lock").clone()
    }

    fn log_tail(&self) -> String {
        format!(
            "--- vmm log ---\n{}\n--- guest console ---\n{}",
            tail(&self.inner.spec.vmm_log(), 10),
            tail(&self.inner.spec.console_log(), 25)
        )
    }

    /// `reason` (the VMM ended before the agent answered) with the VMM's last words, which
    /// say why (a file it could not open, a socket it could not reach, a bad argument).
    fn with_vmm_words(&self, reason: String) -> String {
        let words = tail(&self.inner.spec.vmm_log(), 1);
        match words.trim() {
            "" => reason,
            w => format!("{reason}: {w}"),
        }
    }

    fn bind_agent_socket(&self) -> Result<UnixListener> {
        let path = self.inner.spec.agent_socket();
        remove_file_logged(&path);
        UnixListener::bind(&path).map_err(|e| Error::io(format!("binding {}", path.display()), e))
    }

    /// Watches the VM's exit: marks the machine stopped, ends the agent channel, and removes the
    /// sockets, whichever way the VMM went (clean power-off, crash, SIGKILL from anyone).
    async fn on_exit(weak: &Weak<Inner>, detail: &str) {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        tracing::info!(machine = %inner.name, detail, "VMM exited");
        // the sockets go before the machine reads as stopped: a start seeing it stopped binds
        // new ones, which must not be the ones removed here
        remove_file_logged(&inner.spec.agent_socket());
        remove_file_logged(&inner.spec.qmp_socket());
        let phase = Self::note(&inner, Event::Exited);
        if let Some(c) = inner.conn.lock().expect("conn lock").take() {
            c.close(detail);
        }
        // a branch source's RAM file: its clones have their own copies
        if let Some(ram) = &inner.spec.ram_file {
            remove_file_logged(ram);
        }
        Self::stop_helpers(&inner);
        let rec = {
            let mut rec = inner.record.lock().expect("record lock");
            rec.vmm = None;
            rec.paused = false;
            rec.clone()
        };
        if !matches!(phase, Phase::Deleting | Phase::Deleted) {
            if let Err(e) = inner.db.call(move |db| db.update(&rec)).await {
                tracing::warn!(machine = %inner.name, error = %e, "cannot store the stopped record");
            }
        }
    }

    /// Boots the VM (phase `Booting`, then `Running`, or `Failed`) and launches its workload.
    /// Callers hold the lifecycle lock (or the only handle).
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    pub(crate) async fn boot(&self) -> Result<()> {
        self.apply(Event::Boot, "start")?;
        self.inner.boots.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.boot_vm().await {
            tracing::warn!(error = %e, "boot failed");
            Self::note(&self.inner, Event::BootFailed);
            return Err(e);
        }
        self.apply(Event::Booted, "start")?;
        tracing::info!(pid = self.vm_pid(), "running");
        self.launch_workload().await
    }

    /// The watchdog that ends the VM and its helpers when this handle or process goes away,
    /// whatever the guest does (`None` for a detached machine, which outlives its process).
    fn start_watchdog(&self, vmm: Option<ProcId>) -> Result<Option<super::watchdog::Watchdog>> {
        let spec = &self.inner.spec;
        let (Some(linger_ms), Some(vmm)) = (spec.linger_ms, vmm) else {
            return Ok(None);
        };
        let helpers: Vec<ProcId> = self
            .inner
            .helpers
            .lock()
            .expect("helpers lock")
            .iter()
            .filter_map(|c| ProcId::of(c.id()))
            .collect();
        let grace = Duration::from_millis(linger_ms) + POWER_OFF_GRACE;
        super::watchdog::start(vmm, &helpers, grace, &spec.dir.join("watchdog.log"))
            .map(Some)
            .map_err(|e| Error::BootFailed {
                name: self.inner.name.clone(),
                reason: format!(
                    "cannot start the watchdog that ends the VM with its owner (/bin/sh): {e}"
                ),
                log_tail: String::new(),
            })
    }

    /// Starts the VMM and waits for the agent's hello.
    async fn boot_vm(&self) -> Result<()> {
        self.start_vm(None).await
    }

    /// Starts the VMM: a boot, or (`clone`: how its RAM is mapped, and the source's saved
    /// device state) a branch's clone, whose device state is loaded over QMP before it runs;
    /// then waits for the agent's hello.
    async fn start_vm(
        &self,
        clone: Option<(&super::vmm::Restore, &std::path::Path)>,
    ) -> Result<()> {
        let t0 = std::time::Instant::now();
        let ms = move || t0.elapsed().as_secs_f64() * 1e3;
        // refused before anything starts when the host cannot hold it; held until started
        let spec = &self.inner.spec;
        let _admitted = super::admission::admit(&spec.dir, spec.memory_mb)?;
        if let Some(dir) = self.inner.spec.ram_file.as_ref().and_then(|f| f.parent()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let listener = self.bind_agent_socket()?;
        // before any of its processes: each joins it before it execs (local::confine)
        let cgroup = super::confine::machine_cgroup(
            &self.inner.spec.dir,
            self.inner.spec.memory_mb,
            self.inner.spec.cpus,
        );
        let (mounts, network, filter) = {
            let r = self.inner.record.lock().expect("record lock");
            (
                r.mounts.clone(),
                r.network,
                super::egress::Filter::of_record(&r),
            )
        };
        if network {
            let child = super::net::spawn(
                &self.inner.spec.dir,
                &self.inner.passt,
                &self.inner.name,
                filter,
            )?;
            self.inner.helpers.lock().expect("helpers lock").push(child);
        }
        for (i, m) in mounts.iter().enumerate() {
            match super::mounts::spawn(&self.inner.spec.dir, i, m) {
                Ok(child) => self.inner.helpers.lock().expect("helpers lock").push(child),
                Err(e) => {
                    Self::stop_helpers(&self.inner);
                    super::cgroup::remove_later(cgroup);
                    return Err(e);
                }
            }
        }
        let mut spawn_spec = self.inner.spec.clone();
        if let Some((restore, _)) = clone {
            spawn_spec.restore = Some(restore.clone());
        }
        // the images the slots hold now (run(image) may have filled one since the handle)
        if clone.is_none()
            && self
                .record()
                .image_slots
                .iter()
                .flatten()
                .any(|s| !s.file.exists())
        {
            // a fresh boot mounts nothing: a slot whose file is gone (a pruned cache) is free
            // again, not a name that sends the next run to a slot that reads as zeros
            self.save_record(|r| {
                for s in r.image_slots.iter_mut() {
                    if s.as_ref().is_some_and(|s| !s.file.exists()) {
                        tracing::warn!(image = %s.as_ref().map(|s| s.reference.as_str()).unwrap_or(""), "an image slot's file is gone: the slot boots empty");
                        *s = None;
                    }
                }
            })
            .await;
        }
        spawn_spec.image_slots = super::slot_files(&self.record());
        let spawned = self.inner.vmm.spawn(&spawn_spec);
        if spawned.is_err() {
            Self::stop_helpers(&self.inner);
            super::cgroup::remove_later(cgroup.clone());
        }
        let mut child = spawned.map_err(|e| match e {
            super::vmm::VmmError::BinaryMissing { .. } => Error::HypervisorUnavailable {
                message: e.to_string(),
            },
            other => Error::BootFailed {
                name: self.inner.name.clone(),
                reason: other.to_string(),
                log_tail: String::new(),
            },
        })?;
        let pid = child.id().unwrap_or(0);
        tracing::trace!(ms = ms(), pid, "VMM spawned");
        let vmm_id = ProcId::of(pid);
        let watchdog = match self.start_watchdog(vmm_id) {
            Ok(w) => w,
            Err(e) => {
                if let Err(k) = child.start_kill() {
                    tracing::debug!(pid, error = %k, "VMM already gone");
                }
                Self::stop_helpers(&self.inner);
                return Err(e);
            }
        };
        let (tie, watchdog) = match watchdog {
            Some(w) => (Some(w.tie), Some(w.process)),
            None => (None, None),
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        *self.inner.vm.lock().expect("vm lock") = Some(Vm {
            pid,
            exit: exit_rx.clone(),
            _tie: tie,
        });
        let me = ProcId::current();
        let console = self.inner.spec.console_log();
        // the supervisor first: the VMM may exit while the record is written
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            // the console log is capped while it waits (local::console)
            let cap = super::console::cap();
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s,
                    _ = tokio::time::sleep(super::console::CHECK) => {
                        super::console::trim_logged(&console, cap);
                    }
                }
            };
            end_children(watchdog.into_iter().collect());
            // A guest kernel panic ends QEMU like a power-off (status 0): the console says which.
            let crash = match &status {
                Ok(s) if s.code().is_some() => super::vmm::crash_report(&console),
                _ => None,
            };
            let deleted = weak.upgrade().is_some_and(|i| {
                matches!(
                    *i.phase.lock().expect("phase lock"),
                    Phase::Deleting | Phase::Deleted
                )
            });
            let detail = match crash {
                Some(c) => c,
                // the kill was the delete's: say so, not how the VMM ended
                None if deleted => "the machine was deleted".to_string(),
                None => describe_exit(status),
            };
            Self::on_exit(&weak, &detail).await;
            // the VMM and its helpers are gone (or going): their cgroup goes too, before
            // anyone waiting for the exit goes on (a start right after a stop makes it again)
            super::cgroup::remove_blocking(cgroup).await;
            // no receiver left: every handle is gone, nobody waits for the exit
            if exit_tx.send(Some(detail)).is_err() {
                tracing::trace!("VMM exit seen after the last handle");
            }
        });
        self.save_record(|r| {
            r.vmm = vmm_id;
            r.owner = Some(me);
            r.booted = true;
            r.paused = false;
        })
        .await;
        tracing::trace!(ms = ms(), "watchdog started, record saved");
        if let Some((_, state)) = clone {
            let loaded = self.load_state(state, exit_rx.clone()).await;
            tracing::trace!(ms = ms(), "device state loaded");
            if let Err(reason) = loaded {
                let log_tail = self.log_tail();
                self.kill_and_wait().await;
                return Err(Error::BootFailed {
                    name: self.inner.name.clone(),
                    reason,
                    log_tail,
                });
            }
        }
        self.await_agent(listener, exit_rx).await
    }

    /// Starts the machine's workload (SPEC §3.4) in the background; its output goes to
    /// [`WORKLOAD_LOG`] in the guest. A workload that cannot start fails the boot.
    pub(crate) async fn launch_workload(&self) -> Result<()> {
        let Some(w) = self.record().workload else {
            return Ok(());
        };
        let req = ExecRequest {
            argv: w.argv.clone(),
            env: w.env.into_iter().collect(),
            workdir: w.workdir,
            timeout_ms: None,
            stdin: false,
            user: w.user,
        };
        let op = Op::Spawn {
            exec: req,
            log: Some(WORKLOAD_LOG.into()),
        };
        // A workdir the guest lacks is a bad config, like a program it lacks.
        let r = self
            .exec_op(op, &w.argv, &ExecOptions::default())
            .await
            .map_err(|e| match e {
                Error::NotFound { what: why } | Error::NotADirectory { detail: why } => {
                    Error::invalid(format!("the workload {:?} cannot start: {why}", w.argv))
                }
                other => other,
            })?;
        if r.exit_code != 0 {
            return Err(Error::invalid(format!(
                "the workload {:?} cannot start (exit {}): {}",
                w.argv,
                r.exit_code,
                r.stderr.trim()
            )));
        }
        Ok(())
    }

    async fn await_agent(
        &self,
        listener: UnixListener,
        mut exit_rx: watch::Receiver<Option<String>>,
    ) -> Result<()> {
        let name = self.inner.name.clone();
        let mut grace_rx = exit_rx.clone();
        let exited = async move {
            match exit_rx.wait_for(|d| d.is_some()).await {
                Ok(d) => format!(
                    "{} before the agent answered",
                    d.clone().unwrap_or_default()
                ),
                Err(_) => "the VMM supervisor ended".to_string(),
            }
        };
        let accepted = tokio::select! {
            r = AgentConn::accept(&listener, self.inner.ready_timeout) => Ok(r),
            d = exited => Err(self.with_vmm_words(d)),
        };
        let outcome = match accepted {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => {
                if let Some(typed) = e.incompatible(&name) {
                    drop(listener);
                    self.kill_and_wait().await;
                    return Err(typed);
                }
                // The channel may end because the VM did: say so when it is known.
                let exit = tokio::time::timeout(EXIT_GRACE, grace_rx.wait_for(|d| d.is_some()))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|d| d.clone()));
                Err(match exit {
                    Some(d) => format!("{e}: {d}"),
                    None => e.to_string(),
                })
            }
            Err(d) => Err(d),
        };
        drop(listener);
        match outcome {
            Ok(conn) => {
                self.watch_agent(conn.clone());
                *self.inner.conn.lock().expect("conn lock") = Some(conn);
                Ok(())
            }
            Err(reason) => {
                let log_tail = self.log_tail();
                self.kill_and_wait().await;
                Err(Error::BootFailed {
                    name,
                    reason,
                    log_tail,
                })
            }
        }
    }

    /// When the guest agent restarts (PID 1 started it again after it died, and it said
    /// goodbye to this session), connects to the new agent, so that the next operation works:
    /// the session's operations have failed with `Interrupted` already.
    fn watch_agent(&self, conn: AgentConn) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let closed = conn.closed().await;
            if !closed.agent_restarted() {
                return;
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let m = LocalMachine { inner };
            let _one_at_a_time = m.inner.lifecycle.lock().await;
            let current = m.inner.conn.lock().expect("conn lock").clone();
            let ours = current.is_some_and(|c| c.same(&conn));
            if !ours || m.phase() != Phase::Running {
                return;
            }
            tracing::warn!(machine = %m.inner.name, "the guest agent restarted; connecting to the new one");
            match m.reconnect().await {
                Ok(()) => {
                    tracing::info!(machine = %m.inner.name, "connected to the restarted agent")
                }
                Err(e) => {
                    tracing::warn!(machine = %m.inner.name, error = %e, "could not connect to the restarted agent")
                }
            }
        });
    }

    /// Attaches to the VM of another process: take over its agent socket and wait for QEMU to
    /// reconnect (it retries every second).
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name, pid = vmm_id.pid))]
    pub(crate) async fn attach(&self, vmm_id: ProcId) -> Result<()> {
        self.apply(Event::Boot, "attach")?;
        match self.attach_vm(vmm_id).await {
            Ok(()) => {
                self.apply(Event::Booted, "attach")?;
                self.resume_network();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "attach failed");
                Self::note(&self.inner, Event::BootFailed);
                Err(e)
            }
        }
    }

    async fn attach_vm(&self, vmm_id: ProcId) -> Result<()> {
        let exit_rx = self.watch_foreign_vmm(vmm_id);
        let listener = self.bind_agent_socket()?;
        self.nudge_reconnect().await;
        self.await_agent(listener, exit_rx).await
    }

    /// Watches the VMM of another process (polls for its exit, which `on_exit` handles).
    fn watch_foreign_vmm(&self, vmm_id: ProcId) -> watch::Receiver<Option<String>> {
        let pid = vmm_id.pid;
        let (exit_tx, exit_rx) = watch::channel(None);
        *self.inner.vm.lock().expect("vm lock") = Some(Vm {
            pid,
            exit: exit_rx.clone(),
            _tie: None,
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            // Not our child: poll for its exit.
            while vmm_id.alive() {
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let detail = "the VMM exited".to_string();
            Self::on_exit(&weak, &detail).await;
            if exit_tx.send(Some(detail)).is_err() {
                tracing::trace!("VMM exit seen after the last handle");
            }
        });
        exit_rx
    }

    /// Tells QEMU to reconnect its agent chardev now instead of on its next retry; a failure
    /// only costs that retry (about a second), so it is logged, not returned.
    async fn nudge_reconnect(&self) {
        if let Err(e) = self.inner.vmm.reconnect_agent(&self.inner.spec).await {
            tracing::debug!(machine = %self.inner.name, error = %e, "chardev-change failed; QEMU retries by itself");
        }
    }

    /// One protocol round trip through the agent (no process, no file): the channel's latency.
    pub async fn ping(&self) -> Result<()> {
        let conn = self.conn("ping")?;
        match conn.ping().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.map_err(e).await),
        }
    }

    /// Drops the agent connection and waits for the VM to connect again (the guest agent serves
    /// one session per host connection).
    pub async fn reconnect(&self) -> Result<()> {
        let listener = self.bind_agent_socket()?;
        if let Some(c) = self.inner.conn.lock().expect("conn lock").take() {
            c.close("host reconnecting");
        }
        let exit_rx = self
            .exit_watch()
            .ok_or_else(|| self.invalid_state("reconnect"))?;
        self.nudge_reconnect().await;
        self.await_agent(listener, exit_rx).await
    }

    fn invalid_state(&self, op: &str) -> Error {
        Error::InvalidState {
            name: self.inner.name.clone(),
            state: self.current_state().to_string(),
            op: op.to_string(),
        }
    }

    pub(super) fn conn(&self, op: &str) -> Result<AgentConn> {
        if self.current_state() != MachineState::Running {
            return Err(self.invalid_state(op));
        }
        self.inner
            .conn
            .lock()
            .expect("conn lock")
            .clone()
            .ok_or_else(|| self.invalid_state(op))
    }

    /// Maps an agent failure: a lost channel becomes `Interrupted`, saying how the VM ended.
    pub(super) async fn map_err(&self, e: AgentError) -> Error {
        match e {
            AgentError::Remote(r) => Error::from_remote(r),
            AgentError::Unexpected(m) => Error::Protocol { message: m },
            e @ AgentError::NotSupported(_) => Error::NotSupported {
                message: e.to_string(),
            },
            e @ AgentError::TooLarge { .. } => Error::InvalidConfig {
                message: e.to_string(),
            },
            // The VM is up: no wait for an exit that will not come.
            AgentError::Closed(closed) if closed.agent_restarted() => Error::Interrupted {
                name: self.inner.name.clone(),
                detail: closed.reason,
            },
            AgentError::Closed(closed) => {
                let mut detail = format!("agent connection lost ({})", closed.reason);
                if let Some(mut rx) = self.exit_watch() {
                    if let Ok(Ok(d)) =
                        tokio::time::timeout(EXIT_GRACE, rx.wait_for(|d| d.is_some())).await
                    {
                        detail = d.clone().unwrap_or(detail);
                    }
                }
                Error::Interrupted {
                    name: self.inner.name.clone(),
                    detail,
                }
            }
        }
    }

    /// Waits until the VMM has exited, up to `limit`. True if it has.
    async fn wait_exit(&self, limit: Duration) -> bool {
        let Some(mut rx) = self.exit_watch() else {
            return true;
        };
        let done = tokio::time::timeout(limit, rx.wait_for(|d| d.is_some()))
            .await
            .is_ok();
        done
    }

    async fn kill_and_wait(&self) {
        if let Some(pid) = self.vm_pid() {
            // SAFETY: signals a process id we started (or read from our record); no memory involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            self.wait_exit(KILL_WAIT).await;
        }
    }

    /// The agent request for a command: the image's environment under the caller's, and the
    /// image's working directory unless the caller names one.
    /// The agent request of an exec: the image's `Env` under `opts.env`, its `WorkingDir`
    /// unless `opts.workdir`. A per-command user needs an image (SPEC §3.6: a bare machine
    /// refuses it).
    fn request(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecRequest> {
        let image = self.inner.record.lock().expect("record lock").image.clone();
        if opts.user.is_some() && image.is_none() {
            return Err(Error::invalid(
                "a per-command user needs a machine created from an image",
            ));
        }
        let mut env = image.as_ref().map(|i| i.env.clone()).unwrap_or_default();
        env.extend(opts.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(ExecRequest {
            argv: argv.to_vec(),
            env: env.into_iter().collect(),
            workdir: opts
                .workdir
                .clone()
                .or_else(|| image.and_then(|i| i.workdir)),
            timeout_ms: opts.timeout_ms(),
            stdin: opts.stdin.is_some(),
            user: opts.user.clone(),
        })
    }

    /// Runs an `Op::Exec` / `Op::ExecIn` to completion with [`MachineBackend::exec`]'s
    /// semantics.
    pub(super) async fn exec_op(
        &self,
        op: Op,
        argv: &[String],
        opts: &ExecOptions,
    ) -> Result<ExecResult> {
        let conn = self.conn("exec")?;
        let fut = conn.exec_op(op, opts.stdin.clone());
        // Safety net if the guest cannot enforce the timeout (a wedged VM): give up a grace later.
        let outcome = match opts.timeout {
            Some(t) => tokio::time::timeout(t + EXEC_GRACE, fut)
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("{argv:?} did not end {EXEC_GRACE:?} after its timeout"),
                })?,
            None => fut.await,
        };
        match outcome {
            Ok(o) => {
                let mut r = ExecResult::from_bytes(o.code, o.timed_out, o.stdout, o.stderr);
                r.stdout_truncated = o.stdout_truncated;
                r.stderr_truncated = o.stderr_truncated;
                Ok(r)
            }
            Err(e) => Err(self.map_err(e).await),
        }
    }

    /// Kills the VM and removes everything of the machine: processes, sockets, disk, record;
    /// the machine leaves its engine's live machines.
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    pub(crate) async fn destroy(&self) -> Result<()> {
        Self::note(&self.inner, Event::Delete);
        self.kill_and_wait().await;
        Self::stop_helpers(&self.inner);
        let tasks: Vec<_> = self
            .inner
            .ports
            .lock()
            .expect("ports lock")
            .drain(..)
            .collect();
        close_ports(tasks).await;
        let (dir, home_dir, name) = (
            self.inner.spec.dir.clone(),
            self.inner.home_dir.clone(),
            self.inner.name.clone(),
        );
        let ram_dir = self.inner.ram_dir();
        let removed = self
            .inner
            .db
            .call(move |db| {
                remove_dir_logged(&dir);
                remove_dir_logged(&home_dir);
                super::ram::remove_dir(&ram_dir);
                db.delete(&name)
            })
            .await;
        self.inner
            .engine
            .forget(&self.inner.name, Arc::as_ptr(&self.inner));
        Self::note(&self.inner, Event::Removed);
        tracing::info!("deleted");
        removed
    }
}

#[path = "machine_ops.rs"]
mod ops;

#[path = "pause.rs"]
mod pause;

#[path = "branch.rs"]
mod branch;
#[path = "checkpoint.rs"]
mod checkpoint;
#[path = "pool.rs"]
mod pool;

pub use branch::BranchReport;
pub(crate) use branch::{base_ram_at, BASE_STATE};

impl Drop for Inner {
    fn drop(&mut self) {
        // End this process's agent session: the guest sees the host go away and syncs; a machine
        // that must not outlive its process then powers itself off after its linger time, a
        // detached one waits for the next `connect`.
        if let Some(c) = self.conn.lock().expect("conn lock").take() {
            c.close("machine handle dropped");
        }
        for (_, t) in self.ports.lock().expect("ports lock").drain(..) {
            t.abort();
        }
        let me: *const Inner = self;
        let phase = *self.phase.lock().expect("phase lock");
        let persistent = self.record.lock().expect("record lock").persistent;
        if !self.owned || persistent || phase == Phase::Deleted {
            self.engine.forget(&self.name, me);
            return;
        }
        // The last handle of a non-persistent machine this process created: nothing of it may
        // outlive the handle.
        tracing::info!(machine = %self.name, "last handle dropped: removing the machine");
        if let Some(vm) = self.vm.lock().expect("vm lock").as_ref() {
            if vm.exit.borrow().is_none() {
                // SAFETY: signals the VMM process this machine started; no memory involved.
                unsafe { libc::kill(vm.pid as i32, libc::SIGKILL) };
            }
        }
        let helpers: Vec<_> = self
            .helpers
            .lock()
            .expect("helpers lock")
            .drain(..)
            .collect();
        end_children(helpers);
        // The files and the record go on the blocking pool, holding the name's gate so that a
        // create or open of the same name waits for them (inline without a runtime).
        let (dir, home_dir, db, name) = (
            self.spec.dir.clone(),
            self.home_dir.clone(),
            self.db.clone(),
            self.name.clone(),
        );
        let engine = self.engine.clone();
        let me_addr = me as usize;
        let gate = self.engine.release(&self.name, me);
        let ram_dir = self.ram_dir();
        // the supervisor that would remove the cgroup may never run (the runtime is ending)
        let cgroup = super::cgroup::detect()
            .map(|h| super::cgroup::machine_dirs(&h, &dir))
            .unwrap_or_default();
        let cleanup = move || {
            super::cgroup::remove(&cgroup);
            remove_dir_logged(&dir);
            remove_dir_logged(&home_dir);
            super::ram::remove_dir(&ram_dir);
            if let Err(e) = db.delete(&name) {
                tracing::warn!(machine = %name, error = %e, "cannot remove the machine record");
            }
            engine.drained(&name, me_addr as *const Inner);
        };
        match (tokio::runtime::Handle::try_current(), gate) {
            (Ok(rt), Some(gate)) => {
                rt.spawn_blocking(move || {
                    cleanup();
                    drop(gate);
                });
            }
            _ => cleanup(),
        }
    }
}
