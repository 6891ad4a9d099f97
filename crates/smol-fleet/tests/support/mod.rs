//! Helpers of the fleet's HTTP tests: a reqwest client (no proxy), problem checks, a raw
//! oversized request.
#![allow(dead_code)]

pub mod procs;

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("reqwest client")
}

pub fn content_type(r: &Response) -> String {
    r.headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii content-type").to_string())
        .unwrap_or_default()
}

/// A JSON 2xx: status, `application/json` exactly, the body.
pub async fn json_ok(r: Response, status: StatusCode) -> Value {
    let ct = content_type(&r);
    let got = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(got, status, "{text}");
    assert_eq!(ct, "application/json", "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A problem+json error of `status` whose `code` is `code`; the body.
pub async fn problem(r: Response, status: StatusCode, code: &str) -> Value {
    let ct = content_type(&r);
    let got = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(got, status, "{text}");
    assert_eq!(ct, "application/problem+json", "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["code"], code, "{text}");
    assert_eq!(v["status"], status.as_u16(), "{text}");
    assert!(
        v["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{text}"
    );
    v
}

/// A 401 with an empty body.
pub async fn unauthorized(r: Response) {
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("x-request-id").is_some());
    assert_eq!(r.bytes().await.expect("body").len(), 0);
}

/// Sends `method path` declaring a body of `len` bytes but sending none of it (the server
/// must refuse it from the header alone) and returns the status and the response text.
pub async fn oversized(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    len: usize,
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/octet-stream\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        // keep the write half open until the answer came
        std::future::pending::<()>().await;
        drop(wr);
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        let mut tmp = [0u8; 8192];
        loop {
            match rd.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let headers = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let clen = headers
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + clen {
                    break;
                }
            }
        }
    })
    .await;
    writer.abort();
    assert!(read.is_ok(), "no answer to the oversized request");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `smolfleet` for admin commands over `home`'s store: with `SMOL_FLEET_TEST_STORE=postgres`,
/// `SMOLFLEET_DB` names the database of the test's cluster that the server of `home` uses.
pub fn smolfleet(home: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_smolfleet"));
    if std::env::var(smol_fleet::testing::STORE_VAR).as_deref() == Ok("postgres") {
        let url = smol_fleet::testing::pg::url_for_home(home).expect("the test's cluster");
        c.env("SMOLFLEET_DB", url);
    }
    c
}

/// Connection options of the cloud target: the server at `base_url`, API key `key`.
pub fn cloud(base_url: &str, key: &str) -> smolmachines::ConnectOptions {
    smolmachines::ConnectOptions {
        target: Some(smolmachines::Target::Cloud),
        base_url: Some(base_url.to_string()),
        api_key: Some(key.to_string()),
    }
}

/// A fleet home under /tmp (short paths: the engine's sockets live below it), named `prefix…`.
pub fn home(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
}

/// `smolfleet keys create` of a key of the bootstrap tenant of `home` holding `scopes`.
pub fn key_with(home: &std::path::Path, scopes: &[&str]) -> String {
    let list = smolfleet(home)
        .args(["keys", "list", "--home"])
        .arg(home)
        .output()
        .expect("run smolfleet");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let tenant = list
        .split_whitespace()
        .find(|w| w.starts_with("ten-"))
        .unwrap_or_else(|| panic!("no tenant in {list}"))
        .to_string();
    let mut cmd = smolfleet(home);
    cmd.args(["keys", "create", "--tenant", &tenant]);
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
    assert!(out.status.success(), "{stdout}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap_or_else(|| panic!("no key in {stdout}"))
        .trim()
        .to_string()
}

/// Polls the store until node `id` shows `state` (within 60 s); `ready` also waits for its
/// first heartbeat to have told its labels (a node is ready from its join on, but a create
/// that asks for a node label is answered "not yet" until then).
pub async fn await_node_state(db: &smol_fleet::Db, id: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = db.node_status().await.unwrap();
        if nodes.iter().any(|n| {
            n.node.id == id
                && n.shown_state() == state
                && (state != "ready" || !n.labels.is_empty())
        }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {id} never {state}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A machine row `id` of `tenant` for placement tests (no VM behind it).
pub fn machine_row(id: &str, tenant: &str) -> smol_fleet::MachineRow {
    smol_fleet::MachineRow {
        id: id.into(),
        tenant_id: tenant.into(),
        name: id.into(),
        engine_name: format!("e-{id}"),
        spec: "{}".into(),
        created_at: 0,
        auto_stop_seconds: None,
        ttl_seconds: None,
        expires_at: None,
        ephemeral: false,
        last_activity_at: None,
    }
}
