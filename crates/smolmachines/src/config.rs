//! Configuration and result types of the `Machine` API (SPEC §2, §3).
//!
//! Every SPEC field exists here, whatever the target: [`MachineConfig::validate`] checks values
//! once for every front end (Rust, CLI, Python, Node, the fleet server), and a backend refuses
//! the fields it cannot honour with [`MachineConfig::refuse_unsupported`] and its
//! [`Capabilities`]. The `/v1` REST shapes of these types are in [`crate::wire`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod support;
mod validate;

pub use support::{Capabilities, ConfigField, Support};
pub(crate) use validate::argv as check_argv;
pub use validate::seconds;

/// The longest wait any call takes: a deadline past what the clock can hold (a huge timeout
/// given by a caller) is this, a century, instead of an overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d`, at most [`MAX_WAIT`].
pub fn cap_wait(d: Duration) -> Duration {
    d.min(MAX_WAIT)
}

/// Which backend a call goes to (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The embedded local engine.
    Local,
    /// A fleet server over REST.
    Cloud,
}

impl Target {
    /// `"local"` or `"cloud"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Cloud => "cloud",
        }
    }

    /// Parses an optional target as the SDKs give it (`None` resolves by SPEC §2.2).
    pub fn parse_opt(s: Option<&str>) -> Result<Option<Target>> {
        s.map(str::parse).transpose()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Target {
    type Err = Error;
    /// `"local"` or `"cloud"`; anything else is `InvalidConfig`.
    fn from_str(s: &str) -> Result<Target> {
        match s {
            "local" => Ok(Target::Local),
            "cloud" => Ok(Target::Cloud),
            other => Err(Error::invalid(format!(
                "target must be \"local\" or \"cloud\" (or unset), got {other:?}"
            ))),
        }
    }
}

/// Backend selection (SPEC §2.1). The default is the local engine.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Explicit target; `None` resolves by §2.2.
    pub target: Option<Target>,
    /// Cloud base URL.
    pub base_url: Option<String>,
    /// Cloud API key (never printed).
    pub api_key: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("target", &self.target)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ConnectOptions {
    /// Resolves the target (SPEC §2.2): explicit target, else cloud only when an API key is
    /// given or `SMOL_CLOUD_TOKEN` is set and non-empty, else local.
    pub fn resolve_target(&self) -> Target {
        if let Some(t) = self.target {
            return t;
        }
        let env_key = std::env::var("SMOL_CLOUD_TOKEN").unwrap_or_default();
        if self.api_key.as_deref().is_some_and(|k| !k.is_empty()) || !env_key.is_empty() {
            Target::Cloud
        } else {
            Target::Local
        }
    }
}

/// How durably the storage disk acknowledges writes (SPEC §3.1 `disk_durability`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskDurability {
    /// Every acknowledged write is on stable storage (the default).
    Full,
    /// Writes may be acknowledged before they are durable.
    Deferred,
}

impl DiskDurability {
    /// `"full"` or `"deferred"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskDurability::Full => "full",
            DiskDurability::Deferred => "deferred",
        }
    }
}

impl std::str::FromStr for DiskDurability {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(DiskDurability::Full),
            "deferred" => Ok(DiskDurability::Deferred),
            other => Err(Error::invalid(format!(
                "disk_durability must be \"full\" or \"deferred\", got {other:?}"
            ))),
        }
    }
}

/// The guest network device of a local machine (SPEC §3.1 `networkBackend`, Node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkBackend {
    /// Transparent socket impersonation (libkrun).
    Tsi,
    /// A virtio-net device.
    VirtioNet,
}

impl std::str::FromStr for NetworkBackend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tsi" => Ok(NetworkBackend::Tsi),
            "virtio-net" => Ok(NetworkBackend::VirtioNet),
            other => Err(Error::invalid(format!(
                "network_backend must be \"tsi\" or \"virtio-net\", got {other:?}"
            ))),
        }
    }
}

