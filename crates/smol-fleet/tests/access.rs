//! Key scopes (403 `missing scope: …`), the per-key rate limit (429 + Retry-After) and
//! `GET /metrics`, against a real server on 127.0.0.1 over a temporary home (no VM: the
//! routes used are refused or answered before the engine boots anything).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use smol_fleet::testing::spawn;
use smol_fleet::RateLimit;
use support::{client, content_type, json_ok, problem, unauthorized};

/// `smolfleet keys create --scope …` over `home`: the key and the scopes it printed.
fn create_key(home: &std::path::Path, tenant: &str, scopes: &[&str]) -> (String, String) {
    let mut cmd = support::smolfleet(home);
    cmd.args(["keys", "create", "--tenant", tenant]);
    for s in scopes {
        cmd.args(["--scope", s]);
    }
    let out = cmd
        .arg("--home")
        .arg(home)
        .env("SMOL_LOG", "warn")
        .output()
        .expect("run smolfleet");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in {stdout}"))
            .trim()
            .to_string()
    };
    (field("key: "), field("scopes: "))
}

/// The tenant of the bootstrap key (from `keys list`).
fn first_tenant(home: &std::path::Path) -> String {
    let out = support::smolfleet(home)
        .args(["keys", "list", "--home"])
        .arg(home)
        .output()
        .expect("run smolfleet");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    list.split_whitespace()
        .find(|w| w.starts_with("ten-"))
        .unwrap_or_else(|| panic!("no tenant in {list}"))
        .to_string()
}

