//! The one public error type of the Rust API, with the stable codes of SPEC §8.2 / §8.3
//! ([`ErrorCode`]), their HTTP statuses and RFC 9457 problem bodies ([`Problem`]).
//!
//! An error crosses the /v1 API as `Error::to_problem` and comes back as
//! `Error::from_problem`: the same variant, code and typed fields (see `error/problem.rs`).

use std::path::PathBuf;
use std::time::Duration;

mod code;
mod problem;

pub use code::{ErrorCode, UnknownErrorCode};
pub use problem::{parse_retry_after, Problem};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the `Machine` API returns. Bindings map [`Error::code`] to their exception types
/// once; [`Error::hint`] says what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value or argument is invalid.
    #[error("invalid configuration: {message}")]
    InvalidConfig {
        /// What is wrong.
        message: String,
    },
    /// The operation is not available on this target (yet).
    #[error("not supported: {message}")]
    NotSupported {
        /// What is not supported.
        message: String,
    },
    /// A guest path, machine or asset does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// A file operation named a directory.
    #[error("{path}: is a directory")]
    IsADirectory {
        /// The guest path.
        path: String,
    },
    /// A path component is not a directory.
    #[error("not a directory: {detail}")]
    NotADirectory {
        /// The agent's detail.
        detail: String,
    },
    /// The guest refused access.
    #[error("permission denied: {detail}")]
    PermissionDenied {
        /// The agent's detail.
        detail: String,
    },
    /// The guest file system is full.
    #[error("guest disk full: {detail}")]
    NoSpace {
        /// The agent's detail.
        detail: String,
    },
    /// The engine home (state database, disks) cannot be written.
    #[error("engine storage {}: {message}", path.display())]
    Storage {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A host port to publish cannot be bound.
    #[error("host port {port} cannot be published: {reason}")]
    PortUnavailable {
        /// The host port.
        port: u16,
        /// Why (usually: in use).
        reason: String,
    },
    /// A host directory to mount is not usable.
    #[error("mount {source_path}: {reason}")]
    MountSource {
        /// The host path.
        source_path: String,
        /// Why.
        reason: String,
    },
    /// A machine with this name already exists.
    #[error("a machine named {name:?} already exists")]
    Conflict {
        /// The name.
        name: String,
    },
    /// The machine is not in a state that allows the operation.
    #[error("machine {name:?} is {state}: cannot {op}")]
    InvalidState {
        /// Machine name.
        name: String,
        /// Its state.
        state: String,
        /// What was attempted.
        op: String,
    },
    /// The VM stopped (crashed, was killed, or was stopped) while an operation was in flight.
    #[error("machine {name:?} stopped during the operation: {detail}")]
    Interrupted {
        /// Machine name.
        name: String,
        /// What is known about the exit.
        detail: String,
    },
    /// The VM did not become ready: QEMU failed or the agent never answered.
    #[error("machine {name:?} failed to boot: {reason}")]
    BootFailed {
        /// Machine name.
        name: String,
        /// Why.
        reason: String,
        /// Last lines of the guest console and QEMU's stderr, for diagnosis.
        log_tail: String,
    },
    /// The guest agent and this host share no protocol generation (an initramfs built by an
    /// older or newer smol): the machine did not boot.
    #[error("machine {name:?} failed to boot: {reason}")]
    AgentIncompatible {
        /// Machine name.
        name: String,
        /// The generations the agent speaks (`1..=3`).
        agent: String,
        /// The generations this host speaks.
        host: String,
        /// Which side is older, and what to do.
        reason: String,
    },
    /// A `.smolcheckpoint` file is not a checkpoint this host can restore: truncated, altered
    /// (a checksum differs), of another format version, another architecture or an
    /// incompatible QEMU. Nothing was started.
    #[error("invalid checkpoint {}: {reason}", path.display())]
    InvalidCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A deadline passed.
    #[error("timed out: {what}")]
    Timeout {
        /// What did not finish in time.
        what: String,
    },
    /// QEMU (or the requested accelerator) is not usable on this host.
    #[error("hypervisor unavailable: {message}")]
    HypervisorUnavailable {
        /// Why.
        message: String,
    },
    /// KVM was requested but cannot be used.
    #[error("KVM unavailable: {message}")]
    KvmUnavailable {
        /// Why.
        message: String,
    },
    /// A host program the engine runs (scripts/programs.txt) is missing or does not run.
    #[error("{program} is needed {needed_for} but {problem} (Debian package {package})")]
    ProgramMissing {
        /// The program (a name on PATH or an absolute path).
        program: String,
        /// The Debian package that provides it.
        package: String,
        /// What needs it ("to create a machine", "for mounts", ...).
        needed_for: String,
        /// What is wrong ("it is not installed", "`qemu-img --version` fails: ...").
        problem: String,
    },
    /// The host, or the memory cgroup the engine runs in, cannot hold the machine now: it was
    /// not started (`local::admission`). Retryable: it may fit once other machines stop.
    #[error("machine {name:?} needs {requested_mib} MiB of host memory but {available_mib} MiB is available: {reason}")]
    InsufficientMemory {
        /// Machine name.
        name: String,
        /// What it asks for: guest RAM plus the VMM's overhead.
        requested_mib: u64,
        /// What the host can give (after the other starting machines and the headroom).
        available_mib: u64,
        /// Which limit is the tightest, and what is reserved.
        reason: String,
    },
    /// A guest asset (kernel, initramfs) is missing.
    #[error("{what} not found at {}", path.display())]
    AssetMissing {
        /// Which asset.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// The host and the agent do not speak the same protocol.
    #[error("protocol error: {message}")]
    Protocol {
        /// Detail.
        message: String,
    },
    /// The guest reported an I/O error.
    #[error("guest error: {message}")]
    Guest {
        /// Detail.
        message: String,
    },
    /// A host-side I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image registry failed, or served content that does not match its digest.
    #[error("{message}")]
    Registry {
        /// The registry host, when known.
        registry: Option<String>,
        /// What failed.
        message: String,
    },
    /// The service refused the request's credential: none, unknown or expired (HTTP 401).
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// What the service said.
        message: String,
    },
    /// The credential is valid but lacks a permission (HTTP 403, e.g. `missing scope: ...`).
    #[error("forbidden: {message}")]
    Forbidden {
        /// What the service said.
        message: String,
        /// The missing scope, when the service named one (`machine:exec`).
        scope: Option<String>,
    },
    /// Billing or budget refuses the request (HTTP 402).
    #[error("payment required: {message}")]
    PaymentRequired {
        /// What the service said.
        message: String,
    },
    /// Too many requests (HTTP 429); try again after `retry_after` when it is known.
    #[error("rate limited: {message}")]
    RateLimited {
        /// What the service said.
        message: String,
        /// How long the service asks to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The service cannot be reached, or the connection dropped mid-response (DNS, connect,
    /// TLS, a stream cut off).
    #[error("connection failed: {message}")]
    Connection {
        /// What failed.
        message: String,
    },
    /// An error known by its code and message only: another server's HTTP error whose body
    /// names none of the variants above with its fields (plain text, an unknown `code`), or a
    /// stream's error event. Its code comes from the body's `code` or the status (SPEC §8.3).
    #[error("{}", coded_display(*status, message))]
    Coded {
        /// The stable code.
        code: ErrorCode,
        /// The HTTP status (the code's for errors that did not come over HTTP).
        status: u16,
        /// The message (an HTTP body's sentence: `detail`, `error`, `message` or `title`).
        message: String,
        /// The problem body's `code`, as sent (`machine_interrupted`).
        problem_code: Option<String>,
        /// The body's `retryable`, else whether the status is 408/429/502/503/504.
        retryable: bool,
        /// `Retry-After` (or the body's `retryAfterS`).
        retry_after: Option<Duration>,
    },
    /// `ExecResult::assert_success` on a non-zero exit.
    #[error("command exited with code {exit_code}: {command}")]
    CommandFailed {
        /// The joined argv.
        command: String,
        /// Its exit code.
        exit_code: i32,
        /// Its stdout.
        stdout: String,
        /// Its stderr.
        stderr: String,
    },
}

impl Error {
    /// Stable code (SPEC §8.2, §8.3), mapped to typed exceptions by the bindings.
    pub fn code(&self) -> ErrorCode {
        use ErrorCode as C;
        match self {
            Error::InvalidConfig { .. }
            | Error::NotADirectory { .. }
            | Error::InvalidCheckpoint { .. } => C::InvalidConfig,
            Error::NotSupported { .. } => C::NotSupported,
            Error::NotFound { .. } | Error::AssetMissing { .. } => C::NotFound,
            Error::IsADirectory { .. } => C::IsADirectory,
            Error::PermissionDenied { .. } => C::PermissionDenied,
            Error::NoSpace { .. } | Error::Storage { .. } => C::StorageError,
            Error::PortUnavailable { .. } => C::Conflict,
            Error::MountSource { .. } => C::MountError,
            Error::Conflict { .. } => C::Conflict,
            Error::InvalidState { .. } => C::InvalidState,
            Error::Interrupted { .. } => C::Interrupted,
            Error::BootFailed { .. } | Error::AgentIncompatible { .. } => C::BootFailed,
            Error::Timeout { .. } => C::Timeout,
            Error::HypervisorUnavailable { .. } => C::HypervisorUnavailable,
            Error::KvmUnavailable { .. } => C::KvmUnavailable,
            Error::Protocol { .. }
            | Error::Guest { .. }
            | Error::Io { .. }
            | Error::Registry { .. } => C::SmolvmError,
            Error::CommandFailed { .. } => C::CommandFailed,
            Error::ProgramMissing { .. } => C::RuntimeNotInstalled,
            Error::InsufficientMemory { .. } => C::InsufficientMemory,
            Error::Unauthorized { .. } => C::Unauthorized,
            Error::Forbidden { .. } => C::Forbidden,
            Error::PaymentRequired { .. } => C::PaymentRequired,
            Error::RateLimited { .. } => C::RateLimited,
            Error::Connection { .. } => C::Connection,
            Error::Coded { code, .. } => *code,
        }
    }

    /// An error known only by its code and message ([`Error::Coded`]), e.g. a stream's
    /// [`ExecEvent::Error`](crate::ExecEvent::Error).
    pub fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Coded {
            code,
            status: code.http_status(),
            message: message.into(),
            problem_code: None,
            retryable: code.retryable(),
            retry_after: None,
        }
    }

    /// The HTTP status of this error on the /v1 API: the response's for [`Error::Coded`], else
    /// [`ErrorCode::http_status`] of its code.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::Coded { status, .. } => *status,
            e => e.code().http_status(),
        }
    }

    /// Whether trying again may succeed (SPEC §8.1 `retryable`).
    pub fn retryable(&self) -> bool {
        match self {
            Error::Coded { retryable, .. } => *retryable,
            e => e.code().retryable(),
        }
    }

    /// How long to wait before trying again, when the service said (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } | Error::Coded { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The problem body's `code` (SPEC §10.1): what the service sent for [`Error::Coded`], else
    /// [`ErrorCode::problem_code`].
    pub fn problem_code(&self) -> String {
        match self {
            Error::Coded {
                problem_code: Some(p),
                ..
            } => p.clone(),
            e => e.code().problem_code(),
        }
    }

    /// What the user can do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Error::AssetMissing { .. } => {
                "run `make setup` (or scripts/setup.sh) to build the guest kernel and initramfs, \
                 or point SMOL_KERNEL / SMOL_INITRD at them"
                    .into()
            }
            Error::ProgramMissing { package, .. } => {
                format!("install it: apt-get install {package} (or run `make setup`); `smol doctor` checks every program")
            }
            Error::HypervisorUnavailable { .. } => {
                "install QEMU (Debian: apt-get install qemu-system-x86) or set SMOL_QEMU".into()
            }
            Error::KvmUnavailable { .. } => {
                "unset SMOL_ACCEL (or set SMOL_ACCEL=tcg) to run under emulation".into()
            }
            Error::BootFailed { .. } => {
                "the guest console's last lines are in this error's log_tail (Python e.log_tail, \
                 Node err.logTail; the CLI prints them above); `smol doctor` shows the kernel, \
                 accelerator and QEMU in use"
                    .into()
            }
            Error::AgentIncompatible { .. } => {
                "rebuild the guest initramfs with this smol (`make setup`, or scripts/setup.sh), \
                 or point SMOL_INITRD at one it built; `smol doctor` shows the assets in use"
                    .into()
            }
            Error::InvalidCheckpoint { .. } => {
                "the file is not a whole, unaltered checkpoint of this architecture and QEMU: \
                 copy it again (compare its size), or take a new checkpoint on this host"
                    .into()
            }
            Error::InsufficientMemory { .. } => {
                "stop or delete machines you do not need (`smol machine ls`), or ask for a \
                 smaller machine (memory); an operator can lower SMOL_ADMISSION_HEADROOM_MIB or \
                 turn the check off with SMOL_ADMISSION=off (then the OOM killer chooses)"
                    .into()
            }
            Error::Storage { .. } => {
                "the engine home must be writable and have free space: free some, or set SMOL_HOME \
                 to another directory"
                    .into()
            }
            Error::PortUnavailable { .. } => {
                "pick a free host port (`ss -ltn` lists the ones in use)".into()
            }
            Error::Conflict { .. } => {
                "pick another name, or remove it with `smol machine rm`".into()
            }
            Error::InvalidState { .. } => "`smol machine ls` shows the machine's state".into(),
            Error::Interrupted { detail, .. }
                if detail.contains(smol_protocol::mux::AGENT_RESTARTED) =>
            {
                "the machine is still running and reconnects to the new agent: run the \
                 operation again"
                    .into()
            }
            Error::Interrupted { .. } => "the VM exited; create a new machine".into(),
            Error::Unauthorized { .. } => {
                "check the API key (ConnectOptions.api_key or SMOL_CLOUD_TOKEN)".into()
            }
            Error::Forbidden { scope: Some(s), .. } => {
                format!("use an API key with the {s} scope")
            }
            Error::RateLimited {
                retry_after: Some(d),
                ..
            } => format!("try again in {} s", d.as_secs_f64()),
            _ => return None,
        })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            message: message.into(),
        }
    }

    pub(crate) fn from_remote(err: smol_protocol::RemoteError) -> Self {
        use smol_protocol::ErrorKind as K;
        let m = err.message;
        match err.kind {
            K::NotFound => Error::NotFound { what: m },
            K::IsADirectory => Error::IsADirectory {
                path: m.trim_end_matches(": is a directory").to_string(),
            },
            K::NotADirectory => Error::NotADirectory { detail: m },
            K::PermissionDenied => Error::PermissionDenied { detail: m },
            K::InvalidInput => Error::InvalidConfig { message: m },
            K::NoSpace => Error::NoSpace { detail: m },
            K::Unsupported => Error::NotSupported { message: m },
            K::Io => Error::Guest { message: m },
        }
    }
}

/// `Error::Coded`'s message: the message, or `HTTP 503` when there is none.
fn coded_display(status: u16, message: &str) -> String {
    if message.is_empty() {
        format!("HTTP {status}")
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol_protocol::{ErrorKind, RemoteError};

    #[test]
    fn remote_errors_become_typed_errors() {
        let e = Error::from_remote(RemoteError::new(ErrorKind::NotFound, "/x: gone"));
        assert!(matches!(e, Error::NotFound { .. }));
        assert_eq!(e.code(), "NOT_FOUND");
        let e = Error::from_remote(RemoteError::new(
            ErrorKind::IsADirectory,
            "/tmp: is a directory",
        ));
        assert!(matches!(&e, Error::IsADirectory { path } if path == "/tmp"));
        let e = Error::from_remote(RemoteError::new(ErrorKind::NoSpace, "full"));
        assert_eq!(e.code(), "STORAGE_ERROR");
    }

    #[test]
    fn hints_for_setup_problems() {
        let e = Error::AssetMissing {
            what: "guest kernel",
            path: "/nope".into(),
        };
        assert!(e.hint().unwrap().contains("make setup"));
        assert_eq!(e.to_string(), "guest kernel not found at /nope");
    }
}
