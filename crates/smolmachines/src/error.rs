//! The one public error type of the Rust API, with the stable codes of SPEC §8.2.

use std::path::PathBuf;

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
    /// Stable code (SPEC §8.2), mapped to typed exceptions by the bindings.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidConfig { .. } | Error::NotADirectory { .. } => "INVALID_CONFIG",
            Error::NotSupported { .. } => "NOT_SUPPORTED",
            Error::NotFound { .. } | Error::AssetMissing { .. } => "NOT_FOUND",
            Error::IsADirectory { .. } => "IS_A_DIRECTORY",
            Error::PermissionDenied { .. } => "PERMISSION_DENIED",
            Error::NoSpace { .. } | Error::Storage { .. } => "STORAGE_ERROR",
            Error::PortUnavailable { .. } => "CONFLICT",
            Error::MountSource { .. } => "MOUNT_ERROR",
            Error::Conflict { .. } => "CONFLICT",
            Error::InvalidState { .. } => "INVALID_STATE",
            Error::Interrupted { .. } => "INTERRUPTED",
            Error::BootFailed { .. } => "BOOT_FAILED",
            Error::Timeout { .. } => "TIMEOUT",
            Error::HypervisorUnavailable { .. } => "HYPERVISOR_UNAVAILABLE",
            Error::KvmUnavailable { .. } => "KVM_UNAVAILABLE",
            Error::Protocol { .. } | Error::Guest { .. } | Error::Io { .. } => "SMOLVM_ERROR",
            Error::CommandFailed { .. } => "COMMAND_FAILED",
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
            Error::HypervisorUnavailable { .. } => {
                "install QEMU (Debian: apt-get install qemu-system-x86) or set SMOL_QEMU".into()
            }
            Error::KvmUnavailable { .. } => {
                "unset SMOL_ACCEL (or set SMOL_ACCEL=tcg) to run under emulation".into()
            }
            Error::BootFailed { .. } => {
                "check the log above; `smol doctor` shows the kernel, accelerator and QEMU in use"
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
            Error::Interrupted { .. } => "the VM exited; create a new machine".into(),
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
