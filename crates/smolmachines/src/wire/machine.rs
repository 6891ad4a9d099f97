//! Machine records, the create body, lists and ports (SPEC §10.2, §10.3, §10.5.2).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::nullable;
use crate::config::{
    CacheDiskRef, CredentialSpec, DiskDurability, MachineConfig, MachineState, MachineSummary,
    PortSpec, ResourceSpec,
};
use crate::error::{Error, Result};

/// What a machine boots from (`source`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `image` or `smolmachine`.
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// The image reference (or the packed machine's).
    pub reference: String,
    /// `amd64` / `arm64` (packed machines, records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// The kind of a [`Source`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// An OCI image.
    Image,
    /// A packed `.smolmachine` artifact.
    Smolmachine,
}

/// `network` of a create body or a record.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    /// Unrestricted egress.
    Open,
    /// No egress.
    Blocked,
    /// Egress to `cidrs` and `hosts` only.
    AllowCidrs,
}

/// `{"mode": ..., "cidrs": [...], "hosts": [...]}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// The mode.
    pub mode: NetworkMode,
    /// Allowed CIDRs (`allowCidrs` mode).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cidrs: Vec<String>,
    /// Allowed host names (`allowCidrs` mode).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hosts: Vec<String>,
}

impl NetworkPolicy {
    /// The policy of a config, as the Python client sends it: `allowCidrs` when CIDRs or hosts
    /// are given, else `open` / `blocked` for `network: true / false`, else none (the server's
    /// default).
    pub fn of(r: &ResourceSpec, network: Option<bool>) -> Option<NetworkPolicy> {
        let policy = |mode| NetworkPolicy {
            mode,
            cidrs: r.allow_cidrs.clone(),
            hosts: r.allow_hosts.clone(),
        };
        if !r.allow_cidrs.is_empty() || !r.allow_hosts.is_empty() {
            return Some(policy(NetworkMode::AllowCidrs));
        }
        network.map(|on| {
            policy(if on {
                NetworkMode::Open
            } else {
                NetworkMode::Blocked
            })
        })
    }
}

/// `resources` of a create body: `diskGb` is always sent (`null` when unset), the rest only
/// when set.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateResources {
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// Storage disk in GB.
    #[serde(default)]
    pub disk_gb: Option<u32>,
    /// `full` / `deferred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_durability: Option<DiskDurability>,
}

/// A port asked for: `{"port": guest}` (create, `PUT .../ports`), with `hostPort` in branch
/// bodies.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRequest {
    /// Guest port.
    pub port: u16,
    /// Host port (branch bodies; the server picks one otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

/// `PUT /v1/machines/{id}/ports`: the complete desired set (TCP).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPortsBody {
    /// The ports.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<PortRequest>,
}

impl From<&[PortSpec]> for SetPortsBody {
    fn from(ports: &[PortSpec]) -> Self {
        SetPortsBody {
            ports: ports
                .iter()
                .map(|p| PortRequest {
                    port: p.guest,
                    host_port: None,
                })
                .collect(),
        }
    }
}

/// `PUT /v1/credentials/{name}`: what the client stores before create (SPEC §3.5).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialBody {
    /// The guest variable holding a placeholder.
    pub env_var: String,
    /// Exact host names.
    pub hosts: Vec<String>,
    /// The secret (never printed by `Debug`).
    pub value: String,
}

