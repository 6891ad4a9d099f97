//! Which [`MachineConfig`] fields a target honours: one table per target, and one place that
//! refuses the rest ([`MachineConfig::refuse_unsupported`]) with `NotSupported` naming the
//! field and the target.

use super::{MachineConfig, NetworkBackend, Target};
use crate::config::DiskDurability;
use crate::error::{Error, Result};

/// A field of [`MachineConfig`] set to something other than its default, as
/// [`MachineConfig::fields_set`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigField {
    /// `name`
    Name,
    /// `image`
    Image,
    /// `labels`
    Labels,
    /// `command`
    Command,
    /// `env`
    Env,
    /// `workdir`
    Workdir,
    /// `user` (the workload's)
    User,
    /// `mounts`
    Mounts,
    /// `mounts[].staged`
    MountStaged,
    /// `ports`
    Ports,
    /// `ports[].host` = 0: a host port picked by the target
    PortAnyHost,
    /// `resources.cpus`
    Cpus,
    /// `resources.memory_mb`
    MemoryMb,
    /// `resources.storage_gb`
    StorageGb,
    /// `resources.network` / `network`
    Network,
    /// `resources.allow_cidrs`
    AllowCidrs,
    /// `resources.allow_hosts`
    AllowHosts,
    /// `resources.overlay_gb`
    OverlayGb,
    /// `resources.gpu`
    Gpu,
    /// `resources.gpu_vram_mib`
    GpuVramMib,
    /// `resources.cuda`
    Cuda,
    /// `resources.disk_durability` = deferred (full is every target's behaviour)
    DiskDurabilityDeferred,
    /// `resources.network_backend` = tsi (virtio-net is what the local engine uses)
    NetworkBackendTsi,
    /// `persistent`
    Persistent,
    /// `detach`
    Detach,
    /// `ready_timeout`
    ReadyTimeout,
    /// `wait_for_ports`
    WaitForPorts,
    /// `auto_stop_seconds`
    AutoStopSeconds,
    /// `ttl_seconds`
    TtlSeconds,
    /// `branchable` / `forkable` true
    Branchable,
    /// `egress_interceptor`
    EgressInterceptor,
    /// `credentials`
    Credentials,
    /// `credentials[].methods`
    CredentialMethods,
    /// `cache_disk`
    CacheDisk,
}

impl ConfigField {
    /// The field's path as Rust and Python spell it (`resources.allow_hosts`).
    pub fn name(self) -> &'static str {
        self.names().0
    }

    /// The field's path as TypeScript and the wire spell it (`resources.allowHosts`).
    pub fn camel_name(self) -> &'static str {
        self.names().1
    }

    fn names(self) -> (&'static str, &'static str) {
        use ConfigField::*;
        match self {
            Name => ("name", "name"),
            Image => ("image", "image"),
            Labels => ("labels", "labels"),
            Command => ("command", "command"),
            Env => ("env", "env"),
            Workdir => ("workdir", "workdir"),
            User => ("user", "user"),
            Mounts => ("mounts", "mounts"),
            MountStaged => ("mounts[].staged", "mounts[].staged"),
            Ports => ("ports", "ports"),
            PortAnyHost => ("ports[].host = 0", "ports[].host = 0"),
            Cpus => ("resources.cpus", "resources.cpus"),
            MemoryMb => ("resources.memory_mb", "resources.memoryMb"),
            StorageGb => ("resources.storage_gb", "resources.storageGb"),
            Network => ("network", "network"),
            AllowCidrs => ("resources.allow_cidrs", "resources.allowCidrs"),
            AllowHosts => ("resources.allow_hosts", "resources.allowHosts"),
            OverlayGb => ("resources.overlay_gb", "resources.overlayGb"),
            Gpu => ("resources.gpu", "resources.gpu"),
            GpuVramMib => ("resources.gpu_vram_mib", "resources.gpuVramMib"),
            Cuda => ("resources.cuda", "resources.cuda"),
            DiskDurabilityDeferred => (
                "resources.disk_durability = \"deferred\"",
                "resources.diskDurability = \"deferred\"",
            ),
            NetworkBackendTsi => (
                "resources.network_backend = \"tsi\"",
                "resources.networkBackend = \"tsi\"",
            ),
            Persistent => ("persistent", "persistent"),
            Detach => ("detach", "detach"),
            ReadyTimeout => ("ready_timeout_seconds", "readyTimeoutSeconds"),
            WaitForPorts => ("wait_for_ports", "waitForPorts"),
            AutoStopSeconds => ("auto_stop_seconds", "autoStopSeconds"),
            TtlSeconds => ("ttl_seconds", "ttlSeconds"),
            Branchable => ("branchable", "branchable"),
            EgressInterceptor => ("egress_interceptor", "egressInterceptor"),
            Credentials => ("credentials", "credentials"),
            CredentialMethods => ("credentials[].methods", "credentials[].methods"),
            CacheDisk => ("cache_disk", "cacheDisk"),
        }
    }
}

impl std::fmt::Display for ConfigField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (snake, camel) = self.names();
        if snake == camel {
            f.write_str(snake)
        } else {
            write!(f, "{snake} ({camel})")
        }
    }
}

/// What a target does with a field that is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// It applies it.
    Honoured,
    /// It accepts it and does nothing with it, as the SPEC says (e.g. `ttl_seconds` locally).
    Ignored,
    /// It refuses the config with `NotSupported`.
    Refused,
}

/// The fields a target honours (SPEC §11). A backend passes its own to
/// [`MachineConfig::refuse_unsupported`] first thing in create.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// The target named in refusals.
    pub target: Target,
    /// What it does with each field.
    pub support: fn(ConfigField) -> Support,
}

