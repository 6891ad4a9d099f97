//! The local engine: machines as QEMU processes on this host, supervised by the caller's process
//! (or left running, `detach`), with their records under the engine's run directory.
//!
//! One engine per home per process ([`LocalBackend::open_home`], [`LocalBackend::shared`]):
//! one state database, and the live machines this process drives, so a second `open` or
//! `connect` of a held machine is that same handle, at once (see `registry`).

pub mod accel;
pub mod admission;
pub mod agent;
pub mod assets;
pub mod cgroup;
pub mod checkpoint_file;
pub mod checkpoint_store;
pub mod confine;
pub mod console;
mod container;
pub mod disk;
pub mod egress;
mod machine;
pub mod mounts;
pub mod net;
pub mod phase;
mod ports;
pub mod programs;
pub mod qmp;
pub mod ram;
mod reaper;
pub mod record;
mod registry;
pub mod runas;
pub mod slots;
pub mod state;
mod teardown;
pub mod template;
pub mod template_store;
pub mod vmm;
mod watchdog;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use machine::{BranchReport, LocalMachine};
pub use phase::Phase;
pub use reaper::REAP_INTERVAL;

use crate::backend::{Backend, MachineBackend};
use crate::config::{generate_name, MachineConfig, MachineState, MachineSummary, PortSpec, Target};
use crate::error::{Error, Result};
use accel::AccelError;
use record::{now_unix, ProcId, Record};
use state::StateDb;
use vmm::{Qemu, VmSpec, Vmm};

/// Default vCPUs.
pub const DEFAULT_CPUS: u32 = 1;
/// Default memory (MiB).
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Default readiness deadline (SPEC §3.4).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default writable disk size (GiB, sparse).
pub const DEFAULT_STORAGE_GB: u32 = 20;
/// How long a machine that must not outlive its process waits for its host to come back
/// before it powers itself off.
pub const LINGER: Duration = Duration::from_secs(3);
/// How long `connect` waits for the VM to reconnect its agent channel.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The engine's run directory for a home: `$SMOL_RUN_DIR`, else `/tmp/smol-<uid>-<hash of
/// home>`. Short on purpose: unix socket paths are limited to 107 bytes.
pub fn run_dir_for(home: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("SMOL_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut h: u32 = 0x811c_9dc5;
    for b in home.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    PathBuf::from(format!("/tmp/smol-{uid}-{h:08x}"))
}

/// Runs an image-store future to completion on a blocking thread of the current runtime. The
/// pull futures are not `Send` (oci-client borrows across awaits), so they cannot run inside the
/// `Send` futures of the `Backend` seam directly.
pub(crate) async fn on_own_thread<F, Fut, T>(f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::result::Result<T, crate::image::ImageError>>,
    T: Send + 'static,
{
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || rt.block_on(f()))
        .await
        .map_err(|e| Error::Guest {
            message: format!("image operation panicked: {e}"),
        })?
        .map_err(Error::from)
}

/// What `smol doctor` reports.
#[derive(Debug)]
pub struct Doctor {
    /// Accelerator and why, or why none can be used.
    pub accel: std::result::Result<accel::AccelChoice, String>,
    /// VMM version, or why it cannot be used.
    pub vmm: std::result::Result<String, String>,
    /// Guest assets, or what is missing.
    pub assets: std::result::Result<assets::Assets, String>,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Engine home.
    pub home: PathBuf,
    /// Every program the engine runs (scripts/programs.txt): present, runnable, version.
    pub programs: Vec<programs::Check>,
    /// How machines' processes are confined here (`local::confine`), "partial" where some of
    /// it cannot apply.
    pub confinement: String,
}

impl Doctor {
    /// Whether machines can be created on this host (every `engine` program is there; a
    /// missing program of an optional feature, mounts or network, only disables that feature).
    pub fn ok(&self) -> bool {
        self.accel.is_ok()
            && self.vmm.is_ok()
            && self.assets.is_ok()
            && self
                .programs
                .iter()
                .all(|c| c.ok() || c.program.role != programs::Role::Engine)
    }
}

/// The workload a machine launches at every boot (SPEC §3.4): `command`, else the image's
/// `Entrypoint` + `Cmd`; the image's `Env` under `env`; `workdir`, else the image's.
fn workload(
    config: &MachineConfig,
    image: Option<&record::ImageRecord>,
    image_argv: Vec<String>,
    image_user: Option<String>,
) -> Result<Option<record::Workload>> {
    let argv = config.command.clone().unwrap_or(image_argv);
    if argv.is_empty() {
        if config.command.is_none()
            && (!config.env.is_empty() || config.workdir.is_some() || config.user.is_some())
        {
            return Err(Error::invalid(
                "env, workdir and user apply to the workload launched at create: give a \
                 command (or an image that has one); per-command settings go in ExecOptions",
            ));
        }
        return Ok(None);
    }
    let mut env = image.map(|i| i.env.clone()).unwrap_or_default();
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(Some(record::Workload {
        argv,
        env,
        workdir: config
            .workdir
            .clone()
            .or_else(|| image.and_then(|i| i.workdir.clone())),
        user: config.user.clone().or(image_user),
    }))
}

/// [`crate::local_availability`]: the doctor's findings as SPEC §3.10 codes.
pub(crate) fn availability() -> crate::config::LocalAvailability {
    let no = |code: &str, reason: String| crate::config::LocalAvailability {
        available: false,
        code: Some(code.to_string()),
        reason: Some(reason),
        accel: None,
    };
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return no(
            "UNSUPPORTED_PLATFORM",
            "the local engine runs on linux-x64 hosts".into(),
        );
    }
    let d = LocalBackend::from_env().doctor();
    let choice = match d.accel {
        Ok(c) => c,
        Err(e) => return no("KVM_UNAVAILABLE", e),
    };
    if let Err(e) = d.vmm {
        return no(
            "HYPERVISOR_UNAVAILABLE",
            format!("{e}; install QEMU (Debian: apt-get install qemu-system-x86) or set SMOL_QEMU"),
        );
    }
    if let Some(c) = d
        .programs
        .iter()
        .find(|c| !c.ok() && c.program.role == programs::Role::Engine)
    {
        return no(
            "RUNTIME_NOT_INSTALLED",
            format!(
                "{}: {}; install it: apt-get install {}",
                c.program.program,
                c.status
                    .as_ref()
                    .err()
                    .map(String::as_str)
                    .unwrap_or_default(),
                c.program.package
            ),
        );
    }
    if let Err(e) = d.assets {
        return no(
            "RUNTIME_NOT_INSTALLED",
            format!(
                "{e}; the smolmachines packages (wheel, npm package, release tarball) carry \
                 them, or run `make setup` in a checkout to build them"
            ),
        );
    }
    crate::config::LocalAvailability {
        available: true,
        code: None,
        reason: None,
        accel: Some(choice.accel.as_str().to_string()),
    }
}

