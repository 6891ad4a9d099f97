//! The cloud client without a fleet: request building against the bodies, paths and headers
//! CLOUD-CLIENTS.md records from the published client, and error translation / retries / the
//! create flow against a real HTTP/1.1 server on 127.0.0.1 written here (an edge stand-in that
//! answers as scripted: the end-to-end tests against the real fleet server are in
//! crates/smol-fleet/tests/cloud_backend.rs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::{translate, Body, Req};
use super::machine::{connect_url, exec_request, file_path};
use super::stream::stream_request;
use super::*;
use crate::config::{CredentialSpec, ExecOptions, ExecOutput, PortSpec};
use crate::Machine;

fn body_json(r: &Req) -> Value {
    match &r.body {
        Body::Json(b) => serde_json::from_slice(b).unwrap(),
        other => panic!("not a JSON body: {other:?}"),
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn create_body_is_the_published_clients() {
    let config = MachineConfig {
        image: Some("alpine:3.20".into()),
        ..Default::default()
    };
    let reqs = create_requests(&config).unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, reqwest::Method::POST);
    assert_eq!(reqs[0].path, "/v1/machines");
    assert!(!reqs[0].idempotent, "a create is never retried on 503");
    // CLOUD-CLIENTS.md §4, observed
    assert_eq!(
        body_json(&reqs[0]),
        json!({"name": null, "source": {"type": "image", "reference": "alpine:3.20"},
               "resources": {"diskGb": null}, "autoStopSeconds": null, "ttlSeconds": null,
               "forkable": false})
    );
}

#[test]
fn create_stores_credentials_first_and_refuses_local_fields() {
    let config = MachineConfig {
        image: Some("python:3.12".into()),
        ports: vec![PortSpec {
            host: 0,
            guest: 8080,
        }],
        credentials: vec![CredentialSpec {
            name: "gh tok".into(),
            env_var: "GH".into(),
            hosts: vec!["api.github.com".into()],
            value: Some("s3cret".into()),
            methods: None,
        }],
        ..Default::default()
    };
    let reqs = create_requests(&config).unwrap();
    assert_eq!(reqs[0].method, reqwest::Method::PUT);
    assert_eq!(reqs[0].path, "/v1/credentials/gh%20tok");
    assert_eq!(
        body_json(&reqs[0]),
        json!({"envVar": "GH", "hosts": ["api.github.com"], "value": "s3cret"})
    );
    let create = body_json(&reqs[1]);
    assert_eq!(create["ports"], json!([{"port": 8080}]));
    assert_eq!(create["credentials"], json!(["gh tok"]));

    let no_image = create_requests(&MachineConfig::default()).unwrap_err();
    assert_eq!(no_image.code(), ErrorCode::InvalidConfig);
    let mounts = MachineConfig {
        image: Some("alpine".into()),
        mounts: vec![crate::config::MountSpec {
            source: "/tmp".into(),
            target: "/mnt".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = create_requests(&mounts).unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotSupported);
    assert!(
        e.to_string().contains("mounts") && e.to_string().contains("cloud"),
        "{e}"
    );
}

#[test]
fn exec_bodies_paths_and_deadlines() {
    let r = exec_request(
        "mach-1",
        &argv(&["sh", "-c", "echo hi"]),
        &ExecOptions::default(),
    )
    .unwrap();
    assert_eq!(r.path, "/v1/machines/mach-1/exec");
    assert_eq!(
        body_json(&r),
        json!({"command": ["sh", "-c", "echo hi"], "env": {}, "cwd": null, "timeoutSeconds": null})
    );
    assert_eq!(r.timeout, Some(Duration::from_secs(30)));
    assert!(!r.idempotent);

    let opts = ExecOptions {
        timeout: Some(Duration::from_millis(1200)),
        output: Some(ExecOutput::B64),
        user: Some("app".into()),
        stdin: Some(b"in".to_vec()),
        workdir: Some("/w".into()),
        ..Default::default()
    };
    let r = exec_request("mach-1", &argv(&["cat"]), &opts).unwrap();
    assert_eq!(r.path, "/v1/machines/mach-1/exec?output=b64");
    assert_eq!(
        body_json(&r),
        json!({"command": ["cat"], "env": {}, "cwd": "/w", "timeoutSeconds": 2,
               "stdin": "in", "user": "app"})
    );
    // max(30 s, timeout + 30 s)
    assert_eq!(r.timeout, Some(Duration::from_millis(31_200)));

    let s = stream_request("mach-1", &argv(&["true"]), &ExecOptions::default()).unwrap();
    assert_eq!(s.path, "/v1/machines/mach-1/exec/stream");
    assert_eq!(s.accept, Some("text/event-stream"));
    assert_eq!(s.timeout, None, "a stream has no deadline past its headers");
}

#[test]
fn file_paths_and_list_queries_are_encoded_per_segment() {
    // CLOUD-CLIENTS.md §3, observed
    assert_eq!(
        file_path("mach-1", "/workspace/a b?.txt"),
        "/v1/machines/mach-1/files//workspace/a%20b%3F.txt"
    );
    assert_eq!(
        file_path("mach-1", "/t/100%#"),
        "/v1/machines/mach-1/files//t/100%25%23"
    );
    let labels: BTreeMap<String, String> =
        [("env".into(), "prod".into()), ("team".into(), "a b".into())].into();
    assert_eq!(
        list_path(&labels),
        "/v1/machines?label=env%3Dprod&label=team%3Da%20b"
    );
    assert_eq!(list_path(&BTreeMap::new()), "/v1/machines");
    assert_eq!(
        connect_url("http://h:1", "mach-1", 8080, Some("/")),
        "http://h:1/v1/machines/mach-1/connect/8080"
    );
    assert_eq!(
        connect_url("http://h:1", "mach-1", 8080, Some("api/x")),
        "http://h:1/v1/machines/mach-1/connect/8080/api/x"
    );
}

#[test]
fn key_and_url_resolution() {
    let none = ConnectOptions::default();
    let e = resolve(&none, None, None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidConfig);
    assert!(e.to_string().contains(NO_KEY_MESSAGE), "{e}");
    assert!(resolve(&none, Some(String::new()), None).is_err());

    let (url, key) = resolve(&none, Some("smk_env".into()), None).unwrap();
    assert_eq!((url.as_str(), key.as_str()), (DEFAULT_BASE_URL, "smk_env"));

    let conn = ConnectOptions {
        target: Some(Target::Cloud),
        base_url: Some("http://127.0.0.1:9/".into()),
        api_key: Some("smk_explicit".into()),
    };
    let (url, key) = resolve(&conn, Some("smk_env".into()), Some("http://env:1".into())).unwrap();
    assert_eq!(
        (url.as_str(), key.as_str()),
        ("http://127.0.0.1:9", "smk_explicit")
    );
    let env_url = ConnectOptions {
        api_key: Some("k".into()),
        ..Default::default()
    };
    assert_eq!(
        resolve(&env_url, None, Some("http://env:1//".into()))
            .unwrap()
            .0,
        "http://env:1"
    );
    for bad in ["ftp://x", "not a url", "http://h/?q=1"] {
        let c = ConnectOptions {
            base_url: Some(bad.into()),
            api_key: Some("k".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&c, None, None).unwrap_err().code(),
            ErrorCode::InvalidConfig,
            "{bad}"
        );
    }
}

#[test]
fn debug_never_prints_the_key() {
    let b = CloudBackend::new("http://127.0.0.1:9", "smk_topsecret").unwrap();
    let d = format!("{b:?}");
    assert!(
        !d.contains("smk_topsecret") && d.contains("redacted"),
        "{d}"
    );
}

#[test]
fn error_responses_become_typed_errors() {
    // 401 with an empty body (SPEC §10.1), as the published client words it
    let e = translate("cloud GET /v1/machines", 401, b"", None, Some("req-1"));
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "unauthorized: cloud GET /v1/machines → 401 [request id: req-1]"
    );
    // plain text 409
    let e = translate(
        "cloud POST /v1/machines",
        409,
        b"machine name already exists",
        None,
        Some("r2"),
    );
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert!(
        e.to_string().contains(
            "cloud POST /v1/machines → 409: machine name already exists [request id: r2]"
        ),
        "{e}"
    );
    // a scope
    let e = translate(
        "cloud POST x",
        403,
        b"missing scope: machine:exec",
        None,
        None,
    );
    match e {
        Error::Forbidden { scope, .. } => assert_eq!(scope.as_deref(), Some("machine:exec")),
        other => panic!("{other:?}"),
    }
    // 429 with Retry-After
    let e = translate("cloud GET x", 429, b"", Some("7"), None);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(e.code(), ErrorCode::RateLimited);
    // the cloud's machine_interrupted
    let e = translate(
        "cloud POST x",
        503,
        br#"{"type":"about:blank","title":"x","status":503,"detail":"vm gone","code":"machine_interrupted"}"#,
        None,
        None,
    );
    assert_eq!(e.code(), ErrorCode::MachineInterrupted);
    // a body of our own server: the same variant, fields untouched
    let ours = Error::InvalidState {
        name: "m".into(),
        state: "stopped".into(),
        op: "publish".into(),
    };
    let e = translate(
        "cloud PUT x",
        ours.http_status(),
        ours.to_problem().to_json().as_bytes(),
        None,
        Some("r3"),
    );
    match e {
        Error::InvalidState { name, state, op } => {
            assert_eq!(
                (name.as_str(), state.as_str(), op.as_str()),
                ("m", "stopped", "publish")
            )
        }
        other => panic!("{other:?}"),
    }
    let e = translate("cloud GET x", 404, b"machine not found", None, None);
    assert_eq!(e.code(), ErrorCode::NotFound);
    let e = translate("cloud GET x", 500, b"boom", None, None);
    assert_eq!(e.code(), ErrorCode::SmolvmError);
    assert_eq!(e.http_status(), 500);
}

// ---- a real HTTP/1.1 server on 127.0.0.1 answering as scripted ----

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, ct: &str, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", ct.to_string())],
        body: body.as_bytes().to_vec(),
    }
}