/// CPU, memory, disks and network of a machine (SPEC §3.1). `None` / empty is "the target's
/// default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSpec {
    /// vCPUs, 1..=[`limits::MAX_CPUS`] (local default 1).
    pub cpus: Option<u32>,
    /// Memory in MiB, [`limits::MIN_MEMORY_MB`]..=[`limits::MAX_MEMORY_MB`] (local default
    /// 512).
    pub memory_mb: Option<u32>,
    /// Unrestricted egress; local default off, cloud default the server's (open). Locally the
    /// guest cannot reach the host's loopback services, but it does reach host services bound
    /// to `0.0.0.0` (or another host address) through the host's own address: bind what the
    /// guest must not see to `127.0.0.1` (no egress policy yet).
    pub network: Option<bool>,
    /// Egress restricted to these CIDRs (setting it turns networking on).
    pub allow_cidrs: Vec<String>,
    /// Egress restricted to these host names and their subdomains (enforced at DNS).
    pub allow_hosts: Vec<String>,
    /// Size of the writable (storage) disk in GiB, 1..=[`limits::MAX_DISK_GB`] (sparse; default
    /// 20). The cloud's `resources.diskGb`.
    pub storage_gb: Option<u32>,
    /// Size of the overlay disk in GiB (local).
    pub overlay_gb: Option<u32>,
    /// A virtio-gpu (Venus) device (local).
    pub gpu: Option<bool>,
    /// Its VRAM in MiB (local).
    pub gpu_vram_mib: Option<u32>,
    /// How durably the disk acknowledges writes (default full).
    pub disk_durability: Option<DiskDurability>,
    /// CUDA driver-API remoting (local).
    pub cuda: Option<bool>,
    /// The guest network device (local, Node's `networkBackend`).
    pub network_backend: Option<NetworkBackend>,
}

/// The bounds [`MachineConfig::validate`] checks, one place for every front end.
pub mod limits {
    /// Most vCPUs of a machine.
    pub const MAX_CPUS: u32 = 64;
    /// Least memory of a machine, MiB (the guest kernel needs some).
    pub const MIN_MEMORY_MB: u32 = 64;
    /// Most memory of a machine, MiB (1 TiB).
    pub const MAX_MEMORY_MB: u32 = 1 << 20;
    /// Largest disk, GiB (16 TiB, the cloud's limit too).
    pub const MAX_DISK_GB: u32 = 16 * 1024;
    /// Most published ports of a machine.
    pub const MAX_PORTS: usize = 64;
    /// Most credentials of a machine.
    pub const MAX_CREDENTIALS: usize = 64;
}

/// A host directory mounted into the guest (SPEC §3.2; local only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute host path.
    pub source: String,
    /// Absolute guest path.
    pub target: String,
    /// Mount read-only (the bindings fold the deprecated `readonly` alias into it).
    pub read_only: bool,
    /// A guest-local working copy, copied back on `sync()`, stop or delete. Not with
    /// `read_only`.
    pub staged: bool,
}

/// A host -> guest TCP port forward (SPEC §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// Host port on 127.0.0.1; `0` asks the target to pick one (the cloud always does: it
    /// ignores the host port).
    pub host: u16,
    /// Guest port, 1..=65535.
    pub guest: u16,
}

/// A credential substituted into the headers of HTTPS requests to `hosts`, so that the guest
/// never sees it (SPEC §3.5, Python's shape, the one that reaches the cloud).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialSpec {
    /// 1-64 characters of `[a-z0-9_-]`.
    pub name: String,
    /// The guest environment variable that holds a placeholder.
    pub env_var: String,
    /// Exact host names (no wildcards).
    pub hosts: Vec<String>,
    /// The secret (never printed by `Debug`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// HTTP methods it applies to (local only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
}

impl std::fmt::Debug for CredentialSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSpec")
            .field("name", &self.name)
            .field("env_var", &self.env_var)
            .field("hosts", &self.hosts)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("methods", &self.methods)
            .finish()
    }
}

/// Intercepted egress (SPEC §3.4, §3.10; local only): `address` is `127.0.0.1:port`, `token`
/// 64 hex digits (never printed by `Debug`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressInterceptor {
    /// `127.0.0.1:port` of the interceptor.
    pub address: String,
    /// Its token.
    pub token: String,
}

impl std::fmt::Debug for EgressInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressInterceptor")
            .field("address", &self.address)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A cloud cache disk attached at create (SPEC §7.3; cloud only).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheDiskRef {
    /// The cache disk's name or id.
    pub cache: String,
    /// A published version (default: the latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Where it is mounted in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// A writable slot instead of a read-only version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slot: bool,
}