/// The local engine backend. Cheap to clone: clones (and the `with_*` variants of one) share
/// the engine of their home and run directory: its state database and its live machines.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    home: PathBuf,
    run_dir: PathBuf,
    vmm: Arc<dyn Vmm>,
    assets: Option<assets::Assets>,
    passt: Option<PathBuf>,
    shared: Arc<registry::Shared>,
    /// Booted templates for create (`local::template`); `None`: `SMOL_TEMPLATES`.
    templates: Option<bool>,
    /// Warm clones kept per template; `None`: `SMOL_TEMPLATE_POOL`.
    pool: Option<usize>,
}

fn map_accel(e: AccelError) -> Error {
    match e {
        AccelError::KvmUnavailable(_) => Error::KvmUnavailable {
            message: e.to_string(),
        },
        AccelError::BadValue(_) => Error::invalid(e.to_string()),
    }
}

impl LocalBackend {
    /// This process's engine for `home` and `run_dir` (made on first use, then the same `Arc`).
    pub fn open_dirs(home: impl AsRef<Path>, run_dir: impl AsRef<Path>) -> Arc<LocalBackend> {
        let key = (
            registry::canonical(home.as_ref()),
            registry::canonical(run_dir.as_ref()),
        );
        let (home, run_dir) = key.clone();
        registry::engine(key, || LocalBackend {
            home,
            run_dir,
            vmm: Arc::new(Qemu::from_env()),
            assets: None,
            passt: None,
            shared: Arc::new(registry::Shared::default()),
            templates: None,
            pool: None,
        })
    }

    /// This process's engine whose home (state database, disks) is `home` and whose run
    /// directory is `home/run`: the same `Arc` at every call. Engines of different homes do not
    /// see each other's machines.
    pub fn open_home(home: impl AsRef<Path>) -> Arc<LocalBackend> {
        let home = home.as_ref();
        Self::open_dirs(home, home.join("run"))
    }