fn json_reply(status: u16, v: Value) -> Reply {
    reply(status, "application/json", &v.to_string())
}

type Handler = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

struct Stand {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stand {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn backend(&self) -> CloudBackend {
        CloudBackend::new(&self.base, "smk_test").unwrap()
    }
}

async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

async fn stand(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Stand {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler: Handler = Arc::new(handler);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (handler, log) = (handler.clone(), log.clone());
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(req.clone());
                    log.len() - 1
                };
                let r = handler(&req, n);
                let mut out = format!("HTTP/1.1 {} X\r\nconnection: close\r\n", r.status);
                for (k, v) in &r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!("content-length: {}\r\n\r\n", r.body.len()));
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&r.body);
                if let Err(e) = s.write_all(&bytes).await {
                    eprintln!("stand-in server write: {e}");
                }
            });
        }
    });
    Stand { base, seen }
}

fn machine_json(state: &str, ready: bool) -> Value {
    json!({"id": "mach-1", "name": "smol-ab", "state": state, "ready": ready, "ports": []})
}

#[tokio::test]
async fn headers_are_the_published_clients() {
    let s = stand(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines/mach-1/stop") => reply(200, "text/plain", ""),
        ("PUT", _) => reply(204, "text/plain", ""),
        _ => json_reply(200, machine_json("running", true)),
    })
    .await;
    let m = Machine::open_on(&s.backend(), "mach-1").await.unwrap();
    m.write_file("/workspace/a b?.txt", b"\x00\xff", None)
        .await
        .unwrap();
    m.stop().await.unwrap();
    let seen = s.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for r in &seen {
        assert_eq!(r.headers["authorization"], "Bearer smk_test");
    }
    assert_eq!(seen[0].method, "GET");
    assert!(!seen[0].headers.contains_key("content-type"));
    assert_eq!(
        seen[1].path,
        "/v1/machines/mach-1/files//workspace/a%20b%3F.txt"
    );
    assert_eq!(seen[1].headers["content-type"], "application/octet-stream");
    assert_eq!(seen[1].body, b"\x00\xff");
    assert_eq!(seen[2].path, "/v1/machines/mach-1/stop");
    assert_eq!(seen[2].headers["content-length"], "0");
    assert!(!seen[2].headers.contains_key("content-type"));
}

