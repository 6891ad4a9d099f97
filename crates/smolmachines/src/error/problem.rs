//! RFC 9457 problem bodies (`application/problem+json`) for the /v1 API (SPEC §10.1), and the
//! two mappings: [`Error::to_problem`] (what a server sends) and [`Error::from_problem`] (what
//! a client makes of any error response, ours or not).
//!
//! Our bodies carry, next to `type/title/status/detail`, the problem `code` (SPEC §10.1, lower
//! case), `retryable`, `retryAfterS`, `hint`, `kind` (the variant) and the variant's typed
//! fields (`machine`, `port`, `exitCode`, `logTail`, ...), so that the client rebuilds the same
//! variant. Another server's body (plain text, `{"code","error"}`, an unknown code) becomes the
//! closest variant with a free-text field, or [`Error::Coded`] with the code of SPEC §8.3.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Error, ErrorCode};

/// Assets whose `what` [`Error::AssetMissing`] can name (it holds a `&'static str`).
const ASSETS: &[&str] = &["guest kernel", "guest initramfs"];

/// An RFC 9457 problem body with smol's extension members (camelCase, SPEC §10.1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Problem {
    /// A URI naming the problem type (`urn:smolmachines:problem:not_found`).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the type ("Not found").
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// This occurrence, in words (the error's message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The stable problem code, lower case (`not_found`, `machine_interrupted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Whether trying again may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Seconds to wait before trying again (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<f64>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The error variant (`notFound`, `bootFailed`, ...): with the fields below it names the
    /// exact error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The variant's main text (what was not found, why, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The machine's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The machine's state (`INVALID_STATE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The operation attempted (`INVALID_STATE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// A host port (`CONFLICT` of a published port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A path (guest path, engine file, mount source, asset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The end of the console and VMM logs (`BOOT_FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// The command's exit code (`COMMAND_FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The command (`COMMAND_FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The command's stdout (`COMMAND_FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// The command's stderr (`COMMAND_FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// The protocol generations a guest agent speaks (an incompatible agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_protocol: Option<String>,
    /// The protocol generations the host speaks (an incompatible agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_protocol: Option<String>,
    /// A host program (`RUNTIME_NOT_INSTALLED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The Debian package providing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// What needs the program.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needed_for: Option<String>,
    /// MiB a machine asked for (`INSUFFICIENT_MEMORY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_mib: Option<u64>,
    /// MiB the host had for it (`INSUFFICIENT_MEMORY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_mib: Option<u64>,
    /// A missing credential scope (`FORBIDDEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// An image registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// What was being done (a host I/O error's context).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Older servers' sentence (`{"code": "unknown_key", "error": "..."}`); read, not sent.
    #[serde(skip_serializing)]
    pub error: Option<String>,
    /// Other servers' sentence; read, not sent.
    #[serde(skip_serializing)]
    pub message: Option<String>,
}

/// JSON types of the members [`Problem::from_body`] takes from a foreign object.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Num,
    Bool,
}

const MEMBERS: &[(&str, Ty)] = &[
    ("type", Ty::Str),
    ("title", Ty::Str),
    ("status", Ty::Num),
    ("detail", Ty::Str),
    ("code", Ty::Str),
    ("retryable", Ty::Bool),
    ("retryAfterS", Ty::Num),
    ("hint", Ty::Str),
    ("kind", Ty::Str),
    ("reason", Ty::Str),
    ("machine", Ty::Str),
    ("state", Ty::Str),
    ("agentProtocol", Ty::Str),
    ("hostProtocol", Ty::Str),
    ("operation", Ty::Str),
    ("port", Ty::Num),
    ("path", Ty::Str),
    ("logTail", Ty::Str),
    ("exitCode", Ty::Num),
    ("command", Ty::Str),
    ("stdout", Ty::Str),
    ("stderr", Ty::Str),
    ("program", Ty::Str),
    ("package", Ty::Str),
    ("neededFor", Ty::Str),
    ("requestedMib", Ty::Num),
    ("availableMib", Ty::Num),
    ("scope", Ty::Str),
    ("registry", Ty::Str),
    ("context", Ty::Str),
    ("error", Ty::Str),
    ("message", Ty::Str),
];