/// Machine configuration (SPEC §3.4). Which fields a target honours is its
/// [`Capabilities`]'s to say.
#[derive(Debug, Clone, Default)]
pub struct MachineConfig {
    /// Name; generated (`smol-` + 8 hex) when omitted.
    pub name: Option<String>,
    /// Base image (required on the cloud).
    pub image: Option<String>,
    /// Host directories to mount (local).
    pub mounts: Vec<MountSpec>,
    /// Port forwards.
    pub ports: Vec<PortSpec>,
    /// Resources.
    pub resources: ResourceSpec,
    /// Top-level alias of `resources.network` (the latter wins).
    pub network: Option<bool>,
    /// Keep the machine record after the process exits (local).
    pub persistent: bool,
    /// Keep the VM running after the process exits; `Machine::connect` attaches to it (local).
    pub detach: bool,
    /// Caller metadata.
    pub labels: BTreeMap<String, String>,
    /// Create's readiness deadline (default 120 s).
    pub ready_timeout: Option<Duration>,
    /// Whether create also waits for published ports (default true; Python's
    /// `wait_for_ports`).
    pub wait_for_ports: Option<bool>,
    /// Stop after this many idle seconds (cloud; ignored locally, SPEC §11).
    pub auto_stop_seconds: Option<u64>,
    /// Delete this many seconds after creation (cloud; ignored locally, SPEC §11).
    pub ttl_seconds: Option<u64>,
    /// Start as a live-RAM branch source. `forkable` is its deprecated alias; setting both is
    /// an error (as the server says).
    pub branchable: Option<bool>,
    /// Deprecated alias of `branchable` (the field the cloud client sends).
    pub forkable: Option<bool>,
    /// Environment of the workload launched at create (over the image's `Env`).
    pub env: BTreeMap<String, String>,
    /// Working directory of that workload (default: the image's `WorkingDir`).
    pub workdir: Option<String>,
    /// User of that workload (name, `uid[:gid]` or `name:group`; default: the image's `User`,
    /// else root). Needs an image.
    pub user: Option<String>,
    /// argv of that workload, replacing the image's `Entrypoint` + `Cmd`. An empty list
    /// launches nothing (the CLI's `smol run IMAGE -- argv` runs only argv); the bindings refuse
    /// an empty list as SPEC §3.4 says.
    pub command: Option<Vec<String>>,
    /// Intercepted egress (local; not with `branchable`).
    pub egress_interceptor: Option<EgressInterceptor>,
    /// Credentials substituted into HTTPS requests (SPEC §3.5).
    pub credentials: Vec<CredentialSpec>,
    /// A cache disk to attach (cloud).
    pub cache_disk: Option<CacheDiskRef>,
}

impl MachineConfig {
    /// `resources.network`, else the top-level alias.
    pub fn effective_network(&self) -> Option<bool> {
        self.resources.network.or(self.network)
    }

    /// `branchable`, else its alias `forkable`; false when neither is set.
    pub fn is_branchable(&self) -> bool {
        self.branchable.or(self.forkable).unwrap_or(false)
    }
}

/// What the text and byte fields of a cloud exec response carry (SPEC §3.6 `output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecOutput {
    /// Text only (no b64 fields).
    Text,
    /// The b64 fields only (empty text).
    B64,
    /// Both (the default).
    Both,
}

impl ExecOutput {
    /// `"text"`, `"b64"` or `"both"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExecOutput::Text => "text",
            ExecOutput::B64 => "b64",
            ExecOutput::Both => "both",
        }
    }
}

impl std::str::FromStr for ExecOutput {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(ExecOutput::Text),
            "b64" => Ok(ExecOutput::B64),
            "both" => Ok(ExecOutput::Both),
            other => Err(Error::invalid(format!(
                "output must be \"text\", \"b64\" or \"both\", got {other:?}"
            ))),
        }
    }
}

/// Per-command options (SPEC §3.6).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute guest path; the cloud's `cwd`).
    pub workdir: Option<String>,
    /// Kill the command after this long; the result then has exit code 124.
    pub timeout: Option<Duration>,
    /// Run as this user: a name of the image's `/etc/passwd`, `uid[:gid]` or `name:group`
    /// (needs a machine created from an image).
    pub user: Option<String>,
    /// Bytes written to the command's stdin, which is then closed.
    pub stdin: Option<Vec<u8>>,
    /// Start the command detached and return at once: `pid` set, stdout `pid=<n>\n`, exit 0.
    /// Takes no stdin and no timeout; its output is discarded.
    pub background: bool,
    /// Which output fields the cloud sends (ignored locally: both are always complete).
    pub output: Option<ExecOutput>,
}