#[tokio::test]
async fn retries_follow_spec_9_9() {
    // GET: 429, then 503 with Retry-After 0, then the answer
    let s = stand(|_, n| match n {
        0 => Reply {
            status: 429,
            headers: vec![("retry-after", "0".into())],
            body: Vec::new(),
        },
        1 => Reply {
            status: 503,
            headers: vec![("retry-after", "0".into())],
            body: Vec::new(),
        },
        _ => json_reply(200, json!([])),
    })
    .await;
    let list = Machine::list_on(&s.backend(), &BTreeMap::new())
        .await
        .unwrap();
    assert!(list.is_empty());
    assert_eq!(s.seen().len(), 3);

    // a create's 503 is not retried; its error is the server's
    let s = stand(|_, _| Reply {
        status: 503,
        headers: vec![("retry-after", "0".into()), ("x-request-id", "rq".into())],
        body: b"capacity".to_vec(),
    })
    .await;
    let config = MachineConfig {
        image: Some("alpine".into()),
        ..Default::default()
    };
    let e = Machine::create_on(&s.backend(), config.clone())
        .await
        .unwrap_err();
    assert_eq!(s.seen().len(), 1);
    assert!(e.retryable());
    assert!(
        e.to_string()
            .contains("cloud POST /v1/machines → 503: capacity [request id: rq]"),
        "{e}"
    );

    // 429 is retried even for a POST; max_retries bounds it
    let s = stand(|_, _| Reply {
        status: 429,
        headers: vec![("retry-after", "0".into())],
        body: Vec::new(),
    })
    .await;
    let e = Machine::create_on(&s.backend().with_max_retries(2), config)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RateLimited);
    assert_eq!(s.seen().len(), 3);
}