    /// This process's engine configured from the environment (`SMOL_HOME`, `SMOL_RUN_DIR`).
    pub fn open_env() -> Arc<LocalBackend> {
        let home = assets::smol_home();
        let run_dir = run_dir_for(&home);
        Self::open_dirs(home, run_dir)
    }

    /// The engine configured from the environment, as a value (a clone of [`Self::open_env`]'s,
    /// sharing its state and live machines).
    pub fn from_env() -> Self {
        (*Self::open_env()).clone()
    }

    /// [`Self::open_home`] as a value (sharing that engine's state and live machines).
    pub fn at(home: impl Into<PathBuf>) -> Self {
        (*Self::open_home(home.into())).clone()
    }

    /// The same engine with another run directory (the engine of that home and run directory).
    pub fn with_run_dir(self, dir: impl Into<PathBuf>) -> Self {
        let other = Self::open_dirs(&self.home, dir.into());
        Self {
            run_dir: other.run_dir.clone(),
            shared: other.shared.clone(),
            ..self
        }
    }

    /// Whether `other` is the same engine (same home and run directory, one set of live
    /// machines).
    pub fn same_engine(&self, other: &LocalBackend) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The image cache of this engine's home (pull, list, remove, prune).
    pub fn image_store(&self) -> Result<crate::image::ImageStore> {
        Ok(crate::image::ImageStore::open(&self.home)?)
    }

    /// The live handle of `name` if this process holds one (cheap: a map lookup).
    pub fn live_machine(&self, name: &str) -> Option<LocalMachine> {
        self.shared.live(name)
    }

    /// The same engine booting these assets instead of resolving them from the environment.
    pub fn with_assets(mut self, assets: assets::Assets) -> Self {
        self.assets = Some(assets);
        self
    }

    /// The same engine starting guest networking with this passt binary (or wrapper).
    pub fn with_passt(mut self, binary: impl Into<PathBuf>) -> Self {
        self.passt = Some(binary.into());
        self
    }

    /// The run directory (sockets, logs).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The engine home (state database, disks).
    pub fn home(&self) -> &Path {
        &self.home
    }

    async fn db(&self) -> Result<Arc<StateDb>> {
        self.shared.db(&self.home).await
    }

    fn machine_run_dir(&self, name: &str) -> PathBuf {
        self.machines_dir().join(name)
    }

    fn machine_home_dir(&self, name: &str) -> PathBuf {
        self.home.join("machines").join(name)
    }

    /// Cleans up after processes that died (see `reaper`): machines that were not to outlive
    /// their process lose their VM (if it still runs) and, unless persistent, their record,
    /// disk and sockets. Scans every record; returns how many machines were removed.
    pub async fn reap(&self) -> Result<usize> {
        let db = self.db().await?;
        let (run, home) = (self.machines_dir(), self.home.join("machines"));
        let engine_home = self.home.clone();
        let n = db
            .call(move |db| {
                let dirs = reaper::Dirs {
                    run: &run,
                    home: &home,
                };
                let n = reaper::reap_all(db, &dirs)?;
                // the booted templates kept in the home: those unused, broken or too many
                let policy = template_store::Policy::from_env();
                if let Err(e) = template_store::gc(db, &dirs, &engine_home, policy) {
                    tracing::warn!(error = %e, "template GC");
                }
                // RAM roots under /dev/shm of engines whose run directory is gone
                ram::remove_orphans();
                Ok(n)
            })
            .await?;
        *self.shared.last_reap.lock().expect("reap lock") = Some(Instant::now());
        if n > 0 {
            tracing::info!(reaped = n, home = %self.home.display(), "reaper");
        }
        Ok(n)
    }

    /// [`Self::reap`] when the engine has not scanned yet or did so [`REAP_INTERVAL`] ago.
    async fn reap_if_due(&self) -> Result<()> {
        let due = self
            .shared
            .last_reap
            .lock()
            .expect("reap lock")
            .is_none_or(|t| t.elapsed() >= REAP_INTERVAL);
        if due {
            self.reap().await?;
        }
        Ok(())
    }

    /// Reaps the one record `rec` if its owner died; true when it is gone.
    async fn reap_record(&self, db: &Arc<StateDb>, rec: Record) -> Result<bool> {
        let (run, home) = (self.machines_dir(), self.home.join("machines"));
        db.call(move |db| {
            reaper::reap_one(
                db,
                &reaper::Dirs {
                    run: &run,
                    home: &home,
                },
                rec,
            )
        })
        .await
    }