impl ExecOptions {
    /// Timeout rounded up to whole milliseconds (SPEC §3.6).
    pub(crate) fn timeout_ms(&self) -> Option<u64> {
        self.timeout.map(|t| {
            let ms = t.as_nanos().div_ceil(1_000_000);
            u64::try_from(ms).unwrap_or(u64::MAX)
        })
    }

    /// Timeout rounded up to whole seconds (SPEC §3.6: the cloud's `timeoutSeconds`).
    pub fn timeout_secs(&self) -> Option<u64> {
        self.timeout
            .map(|t| t.as_secs() + u64::from(t.subsec_nanos() > 0))
    }
}

/// How much of each output stream a buffered local `exec` / `run` keeps: 16 MiB of stdout and
/// 16 MiB of stderr. The command runs on past the cap; the rest of its output is read and
/// dropped (never buffered) and [`ExecResult::stdout_truncated`] / `stderr_truncated` say so.
/// For more, use `exec_stream` (flow-controlled, any size) or write to a file and `read_file`.
pub const MAX_BUFFERED_OUTPUT: usize = 16 * 1024 * 1024;

/// Result of a finished command (SPEC §3.7). A non-zero exit is not an error.
///
/// Output is capped per stream: locally at [`MAX_BUFFERED_OUTPUT`] (16 MiB) bytes, in the
/// cloud at 1 MiB of text (with the full bytes in base64 when asked for); a capped stream has
/// its `*_truncated` flag set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code; 124 when the timeout killed the command, 127 when it was not found.
    pub exit_code: i32,
    /// stdout as lossy UTF-8 (decoded once from `stdout_bytes`).
    pub stdout: String,
    /// stderr as lossy UTF-8.
    pub stderr: String,
    /// stdout, byte-exact, up to the cap.
    pub stdout_bytes: Vec<u8>,
    /// stderr, byte-exact, up to the cap.
    pub stderr_bytes: Vec<u8>,
    /// stdout went past the cap ([`MAX_BUFFERED_OUTPUT`] locally): the rest was dropped.
    pub stdout_truncated: bool,
    /// stderr went past the cap.
    pub stderr_truncated: bool,
    /// True when the timeout killed the command.
    pub timed_out: bool,
    /// The process id of a background command.
    pub pid: Option<u32>,
}

impl ExecResult {
    pub(crate) fn from_bytes(exit_code: i32, timed_out: bool, out: Vec<u8>, err: Vec<u8>) -> Self {
        Self {
            exit_code,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            stdout_bytes: out,
            stderr_bytes: err,
            stdout_truncated: false,
            stderr_truncated: false,
            timed_out,
            pid: None,
        }
    }

    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// `Err(Error::CommandFailed)` unless the command exited 0.
    pub fn assert_success(&self, command: &[String]) -> Result<&Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(Error::CommandFailed {
                command: command.join(" "),
                exit_code: self.exit_code,
                stdout: self.stdout.clone(),
                stderr: self.stderr.clone(),
            })
        }
    }
}

/// One event of a streamed command (SPEC §3.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// A chunk of stdout, as produced.
    Stdout(Vec<u8>),
    /// A chunk of stderr, as produced.
    Stderr(Vec<u8>),
    /// The command ended (last event).
    Exit(i32),
    /// The stream failed (last event): the stable code of the error (`INTERRUPTED` when the
    /// VM or the connection went away) and its message. Bindings raise the exception of the
    /// code for it (SPEC §3.9's `{"kind": "error", "message"}`, plus `code`).
    Error {
        /// The stable code (SPEC §8.2).
        code: crate::error::ErrorCode,
        /// What happened.
        message: String,
    },
}