#[tokio::test]
async fn exec_needs_json_and_reads_b64() {
    let s = stand(|req, _| {
        if req.path.ends_with("/exec") {
            json_reply(
                200,
                json!({"stdout": "hi\n", "stderr": "", "exitCode": 3, "stdoutB64": "aGkK"}),
            )
        } else if req.path.ends_with("/exec?output=text") {
            reply(200, "text/plain", "{\"exitCode\": 0}")
        } else {
            json_reply(200, machine_json("running", true))
        }
    })
    .await;
    let m = Machine::open_on(&s.backend(), "mach-1").await.unwrap();
    let r = m.exec(&argv(&["x"]), ExecOptions::default()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout_bytes.as_slice()), (3, &b"hi\n"[..]));
    // a 2xx that is not JSON is an error, never a silent exit 0
    let opts = ExecOptions {
        output: Some(ExecOutput::Text),
        ..Default::default()
    };
    let e = m.exec(&argv(&["x"]), opts).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::SmolvmError);
    assert!(e.to_string().contains("not JSON"), "{e}");
}

#[tokio::test]
async fn a_failed_start_deletes_the_half_created_machine() {
    let s = stand(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines") => json_reply(201, machine_json("stopped", false)),
        ("POST", "/v1/machines/mach-1/start") => reply(500, "text/plain", "no capacity"),
        ("GET", _) => json_reply(200, machine_json("stopped", false)),
        ("DELETE", _) => reply(204, "text/plain", ""),
        _ => reply(404, "text/plain", ""),
    })
    .await;
    let config = MachineConfig {
        image: Some("alpine".into()),
        ..Default::default()
    };
    let e = Machine::create_on(&s.backend(), config).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::SmolvmError);
    let msg = e.to_string();
    assert!(
        msg.contains("entered stopped before becoming ready") && msg.contains("(start failed:"),
        "{msg}"
    );
    let seen = s.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("DELETE", "/v1/machines/mach-1")
    );
}