impl std::fmt::Debug for CredentialBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialBody")
            .field("env_var", &self.env_var)
            .field("hosts", &self.hosts)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl CredentialBody {
    /// The body for a spec that carries a value (`None` otherwise: nothing to store).
    pub fn of(c: &CredentialSpec) -> Option<CredentialBody> {
        c.value.as_ref().map(|v| CredentialBody {
            env_var: c.env_var.clone(),
            hosts: c.hosts.clone(),
            value: v.clone(),
        })
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

/// `POST /v1/machines` (SPEC §10.3). Serialized as the Python client sends it: `name`,
/// `resources.diskGb`, `autoStopSeconds`, `ttlSeconds` always (`null` when unset), `forkable`
/// always, everything else only when set.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMachineBody {
    /// `null`: the server generates one.
    #[serde(default)]
    pub name: Option<String>,
    /// Required.
    pub source: Source,
    /// Sizes.
    #[serde(default, deserialize_with = "nullable")]
    pub resources: CreateResources,
    /// Egress policy (absent: the server's default, open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Guest ports to publish.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<PortRequest>,
    /// Workload environment.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Workload working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Workload argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Idle stop.
    #[serde(default)]
    pub auto_stop_seconds: Option<u64>,
    /// Delete after.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Delete when stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// The alias the Python client sends (always, also `false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forkable: Option<bool>,
    /// The alias the Rust crate sends; both at once is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branchable: Option<bool>,
    /// Caller metadata.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// Names of stored credentials.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub credentials: Vec<String>,
    /// A cache disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_disk: Option<CacheDiskRef>,
    /// Cloud volumes (not host paths).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mounts: Vec<serde_json::Value>,
    /// Ingress without auth.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
}

impl TryFrom<&MachineConfig> for CreateMachineBody {
    type Error = Error;

    /// The body the cloud client sends for `config` (credentials by name: store their values
    /// with [`CredentialBody`] first). No image is `InvalidConfig`, as on the cloud target.
    fn try_from(c: &MachineConfig) -> Result<Self> {
        let Some(image) = &c.image else {
            return Err(Error::invalid(
                "cloud target requires an image (MachineConfig.image)",
            ));
        };
        Ok(CreateMachineBody {
            name: c.name.clone(),
            source: Source {
                kind: SourceKind::Image,
                reference: image.clone(),
                arch: None,
            },
            resources: CreateResources {
                cpus: c.resources.cpus,
                memory_mb: c.resources.memory_mb,
                disk_gb: c.resources.storage_gb,
                disk_durability: c.resources.disk_durability,
            },
            network: NetworkPolicy::of(&c.resources, c.effective_network()),
            ports: c
                .ports
                .iter()
                .map(|p| PortRequest {
                    port: p.guest,
                    host_port: None,
                })
                .collect(),
            env: c.env.clone(),
            workdir: c.workdir.clone(),
            command: c.command.clone(),
            auto_stop_seconds: c.auto_stop_seconds,
            ttl_seconds: c.ttl_seconds,
            ephemeral: None,
            forkable: Some(c.is_branchable()),
            branchable: None,
            labels: c.labels.clone(),
            credentials: c.credentials.iter().map(|c| c.name.clone()).collect(),
            cache_disk: c.cache_disk.clone(),
            mounts: Vec::new(),
            public: false,
        })
    }
}

impl CreateMachineBody {
    /// The core config of this body, validated ([`MachineConfig::validate`]); credentials
    /// named in it are looked up with `credential`. A field the core has no place for
    /// (`ephemeral`, `public`, volume mounts, a `smolmachine` source) is `NotSupported`.
    pub fn into_config(
        self,
        credential: impl Fn(&str) -> Result<CredentialSpec>,
    ) -> Result<MachineConfig> {
        let refuse = |field: &str| {
            Err(Error::NotSupported {
                message: format!("{field} is not supported by this server; leave it unset"),
            })
        };
        if self.source.kind != SourceKind::Image {
            return refuse("source.type \"smolmachine\"");
        }
        if self.ephemeral == Some(true) {
            return refuse("ephemeral");
        }
        if self.public {
            return refuse("public");
        }
        if !self.mounts.is_empty() {
            return refuse("mounts (volumes)");
        }
        let (network, allow_cidrs, allow_hosts) = match self.network {
            None => (None, Vec::new(), Vec::new()),
            Some(p) => match p.mode {
                NetworkMode::Open => (Some(true), Vec::new(), Vec::new()),
                NetworkMode::Blocked => (Some(false), Vec::new(), Vec::new()),
                NetworkMode::AllowCidrs if p.cidrs.is_empty() && p.hosts.is_empty() => {
                    return Err(Error::invalid(
                        "allowCidrs network mode requires at least one CIDR or host",
                    ))
                }
                NetworkMode::AllowCidrs => (None, p.cidrs, p.hosts),
            },
        };
        let credentials = self
            .credentials
            .iter()
            .map(|n| credential(n))
            .collect::<Result<Vec<_>>>()?;
        let config = MachineConfig {
            name: self.name,
            image: Some(self.source.reference),
            ports: self
                .ports
                .iter()
                .map(|p| PortSpec {
                    host: p.host_port.unwrap_or(0),
                    guest: p.port,
                })
                .collect(),
            resources: ResourceSpec {
                cpus: self.resources.cpus,
                memory_mb: self.resources.memory_mb,
                network,
                allow_cidrs,
                allow_hosts,
                storage_gb: self.resources.disk_gb,
                disk_durability: self.resources.disk_durability,
                ..Default::default()
            },
            labels: self.labels,
            auto_stop_seconds: self.auto_stop_seconds,
            ttl_seconds: self.ttl_seconds,
            branchable: self.branchable,
            forkable: self.forkable,
            env: self.env,
            workdir: self.workdir,
            command: self.command,
            credentials,
            cache_disk: self.cache_disk,
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }
}

impl TryFrom<CreateMachineBody> for MachineConfig {
    type Error = Error;

    /// [`CreateMachineBody::into_config`] without a credential store: a body naming
    /// credentials is `NotSupported`.
    fn try_from(body: CreateMachineBody) -> Result<Self> {
        body.into_config(|name| {
            Err(Error::NotSupported {
                message: format!("credential {name:?}: this server has no credential store"),
            })
        })
    }
}

/// `resources` of a record.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineResources {
    /// vCPUs.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in MB.
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Storage disk in GB.
    #[serde(default)]
    pub disk_gb: Option<u32>,
}

/// A published port of a record: `hostPort` is `null` until placed.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortInfo {
    /// Guest port.
    pub port: u16,
    /// Host (node) port.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// `tcp` / `udp`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// The machine record (`MachineInfo`, SPEC §10.2). `id` and `state` are required; everything
/// else reads as its default when absent or `null`. `persistent`, `detached`, `pid` and `accel`
/// are this engine's additions for local machines (absent on the cloud).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineInfo {
    /// `mach-...` (the name locally).
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: Option<String>,
    /// `stopped`, `started`, `running`, ... (SPEC §10.6).
    pub state: String,
    /// Agent and every published port answer (absent on old servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// RFC 3339.
    #[serde(default)]
    pub ready_at: Option<String>,
    /// What it boots from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<MachineResources>,
    /// Egress policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Published ports.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<PortInfo>,
    /// Workload environment.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Workload working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Deleted when it stops.
    #[serde(default, deserialize_with = "nullable")]
    pub ephemeral: bool,
    /// Delete after.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Idle stop.
    #[serde(default)]
    pub auto_stop_seconds: Option<u64>,
    /// Caller metadata.
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// Asked for at create.
    #[serde(default, deserialize_with = "nullable")]
    pub branchable: bool,
    /// Its alias.
    #[serde(default, deserialize_with = "nullable")]
    pub forkable: bool,
    /// What the machine can do (`{"exec": true, "branch": false}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeMap<String, bool>>,
    /// Public ingress of the first published port.
    #[serde(default)]
    pub url: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Local: the record outlives its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Local: the VM outlives its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached: Option<bool>,
    /// Local: the VMM process while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Local: `kvm` / `tcg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Why the machine is not ready when that is not its own doing (a fleet: its node is
    /// lost); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
}