impl Capabilities {
    /// The local engine of this crate.
    pub const LOCAL: Capabilities = Capabilities {
        target: Target::Local,
        support: local_support,
    };

    /// A smolfleet server as the published clients know it (SPEC §11).
    pub const CLOUD: Capabilities = Capabilities {
        target: Target::Cloud,
        support: cloud_support,
    };

    /// A target that honours every field (for in-memory backends in tests).
    pub fn honouring_all(target: Target) -> Capabilities {
        Capabilities {
            target,
            support: |_| Support::Honoured,
        }
    }
}

fn local_support(f: ConfigField) -> Support {
    use ConfigField::*;
    match f {
        Name | Image | Labels | Command | Env | Workdir | User | Mounts | Ports | Cpus
        | MemoryMb | StorageGb | Network | AllowCidrs | AllowHosts | Persistent | Detach
        | ReadyTimeout | Branchable => Support::Honoured,
        // SPEC §11: sweeps of the cloud's control plane; a local machine lives as long as its
        // process (or its persistent / detached record) says. Create returns once the agent
        // answers; readiness of ports is `wait_until_ready`'s.
        AutoStopSeconds | TtlSeconds | WaitForPorts => Support::Ignored,
        // Not implemented by the local engine yet: refused rather than dropped.
        MountStaged
        | PortAnyHost
        | OverlayGb
        | Gpu
        | GpuVramMib
        | Cuda
        | DiskDurabilityDeferred
        | NetworkBackendTsi
        | EgressInterceptor
        | Credentials
        | CredentialMethods => Support::Refused,
        // Cloud only (SPEC §7.3).
        CacheDisk => Support::Refused,
    }
}

fn cloud_support(f: ConfigField) -> Support {
    use ConfigField::*;
    match f {
        Name
        | Image
        | Labels
        | Command
        | Env
        | Workdir
        | Ports
        | PortAnyHost
        | Cpus
        | MemoryMb
        | StorageGb
        | Network
        | AllowCidrs
        | AllowHosts
        | DiskDurabilityDeferred
        | ReadyTimeout
        | WaitForPorts
        | AutoStopSeconds
        | TtlSeconds
        | Branchable
        | Credentials
        | CacheDisk => Support::Honoured,
        // Not sent (SPEC §11): cloud machines always persist; local devices.
        Persistent | Detach | OverlayGb | Gpu | GpuVramMib | Cuda | NetworkBackendTsi => {
            Support::Ignored
        }
        Mounts | MountStaged | User | EgressInterceptor | CredentialMethods => Support::Refused,
    }
}

impl MachineConfig {
    /// Every field set to something other than its default, in declaration order.
    pub fn fields_set(&self) -> Vec<ConfigField> {
        use ConfigField::*;
        let r = &self.resources;
        let on = |b: Option<bool>| b == Some(true);
        [
            (Name, self.name.is_some()),
            (Image, self.image.is_some()),
            (Labels, !self.labels.is_empty()),
            (Command, self.command.is_some()),
            (Env, !self.env.is_empty()),
            (Workdir, self.workdir.is_some()),
            (User, self.user.is_some()),
            (Mounts, !self.mounts.is_empty()),
            (MountStaged, self.mounts.iter().any(|m| m.staged)),
            (Ports, !self.ports.is_empty()),
            (PortAnyHost, self.ports.iter().any(|p| p.host == 0)),
            (Cpus, r.cpus.is_some()),
            (MemoryMb, r.memory_mb.is_some()),
            (StorageGb, r.storage_gb.is_some()),
            (Network, self.effective_network().is_some()),
            (AllowCidrs, !r.allow_cidrs.is_empty()),
            (AllowHosts, !r.allow_hosts.is_empty()),
            (OverlayGb, r.overlay_gb.is_some()),
            (Gpu, on(r.gpu)),
            (GpuVramMib, r.gpu_vram_mib.is_some()),
            (Cuda, on(r.cuda)),
            (
                DiskDurabilityDeferred,
                r.disk_durability == Some(DiskDurability::Deferred),
            ),
            (
                NetworkBackendTsi,
                r.network_backend == Some(NetworkBackend::Tsi),
            ),
            (Persistent, self.persistent),
            (Detach, self.detach),
            (ReadyTimeout, self.ready_timeout.is_some()),
            (WaitForPorts, self.wait_for_ports.is_some()),
            (AutoStopSeconds, self.auto_stop_seconds.is_some()),
            (TtlSeconds, self.ttl_seconds.is_some()),
            (Branchable, self.is_branchable()),
            (EgressInterceptor, self.egress_interceptor.is_some()),
            (Credentials, !self.credentials.is_empty()),
            (
                CredentialMethods,
                self.credentials
                    .iter()
                    .any(|c| c.methods.as_ref().is_some_and(|m| !m.is_empty())),
            ),
            (CacheDisk, self.cache_disk.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
    }

    /// The first field set here that `caps` refuses.
    pub fn unsupported_on(&self, caps: &Capabilities) -> Option<ConfigField> {
        self.fields_set()
            .into_iter()
            .find(|&f| (caps.support)(f) == Support::Refused)
    }

    /// `Err(NotSupported)` naming the first field `caps` refuses and the target; the fields it
    /// ignores are logged at debug level. A backend calls this first thing in create.
    pub fn refuse_unsupported(&self, caps: &Capabilities) -> Result<()> {
        for f in self.fields_set() {
            match (caps.support)(f) {
                Support::Honoured => {}
                Support::Ignored => tracing::debug!(
                    field = f.name(),
                    target = caps.target.as_str(),
                    "config field ignored by this target"
                ),
                Support::Refused => {
                    return Err(Error::NotSupported {
                        message: format!(
                            "{f} is not supported on the {} target; leave it unset",
                            caps.target
                        ),
                    })
                }
            }
        }
        Ok(())
    }
}