#[tokio::test]
async fn readiness_polls_until_ready() {
    let s = stand(|req, n| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines") => json_reply(201, machine_json("stopped", false)),
        ("POST", _) => json_reply(200, machine_json("started", false)),
        // two polls not ready yet, then ready
        _ => json_reply(200, machine_json("running", n >= 4)),
    })
    .await;
    let config = MachineConfig {
        image: Some("alpine".into()),
        ..Default::default()
    };
    let m = Machine::create_on(&s.backend(), config).await.unwrap();
    assert_eq!(m.name(), "smol-ab");
    assert!(s.seen().iter().all(|r| r.method != "DELETE"));
    assert_eq!(s.seen().len(), 5);
}

#[tokio::test]
async fn connect_by_name_and_stream_events() {
    let sse = "event: stdout\ndata: a\ndata: \n\nevent: stderr\r\ndata: e\r\n\r\n: note\n\nevent: exit\ndata: {\"exitCode\": 7}\n\n";
    let s = stand(
        move |req, _| match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/machines/smol-ab") => reply(404, "text/plain", "machine not found"),
            ("GET", "/v1/machines") => {
                json_reply(200, json!({"machines": [machine_json("running", true)]}))
            }
            ("POST", "/v1/machines/mach-1/exec/stream") => reply(200, "text/event-stream", sse),
            _ => reply(404, "text/plain", "nope"),
        },
    )
    .await;
    let m = Machine::connect_on(&s.backend(), "smol-ab").await.unwrap();
    let mut st = m
        .exec_stream(&argv(&["x"]), ExecOptions::default())
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some(e) = st.next_event().await {
        events.push(e);
    }
    use crate::config::ExecEvent as E;
    assert_eq!(
        events,
        vec![
            E::Stdout(b"a\n".to_vec()),
            E::Stderr(b"e".to_vec()),
            E::Exit(7)
        ]
    );
    let seen = s.seen();
    assert_eq!(seen.last().unwrap().headers["accept"], "text/event-stream");
    // a missing machine is the server's 404
    let e = Machine::connect_on(&s.backend(), "other")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
}

#[tokio::test]
async fn an_unreachable_server_is_a_connection_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let b = CloudBackend::new(&base, "smk_x").unwrap();
    let e = Machine::list_on(&b, &BTreeMap::new()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Connection);
    assert!(e.to_string().contains("cloud request failed"), "{e}");
    assert!(!e.to_string().contains("smk_x"));
}

#[test]
fn loopback_bases_bypass_proxies() {
    for (base, lo) in [
        ("http://127.0.0.1:8700", true),
        ("http://localhost:1", true),
        ("http://[::1]:1", true),
        ("https://api.smolmachines.com", false),
        ("http://10.0.0.1", false),
    ] {
        assert_eq!(super::http::is_loopback(base), lo, "{base}");
    }
}

#[tokio::test]
async fn a_timed_out_or_abandoned_create_deletes_the_machine() {
    let s = stand(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines") => json_reply(201, machine_json("stopped", false)),
        ("POST", _) => json_reply(200, machine_json("started", false)),
        ("DELETE", _) => reply(204, "text/plain", ""),
        // a published port that never answers: never ready
        _ => json_reply(
            200,
            json!({"id": "mach-1", "name": "smol-ab", "state": "started", "ready": false,
                   "ports": [{"port": 80, "hostPort": null}]}),
        ),
    })
    .await;
    let deletes = |s: &Stand| s.seen().iter().filter(|r| r.method == "DELETE").count();
    let config = MachineConfig {
        image: Some("alpine".into()),
        ready_timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let e = Machine::create_on(&s.backend(), config.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout);
    assert!(
        e.to_string()
            .contains("machine smol-ab not ready after 1s (state=started)"),
        "{e}"
    );
    assert_eq!(deletes(&s), 1);

    // the caller gives up: the dropped create still deletes what it made
    let config = MachineConfig {
        ready_timeout: Some(Duration::from_secs(60)),
        ..config
    };
    let b = s.backend();
    let gave_up = tokio::time::timeout(Duration::from_millis(500), Machine::create_on(&b, config))
        .await
        .is_err();
    assert!(gave_up);
    for _ in 0..100 {
        if deletes(&s) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deletes(&s), 2, "{:?}", s.seen());
}