impl Problem {
    /// Reads an error response body of any shape: a problem (or other JSON object: members
    /// of the wrong type are dropped, not fatal), or text, which becomes `detail`. `status` is
    /// the response's.
    pub fn from_body(status: u16, body: &[u8]) -> Problem {
        let text = String::from_utf8_lossy(body);
        let mut p = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(obj)) => {
                let kept: serde_json::Map<String, serde_json::Value> = MEMBERS
                    .iter()
                    .filter_map(|&(k, ty)| {
                        let v = obj.get(k)?;
                        let fits = match ty {
                            Ty::Str => v.is_string(),
                            Ty::Num => v.is_number(),
                            Ty::Bool => v.is_boolean(),
                        };
                        fits.then(|| (k.to_string(), v.clone()))
                    })
                    .collect();
                serde_json::from_value(serde_json::Value::Object(kept)).unwrap_or_else(|e| {
                    // a number out of range (a port of 70000): keep what reads as text
                    tracing::debug!(error = %e, "problem body members out of range");
                    Problem {
                        detail: obj.get("detail").and_then(|v| v.as_str()).map(Into::into),
                        ..Problem::default()
                    }
                })
            }
            _ => {
                let t = text.trim();
                Problem {
                    detail: (!t.is_empty()).then(|| t.to_string()),
                    ..Problem::default()
                }
            }
        };
        p.status = status;
        p
    }

    /// The body's sentence (SPEC §8.3): the first of `detail`, `error`, `message`, `title`.
    pub fn sentence(&self) -> Option<&str> {
        [&self.detail, &self.error, &self.message]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .chain((!self.title.is_empty()).then_some(self.title.as_str()))
            .find(|s| !s.trim().is_empty())
    }

    /// The body as JSON text (for `application/problem+json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Problem always serialises")
    }
}

/// Parses a `Retry-After` value: delta seconds, or an HTTP date (IMF-fixdate, e.g.
/// `Wed, 21 Oct 2015 07:28:00 GMT`), as the time left from now (zero if it has passed).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = parse_http_date(v)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(v: &str) -> Option<u64> {
    let mut it = v.split_whitespace();
    let _weekday = it.next()?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // days from the civil date (Howard Hinnant's algorithm)
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + m * 60 + s)
}

/// The scope of a 403's `missing scope: machine:exec`.
fn scope_of(sentence: &str) -> Option<String> {
    let rest = sentence.trim().strip_prefix("missing scope:")?.trim();
    (!rest.is_empty()).then(|| rest.to_string())
}