async fn send(c: &Client, method: Method, url: &str, key: &str) -> reqwest::Response {
    let req = c.request(method.clone(), url).bearer_auth(key);
    let req = if method == Method::POST || method == Method::PUT {
        req.header("content-type", "application/json")
            .body(r#"{"command":["true"]}"#)
    } else {
        req
    };
    req.send().await.expect("request")
}

async fn forbidden(r: reqwest::Response, scope: &str) {
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("x-request-id").is_some());
    assert!(
        content_type(&r).starts_with("text/plain"),
        "{}",
        content_type(&r)
    );
    assert_eq!(r.text().await.unwrap(), format!("missing scope: {scope}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn each_route_needs_its_scope() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let admin = srv.admin_key.clone().expect("bootstrap key");
    let tenant = first_tenant(home.path());
    let (reader, scopes) = create_key(home.path(), &tenant, &["machine:read"]);
    assert_eq!(scopes, "machine:read");
    let (all, scopes) = create_key(home.path(), &tenant, &[]);
    assert_eq!(
        scopes,
        "machine:create machine:read machine:exec machine:delete machine:files volume:read usage:read"
    );
    // comma-separated and repeated; an unknown scope is refused naming the known ones
    let (_, scopes) = create_key(
        home.path(),
        &tenant,
        &["machine:exec,machine:files", "admin"],
    );
    assert_eq!(scopes, "machine:exec machine:files admin");
    let out = support::smolfleet(home.path())
        .args([
            "keys",
            "create",
            "--tenant",
            &tenant,
            "--scope",
            "machines:read",
            "--home",
        ])
        .arg(home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("machines:read") && err.contains("machine:read"),
        "{err}"
    );

    let c = client();
    let url = |p: &str| format!("{}{p}", srv.base_url);
    let id = "mach-0000000000000000";
    let routes: &[(Method, String, &str)] = &[
        (Method::POST, url("/v1/machines"), "machine:create"),
        (
            Method::DELETE,
            url(&format!("/v1/machines/{id}")),
            "machine:delete",
        ),
        (
            Method::POST,
            url(&format!("/v1/machines/{id}/start")),
            "machine:exec",
        ),
        (
            Method::POST,
            url(&format!("/v1/machines/{id}/stop")),
            "machine:exec",
        ),
        (
            Method::POST,
            url(&format!("/v1/machines/{id}/exec")),
            "machine:exec",
        ),
        (
            Method::POST,
            url(&format!("/v1/machines/{id}/exec/stream")),
            "machine:exec",
        ),
        (
            Method::GET,
            url(&format!("/v1/machines/{id}/files//etc/x")),
            "machine:files",
        ),
        (
            Method::PUT,
            url(&format!("/v1/machines/{id}/files/rel/x")),
            "machine:files",
        ),
        (Method::GET, url("/metrics"), "admin"),
    ];
    for (m, u, scope) in routes {
        // the reader lacks it: 403 naming it
        forbidden(send(&c, m.clone(), u, &reader).await, scope).await;
        if *scope != "admin" {
            // a key holding it gets past the check: the machine does not exist (the create
            // body lacks its source)
            let r = send(&c, m.clone(), u, &all).await;
            if u.ends_with("/v1/machines") {
                problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
            } else {
                problem(r, StatusCode::NOT_FOUND, "not_found").await;
            }
        } else {
            forbidden(send(&c, m.clone(), u, &all).await, scope).await;
        }
    }
    // what the reader holds works; routes without a scope need only a key
    json_ok(
        send(&c, Method::GET, &url("/v1/machines"), &reader).await,
        StatusCode::OK,
    )
    .await;
    problem(
        send(
            &c,
            Method::GET,
            &url(&format!("/v1/machines/{id}")),
            &reader,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    json_ok(
        send(&c, Method::GET, &url("/livez"), &reader).await,
        StatusCode::OK,
    )
    .await;
    problem(
        send(&c, Method::GET, &url("/v1/nope"), &reader).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // admin implies every scope
    let r = send(&c, Method::GET, &url("/metrics"), &admin).await;
    assert_eq!(r.status(), StatusCode::OK);
    problem(
        send(
            &c,
            Method::POST,
            &url(&format!("/v1/machines/{id}/exec")),
            &admin,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // without a key it stays 401 with an empty body, scope or not
    unauthorized(c.get(url("/metrics")).send().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().expect("bootstrap key");
    let other = srv.new_tenant_key("other").await.unwrap();
    let c = client();
    let livez = format!("{}/livez", srv.base_url);

    // the default is far above what a test sends
    for _ in 0..50 {
        json_ok(send(&c, Method::GET, &livez, &key).await, StatusCode::OK).await;
    }

    // 2 a second, bursts of 2: the key is refused within a few requests (at most one token
    // comes back per half second, however slow this host is)
    srv.fleet.set_rate_limit(RateLimit::per_second(2.0));
    let mut refused = None;
    for _ in 0..20 {
        let r = send(&c, Method::GET, &livez, &key).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get("x-ratelimit-remaining").is_some());
    }
    let r = refused.expect("a key over 2 requests a second is refused");
    let after: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert_eq!(after, 1, "ceil of half a second at most");
    assert!(r.headers().get("x-request-id").is_some());
    let body = problem(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("2 requests a second"),
        "{body}"
    );
    // the refusal is the same on any route, before any scope or body check
    problem(
        send(
            &c,
            Method::POST,
            &format!("{}/v1/machines", srv.base_url),
            &key,
        )
        .await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    // another key has its own bucket
    json_ok(send(&c, Method::GET, &livez, &other).await, StatusCode::OK).await;
    // a bad key is still 401, not 429
    unauthorized(send(&c, Method::GET, &livez, &smol_fleet::keys::generate()).await).await;
    // after Retry-After the key works again
    tokio::time::sleep(Duration::from_secs(after)).await;
    json_ok(send(&c, Method::GET, &livez, &key).await, StatusCode::OK).await;
}

/// The samples of a Prometheus text exposition: `name{labels}` → value (labels as written).
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).expect("a type");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(open) = series.find('{') {
            assert!(series.ends_with('}'), "{line}");
            let name = &series[..open];
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{line}"
            );
            for pair in series[open + 1..series.len() - 1].split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                assert!(
                    k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{line}"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    out
}

async fn scrape(c: &Client, base: &str, key: &str) -> BTreeMap<String, f64> {
    let r = send(c, Method::GET, &format!("{base}/metrics"), key).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(content_type(&r), "text/plain; version=0.0.4; charset=utf-8");
    parse(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_latency_and_errors() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().expect("bootstrap key");
    let c = client();
    let base = srv.base_url.clone();

    let before = scrape(&c, &base, &key).await;
    for state in ["created", "running", "stopped"] {
        assert_eq!(
            before[&format!("smolfleet_machines{{state=\"{state}\"}}")],
            0.0
        );
    }
    assert_eq!(before["smolfleet_execs_total{kind=\"exec\"}"], 0.0);
    assert_eq!(before["smolfleet_execs_total{kind=\"stream\"}"], 0.0);

    // three lists, two exec refusals (no such machine), one bad body, one unknown route,
    // one request without a key
    for _ in 0..3 {
        json_ok(
            send(&c, Method::GET, &format!("{base}/v1/machines"), &key).await,
            StatusCode::OK,
        )
        .await;
    }
    for _ in 0..2 {
        problem(
            send(
                &c,
                Method::POST,
                &format!("{base}/v1/machines/mach-x/exec"),
                &key,
            )
            .await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    let r = c
        .post(format!("{base}/v1/machines"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
    problem(
        send(&c, Method::GET, &format!("{base}/v1/nope/1"), &key).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    unauthorized(c.get(format!("{base}/v1/machines")).send().await.unwrap()).await;

    let after = scrape(&c, &base, &key).await;
    let delta = |series: &str| {
        after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
    };
    let list = "route=\"/v1/machines\",method=\"GET\"";
    assert_eq!(
        delta(&format!(
            "smolfleet_requests_total{{{list},status=\"200\"}}"
        )),
        3.0
    );
    // the unauthenticated list never reached the route: it is counted as such, by status
    assert_eq!(
        delta(&format!(
            "smolfleet_requests_total{{{list},status=\"401\"}}"
        )),
        1.0
    );
    assert_eq!(
        delta(&format!(
            "smolfleet_request_duration_seconds_count{{{list}}}"
        )),
        4.0
    );
    assert_eq!(
        delta(&format!(
            "smolfleet_request_duration_seconds_bucket{{{list},le=\"+Inf\"}}"
        )),
        4.0
    );
    assert!(delta(&format!("smolfleet_request_duration_seconds_sum{{{list}}}")) > 0.0);
    // buckets are cumulative
    let b1 = after[&format!("smolfleet_request_duration_seconds_bucket{{{list},le=\"0.001\"}}")];
    let b2 = after[&format!("smolfleet_request_duration_seconds_bucket{{{list},le=\"300\"}}")];
    assert!(b1 <= b2, "{b1} {b2}");
    // the ids of machines do not make series of their own
    let exec = "route=\"/v1/machines/{id}/exec\",method=\"POST\"";
    assert_eq!(
        delta(&format!(
            "smolfleet_requests_total{{{exec},status=\"404\"}}"
        )),
        2.0
    );
    assert!(!after.keys().any(|k| k.contains("mach-x")));
    // errors by code; refused execs are not execs
    assert_eq!(delta("smolfleet_errors_total{code=\"NOT_FOUND\"}"), 3.0);
    assert_eq!(
        delta("smolfleet_errors_total{code=\"INVALID_CONFIG\"}"),
        1.0
    );
    assert_eq!(delta("smolfleet_errors_total{code=\"UNAUTHORIZED\"}"), 1.0);
    assert_eq!(delta("smolfleet_execs_total{kind=\"exec\"}"), 0.0);
    assert_eq!(
        delta("smolfleet_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"}"),
        1.0
    );
    // the first scrape is itself counted
    assert_eq!(
        delta("smolfleet_requests_total{route=\"/metrics\",method=\"GET\",status=\"200\"}"),
        1.0
    );
}
