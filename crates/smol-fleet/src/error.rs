//! The server's own errors (its database, start-up) and the one way any error becomes an HTTP
//! response: [`ApiError`], a `smolmachines::Error` sent as the core's problem+json.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use smolmachines::{Error, ErrorCode};

/// What can go wrong in the fleet's own machinery.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A database step failed.
    #[error("fleet database: cannot {what}: {source}")]
    Db {
        /// The step.
        what: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A PostgreSQL step failed (the database answered with an error).
    #[error("fleet database (PostgreSQL): cannot {what}: {source}")]
    Postgres {
        /// The step.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The store's database cannot be reached (down, restarting, not answering): answered
    /// 503, retryable.
    #[error("fleet database unavailable: cannot {what}: {message}")]
    StoreUnavailable {
        /// The step.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// `--db` is not a store URL.
    #[error("--db: {message}")]
    StoreConfig {
        /// What is wrong.
        message: String,
    },
    /// The database was written by a newer server.
    #[error("fleet database schema {found} is newer than this server's ({supported}); upgrade smolfleet")]
    SchemaTooNew {
        /// Its version.
        found: i64,
        /// Ours.
        supported: i64,
    },
    /// A thread panicked while holding the database.
    #[error("fleet database lock poisoned by a panic")]
    Poisoned,
    /// A blocking task did not finish.
    #[error("fleet blocking task failed: {0}")]
    Join(String),
    /// A TLS certificate or key file is missing, unreadable or wrong.
    #[error("TLS file {}: {message}", file.display())]
    Tls {
        /// The file.
        file: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The fleet CA, a node's certificate or its request (`fleetca.rs`).
    #[error("fleet CA: {message}")]
    Ca {
        /// What went wrong.
        message: String,
    },
    /// A node's join or heartbeat (`nodeagent.rs`, `nodedoor.rs`).
    #[error("fleet node: {message}")]
    Node {
        /// What went wrong.
        message: String,
    },
    /// The node's certificate expired while it was away: no replica takes it, the node stops.
    #[error(
        "fleet node: the node certificate expired {ago_secs}s ago (the node was away longer \
         than its validity): remove node.json, node.key and node.crt from {} and join again \
         with a new token (`smolfleet node join-token`)",
        home.display()
    )]
    NodeCertExpired {
        /// How long ago it expired.
        ago_secs: i64,
        /// The node's home.
        home: std::path::PathBuf,
    },
    /// A file or socket step failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl FleetError {
    pub(crate) fn db(what: &'static str, source: rusqlite::Error) -> FleetError {
        FleetError::Db { what, source }
    }
}

impl FleetError {
    /// Whether the step failed because the fleet's disk is full (SQLite's `SQLITE_FULL`,
    /// `ENOSPC` / `EDQUOT`).
    pub fn disk_full(&self) -> bool {
        match self {
            FleetError::Db { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            FleetError::Postgres { source, .. } => {
                source.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            FleetError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}

impl From<FleetError> for Error {
    fn from(e: FleetError) -> Error {
        if let FleetError::StoreUnavailable { .. } = e {
            // 503 retryable: the database comes back, the request can be made again
            return retry_later(e.to_string());
        }
        if e.disk_full() {
            // 507 storage_error: the client can tell "no room" from a bug
            return Error::Storage {
                path: "fleet.db".into(),
                message: format!("the fleet's disk is full: {e}"),
            };
        }
        Error::coded(ErrorCode::SmolvmError, e.to_string())
    }
}

/// 503 `retryable`, `Retry-After: 1` (see [`ApiError::retry_later`]).
fn retry_later(message: String) -> Error {
    Error::Coded {
        code: ErrorCode::SmolvmError,
        status: 503,
        message,
        problem_code: None,
        retryable: true,
        retry_after: Some(std::time::Duration::from_secs(1)),
    }
}

/// An error answered as `application/problem+json` with the status of its code, from
/// [`Error::to_problem`] (and `Retry-After` when the error carries one).
#[derive(Debug)]
pub struct ApiError(pub Error);

impl ApiError {
    /// 503 `retryable` with `Retry-After: 1`: the fleet cannot do it now but may soon (no
    /// node has room, a node or the store is away); `message` says what is missing.
    pub fn retry_later(message: impl Into<String>) -> ApiError {
        ApiError(retry_later(message.into()))
    }

    /// A body that is not JSON (400).
    pub fn malformed(detail: impl std::fmt::Display) -> ApiError {
        ApiError(Error::InvalidConfig {
            message: format!("malformed JSON body: {detail}"),
        })
    }

    /// A JSON body that does not satisfy the schema (422).
    pub fn unprocessable(detail: impl std::fmt::Display) -> ApiError {
        ApiError(Error::Coded {
            code: ErrorCode::InvalidConfig,
            status: 422,
            message: detail.to_string(),
            problem_code: None,
            retryable: false,
            retry_after: None,
        })
    }

    /// A body over `limit` bytes (413).
    pub fn too_large(what: &str, limit: usize) -> ApiError {
        ApiError(Error::Coded {
            code: ErrorCode::InvalidConfig,
            status: 413,
            message: format!("{what} is larger than the limit of {limit} bytes"),
            problem_code: None,
            retryable: false,
            retry_after: None,
        })
    }

    /// Machine `id` does not exist for this tenant (404).
    pub fn machine_not_found(id: &str) -> ApiError {
        ApiError(Error::NotFound {
            what: format!("machine {id}"),
        })
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        tracing::error!(error = %e, "fleet internal error");
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0, None)
    }
}

/// The problem+json response of `e` (its `hint` replaced by `hint` when given).
pub(crate) fn problem_response(e: &Error, hint: Option<String>) -> Response {
    let mut problem = e.to_problem();
    if hint.is_some() {
        problem.hint = hint;
    }
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), error = %e, "request failed");
    } else {
        tracing::debug!(status = status.as_u16(), error = %e, "request refused");
    }
    let mut resp = (status, problem.to_json()).into_response();
    resp.extensions_mut()
        .insert(crate::metrics::ErrorTag(e.code().as_str()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(after) = e.retry_after() {
        let secs = after.as_secs_f64().ceil() as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}