impl ExecEvent {
    /// The `Error` event of `e`.
    pub fn error(e: &Error) -> Self {
        ExecEvent::Error {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// Machine state strings of SPEC §4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Record exists, VM not started yet.
    Created,
    /// VM up and agent ready.
    Running,
    /// VM not running (stopped, crashed or killed).
    Stopped,
    /// Deleted; every further operation fails.
    Deleted,
    /// VM paused (`pause()`): its vCPUs are stopped, it keeps its memory; `resume()` goes on.
    Paused,
    /// A frozen branch base (`branch(.., freeze_source)`): its memory, device state and disk
    /// as of its last branch are kept and it can be branched again, but it never runs again.
    Frozen,
}

impl MachineState {
    /// The state as the API string.
    pub fn as_str(&self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
            MachineState::Deleted => "deleted",
            MachineState::Paused => "paused",
            MachineState::Frozen => "frozen",
        }
    }
}

impl std::str::FromStr for MachineState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "created" => Ok(MachineState::Created),
            "running" => Ok(MachineState::Running),
            "stopped" => Ok(MachineState::Stopped),
            "deleted" => Ok(MachineState::Deleted),
            "paused" => Ok(MachineState::Paused),
            "frozen" => Ok(MachineState::Frozen),
            other => Err(Error::invalid(format!("unknown machine state {other:?}"))),
        }
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of [`Machine::branch_with`](crate::Machine::branch_with) (SPEC §4.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BranchOptions {
    /// Ports published on the clone (host -> guest). Empty: each port the source publishes is
    /// published again on a free host port.
    pub ports: Vec<PortSpec>,
    /// The clone is a branch source too (its RAM in a file of its own).
    pub branchable: bool,
    /// The source becomes a frozen base (state `frozen`): it does not go on after the
    /// branch, never runs commands again, and can be branched again and again from the same
    /// instant. Its VMM ends; its memory and disk stay, as files.
    pub freeze_source: bool,
}

/// Options of [`Machine::checkpoint`](crate::Machine::checkpoint) (SPEC §4.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// The `.smolcheckpoint` file to write (local: required; cloud: must be unset).
    pub output: Option<std::path::PathBuf>,
    /// A content-addressed chunk store shared by checkpoints (local; not built yet).
    pub store: Option<std::path::PathBuf>,
}

/// Options of [`Machine::restore_checkpoint`](crate::Machine::restore_checkpoint) (SPEC §4.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Ports published on the restored machine (host -> guest). Empty: each port of the
    /// checkpointed machine is published again on a free host port.
    pub ports: Vec<PortSpec>,
    /// Keep the checkpointed machine's hostname and RNG state instead of the new name's and a
    /// reseeded RNG (local only).
    pub keep_identity: bool,
    /// Cloud: guest egress of the restored machine (`None`: blocked).
    pub network: Option<bool>,
}

/// Where a published port is reached (SPEC §3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEndpoint {
    /// `http://...` URL.
    pub http_url: String,
    /// `ws://...` URL.
    pub ws_url: String,
    /// Headers to send (cloud: authorization; local: none).
    pub headers: BTreeMap<String, String>,
}

/// Whether this host can run local machines (SPEC §3.10 `LocalAvailability`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAvailability {
    /// Machines can be created here.
    pub available: bool,
    /// `UNSUPPORTED_PLATFORM`, `RUNTIME_NOT_INSTALLED`, `KVM_UNAVAILABLE` or
    /// `HYPERVISOR_UNAVAILABLE` when not available.
    pub code: Option<String>,
    /// Why not, and what to do.
    pub reason: Option<String>,
    /// The accelerator machines would use (`kvm` or `tcg`) when available.
    pub accel: Option<String>,
}

/// Summary of a machine, as `Machine::list` returns it (SPEC §3.10). The bindings convert it
/// field by field; [`crate::wire::MachineInfo`] is its REST shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSummary {
    /// Id: the name locally, `mach-...` on the cloud.
    pub id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: MachineState,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// VMM process id while running.
    pub pid: Option<u32>,
    /// Accelerator (`kvm` or `tcg`).
    pub accel: String,
    /// Caller labels.
    pub labels: BTreeMap<String, String>,
    /// The record (and disk) outlives the process that created it.
    pub persistent: bool,
    /// The VM keeps running after its process exits.
    pub detached: bool,
    /// The image the machine runs in, as it was given.
    pub image: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Size of the writable disk in GiB.
    pub storage_gb: u32,
    /// Published ports (host -> guest).
    pub ports: Vec<PortSpec>,
    /// Started as a branch source.
    pub branchable: bool,
}

impl MachineSummary {
    /// The creation time as RFC 3339 UTC with whole seconds (`2025-01-31T12:00:00Z`, the form
    /// of the cloud's `createdAt`); `None` for a record without one.
    pub fn created_at(&self) -> Option<String> {
        (self.created_unix != 0).then(|| rfc3339(self.created_unix))
    }
}

/// `unix` seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Validates a machine name: 1-63 characters of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid machine name {name:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

/// A fresh machine name: `smol-` and 8 lowercase hex digits (SPEC §9.1).
pub fn generate_name() -> String {
    format!("smol-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests;