#[tokio::test]
async fn a_branch_source_starts_forkable_and_branch_falls_back_to_fork_on_404() {
    let s = stand(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines") => json_reply(201, machine_json("stopped", false)),
        ("POST", "/v1/machines/mach-1/start?forkable=true") => {
            json_reply(200, machine_json("started", false))
        }
        ("GET", "/v1/machines/mach-1") => json_reply(200, machine_json("running", true)),
        // a server from before the branch routes
        ("POST", "/v1/machines/mach-1/branches") => reply(
            404,
            "application/problem+json",
            r#"{"status":404,"code":"not_found","detail":"route not found"}"#,
        ),
        ("POST", "/v1/machines/mach-1/fork") => json_reply(
            201,
            json!({"id": "mach-2", "name": "c1", "state": "running", "ready": false}),
        ),
        ("GET", "/v1/machines/mach-2") => json_reply(
            200,
            json!({"id": "mach-2", "name": "c1", "state": "running", "ready": true}),
        ),
        _ => reply(500, "text/plain", "unexpected"),
    })
    .await;
    let config = MachineConfig {
        image: Some("alpine".into()),
        branchable: Some(true),
        ..Default::default()
    };
    let m = Machine::create_on(&s.backend(), config).await.unwrap();
    let opts = crate::config::BranchOptions {
        ports: vec![PortSpec {
            host: 0,
            guest: 8080,
        }],
        branchable: true,
        freeze_source: false,
    };
    let clone = m.branch_with("c1", opts).await.unwrap();
    assert_eq!((clone.name(), clone.id()), ("c1", "mach-2"));
    let seen = s.seen();
    let posts: Vec<(&str, Value)> = seen
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("/mach-1/"))
        .map(|r| {
            let body = if r.body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&r.body).unwrap()
            };
            (r.path.as_str(), body)
        })
        .collect();
    // transport.py: the flag is `branchable` on branches and `forkable` on fork
    assert_eq!(
        posts,
        vec![
            ("/v1/machines/mach-1/start?forkable=true", Value::Null),
            (
                "/v1/machines/mach-1/branches",
                json!({"name": "c1", "ports": [{"port": 8080, "hostPort": 0}], "branchable": true})
            ),
            (
                "/v1/machines/mach-1/fork",
                json!({"name": "c1", "ports": [{"port": 8080, "hostPort": 0}], "forkable": true})
            ),
        ]
    );
    // the clone's readiness was awaited
    assert!(seen
        .iter()
        .any(|r| r.method == "GET" && r.path == "/v1/machines/mach-2"));
}

#[tokio::test]
async fn pause_and_resume_post_and_resume_waits_for_readiness() {
    // requests: 0 the connect's GET, 1 pause, 2 a state GET, 3 resume, 4.. readiness GETs
    let s = stand(|req, n| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/machines/mach-1/pause") => json_reply(200, machine_json("paused", false)),
        ("POST", "/v1/machines/mach-1/resume") => json_reply(200, machine_json("running", false)),
        ("GET", "/v1/machines/mach-1") if n < 3 => json_reply(200, machine_json("paused", false)),
        // not ready on the first poll after the resume, ready on the second
        ("GET", "/v1/machines/mach-1") => json_reply(200, machine_json("running", n >= 5)),
        _ => reply(500, "text/plain", "unexpected"),
    })
    .await;
    let m = Machine::connect_on(&s.backend(), "mach-1").await.unwrap();
    m.pause().await.unwrap();
    assert_eq!(m.state().await.unwrap(), crate::MachineState::Paused);
    m.resume().await.unwrap();
    let seen: Vec<(String, String)> = s
        .seen()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    let get = ("GET".to_string(), "/v1/machines/mach-1".to_string());
    assert_eq!(
        seen,
        vec![
            get.clone(),
            ("POST".into(), "/v1/machines/mach-1/pause".into()),
            get.clone(),
            ("POST".into(), "/v1/machines/mach-1/resume".into()),
            get.clone(),
            get,
        ]
    );
}