    /// This process's engine of the environment's home as a backend: the same one at every
    /// call ([`Self::open_env`]).
    pub fn shared() -> Arc<dyn Backend> {
        Self::open_env()
    }

    fn machines_dir(&self) -> PathBuf {
        self.run_dir.join("machines")
    }

    /// Checks this host: accelerator, VMM, assets.
    pub fn doctor(&self) -> Doctor {
        Doctor {
            accel: accel::detect().map_err(|e| e.to_string()),
            vmm: self
                .vmm
                .version()
                .map(|v| format!("{} ({v})", self.vmm.name()))
                .map_err(|e| e.to_string()),
            assets: assets::resolve().map_err(|e| e.to_string()),
            run_dir: self.run_dir.clone(),
            home: self.home.clone(),
            programs: programs::check_runtime(),
            confinement: confine::describe(),
        }
    }

    fn spec_for(&self, rec: &Record) -> VmSpec {
        VmSpec {
            name: rec.name.clone(),
            cpus: rec.cpus,
            memory_mb: rec.memory_mb,
            assets: assets::Assets {
                kernel: rec.kernel.clone(),
                initrd: rec.initrd.clone(),
                flavor: if rec.flavor == "cloud" {
                    assets::KernelFlavor::DebianCloud
                } else {
                    assets::KernelFlavor::Smol
                },
            },
            accel: accel::AccelChoice {
                accel: if rec.accel == "kvm" {
                    accel::Accel::Kvm
                } else {
                    accel::Accel::Tcg
                },
                reason: rec.accel_reason.clone(),
            },
            dir: self.machine_run_dir(&rec.name),
            disk: Some(self.machine_home_dir(&rec.name).join("disk.qcow2")),
            linger_ms: (!rec.detach).then(|| LINGER.as_millis() as u64),
            mounts: rec
                .mounts
                .iter()
                .map(|m| (m.target.clone(), m.read_only))
                .collect(),
            network: rec.network,
            image: rec
                .image
                .as_ref()
                .map(|i| (i.rootfs.clone(), i.fstype.clone())),
            ram_file: rec
                .branchable
                .then(|| ram::dir(&self.machines_dir(), &rec.name).join(ram::FILE)),
            restore: None,
            image_slots: slot_files(rec),
        }
    }