impl Error {
    /// The problem body of this error (RFC 9457, SPEC §10.1), sent with
    /// [`Error::http_status`] and `Content-Type: application/problem+json` (and `Retry-After`
    /// when [`Error::retry_after`] is set).
    pub fn to_problem(&self) -> Problem {
        let code = self.code();
        let problem_code = self.problem_code();
        let mut p = Problem {
            type_uri: format!("urn:smolmachines:problem:{problem_code}"),
            title: code.title(),
            status: self.http_status(),
            detail: Some(self.to_string()),
            code: Some(problem_code),
            retryable: Some(self.retryable()),
            retry_after_s: self.retry_after().map(|d| d.as_secs_f64()),
            hint: self.hint(),
            ..Problem::default()
        };
        let kind = match self {
            Error::InvalidConfig { message } => {
                p.reason = Some(message.clone());
                "invalidConfig"
            }
            Error::NotSupported { message } => {
                p.reason = Some(message.clone());
                "notSupported"
            }
            Error::NotFound { what } => {
                p.reason = Some(what.clone());
                "notFound"
            }
            Error::IsADirectory { path } => {
                p.path = Some(path.clone());
                "isADirectory"
            }
            Error::NotADirectory { detail } => {
                p.reason = Some(detail.clone());
                "notADirectory"
            }
            Error::PermissionDenied { detail } => {
                p.reason = Some(detail.clone());
                "permissionDenied"
            }
            Error::NoSpace { detail } => {
                p.reason = Some(detail.clone());
                "noSpace"
            }
            Error::Storage { path, message } => {
                p.path = Some(path.display().to_string());
                p.reason = Some(message.clone());
                "storage"
            }
            Error::PortUnavailable { port, reason } => {
                p.port = Some(*port);
                p.reason = Some(reason.clone());
                "portUnavailable"
            }
            Error::MountSource {
                source_path,
                reason,
            } => {
                p.path = Some(source_path.clone());
                p.reason = Some(reason.clone());
                "mountSource"
            }
            Error::Conflict { name } => {
                p.machine = Some(name.clone());
                "conflict"
            }
            Error::InvalidState { name, state, op } => {
                p.machine = Some(name.clone());
                p.state = Some(state.clone());
                p.operation = Some(op.clone());
                "invalidState"
            }
            Error::Interrupted { name, detail } => {
                p.machine = Some(name.clone());
                p.reason = Some(detail.clone());
                "interrupted"
            }
            Error::BootFailed {
                name,
                reason,
                log_tail,
            } => {
                p.machine = Some(name.clone());
                p.reason = Some(reason.clone());
                p.log_tail = Some(log_tail.clone());
                "bootFailed"
            }
            Error::AgentIncompatible {
                name,
                agent,
                host,
                reason,
            } => {
                p.machine = Some(name.clone());
                p.agent_protocol = Some(agent.clone());
                p.host_protocol = Some(host.clone());
                p.reason = Some(reason.clone());
                "agentIncompatible"
            }
            Error::InvalidCheckpoint { path, reason } => {
                p.path = Some(path.display().to_string());
                p.reason = Some(reason.clone());
                "invalidCheckpoint"
            }
            Error::Timeout { what } => {
                p.reason = Some(what.clone());
                "timeout"
            }
            Error::HypervisorUnavailable { message } => {
                p.reason = Some(message.clone());
                "hypervisorUnavailable"
            }
            Error::KvmUnavailable { message } => {
                p.reason = Some(message.clone());
                "kvmUnavailable"
            }
            Error::ProgramMissing {
                program,
                package,
                needed_for,
                problem,
            } => {
                p.program = Some(program.clone());
                p.package = Some(package.clone());
                p.needed_for = Some(needed_for.clone());
                p.reason = Some(problem.clone());
                "programMissing"
            }
            Error::InsufficientMemory {
                name,
                requested_mib,
                available_mib,
                reason,
            } => {
                p.machine = Some(name.clone());
                p.requested_mib = Some(*requested_mib);
                p.available_mib = Some(*available_mib);
                p.reason = Some(reason.clone());
                "insufficientMemory"
            }
            Error::AssetMissing { what, path } => {
                p.reason = Some((*what).to_string());
                p.path = Some(path.display().to_string());
                "assetMissing"
            }
            Error::Protocol { message } => {
                p.reason = Some(message.clone());
                "protocol"
            }
            Error::Guest { message } => {
                p.reason = Some(message.clone());
                "guest"
            }
            Error::Io { context, source } => {
                p.context = Some(context.clone());
                p.reason = Some(source.to_string());
                "io"
            }
            Error::CommandFailed {
                command,
                exit_code,
                stdout,
                stderr,
            } => {
                p.command = Some(command.clone());
                p.exit_code = Some(*exit_code);
                p.stdout = Some(stdout.clone());
                p.stderr = Some(stderr.clone());
                "commandFailed"
            }
            Error::Registry { registry, message } => {
                p.registry = registry.clone();
                p.reason = Some(message.clone());
                "registry"
            }
            Error::Unauthorized { message } => {
                p.reason = Some(message.clone());
                "unauthorized"
            }
            Error::Forbidden { message, scope } => {
                p.reason = Some(message.clone());
                p.scope = scope.clone();
                "forbidden"
            }
            Error::PaymentRequired { message } => {
                p.reason = Some(message.clone());
                "paymentRequired"
            }
            Error::RateLimited { message, .. } => {
                p.reason = Some(message.clone());
                "rateLimited"
            }
            Error::Connection { message } => {
                p.reason = Some(message.clone());
                "connection"
            }
            // another server's error passed on: its own sentence and code, no variant
            Error::Coded { message, .. } => {
                p.detail = (!message.is_empty()).then(|| message.clone());
                return p;
            }
        };
        p.kind = Some(kind.to_string());
        p
    }

