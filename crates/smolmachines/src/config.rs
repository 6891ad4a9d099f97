//! Configuration and result types of the `Machine` API (SPEC §2, §3).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};

/// Which backend a call goes to (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The embedded local engine.
    Local,
    /// A fleet server over REST.
    Cloud,
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

/// CPU, memory and network of a machine (SPEC §3.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSpec {
    /// vCPUs (default 1).
    pub cpus: Option<u32>,
    /// Memory in MiB (default 512).
    pub memory_mb: Option<u32>,
    /// Unrestricted egress; local default off.
    pub network: Option<bool>,
    /// Size of the writable disk in GiB (sparse; default 20).
    pub storage_gb: Option<u32>,
}

/// A host directory mounted into the guest (SPEC §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute host path.
    pub source: String,
    /// Absolute guest path.
    pub target: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A host -> guest TCP port forward (SPEC §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// Host port on 127.0.0.1.
    pub host: u16,
    /// Guest port.
    pub guest: u16,
}

/// Machine configuration (SPEC §3.4).
#[derive(Debug, Clone, Default)]
pub struct MachineConfig {
    /// Name; generated (`smol-` + 8 hex) when omitted.
    pub name: Option<String>,
    /// Base image (not yet supported locally).
    pub image: Option<String>,
    /// Host directories to mount.
    pub mounts: Vec<MountSpec>,
    /// Port forwards.
    pub ports: Vec<PortSpec>,
    /// Resources.
    pub resources: ResourceSpec,
    /// Top-level alias of `resources.network` (the latter wins).
    pub network: Option<bool>,
    /// Keep the machine record after the process exits.
    pub persistent: bool,
    /// Keep the VM running after the process exits; `Machine::connect` attaches to it.
    pub detach: bool,
    /// Caller metadata.
    pub labels: BTreeMap<String, String>,
    /// Create's readiness deadline (default 120 s).
    pub ready_timeout: Option<Duration>,
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
}

impl MachineConfig {
    pub(crate) fn validate_workload(&self) -> Result<()> {
        if let Some(c) = &self.command {
            if c.iter().any(|a| a.is_empty()) {
                return Err(Error::invalid(
                    "command must be a list of non-empty strings",
                ));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return Err(Error::invalid(format!(
                    "workdir must be an absolute guest path, got {w:?}"
                )));
            }
        }
        if self.user.as_deref() == Some("") {
            return Err(Error::invalid("user must not be empty"));
        }
        if self.user.is_some() && self.image.is_none() {
            return Err(Error::invalid(
                "a workload user needs a machine created from an image",
            ));
        }
        if self.env.keys().any(|k| k.is_empty() || k.contains('=')) {
            return Err(Error::invalid(
                "env names must be non-empty and contain no '='",
            ));
        }
        Ok(())
    }
}

/// Per-command options (SPEC §3.6).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute guest path).
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
}

impl ExecOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(Error::invalid("timeout must be > 0"));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return Err(Error::invalid(format!(
                    "workdir must be an absolute guest path, got {w:?}"
                )));
            }
        }
        if self.background && (self.stdin.is_some() || self.timeout.is_some()) {
            return Err(Error::invalid(
                "a background command takes no stdin and no timeout",
            ));
        }
        // (whether the machine can take a user at all is the backend's to say)
        match self.user.as_deref() {
            Some("") => Err(Error::invalid("user must not be empty")),
            _ => Ok(()),
        }
    }

    /// Timeout rounded up to whole milliseconds (SPEC §3.6).
    pub(crate) fn timeout_ms(&self) -> Option<u64> {
        self.timeout.map(|t| {
            let ms = t.as_nanos().div_ceil(1_000_000);
            u64::try_from(ms).unwrap_or(u64::MAX)
        })
    }
}

/// Result of a finished command (SPEC §3.7). A non-zero exit is not an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code; 124 when the timeout killed the command, 127 when it was not found.
    pub exit_code: i32,
    /// stdout as lossy UTF-8.
    pub stdout: String,
    /// stderr as lossy UTF-8.
    pub stderr: String,
    /// stdout, byte-exact.
    pub stdout_bytes: Vec<u8>,
    /// stderr, byte-exact.
    pub stderr_bytes: Vec<u8>,
    /// Always false locally (the cloud caps output).
    pub stdout_truncated: bool,
    /// Always false locally.
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
    /// The stream failed (last event).
    Error(String),
}

/// Machine state strings of SPEC §4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Record exists, VM not started yet.
    Created,
    /// VM up and agent ready.
    Running,
    /// VM not running (stopped, crashed or killed).
    Stopped,
    /// Deleted; every further operation fails.
    Deleted,
}

impl MachineState {
    /// The state as the API string.
    pub fn as_str(&self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
            MachineState::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Summary of a machine, as `Machine::list` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSummary {
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
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("worker-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(64), "..", "ä"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        let n = generate_name();
        assert!(n.starts_with("smol-") && n.len() == 13);
        assert!(validate_name(&n).is_ok());
    }

    #[test]
    fn exec_options_validation_and_rounding() {
        let o = ExecOptions {
            timeout: Some(Duration::from_micros(1500)),
            ..Default::default()
        };
        assert_eq!(o.timeout_ms(), Some(2));
        assert!(o.validate().is_ok());
        let o = ExecOptions {
            timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(matches!(o.validate(), Err(Error::InvalidConfig { .. })));
        let o = ExecOptions {
            workdir: Some("tmp".into()),
            ..Default::default()
        };
        assert!(o.validate().is_err());
        let o = ExecOptions {
            user: Some(String::new()),
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }

    #[test]
    fn target_resolution() {
        let c = ConnectOptions::default();
        if std::env::var("SMOL_CLOUD_TOKEN")
            .unwrap_or_default()
            .is_empty()
        {
            assert_eq!(c.resolve_target(), Target::Local);
        }
        let c = ConnectOptions {
            api_key: Some("smk_x".into()),
            ..Default::default()
        };
        assert_eq!(c.resolve_target(), Target::Cloud);
        assert!(!format!("{c:?}").contains("smk_x"));
        let c = ConnectOptions {
            target: Some(Target::Local),
            api_key: Some("smk_x".into()),
            ..Default::default()
        };
        assert_eq!(c.resolve_target(), Target::Local);
    }

    #[test]
    fn assert_success() {
        let r = ExecResult::from_bytes(3, false, b"o".to_vec(), b"e".to_vec());
        let err = r.assert_success(&["false".into()]).unwrap_err();
        assert!(matches!(err, Error::CommandFailed { exit_code: 3, .. }));
        assert_eq!(err.to_string(), "command exited with code 3: false");
    }
}
