//! The local engine: machines as QEMU processes on this host, supervised by the caller's process
//! (or left running, `detach`), with their records under the engine's run directory.

pub mod accel;
pub mod agent;
pub mod assets;
mod machine;
pub mod qmp;
pub mod record;
pub mod vmm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use machine::LocalMachine;

use crate::backend::{Backend, MachineBackend};
use crate::config::{generate_name, MachineConfig, MachineState, MachineSummary, Target};
use crate::error::{Error, Result};
use accel::AccelError;
use record::{now_unix, pid_alive, Record};
use vmm::{Qemu, VmSpec, Vmm};

/// Default vCPUs.
pub const DEFAULT_CPUS: u32 = 1;
/// Default memory (MiB).
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Default readiness deadline (SPEC §3.4).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `connect` waits for the VM to reconnect its agent channel.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The engine's run directory: `$SMOL_RUN_DIR`, else `$XDG_RUNTIME_DIR/smol`, else
/// `/tmp/smol-<uid>`. Short on purpose: unix socket paths are limited to 107 bytes.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SMOL_RUN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("smol");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/smol-{uid}"))
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
}

impl Doctor {
    /// Whether machines can be created on this host.
    pub fn ok(&self) -> bool {
        self.accel.is_ok() && self.vmm.is_ok() && self.assets.is_ok()
    }
}

/// The local engine backend.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    run_dir: PathBuf,
    vmm: Arc<dyn Vmm>,
    assets: Option<assets::Assets>,
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
    /// The engine configured from the environment.
    pub fn from_env() -> Self {
        Self {
            run_dir: run_dir(),
            vmm: Arc::new(Qemu::from_env()),
            assets: None,
        }
    }

    /// The same engine with another run directory (machines of different run directories do
    /// not see each other).
    pub fn with_run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = dir.into();
        self
    }

    /// The same engine booting these assets instead of resolving them from the environment.
    pub fn with_assets(mut self, assets: assets::Assets) -> Self {
        self.assets = Some(assets);
        self
    }

    /// The run directory.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// The engine as a shared backend.
    pub fn shared() -> Arc<dyn Backend> {
        Arc::new(Self::from_env())
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
        }
    }

    /// Creates a machine and returns the concrete local handle.
    pub async fn create_machine(&self, config: MachineConfig) -> Result<LocalMachine> {
        if config.image.is_some() {
            return Err(Error::NotSupported {
                message: "machines from images are not supported by the local engine yet".into(),
            });
        }
        if !config.mounts.is_empty() || !config.ports.is_empty() {
            return Err(Error::NotSupported {
                message: "mounts and ports are not supported by the local engine yet".into(),
            });
        }
        if config.resources.network.or(config.network) == Some(true) {
            return Err(Error::NotSupported {
                message: "guest networking is not supported by the local engine yet".into(),
            });
        }
        let cpus = config.resources.cpus.unwrap_or(DEFAULT_CPUS);
        if !(1..=64).contains(&cpus) {
            return Err(Error::invalid(format!("cpus must be 1..=64, got {cpus}")));
        }
        let memory_mb = config.resources.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if !(64..=1_048_576).contains(&memory_mb) {
            return Err(Error::invalid(format!(
                "memory_mb must be 64..=1048576, got {memory_mb}"
            )));
        }
        let name = match config.name {
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
        self.vmm
            .version()
            .map_err(|e| Error::HypervisorUnavailable {
                message: e.to_string(),
            })?;
        let dir = self.machines_dir().join(&name);
        let sock_len = dir.join("agent.sock").as_os_str().len();
        if sock_len > MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "the machine's socket path would be {sock_len} bytes (max {MAX_SOCKET_PATH}); set SMOL_RUN_DIR to a shorter directory"
            )));
        }
        std::fs::create_dir_all(self.machines_dir())
            .map_err(|e| Error::io(format!("creating {}", self.machines_dir().display()), e))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Conflict { name })
            }
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
        let record = Record {
            name: name.clone(),
            pid: None,
            cpus,
            memory_mb,
            accel: accel.accel.as_str().into(),
            accel_reason: accel.reason.clone(),
            kernel: assets.kernel.clone(),
            initrd: assets.initrd.clone(),
            flavor: match assets.flavor {
                assets::KernelFlavor::Smol => "smol".into(),
                assets::KernelFlavor::DebianCloud => "cloud".into(),
            },
            detach: config.detach,
            labels: config.labels.clone(),
            created_unix: now_unix(),
        };
        let lock = match machine::lock_attach(&dir, &name, Duration::ZERO).await {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let spec = VmSpec {
            name,
            cpus,
            memory_mb,
            assets,
            accel,
            dir,
        };
        let machine = LocalMachine::new(
            spec,
            self.vmm.clone(),
            record,
            config.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
            false,
            lock,
        );
        if let Err(e) = machine.boot().await {
            machine.destroy().await;
            return Err(e);
        }
        Ok(machine)
    }

    /// Attaches to a machine by name and returns the concrete local handle.
    pub async fn connect_machine(&self, name: &str) -> Result<LocalMachine> {
        crate::config::validate_name(name)?;
        let dir = self.machines_dir().join(name);
        let record = Record::load(&dir)?;
        let lock = machine::lock_attach(&dir, name, ATTACH_TIMEOUT).await?;
        let spec = VmSpec {
            name: record.name.clone(),
            cpus: record.cpus,
            memory_mb: record.memory_mb,
            assets: assets::Assets {
                kernel: record.kernel.clone(),
                initrd: record.initrd.clone(),
                flavor: if record.flavor == "cloud" {
                    assets::KernelFlavor::DebianCloud
                } else {
                    assets::KernelFlavor::Smol
                },
            },
            accel: accel::AccelChoice {
                accel: if record.accel == "kvm" {
                    accel::Accel::Kvm
                } else {
                    accel::Accel::Tcg
                },
                reason: record.accel_reason.clone(),
            },
            dir,
        };
        let pid = record.pid.filter(|p| pid_alive(*p));
        let machine = LocalMachine::new(spec, self.vmm.clone(), record, ATTACH_TIMEOUT, true, lock);
        match pid {
            Some(pid) => machine.attach(pid).await?,
            None => machine.mark_stopped(),
        }
        Ok(machine)
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

    async fn list(&self) -> Result<Vec<MachineSummary>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.machines_dir()) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let Ok(r) = Record::load(&e.path()) else {
                continue;
            };
            let pid = r.pid.filter(|p| pid_alive(*p));
            out.push(MachineSummary {
                name: r.name,
                state: if pid.is_some() {
                    MachineState::Running
                } else {
                    MachineState::Stopped
                },
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                pid,
                accel: r.accel,
                labels: r.labels,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