    /// The error of an HTTP error response: `status`, its body (any shape: ours, another
    /// problem, `{"code","error"}`, plain text, empty) and its `Retry-After` header.
    ///
    /// The code is the body's `code` when we know it, else the status's (SPEC §8.3). A body
    /// of ours (with `kind` and its fields) becomes the same variant it was made from; the
    /// cloud codes and single-text variants are built from the sentence; anything else is
    /// [`Error::Coded`] with that code.
    pub fn from_problem(status: u16, body: &[u8], retry_after: Option<&str>) -> Error {
        Error::from_problem_body(&Problem::from_body(status, body), retry_after)
    }

    /// [`Error::from_problem`] of a parsed body (`p.status` is the response's status).
    pub fn from_problem_body(p: &Problem, retry_after: Option<&str>) -> Error {
        let status = p.status;
        let retry_after = retry_after.and_then(parse_retry_after).or_else(|| {
            p.retry_after_s
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
        });
        let code = p
            .code
            .as_deref()
            .and_then(ErrorCode::from_problem_code)
            .unwrap_or_else(|| ErrorCode::from_http_status(status));
        let sentence = p.sentence().map(str::to_string);
        if let Some(e) = exact(p, code, sentence.as_deref(), retry_after) {
            return e;
        }
        Error::Coded {
            code,
            status,
            message: sentence.unwrap_or_default(),
            problem_code: p.code.clone(),
            retryable: p
                .retryable
                .unwrap_or(matches!(status, 408 | 429 | 502 | 503 | 504)),
            retry_after,
        }
    }
}

