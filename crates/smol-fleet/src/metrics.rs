//! `GET /metrics`: Prometheus text format 0.0.4. Request latency by route (a histogram), exec
//! count, errors by code, and machines by state (counted at scrape time from the node).
//!
//! It needs the `admin` scope like any other route needs its scope, rather than being open on
//! loopback: the server may sit behind a reverse proxy on the same host (every request then
//! comes from loopback), and the figures span every tenant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use smolmachines::{ErrorCode, Machine};

use crate::error::ApiError;
use crate::server::Fleet;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The error code of a response, set by whoever made it (read by [`observe`]).
#[derive(Debug, Clone, Copy)]
pub struct ErrorTag(pub &'static str);

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// One line of the exposition (formatting into a String cannot fail).
macro_rules! put {
    ($w:expr, $($arg:tt)*) => {{
        $w.push_str(&format!($($arg)*));
        $w.push('\n');
    }};
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// By (route, method, status).
    requests: Mutex<BTreeMap<(String, String), Histogram>>,
    statuses: Mutex<BTreeMap<(String, String, u16), u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    execs: AtomicU64,
    streams: AtomicU64,
    /// Creates and starts in a row whose VM failed to boot (a success starts over).
    failed_boots: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A label value escaped for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn record(
        &self,
        route: &str,
        method: &str,
        status: u16,
        secs: f64,
        code: Option<&'static str>,
    ) {
        lock(&self.requests)
            .entry((route.to_string(), method.to_string()))
            .or_default()
            .observe(secs);
        *lock(&self.statuses)
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        if let Some(code) = code {
            *lock(&self.errors).entry(code).or_default() += 1;
        }
        if method == "POST" && matches!(route, "/v1/machines" | "/v1/machines/{id}/start") {
            if code == Some(ErrorCode::BootFailed.as_str()) {
                self.failed_boots.fetch_add(1, Ordering::Relaxed);
            } else if (200..300).contains(&status) {
                self.failed_boots.store(0, Ordering::Relaxed);
            }
        }
        if (200..300).contains(&status) && method == "POST" {
            match route {
                "/v1/machines/{id}/exec" => {
                    self.execs.fetch_add(1, Ordering::Relaxed);
                }
                "/v1/machines/{id}/exec/stream" => {
                    self.streams.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }

    /// How many creates and starts in a row failed to boot their VM (`nodeagent.rs` cordons the
    /// node past a bound).
    pub(crate) fn failed_boots_in_a_row(&self) -> u64 {
        self.failed_boots.load(Ordering::Relaxed)
    }

    /// Starts the count of failed boots over (the control plane has cordoned the node).
    pub(crate) fn forget_failed_boots(&self) {
        self.failed_boots.store(0, Ordering::Relaxed);
    }

    /// The text exposition, with `machines` counted by state.
    /// `node_connections`: how many connections this control replica opened to nodes' APIs
    /// (none: it reaches no nodes); `cache`: what its route cache did.
    pub fn render(
        &self,
        machines: &BTreeMap<&'static str, u64>,
        node_connections: Option<u64>,
        cache: crate::cache::CacheStats,
    ) -> String {
        let mut out = String::new();
        let w = &mut out;
        w.push_str("# HELP smolfleet_route_cache_live Whether machines' routes are kept (1: the store's changes are heard).\n");
        w.push_str("# TYPE smolfleet_route_cache_live gauge\n");
        put!(w, "smolfleet_route_cache_live {}", u8::from(cache.live));
        w.push_str("# HELP smolfleet_route_cache_hits_total Machines' routes answered without reading the store.\n");
        w.push_str("# TYPE smolfleet_route_cache_hits_total counter\n");
        put!(w, "smolfleet_route_cache_hits_total {}", cache.hits);
        w.push_str("# HELP smolfleet_route_cache_misses_total Machines' routes read from the store while the cache was live.\n");
        w.push_str("# TYPE smolfleet_route_cache_misses_total counter\n");
        put!(w, "smolfleet_route_cache_misses_total {}", cache.misses);
        w.push_str("# HELP smolfleet_route_cache_notifications_total Changes of routes the store notified.\n");
        w.push_str("# TYPE smolfleet_route_cache_notifications_total counter\n");
        put!(
            w,
            "smolfleet_route_cache_notifications_total {}",
            cache.notifications
        );
        if let Some(n) = node_connections {
            w.push_str(
                "# HELP smolfleet_node_connections_total Connections this replica opened to nodes' APIs (each is kept for later requests).\n",
            );
            w.push_str("# TYPE smolfleet_node_connections_total counter\n");
            put!(w, "smolfleet_node_connections_total {n}");
        }
        w.push_str("# HELP smolfleet_machines Machines on the node by state.\n");
        w.push_str("# TYPE smolfleet_machines gauge\n");
        for (state, n) in machines {
            put!(w, "smolfleet_machines{{state=\"{state}\"}} {n}");
        }
        w.push_str("# HELP smolfleet_execs_total Commands run through the API, by kind.\n");
        w.push_str("# TYPE smolfleet_execs_total counter\n");
        put!(
            w,
            "smolfleet_execs_total{{kind=\"exec\"}} {}",
            self.execs.load(Ordering::Relaxed)
        );
        put!(
            w,
            "smolfleet_execs_total{{kind=\"stream\"}} {}",
            self.streams.load(Ordering::Relaxed)
        );
        w.push_str("# HELP smolfleet_errors_total Error responses by code.\n");
        w.push_str("# TYPE smolfleet_errors_total counter\n");
        for (code, n) in lock(&self.errors).iter() {
            put!(w, "smolfleet_errors_total{{code=\"{}\"}} {n}", esc(code));
        }
        w.push_str("# HELP smolfleet_requests_total Responses by route, method and status.\n");
        w.push_str("# TYPE smolfleet_requests_total counter\n");
        for ((route, method, status), n) in lock(&self.statuses).iter() {
            put!(
                w,
                "smolfleet_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                esc(route)
            );
        }
        w.push_str(
            "# HELP smolfleet_request_duration_seconds Time to the response's head, by route.\n",
        );
        w.push_str("# TYPE smolfleet_request_duration_seconds histogram\n");
        for ((route, method), h) in lock(&self.requests).iter() {
            let labels = format!("route=\"{}\",method=\"{method}\"", esc(route));
            for (i, le) in BUCKETS.iter().enumerate() {
                put!(
                    w,
                    "smolfleet_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    h.counts.get(i).copied().unwrap_or(0)
                );
            }
            put!(
                w,
                "smolfleet_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            put!(
                w,
                "smolfleet_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            put!(
                w,
                "smolfleet_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out
    }
}

/// Times every request and counts its outcome (the route as the router matched it, so ids
/// do not multiply the series; unknown paths are `unmatched`).
pub async fn observe(State(fleet): State<Fleet>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    let code = resp.extensions().get::<ErrorTag>().map(|t| t.0).or({
        match status {
            StatusCode::UNAUTHORIZED => Some(ErrorCode::Unauthorized.as_str()),
            StatusCode::FORBIDDEN => Some(ErrorCode::Forbidden.as_str()),
            s if s.is_client_error() || s.is_server_error() => Some("HTTP_ERROR"),
            _ => None,
        }
    });
    fleet.metrics().record(
        &route,
        &method,
        status.as_u16(),
        start.elapsed().as_secs_f64(),
        code,
    );
    resp
}

/// `GET /metrics` (scope `admin`).
pub async fn metrics(State(fleet): State<Fleet>) -> Result<Response, ApiError> {
    let mut by_state: BTreeMap<&'static str, u64> = ["created", "running", "stopped"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for m in Machine::list_on(&**fleet.engine(), &BTreeMap::new()).await? {
        *by_state.entry(m.state.as_str()).or_default() += 1;
    }
    let mut resp = fleet
        .metrics()
        .render(
            &by_state,
            fleet.remote().map(|r| r.connections_opened()),
            fleet.cache().stats(),
        )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}
