//! Ingress through the fleet (`PUT …/ports`, `…/connect/{port}`, `{port}-{id}.{domain}`, the
//! routing headers): a real server on 127.0.0.1, real VMs, busybox `httpd` and a small static
//! server of ours (tests/guest/testsrv.rs, built with rustc and copied in) in the guest. Bodies
//! byte-exact both ways, streaming proven by answers that only come once the client saw the
//! previous bytes, server-sent events, WebSockets, the caller's key never reaching the guest,
//! and the failure cases. The Rust cloud client (`ports`, `publish`, `url`, `endpoint`) runs
//! against the same machine.

mod child;
#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::RngCore;
use reqwest::StatusCode;
use serde_json::{json, Value};
use smol_fleet::testing::spawn;
use support::{client, json_ok, problem, unauthorized};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How long a step waiting on the guest may take before the test fails (boots are slow
/// under TCG); never a measure of speed.
const PATIENCE: Duration = Duration::from_secs(120);

/// tests/guest/testsrv.rs built static (once per source version).
fn guest_server() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/testsrv.rs");
    let text = std::fs::read(&src).expect("read testsrv.rs");
    let hash = text.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("testsrv-{hash:016x}"));
    if !out.exists() {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let st = std::process::Command::new(rustc)
            .args(["--edition", "2021", "-O", "-C", "strip=symbols"])
            .args(["-C", "target-feature=+crt-static"])
            .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run rustc");
        assert!(st.success(), "rustc failed to build {}", src.display());
        std::fs::rename(&tmp, &out).expect("publish the guest server");
    }
    out
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// Polls `GET /v1/machines/{id}` until `ready` is true; the record.
async fn until_ready(c: &reqwest::Client, base: &str, key: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let r = c
            .get(format!("{base}/v1/machines/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let m = json_ok(r, StatusCode::OK).await;
        if m["ready"] == true {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads from `rd` until `want` is in what was read (or EOF); everything read.
async fn read_until(rd: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>, want: &[u8]) {
    tokio::time::timeout(PATIENCE, async {
        let mut tmp = [0u8; 8192];
        while !buf.windows(want.len()).any(|w| w == want) {
            match rd.read(&mut tmp).await.expect("read") {
                0 => break,
                n => buf.extend_from_slice(&tmp[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{:?} never came: {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(buf)
        )
    });
}

/// The next frame of `ws`, in time.
async fn next_frame<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("an echo in time")
        .expect("an echo")
        .expect("a frame")
}

/// A WebSocket round trip (text, 200 KiB binary, ping, close) over `stream` to `url`.
async fn websocket_echo(stream: tokio::net::TcpStream, url: &str, key: &str) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, resp) =
        tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("handshake in time")
            .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    let blob = random(200 * 1024);
    ws.send(Message::text("hello guest")).await.unwrap();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(next_frame(&mut ws).await, Message::text("hello guest"));
    assert_eq!(next_frame(&mut ws).await, Message::binary(blob));
    ws.send(Message::Close(None)).await.unwrap();
    assert!(matches!(next_frame(&mut ws).await, Message::Close(_)));
}

#[tokio::test(flavor = "multi_thread")]
async fn http_sse_websockets_and_failures_through_every_ingress_form() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfi")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let other = srv.new_tenant_key("other").await.unwrap();
    let base = srv.base_url.clone();
    let listen = srv.addr.port();
    let c = client();
    let guest_bin = std::fs::read(guest_server()).unwrap();

    // a machine whose workload serves HTTP on 8080, published at create
    let r = c
        .post(format!("{base}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({
            "source": {"type": "image", "reference": reg.reference("test/busybox:latest")},
            "ports": [{"port": 8080}],
            "command": ["sh", "-c", "mkdir -p /srv && exec busybox httpd -f -p 8080 -h /srv"],
        }))
        .send()
        .await
        .unwrap();
    let m = json_ok(r, StatusCode::CREATED).await;
    let id = m["id"].as_str().unwrap().to_string();
    let name = m["name"].as_str().unwrap().to_string();
    let mpath = |p: &str| format!("{base}/v1/machines/{id}{p}");
    let m = until_ready(&c, &base, &key, &id).await;
    let url = format!("http://8080-{id}.localhost:{listen}");
    assert_eq!(m["url"], url.as_str(), "{m}");
    assert_eq!(m["ports"][0]["port"], 8080, "{m}");
    assert_eq!(m["ports"][0]["protocol"], "tcp", "{m}");
    assert!(m["ports"][0]["hostPort"].as_u64().is_some(), "{m}");

    // byte-exact GET of a file busybox httpd serves: connect route, its URL, the headers
    let blob = random(1 << 20);
    let r = c
        .put(mpath("/files/srv/blob.bin"))
        .bearer_auth(&key)
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let get_ok = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap().to_vec()
    };
    let r = c
        .get(mpath("/connect/8080/blob.bin"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    // the guest's length goes through (not re-chunked)
    assert_eq!(r.content_length(), Some(blob.len() as u64));
    assert!(get_ok(r).await == blob, "connect route: other bytes");
    let by_name = reqwest::Client::builder()
        .no_proxy()
        .resolve(&format!("8080-{id}.localhost"), srv.addr)
        .build()
        .unwrap();
    let r = by_name
        .get(format!("{url}/blob.bin"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(get_ok(r).await == blob, "host-routed: other bytes");
    let r = c
        .get(format!("{base}/blob.bin"))
        .bearer_auth(&key)
        .header("x-smol-machine", &id)
        .header("x-smol-port", "8080")
        .send()
        .await
        .unwrap();
    assert!(get_ok(r).await == blob, "header-routed: other bytes");

    // the public URL needs the key (401, empty) and the machine's tenant (404)
    unauthorized(by_name.get(format!("{url}/blob.bin")).send().await.unwrap()).await;
    unauthorized(c.get(mpath("/connect/8080/blob.bin")).send().await.unwrap()).await;
    let r = by_name
        .get(format!("{url}/blob.bin"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = c
        .get(mpath("/connect/8080/blob.bin"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = c
        .put(mpath("/ports"))
        .bearer_auth(&other)
        .json(&json!({"ports": []}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;

    // malformed PUT bodies
    for (body, status) in [
        ("not json", StatusCode::BAD_REQUEST),
        ("{}", StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"ports": "9000"}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (
            r#"{"ports": [{"port": 70000}]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (r#"{"ports": [{"port": 0}]}"#, StatusCode::BAD_REQUEST),
    ] {
        let r = c
            .put(mpath("/ports"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        problem(r, status, "invalid_config").await;
    }

    // our server goes in; publishing 9000 before it listens: listed, not ready
    let r = c
        .put(mpath("/files/root/testsrv"))
        .bearer_auth(&key)
        .body(guest_bin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .put(mpath("/ports"))
        .bearer_auth(&key)
        .json(&json!({"ports": [{"port": 8080}, {"port": 9000}, {"port": 9100}]}))
        .send()
        .await
        .unwrap();
    let m = json_ok(r, StatusCode::OK).await;
    let ports: Vec<u64> = m["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [8080, 9000, 9100], "{m}");
    assert_eq!(m["ready"], false, "nothing listens on 9000 yet: {m}");
    assert_eq!(m["url"], url.as_str(), "the first port's URL stays: {m}");
    let r = c
        .post(mpath("/exec"))
        .bearer_auth(&key)
        .json(&json!({"command": ["sh", "-c",
            "chmod +x /root/testsrv && for p in 9000 9100; do \
             /root/testsrv $p >/tmp/testsrv-$p.log 2>&1 </dev/null & done"]}))
        .send()
        .await
        .unwrap();
    let r = json_ok(r, StatusCode::OK).await;
    assert_eq!(r["exitCode"], 0, "{r}");
    until_ready(&c, &base, &key, &id).await;

    // the guest sees neither the key nor the routing headers; the path and query arrive as sent
    for (how, req) in [
        (
            "connect",
            c.get(mpath("/connect/9000/dump/a%20b?x=1&y=%2F")),
        ),
        (
            "header",
            c.get(format!("{base}/dump/a%20b?x=1&y=%2F"))
                .header("x-smol-machine", &id)
                .header("x-smol-port", "9000"),
        ),
        (
            "host",
            reqwest::Client::builder()
                .no_proxy()
                .resolve(&format!("9000-{id}.localhost"), srv.addr)
                .build()
                .unwrap()
                .get(format!(
                    "http://9000-{id}.localhost:{listen}/dump/a%20b?x=1&y=%2F"
                )),
        ),
    ] {
        let r = req
            .bearer_auth(&key)
            .header("x-app", "kept")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{how}");
        assert_eq!(r.headers()["x-guest"], "testsrv", "{how}");
        let seen = r.text().await.unwrap();
        let lower = seen.to_ascii_lowercase();
        assert!(
            seen.starts_with("GET /dump/a%20b?x=1&y=%2F HTTP/1.1\r\n"),
            "{how}: {seen}"
        );
        assert!(
            !lower.contains("authorization") && !seen.contains(&key),
            "{how}: {seen}"
        );
        assert!(!lower.contains("x-smol-"), "{how}: {seen}");
        assert!(
            lower.contains("x-app: kept") && lower.contains("x-forwarded-host:"),
            "{how}: {seen}"
        );
    }

    // a 4 MiB body up and back, byte-exact
    let up = random(4 << 20);
    let r = c
        .post(mpath("/connect/9000/echo"))
        .bearer_auth(&key)
        .body(up.clone())
        .send()
        .await
        .unwrap();
    assert!(get_ok(r).await == up, "echo: other bytes");

    // streaming both ways: the guest answers each chunk as it comes, and the second is sent
    // only once the first one's echo is back (a buffering proxy would wait forever)
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let head = format!(
        "POST /duplex HTTP/1.1\r\nhost: 9000-{id}.localhost:{listen}\r\nauthorization: Bearer {key}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n6\r\npart-1\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut tcp, &mut got, b"part-1").await;
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
    tcp.write_all(b"6\r\npart-2\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut tcp, &mut got, b"part-2").await;

    // server-sent events arrive as sent: the second only after the test saw the first
    let mut sse = c
        .get(mpath("/connect/9000/sse"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut events = Vec::new();
    while !String::from_utf8_lossy(&events).contains("data: one\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, sse.chunk())
            .await
            .expect("the first event in time");
        events.extend_from_slice(
            &chunk
                .unwrap()
                .expect("the stream ended before the first event"),
        );
    }
    assert!(!String::from_utf8_lossy(&events).contains("two"));
    let r = c
        .post(mpath("/exec"))
        .bearer_auth(&key)
        .json(&json!({"command": ["busybox", "touch", "/tmp/sse-go"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await["exitCode"], 0);
    while let Some(chunk) = tokio::time::timeout(PATIENCE, sse.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        events.extend_from_slice(&chunk);
    }
    assert_eq!(
        String::from_utf8_lossy(&events),
        "data: one\n\ndata: two\n\n"
    );

    // WebSockets: through the connect route and through the host name
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    websocket_echo(
        tcp,
        &format!("ws://{}/v1/machines/{id}/connect/9000/ws", srv.addr),
        &key,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    websocket_echo(tcp, &format!("ws://9000-{id}.localhost:{listen}/ws"), &key).await;

    // the Rust cloud client over the same machine: ports, url, endpoint (HTTP and WS), publish
    let conn = smolmachines::ConnectOptions {
        target: Some(smolmachines::Target::Cloud),
        base_url: Some(base.clone()),
        api_key: Some(key.clone()),
    };
    let cm = smolmachines::Machine::connect(&name, conn).await.unwrap();
    let guests: Vec<u16> = cm.ports().iter().map(|p| p.guest).collect();
    assert_eq!(guests, [8080, 9000, 9100]);
    assert!(cm.ports().iter().all(|p| p.host != 0), "{:?}", cm.ports());
    assert_eq!(cm.url().as_deref(), Some(url.as_str()));
    let ep = cm.endpoint(8080, Some("/blob.bin")).unwrap();
    assert_eq!(
        ep.http_url,
        format!("{base}/v1/machines/{id}/connect/8080/blob.bin")
    );
    let mut req = c.get(&ep.http_url);
    for (k, v) in &ep.headers {
        req = req.header(k, v);
    }
    assert!(
        get_ok(req.send().await.unwrap()).await == blob,
        "endpoint(): other bytes"
    );
    let ep = cm.endpoint(9000, Some("ws")).unwrap();
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    websocket_echo(tcp, &ep.ws_url, &key).await;
    let p = cm.publish(9200, None, "tcp").await.unwrap();
    assert_eq!(p.guest, 9200);
    assert_ne!(p.host, 0);
    let e = cm.endpoint(9200, None).unwrap();
    // nothing listens on 9200: 502 with a hint
    let r = c.get(&e.http_url).bearer_auth(&key).send().await.unwrap();
    let pb = problem(r, StatusCode::BAD_GATEWAY, "connection").await;
    assert!(pb["hint"].as_str().unwrap().contains("9200"), "{pb}");
    cm.unpublish(Some(9200), None, "tcp").await.unwrap();
    assert!(cm.endpoint(9200, None).is_err());

    // a port that is not published: 404 with a hint; the PUT unpublishes what it leaves out
    let r = c
        .get(mpath("/connect/7777/"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let pb = problem(r, StatusCode::NOT_FOUND, "not_found").await;
    assert!(pb["hint"].as_str().unwrap().contains("/ports"), "{pb}");
    let r = c
        .put(mpath("/ports"))
        .bearer_auth(&key)
        .json(&json!({"ports": [{"port": 9000}]}))
        .send()
        .await
        .unwrap();
    let m = json_ok(r, StatusCode::OK).await;
    assert_eq!(m["ports"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(
        m["url"],
        format!("http://9000-{id}.localhost:{listen}").as_str(),
        "{m}"
    );
    let r = by_name
        .get(format!("{url}/blob.bin"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;

    // a stopped machine: 503 with a hint
    let r = c
        .post(mpath("/stop"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    json_ok(r, StatusCode::OK).await;
    let r = c
        .get(mpath("/connect/9000/dump"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::SERVICE_UNAVAILABLE, "invalid_state").await;

    let r = c.delete(mpath("")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

async fn restart_scenario(home: PathBuf, image: String) {
    let c = client();
    let (mut first, base, key) = child::spawn(&home).await;
    let key = key.expect("the first start prints the bootstrap key");
    let r = c
        .post(format!("{base}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({
            "source": {"type": "image", "reference": image},
            "command": ["sh", "-c", "mkdir -p /srv && echo served > /srv/x.txt && exec busybox httpd -f -p 8080 -h /srv"],
        }))
        .send()
        .await
        .unwrap();
    let id = json_ok(r, StatusCode::CREATED).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = c
        .put(format!("{base}/v1/machines/{id}/ports"))
        .bearer_auth(&key)
        .json(&json!({"ports": [{"port": 8080}]}))
        .send()
        .await
        .unwrap();
    let host_port = json_ok(r, StatusCode::OK).await["ports"][0]["hostPort"].clone();
    assert!(host_port.is_u64(), "{host_port}");
    until_ready(&c, &base, &key, &id).await;
    let fetch = |base: &str| {
        c.get(format!("{base}/v1/machines/{id}/connect/8080/x.txt"))
            .bearer_auth(&key)
            .send()
    };
    let r = fetch(&base).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "served\n");

    // a killed server started again: the machine still publishes 8080, on the same host port
    first.kill().await.expect("SIGKILL the server");
    let (mut second, base, _) = child::spawn(&home).await;
    let m = until_ready(&c, &base, &key, &id).await;
    assert_eq!(m["ports"][0]["port"], 8080, "{m}");
    assert_eq!(m["ports"][0]["hostPort"], host_port, "{m}");
    let listen = base.rsplit(':').next().unwrap();
    assert_eq!(
        m["url"],
        format!("http://8080-{id}.localhost:{listen}").as_str(),
        "{m}"
    );
    let r = fetch(&base).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "served\n");

    // stopped, the server killed and started again, then started: the port answers again
    let r = c
        .post(format!("{base}/v1/machines/{id}/stop"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await["state"], "stopped");
    second.kill().await.expect("SIGKILL the server");
    let (_third, base, _) = child::spawn(&home).await;
    let r = c
        .post(format!("{base}/v1/machines/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    json_ok(r, StatusCode::OK).await;
    let m = until_ready(&c, &base, &key, &id).await;
    assert_eq!(m["ports"][0]["port"], 8080, "{m}");
    let r = fetch(&base).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "served\n");
    let r = c
        .delete(format!("{base}/v1/machines/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn published_ports_survive_server_restarts_running_and_stopped() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfj")
        .tempdir_in("/tmp")
        .unwrap();
    let run = tokio::spawn(restart_scenario(
        home.path().to_path_buf(),
        reg.reference("test/busybox:latest"),
    ))
    .await;
    // whatever happened, no detached VM outlives the test
    child::delete_all(home.path()).await;
    if let Err(e) = run {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_ingress_form_needs_a_key_and_the_exec_scope() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let admin = srv.admin_key.clone().unwrap();
    let db = srv.fleet.db();
    let tenant = db.list_keys().await.unwrap()[0].tenant_id.clone();
    let reader = db
        .create_key(&tenant, "machine:read", None)
        .await
        .unwrap()
        .1;
    let id = "mach-0000000000000000";
    let base = &srv.base_url;
    let host = format!("8080-{id}.localhost:{}", srv.addr.port());
    let c = client();
    let forms = |key: Option<&str>| {
        let with = |r: reqwest::RequestBuilder| match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        };
        vec![
            with(c.get(format!("{base}/v1/machines/{id}/connect/8080/x"))),
            with(
                c.post(format!("{base}/v1/machines/{id}/connect/8080"))
                    .body("x"),
            ),
            // the public /health path, host-routed, is a guest's path: it needs the key too
            with(c.get(format!("{base}/health")).header("host", &host)),
            with(
                c.get(format!("{base}/health"))
                    .header("x-smol-machine", id)
                    .header("x-smol-port", "8080"),
            ),
            with(
                c.put(format!("{base}/v1/machines/{id}/ports"))
                    .json(&json!({"ports": []})),
            ),
        ]
    };
    for r in forms(None) {
        unauthorized(r.send().await.unwrap()).await;
    }
    for r in forms(Some(&reader)) {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.text().await.unwrap(), "missing scope: machine:exec");
    }
    for r in forms(Some(&admin)) {
        problem(r.send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    }
    // the API itself still answers on its own host, and routing headers must name a port
    let r = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{base}/x"))
        .bearer_auth(&admin)
        .header("x-smol-machine", id)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
    let r = c
        .get(format!("{base}/v1/machines/{id}/connect/0/x"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
}