impl From<&MachineSummary> for MachineInfo {
    fn from(s: &MachineSummary) -> Self {
        MachineInfo {
            id: s.id.clone(),
            name: Some(s.name.clone()),
            state: s.state.as_str().into(),
            source: s.image.as_ref().map(|i| Source {
                kind: SourceKind::Image,
                reference: i.clone(),
                arch: None,
            }),
            resources: Some(MachineResources {
                cpus: Some(s.cpus),
                memory_mb: Some(s.memory_mb),
                disk_gb: Some(s.storage_gb),
            }),
            ports: s
                .ports
                .iter()
                .map(|p| PortInfo {
                    port: p.guest,
                    host_port: Some(p.host),
                    protocol: tcp(),
                })
                .collect(),
            labels: s.labels.clone(),
            branchable: s.branchable,
            forkable: s.branchable,
            created_at: s.created_at(),
            persistent: Some(s.persistent),
            detached: Some(s.detached),
            pid: s.pid,
            accel: Some(s.accel.clone()),
            ..Default::default()
        }
    }
}

impl TryFrom<&MachineInfo> for MachineSummary {
    type Error = Error;

    /// A listed record as a summary. The cloud's `creating` reads as `created`, `started` as
    /// `running`; other states the core has no value for are `InvalidConfig`.
    fn try_from(m: &MachineInfo) -> Result<Self> {
        let state = match m.state.as_str() {
            "creating" => MachineState::Created,
            "started" => MachineState::Running,
            s => s.parse()?,
        };
        let r = m.resources.clone().unwrap_or_default();
        Ok(MachineSummary {
            id: m.id.clone(),
            name: m.name.clone().unwrap_or_else(|| m.id.clone()),
            state,
            cpus: r.cpus.unwrap_or(0),
            memory_mb: r.memory_mb.unwrap_or(0),
            pid: m.pid,
            accel: m.accel.clone().unwrap_or_default(),
            labels: m.labels.clone(),
            // cloud machines always persist (SPEC §9.6)
            persistent: m.persistent.unwrap_or(true),
            detached: m.detached.unwrap_or(false),
            image: m.source.as_ref().map(|s| s.reference.clone()),
            created_unix: 0,
            storage_gb: r.disk_gb.unwrap_or(0),
            ports: m
                .ports
                .iter()
                .map(|p| PortSpec {
                    host: p.host_port.unwrap_or(0),
                    guest: p.port,
                })
                .collect(),
            branchable: m.branchable || m.forkable,
        })
    }
}

/// `GET /v1/machines`: a bare array (what servers send) or `{"machines": [...]}` (also
/// accepted by the clients). Serialized bare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MachineList {
    /// `[MachineInfo...]`
    Bare(Vec<MachineInfo>),
    /// `{"machines": [MachineInfo...]}`
    Wrapped {
        /// The machines.
        machines: Vec<MachineInfo>,
    },
}

impl MachineList {
    /// The machines, either way.
    pub fn into_vec(self) -> Vec<MachineInfo> {
        match self {
            MachineList::Bare(v) | MachineList::Wrapped { machines: v } => v,
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
