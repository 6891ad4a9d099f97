//! [`ErrorCode`]: the stable codes of SPEC §8.2 / §8.3, their HTTP statuses and problem codes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The stable code of an error (SPEC §8.2, §8.3). Bindings pick their exception class from it;
/// [`ErrorCode::as_str`] is the string every front end shows (`err.code`).
///
/// The /v1 API sends it as the problem body's `code` in lower case ([`ErrorCode::problem_code`]);
/// [`ErrorCode::http_status`] is the status an error of this code is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ErrorCode {
    /// `INVALID_CONFIG`: a configuration value or argument is invalid.
    InvalidConfig,
    /// `CONFIG_ERROR`: the engine's own configuration (SPEC §8.2 engine code).
    ConfigError,
    /// `NOT_SUPPORTED`: not available on this target.
    NotSupported,
    /// `UNSUPPORTED_PLATFORM`: this host cannot run the local engine at all.
    UnsupportedPlatform,
    /// `NOT_FOUND`: a machine, guest path, image or asset does not exist.
    NotFound,
    /// `IS_A_DIRECTORY`: a file operation named a directory.
    IsADirectory,
    /// `PERMISSION_DENIED`: the guest refused access.
    PermissionDenied,
    /// `STORAGE_ERROR`: a disk (guest or engine home) is full or not writable.
    StorageError,
    /// `MOUNT_ERROR`: a host directory to mount is not usable.
    MountError,
    /// `CONFLICT`: a name or a host port is taken.
    Conflict,
    /// `INVALID_STATE`: the machine's state does not allow the operation.
    InvalidState,
    /// `INTERRUPTED`: the VM ended while the operation was in flight (local engine).
    Interrupted,
    /// `MACHINE_INTERRUPTED`: the cloud says the machine was interrupted (problem code
    /// `machine_interrupted`); retryable, but the command may have partly run.
    MachineInterrupted,
    /// `BOOT_FAILED`: the VM did not become ready.
    BootFailed,
    /// `TIMEOUT`: a deadline passed.
    Timeout,
    /// `HYPERVISOR_UNAVAILABLE`: QEMU (or the accelerator) is not usable.
    HypervisorUnavailable,
    /// `KVM_UNAVAILABLE`: KVM was asked for and cannot be used.
    KvmUnavailable,
    /// `RUNTIME_NOT_INSTALLED`: a host program the engine runs is missing.
    RuntimeNotInstalled,
    /// `INSUFFICIENT_MEMORY`: the host (or the engine's cgroup) cannot hold the machine's
    /// memory now (HTTP 503, retryable: it may fit once other machines stop).
    InsufficientMemory,
    /// `COMMAND_FAILED`: `assert_success` on a non-zero exit.
    CommandFailed,
    /// `UNAUTHORIZED`: no credential, or a bad or expired one (HTTP 401).
    Unauthorized,
    /// `FORBIDDEN`: the credential lacks a scope (HTTP 403).
    Forbidden,
    /// `PAYMENT_REQUIRED`: billing or budget (HTTP 402).
    PaymentRequired,
    /// `RATE_LIMITED`: too many requests (HTTP 429, with `Retry-After`).
    RateLimited,
    /// `CONNECTION`: the service cannot be reached (DNS, connect, TLS, a dropped stream).
    Connection,
    /// `NETWORK_ERROR`: a request to a machine's published port failed.
    NetworkError,
    /// `CANCELLED`: the caller cancelled the operation.
    Cancelled,
    /// `SMOLVM_ERROR`: anything else.
    SmolvmError,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidConfig,
        ErrorCode::ConfigError,
        ErrorCode::NotSupported,
        ErrorCode::UnsupportedPlatform,
        ErrorCode::NotFound,
        ErrorCode::IsADirectory,
        ErrorCode::PermissionDenied,
        ErrorCode::StorageError,
        ErrorCode::MountError,
        ErrorCode::Conflict,
        ErrorCode::InvalidState,
        ErrorCode::Interrupted,
        ErrorCode::MachineInterrupted,
        ErrorCode::BootFailed,
        ErrorCode::Timeout,
        ErrorCode::HypervisorUnavailable,
        ErrorCode::KvmUnavailable,
        ErrorCode::RuntimeNotInstalled,
        ErrorCode::InsufficientMemory,
        ErrorCode::CommandFailed,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::PaymentRequired,
        ErrorCode::RateLimited,
        ErrorCode::Connection,
        ErrorCode::NetworkError,
        ErrorCode::Cancelled,
        ErrorCode::SmolvmError,
    ];

    /// The stable string (SPEC §8.2, §8.3), e.g. `"NOT_FOUND"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::ConfigError => "CONFIG_ERROR",
            ErrorCode::NotSupported => "NOT_SUPPORTED",
            ErrorCode::UnsupportedPlatform => "UNSUPPORTED_PLATFORM",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::IsADirectory => "IS_A_DIRECTORY",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::StorageError => "STORAGE_ERROR",
            ErrorCode::MountError => "MOUNT_ERROR",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::InvalidState => "INVALID_STATE",
            ErrorCode::Interrupted => "INTERRUPTED",
            ErrorCode::MachineInterrupted => "MACHINE_INTERRUPTED",
            ErrorCode::BootFailed => "BOOT_FAILED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::HypervisorUnavailable => "HYPERVISOR_UNAVAILABLE",
            ErrorCode::KvmUnavailable => "KVM_UNAVAILABLE",
            ErrorCode::RuntimeNotInstalled => "RUNTIME_NOT_INSTALLED",
            ErrorCode::InsufficientMemory => "INSUFFICIENT_MEMORY",
            ErrorCode::CommandFailed => "COMMAND_FAILED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::PaymentRequired => "PAYMENT_REQUIRED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Connection => "CONNECTION",
            ErrorCode::NetworkError => "NETWORK_ERROR",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::SmolvmError => "SMOLVM_ERROR",
        }
    }

    /// The HTTP status the /v1 API answers an error of this code with.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidConfig
            | ErrorCode::IsADirectory
            | ErrorCode::MountError
            | ErrorCode::ConfigError => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::PaymentRequired => 402,
            ErrorCode::Forbidden | ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::InvalidState => 409,
            ErrorCode::RateLimited => 429,
            ErrorCode::Cancelled => 499,
            ErrorCode::BootFailed | ErrorCode::CommandFailed | ErrorCode::SmolvmError => 500,
            ErrorCode::NotSupported | ErrorCode::UnsupportedPlatform => 501,
            ErrorCode::Connection | ErrorCode::NetworkError => 502,
            ErrorCode::Interrupted
            | ErrorCode::MachineInterrupted
            | ErrorCode::HypervisorUnavailable
            | ErrorCode::KvmUnavailable
            | ErrorCode::RuntimeNotInstalled
            | ErrorCode::InsufficientMemory => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::StorageError => 507,
        }
    }

    /// The code of an HTTP error whose body names no code we know (SPEC §8.3): 401
    /// `UNAUTHORIZED`, 402 `PAYMENT_REQUIRED`, 403 `FORBIDDEN`, 404 `NOT_FOUND`, 409 `CONFLICT`
    /// (SPEC §8.3's recommendation), 429 `RATE_LIMITED`, anything else `SMOLVM_ERROR`.
    pub const fn from_http_status(status: u16) -> ErrorCode {
        match status {
            401 => ErrorCode::Unauthorized,
            402 => ErrorCode::PaymentRequired,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            429 => ErrorCode::RateLimited,
            _ => ErrorCode::SmolvmError,
        }
    }

    /// The problem body's `code` (SPEC §10.1): the stable string in lower case, except
    /// `INTERRUPTED`, which the cloud calls `machine_interrupted`.
    pub fn problem_code(self) -> String {
        match self {
            ErrorCode::Interrupted => "machine_interrupted".into(),
            c => c.as_str().to_ascii_lowercase(),
        }
    }

    /// The code a problem body's `code` names: ours in either case, and the cloud's older
    /// `unknown_key` / `expired_key` (401 bodies). `None` for a code we do not know.
    pub fn from_problem_code(code: &str) -> Option<ErrorCode> {
        match code.to_ascii_lowercase().as_str() {
            "unknown_key" | "expired_key" | "invalid_key" => Some(ErrorCode::Unauthorized),
            c => c.to_ascii_uppercase().parse().ok(),
        }
    }

    /// Whether an error of this code may succeed when tried again (SPEC §8.1 `retryable`).
    pub const fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Connection
                | ErrorCode::NetworkError
                | ErrorCode::Timeout
                | ErrorCode::Interrupted
                | ErrorCode::MachineInterrupted
                | ErrorCode::InsufficientMemory
        )
    }

    /// A short title for problem bodies ("Not found").
    pub fn title(self) -> String {
        let s = self.as_str().replace('_', " ").to_ascii_lowercase();
        let mut c = s.chars();
        match c.next() {
            Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
            None => s,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `e.code() == "NOT_FOUND"` keeps working where the code was a string.
impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<ErrorCode> for &'static str {
    fn from(c: ErrorCode) -> Self {
        c.as_str()
    }
}

/// A string that is not one of the stable codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    /// Parses the stable string exactly (`"NOT_FOUND"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_parse_back_and_match_serde() {
        for &c in ErrorCode::ALL {
            assert_eq!(c.as_str().parse::<ErrorCode>(), Ok(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
            assert!((400..600).contains(&c.http_status()), "{c}");
        }
        assert_eq!(
            "nope".parse::<ErrorCode>(),
            Err(UnknownErrorCode("nope".into()))
        );
        // lower case is the problem code, not the stable string
        assert!("not_found".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn problem_codes_round_trip() {
        for &c in ErrorCode::ALL {
            let back = ErrorCode::from_problem_code(&c.problem_code());
            if c == ErrorCode::Interrupted {
                assert_eq!(back, Some(ErrorCode::MachineInterrupted));
            } else {
                assert_eq!(back, Some(c), "{c}");
            }
        }
        assert_eq!(
            ErrorCode::from_problem_code("machine_interrupted"),
            Some(ErrorCode::MachineInterrupted)
        );
        assert_eq!(
            ErrorCode::from_problem_code("expired_key"),
            Some(ErrorCode::Unauthorized)
        );
        assert_eq!(ErrorCode::from_problem_code("brand_new"), None);
    }

    #[test]
    fn statuses_follow_spec_8_3() {
        assert_eq!(ErrorCode::from_http_status(404), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_http_status(401), ErrorCode::Unauthorized);
        assert_eq!(ErrorCode::from_http_status(403), ErrorCode::Forbidden);
        assert_eq!(ErrorCode::from_http_status(409), ErrorCode::Conflict);
        assert_eq!(ErrorCode::from_http_status(429), ErrorCode::RateLimited);
        assert_eq!(ErrorCode::from_http_status(402), ErrorCode::PaymentRequired);
        for s in [400, 418, 422, 500, 502, 503] {
            assert_eq!(ErrorCode::from_http_status(s), ErrorCode::SmolvmError);
        }
        for c in [
            ErrorCode::Unauthorized,
            ErrorCode::PaymentRequired,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::RateLimited,
        ] {
            assert_eq!(ErrorCode::from_http_status(c.http_status()), c);
        }
        assert_eq!(ErrorCode::NotFound.title(), "Not found");
    }
}