    /// Creates a machine and returns the concrete local handle.
    #[tracing::instrument(skip_all, fields(machine = config.name.as_deref().unwrap_or("")))]
    pub async fn create_machine(&self, config: MachineConfig) -> Result<LocalMachine> {
        // One validation for every front end, then the fields this engine cannot honour.
        config.validate()?;
        config.refuse_unsupported(&crate::config::Capabilities::LOCAL)?;
        // SPEC §3.1: an allow-list enables networking restricted to it
        let allow_lists =
            !config.resources.allow_cidrs.is_empty() || !config.resources.allow_hosts.is_empty();
        let network = config.effective_network() == Some(true) || allow_lists;
        let cpus = config.resources.cpus.unwrap_or(DEFAULT_CPUS);
        let memory_mb = config.resources.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        let storage_gb = config.resources.storage_gb.unwrap_or(DEFAULT_STORAGE_GB);
        let mounts = mounts::validate(&config.mounts)?;
        let name = match config.name.clone() {
            Some(n) => {
                crate::config::validate_name(&n)?;
                n
            }
            None => generate_name(),
        };
        let accel = accel::detect().map_err(map_accel)?;
        let assets = match &self.assets {
            Some(a) => a.clone(),
            None => assets::resolve()?,
        };
        let qemu = self
            .vmm
            .version()
            .map_err(|e| Error::HypervisorUnavailable {
                message: e.to_string(),
            })?;
        // kept for a cold boot after a template that failed
        let templates = self.templates_on();
        let cold_config = templates.then(|| config.clone());
        let dir = self.machine_run_dir(&name);
        let sock_len = dir.join("agent.sock").as_os_str().len();
        if sock_len > MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "the machine's socket path would be {sock_len} bytes (max {MAX_SOCKET_PATH}); set SMOL_RUN_DIR to a shorter directory"
            )));
        }
        let (image, image_argv, image_user) = match &config.image {
            Some(reference) => {
                let store = crate::image::ImageStore::open(&self.home)?;
                let reference = reference.clone();
                let p = on_own_thread(move || async move { store.ensure(&reference, None).await })
                    .await?;
                let argv = [p.config.entrypoint.clone(), p.config.cmd.clone()].concat();
                let rec = record::ImageRecord {
                    reference: p.info.reference.clone(),
                    rootfs: p.rootfs.clone(),
                    fstype: p.format.fstype().to_string(),
                    env: p.config.env_map(),
                    workdir: p.config.working_dir.clone().filter(|w| !w.is_empty()),
                };
                (
                    Some(rec),
                    argv,
                    p.config.user.clone().filter(|u| !u.is_empty()),
                )
            }
            None => (None, Vec::new(), None),
        };
        // a template or a pool clone runs no workload: each machine made of it launches its own
        let workload = if template::internal(&config.labels) {
            None
        } else {
            workload(&config, image.as_ref(), image_argv, image_user)?
        };
        let db = self.db().await?;
        self.reap_if_due().await?;
        // This process creates, attaches and cleans up a name one task at a time.
        let slot = self.shared.slot(&name);
        let _gate = slot.gate.clone().lock_owned().await;
        let detach = config.detach;
        let mut record = Record {
            name: name.clone(),
            cpus,
            memory_mb,
            storage_gb,
            accel: accel.accel.as_str().into(),
            accel_reason: accel.reason.clone(),
            kernel: assets.kernel.clone(),
            initrd: assets.initrd.clone(),
            flavor: match assets.flavor {
                assets::KernelFlavor::Smol => "smol".into(),
                assets::KernelFlavor::DebianCloud => "cloud".into(),
            },
            // a detached VM outlives its process, so its record must too
            persistent: config.persistent || detach,
            detach,
            labels: config.labels.clone(),
            ports: config.ports.iter().map(|p| (p.host, p.guest)).collect(),
            mounts,
            network,
            allow_cidrs: config.resources.allow_cidrs.clone(),
            allow_hosts: config.resources.allow_hosts.clone(),
            created_unix: now_unix(),
            vmm: None,
            owner: Some(ProcId::current()),
            booted: false,
            image,
            workload,
            branchable: config.is_branchable(),
            frozen: false,
            paused: false,
            image_slots: Vec::new(),
        };
        // as many image slots as microvm's transports leave free (run(image), local::slots)
        let free = vmm::free_transports(&self.spec_for(&record));
        record.image_slots = vec![None; free.min(slots::SLOTS)];
        // Reserves the name: of two processes creating it, one wins. A name whose owner died
        // is reaped and tried once more.
        let rec = record.clone();
        let inserted = match db.call(move |db| db.insert(&rec)).await {
            Err(Error::Conflict { .. }) => {
                let n = name.clone();
                let reaped = match db.call(move |db| db.get(&n)).await? {
                    Some(old) => self.reap_record(&db, old).await?,
                    None => true, // deleted meanwhile
                };
                if reaped {
                    let rec = record.clone();
                    db.call(move |db| db.insert(&rec)).await
                } else {
                    Err(Error::Conflict { name: name.clone() })
                }
            }
            other => other,
        };
        inserted?;
        tracing::debug!(machine = %name, "name reserved");
        let key = templates.then(|| template::template_name(&record, &qemu, &self.run_dir));
        let template = match key {
            Some(Some(t)) => {
                self.template(&t, &record, &qemu, config.ready_timeout)
                    .await
            }
            _ => None,
        };
        let home_dir = self.machine_home_dir(&name);
        let ram_dir = ram::dir(&self.machines_dir(), &name);
        let prepared = async {
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot clear a stale run directory")
                }
                _ => {}
            }
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            if template.is_some() {
                // the disk is an overlay over the template's, made with the clone
                for d in [&home_dir, &ram_dir] {
                    tokio::fs::create_dir_all(d)
                        .await
                        .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
                }
            } else {
                disk::create(&self.home, &home_dir.join("disk.qcow2"), storage_gb).await?;
            }
            let lock = machine::lock_attach(&dir, &name, Duration::ZERO).await?;
            let listeners = ports::bind(&record.ports).await?;
            Ok::<_, Error>((lock, listeners))
        }
        .await;
        let (lock, listeners) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let (dir, home_dir, n) = (dir.clone(), home_dir.clone(), name.clone());
                let undone = db
                    .call(move |db| {
                        for d in [&dir, &home_dir] {
                            if let Err(e) = std::fs::remove_dir_all(d) {
                                tracing::debug!(path = %d.display(), error = %e, "cleanup after a failed create");
                            }
                        }
                        db.delete(&n)
                    })
                    .await;
                if let Err(u) = undone {
                    tracing::warn!(machine = %name, error = %u, "cannot remove the record of a failed create");
                }
                return Err(e);
            }
        };
        let machine = LocalMachine::new(machine::Parts {
            spec: self.spec_for(&record),
            vmm: self.vmm.clone(),
            db: db.clone(),
            passt: self.passt.clone().unwrap_or_else(net::passt),
            home_dir: home_dir.clone(),
            record,
            ready_timeout: config.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
            owned: true,
            lock,
            engine: self.shared.clone(),
            phase: Phase::Creating,
        });
        let started = match &template {
            Some(t) => self.start_templated(t, &machine).await,
            None => machine.start().await,
        };
        if let Err(e) = started {
            if let Err(d) = machine.destroy().await {
                tracing::warn!(machine = %name, error = %d, "cleanup after a failed boot");
            }
            if let (Some(t), Some(config)) = (&template, cold_config) {
                // a template only makes a create faster: without it, the machine boots cold
                tracing::warn!(machine = %name, template = %t.name(), error = %e, "start from the template failed; booting cold");
                drop(listeners);
                drop(_gate);
                let cold = self.clone().with_templates(false);
                return Box::pin(cold.create_machine(config)).await;
            }
            return Err(e);
        }
        machine.serve_ports(listeners);
        slot.set(&machine);
        Ok(machine)
    }

    /// A live handle again: `connect` boots it when its VM is not running.
    async fn reuse(&self, m: LocalMachine, boot: bool) -> Result<LocalMachine> {
        tracing::debug!(machine = %m.inner.name, "live handle reused");
        if boot && m.public_state() != MachineState::Running {
            m.start().await?;
        }
        Ok(m)
    }

    /// The handle of `name`: this process's live one when it holds one (at once), else a new
    /// one attached to its VM (or booted, `boot`).
    #[tracing::instrument(skip(self), fields(machine = name))]
    async fn handle(&self, name: &str, boot: bool) -> Result<LocalMachine> {
        crate::config::validate_name(name)?;
        let slot = self.shared.slot(name);
        if let Some(m) = slot.live() {
            return self.reuse(m, boot).await;
        }
        let _gate = slot.gate.clone().lock_owned().await;
        if let Some(m) = slot.live() {
            drop(_gate);
            return self.reuse(m, boot).await;
        }
        let db = self.db().await?;
        self.reap_if_due().await?;
        let not_found = || Error::NotFound {
            what: format!("machine {name:?}"),
        };
        let n = name.to_string();
        let rec = db.call(move |db| db.get(&n)).await?.ok_or_else(not_found)?;
        if self.reap_record(&db, rec).await? {
            return Err(not_found());
        }
        let dir = self.machine_run_dir(name);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let lock = machine::lock_attach(&dir, name, ATTACH_TIMEOUT).await?;
        // the record may have changed while we waited for the lock
        let n = name.to_string();
        let record = db.call(move |db| db.get(&n)).await?.ok_or_else(not_found)?;
        let vmm = record.vmm.filter(|v| v.alive());
        // a frozen branch base never boots: `connect` leaves it as it is (SPEC §4.1)
        let frozen = record.frozen;
        // a paused machine is attached as it is, without waiting for its agent (SPEC §4.1)
        let paused = record.paused && vmm.is_some();
        let boot = boot && !frozen;
        let listeners = if vmm.is_some() || boot {
            ports::bind(&record.ports).await?
        } else {
            Vec::new()
        };
        let machine = LocalMachine::new(machine::Parts {
            spec: self.spec_for(&record),
            vmm: self.vmm.clone(),
            db: db.clone(),
            passt: self.passt.clone().unwrap_or_else(net::passt),
            home_dir: self.machine_home_dir(name),
            record,
            ready_timeout: ATTACH_TIMEOUT.max(DEFAULT_READY_TIMEOUT),
            owned: false,
            lock,
            engine: self.shared.clone(),
            phase: if frozen {
                Phase::Frozen
            } else {
                Phase::Stopped
            },
        });
        match vmm {
            Some(v) if paused => machine.attach_paused(v).await?,
            Some(v) => machine.attach(v).await?,
            None if boot => machine.start().await?,
            None => {}
        }
        machine.serve_ports(listeners);
        slot.set(&machine);
        Ok(machine)
    }

    /// Attaches to a machine by name, booting it again if it is stopped (SPEC §4.1 `connect`).
    pub async fn connect_machine(&self, name: &str) -> Result<LocalMachine> {
        self.handle(name, true).await
    }

    /// A handle to a machine by name without booting it (SPEC §4.1 `open`): attached when it
    /// runs, `stopped` otherwise.
    pub async fn open_machine(&self, name: &str) -> Result<LocalMachine> {
        self.handle(name, false).await
    }

    /// Serves the egress filter of running networked machine `name` from this process until
    /// its VMM (or passt) ends, without attaching to it (`net::hold`): what keeps a detached
    /// machine's network up once the process that made it is gone (`smol machine create
    /// --network` starts a process that does this). `None`: not networked or not running;
    /// `Some(false)`: another process's filter serves it; `Some(true)`: served until the end.
    pub async fn hold_network(&self, name: &str) -> Result<Option<bool>> {
        let db = self.db().await?;
        let n = name.to_string();
        let rec = db
            .call(move |db| db.get(&n))
            .await?
            .ok_or_else(|| Error::NotFound {
                what: format!("machine {name:?}"),
            })?;
        if !rec.network || !rec.vmm.is_some_and(|v| v.alive()) {
            return Ok(None);
        }
        let filter = egress::Filter::of_record(&rec);
        let (dir, passt, n) = (
            self.machine_run_dir(name),
            self.passt.clone().unwrap_or_else(net::passt),
            name.to_string(),
        );
        tokio::task::spawn_blocking(move || net::hold(&dir, &passt, &n, filter))
            .await
            .map_err(|e| Error::io("holding the network", std::io::Error::other(e)))?
            .map(Some)
    }

    /// Every machine of this engine home carrying all of `labels`.
    pub async fn list_machines(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<MachineSummary>> {
        let db = self.db().await?;
        self.reap_if_due().await?;
        let labels = labels.clone();
        let records = db.call(move |db| db.list(&labels)).await?;
        let mut kept = Vec::with_capacity(records.len());
        for r in records {
            // a record whose owner died goes now; one whose last handle was just dropped is
            // on its way out
            if self.shared.draining(&r.name) || self.reap_record(&db, r.clone()).await? {
                continue;
            }
            if template::hidden(&r) {
                continue;
            }
            kept.push(r);
        }
        Ok(kept
            .into_iter()
            .map(|r| {
                let vmm = r.vmm.filter(|v| v.alive());
                MachineSummary {
                    id: r.name.clone(),
                    branchable: r.branchable,
                    state: if r.frozen {
                        MachineState::Frozen
                    } else if vmm.is_some() && r.paused {
                        MachineState::Paused
                    } else if vmm.is_some() {
                        MachineState::Running
                    } else if r.booted {
                        MachineState::Stopped
                    } else {
                        MachineState::Created
                    },
                    pid: vmm.map(|v| v.pid),
                    name: r.name,
                    cpus: r.cpus,
                    memory_mb: r.memory_mb,
                    accel: r.accel,
                    labels: r.labels,
                    persistent: r.persistent,
                    detached: r.detach,
                    image: r.image.map(|i| i.reference),
                    created_unix: r.created_unix,
                    storage_gb: r.storage_gb,
                    ports: r
                        .ports
                        .iter()
                        .map(|&(host, guest)| PortSpec { host, guest })
                        .collect(),
                }
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn target(&self) -> Target {
        Target::Local
    }

    async fn create(&self, config: MachineConfig) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(self.create_machine(config).await?))
    }

    async fn connect(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(self.connect_machine(name).await?))
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(self.open_machine(name).await?))
    }

    async fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<MachineSummary>> {
        self.list_machines(labels).await
    }

    async fn restore_checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &crate::config::RestoreOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        Ok(Arc::new(self.restore_machine(id, name, opts).await?))
    }

    async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        self.delete_checkpoint_file(id).await
    }
}

/// The image files `rec`'s slots hold (`None`: empty), for its VMM's arguments.
pub(crate) fn slot_files(rec: &Record) -> Vec<Option<PathBuf>> {
    rec.image_slots
        .iter()
        .map(|s| s.as_ref().map(|s| s.file.clone()))
        .collect()
}