/// The variant a body names with all its fields, or the variant of `code` that needs only a
/// sentence. `None`: [`Error::Coded`].
fn exact(
    p: &Problem,
    code: ErrorCode,
    sentence: Option<&str>,
    retry_after: Option<Duration>,
) -> Option<Error> {
    let s = |v: &Option<String>| v.clone();
    let reason = || s(&p.reason);
    let text = || p.reason.clone().or_else(|| sentence.map(str::to_string));
    let Some(kind) = p.kind.as_deref() else {
        // another server's body: the cloud codes, and the codes of a single-text variant
        return Some(match code {
            ErrorCode::Unauthorized => Error::Unauthorized {
                message: text().unwrap_or_else(|| format!("HTTP {}", p.status)),
            },
            ErrorCode::Forbidden => {
                let message = text().unwrap_or_else(|| format!("HTTP {}", p.status));
                Error::Forbidden {
                    scope: p.scope.clone().or_else(|| scope_of(&message)),
                    message,
                }
            }
            ErrorCode::PaymentRequired => Error::PaymentRequired {
                message: text().unwrap_or_else(|| format!("HTTP {}", p.status)),
            },
            ErrorCode::RateLimited => Error::RateLimited {
                message: text().unwrap_or_else(|| format!("HTTP {}", p.status)),
                retry_after,
            },
            ErrorCode::Connection => Error::Connection { message: text()? },
            ErrorCode::NotFound => Error::NotFound { what: text()? },
            ErrorCode::InvalidConfig => Error::InvalidConfig { message: text()? },
            ErrorCode::NotSupported => Error::NotSupported { message: text()? },
            ErrorCode::Timeout => Error::Timeout { what: text()? },
            _ => return None,
        });
    };
    Some(match kind {
        "invalidConfig" => Error::InvalidConfig { message: reason()? },
        "notSupported" => Error::NotSupported { message: reason()? },
        "notFound" => Error::NotFound { what: reason()? },
        "isADirectory" => Error::IsADirectory { path: s(&p.path)? },
        "notADirectory" => Error::NotADirectory { detail: reason()? },
        "permissionDenied" => Error::PermissionDenied { detail: reason()? },
        "noSpace" => Error::NoSpace { detail: reason()? },
        "storage" => Error::Storage {
            path: s(&p.path)?.into(),
            message: reason()?,
        },
        "portUnavailable" => Error::PortUnavailable {
            port: p.port?,
            reason: reason()?,
        },
        "mountSource" => Error::MountSource {
            source_path: s(&p.path)?,
            reason: reason()?,
        },
        "conflict" => Error::Conflict {
            name: s(&p.machine)?,
        },
        "invalidState" => Error::InvalidState {
            name: s(&p.machine)?,
            state: s(&p.state)?,
            op: s(&p.operation)?,
        },
        "interrupted" => Error::Interrupted {
            name: s(&p.machine)?,
            detail: reason()?,
        },
        "bootFailed" => Error::BootFailed {
            name: s(&p.machine)?,
            reason: reason()?,
            log_tail: s(&p.log_tail).unwrap_or_default(),
        },
        "agentIncompatible" => Error::AgentIncompatible {
            name: s(&p.machine)?,
            agent: s(&p.agent_protocol)?,
            host: s(&p.host_protocol)?,
            reason: reason()?,
        },
        "invalidCheckpoint" => Error::InvalidCheckpoint {
            path: s(&p.path)?.into(),
            reason: reason()?,
        },
        "timeout" => Error::Timeout { what: reason()? },
        "hypervisorUnavailable" => Error::HypervisorUnavailable { message: reason()? },
        "kvmUnavailable" => Error::KvmUnavailable { message: reason()? },
        "programMissing" => Error::ProgramMissing {
            program: s(&p.program)?,
            package: s(&p.package)?,
            needed_for: s(&p.needed_for)?,
            problem: reason()?,
        },
        "insufficientMemory" => Error::InsufficientMemory {
            name: s(&p.machine)?,
            requested_mib: p.requested_mib?,
            available_mib: p.available_mib?,
            reason: reason()?,
        },
        "assetMissing" => {
            let what = reason()?;
            let path = s(&p.path)?;
            match ASSETS.iter().find(|a| **a == what) {
                Some(a) => Error::AssetMissing {
                    what: a,
                    path: path.into(),
                },
                None => Error::NotFound {
                    what: format!("{what} at {path}"),
                },
            }
        }
        "protocol" => Error::Protocol { message: reason()? },
        "guest" => Error::Guest { message: reason()? },
        "io" => Error::Io {
            context: s(&p.context)?,
            source: std::io::Error::other(reason()?),
        },
        "commandFailed" => Error::CommandFailed {
            command: s(&p.command).unwrap_or_default(),
            exit_code: p.exit_code?,
            stdout: s(&p.stdout).unwrap_or_default(),
            stderr: s(&p.stderr).unwrap_or_default(),
        },
        "registry" => Error::Registry {
            registry: s(&p.registry),
            message: reason()?,
        },
        "unauthorized" => Error::Unauthorized { message: reason()? },
        "forbidden" => Error::Forbidden {
            message: reason()?,
            scope: s(&p.scope),
        },
        "paymentRequired" => Error::PaymentRequired { message: reason()? },
        "rateLimited" => Error::RateLimited {
            message: reason()?,
            retry_after,
        },
        "connection" => Error::Connection { message: reason()? },
        other => {
            tracing::debug!(kind = other, "problem body of an unknown kind");
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant, with every typed field set.
    fn every_variant() -> Vec<Error> {
        let s = |x: &str| x.to_string();
        vec![
            Error::InvalidConfig {
                message: s("cpus must be 1..64"),
            },
            Error::NotSupported {
                message: s("mounts on the cloud"),
            },
            Error::NotFound {
                what: s("machine \"m\""),
            },
            Error::IsADirectory { path: s("/tmp") },
            Error::NotADirectory {
                detail: s("/etc/passwd/x"),
            },
            Error::PermissionDenied { detail: s("/root") },
            Error::NoSpace { detail: s("/data") },
            Error::Storage {
                path: "/home/u/.local/share/smol/state.db".into(),
                message: s("read-only file system"),
            },
            Error::PortUnavailable {
                port: 8080,
                reason: s("address in use"),
            },
            Error::MountSource {
                source_path: s("/nope"),
                reason: s("does not exist"),
            },
            Error::Conflict { name: s("web") },
            Error::InvalidState {
                name: s("web"),
                state: s("stopped"),
                op: s("exec"),
            },
            Error::Interrupted {
                name: s("web"),
                detail: s("QEMU was killed by SIGKILL"),
            },
            Error::BootFailed {
                name: s("web"),
                reason: s("the agent never answered"),
                log_tail: s("[    0.1] Linux version 6.1\nKernel panic"),
            },
            Error::AgentIncompatible {
                name: s("web"),
                agent: s("0"),
                host: s("1..=3"),
                reason: s("the agent speaks protocol generation 0, older than ..."),
            },
            Error::InvalidCheckpoint {
                path: "/tmp/a.smolcheckpoint".into(),
                reason: s("section ram: sha256 differs"),
            },
            Error::Timeout {
                what: s("readiness of web"),
            },
            Error::HypervisorUnavailable {
                message: s("no qemu-system-x86_64"),
            },
            Error::KvmUnavailable {
                message: s("/dev/kvm: EACCES"),
            },
            Error::ProgramMissing {
                program: s("qemu-img"),
                package: s("qemu-utils"),
                needed_for: s("to create a machine"),
                problem: s("it is not installed"),
            },
            Error::InsufficientMemory {
                name: s("web"),
                requested_mib: 640,
                available_mib: 300,
                reason: s("/sys/fs/cgroup/memory/t has 556 MiB free (limit 1536 MiB)"),
            },
            Error::AssetMissing {
                what: "guest kernel",
                path: "/assets/vmlinux".into(),
            },
            Error::Protocol {
                message: s("agent speaks 1"),
            },
            Error::Guest { message: s("EIO") },
            Error::Io {
                context: s("reading console.log"),
                source: std::io::Error::other("disk on fire"),
            },
            Error::Registry {
                registry: Some(s("registry.example")),
                message: s("registry registry.example: 500"),
            },
            Error::CommandFailed {
                command: s("false --x"),
                exit_code: 3,
                stdout: s("out"),
                stderr: s("err"),
            },
            Error::Unauthorized {
                message: s("expired key"),
            },
            Error::Forbidden {
                message: s("missing scope: machine:exec"),
                scope: Some(s("machine:exec")),
            },
            Error::PaymentRequired {
                message: s("budget exceeded"),
            },
            Error::RateLimited {
                message: s("slow down"),
                retry_after: Some(Duration::from_secs(7)),
            },
            Error::Connection {
                message: s("connection refused"),
            },
            Error::Coded {
                code: ErrorCode::NetworkError,
                status: 502,
                message: s("guest port 80 reset the connection"),
                problem_code: Some(s("network_error")),
                retryable: true,
                retry_after: None,
            },
        ]
    }

    #[test]
    fn every_variant_round_trips_through_problem_json() {
        let all = every_variant();
        let mut kinds = std::collections::HashSet::new();
        for e in &all {
            let p = e.to_problem();
            assert_eq!(p.status, e.http_status(), "{e:?}");
            assert_eq!(p.code.as_deref(), Some(e.problem_code().as_str()));
            assert_eq!(p.detail.as_deref(), Some(e.to_string().as_str()));
            assert_eq!(p.retryable, Some(e.retryable()));
            kinds.insert(p.kind.clone());
            let body = p.to_json();
            let header = e.retry_after().map(|d| d.as_secs().to_string());
            let back = Error::from_problem(p.status, body.as_bytes(), header.as_deref());
            assert_eq!(back.code(), e.code(), "{e:?} -> {back:?}");
            assert_eq!(back.http_status(), e.http_status());
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.retry_after(), e.retry_after());
            assert_eq!(back.to_problem(), p, "{e:?} -> {back:?}");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(e),
                "{e:?} -> {back:?}"
            );
        }
        assert_eq!(kinds.len(), all.len(), "one sample per variant");
        // typed fields arrive typed
        let e = Error::PortUnavailable {
            port: 8080,
            reason: "busy".into(),
        };
        let back = Error::from_problem(409, e.to_problem().to_json().as_bytes(), None);
        assert!(
            matches!(back, Error::PortUnavailable { port: 8080, .. }),
            "{back:?}"
        );
        let json: serde_json::Value = serde_json::from_str(
            &Error::BootFailed {
                name: "m".into(),
                reason: "r".into(),
                log_tail: "tail".into(),
            }
            .to_problem()
            .to_json(),
        )
        .unwrap();
        assert_eq!(json["logTail"], "tail");
        assert_eq!(json["code"], "boot_failed");
        assert_eq!(json["status"], 500);
        assert_eq!(json["kind"], "bootFailed");
        assert!(json["type"].as_str().unwrap().ends_with("boot_failed"));
    }

    #[test]
    fn interrupted_is_machine_interrupted_on_the_wire() {
        let e = Error::Interrupted {
            name: "m".into(),
            detail: "gone".into(),
        };
        let p = e.to_problem();
        assert_eq!(p.code.as_deref(), Some("machine_interrupted"));
        assert_eq!(p.retryable, Some(true));
        // the cloud's own body (no kind): the cloud code of SPEC §8.3
        let e = Error::from_problem(
            503,
            br#"{"type":"about:blank","title":"Service Unavailable","status":503,
                 "detail":"machine was interrupted","code":"machine_interrupted","retryable":true}"#,
            None,
        );
        assert_eq!(e.code(), ErrorCode::MachineInterrupted);
        assert_eq!(e.problem_code(), "machine_interrupted");
        assert!(e.retryable());
        assert_eq!(e.to_string(), "machine was interrupted");
    }

    #[test]
    fn foreign_bodies_map_by_status_and_code() {
        // plain text (older servers)
        let e = Error::from_problem(404, b"machine not found", None);
        assert!(
            matches!(&e, Error::NotFound { what } if what == "machine not found"),
            "{e:?}"
        );
        // an empty 401
        let e = Error::from_problem(401, b"", None);
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        assert_eq!(e.code(), "UNAUTHORIZED");
        // older 401 JSON
        let e = Error::from_problem(
            401,
            br#"{"code":"expired_key","error":"key expired"}"#,
            None,
        );
        assert!(matches!(&e, Error::Unauthorized { message } if message == "key expired"));
        // 403 plain text names the scope
        let e = Error::from_problem(403, b"missing scope: machine:files", None);
        assert!(
            matches!(&e, Error::Forbidden { scope: Some(s), .. } if s == "machine:files"),
            "{e:?}"
        );
        // 429 with Retry-After
        let e = Error::from_problem(429, b"too many", Some("3"));
        assert!(matches!(e, Error::RateLimited { .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(e.retryable());
        // 402 problem of the cloud
        let e = Error::from_problem(
            402,
            br#"{"type":"about:blank","title":"Payment Required","status":402,"code":"payment_required"}"#,
            None,
        );
        assert!(matches!(&e, Error::PaymentRequired { message } if message == "Payment Required"));
        // 409: CONFLICT (SPEC §8.3's recommendation), no name known: Coded
        let e = Error::from_problem(409, b"machine name already exists", None);
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(matches!(e, Error::Coded { status: 409, .. }), "{e:?}");
        assert_eq!(e.to_string(), "machine name already exists");
        // an unknown code keeps the status's code and the body's code
        let e = Error::from_problem(
            422,
            br#"{"detail":"quota exceeded","code":"quota_exceeded","retryable":false}"#,
            None,
        );
        assert_eq!(e.code(), ErrorCode::SmolvmError);
        assert_eq!(e.problem_code(), "quota_exceeded");
        assert!(!e.retryable());
        // a non-JSON 503: retryable by status; members of the wrong type are dropped
        let e = Error::from_problem(503, b"<html>bad gateway</html>", None);
        assert!(matches!(
            &e,
            Error::Coded {
                code: ErrorCode::SmolvmError,
                status: 503,
                retryable: true,
                ..
            }
        ));
        assert_eq!(e.to_string(), "<html>bad gateway</html>");
        let e = Error::from_problem(500, br#"{"code":7,"detail":"x","retryable":"yes"}"#, None);
        assert!(
            matches!(
                &e,
                Error::Coded {
                    problem_code: None,
                    retryable: false,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "x");
        // nothing at all
        let e = Error::from_problem(502, b"", None);
        assert_eq!(e.to_string(), "HTTP 502");
        // our body with a kind but a missing field: the code, as Coded
        let e = Error::from_problem(
            409,
            br#"{"kind":"invalidState","code":"invalid_state","machine":"m","detail":"d"}"#,
            None,
        );
        assert!(
            matches!(
                e,
                Error::Coded {
                    code: ErrorCode::InvalidState,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        // a date in the past: no wait
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        let later = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT").unwrap();
        assert!(later > Duration::from_secs(365 * 86_400));
        // the header wins over the body
        let e = Error::from_problem(429, br#"{"retryAfterS": 9}"#, Some("2"));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        let e = Error::from_problem(429, br#"{"retryAfterS": 9}"#, None);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(9)));
    }
}
