//! `POST …/exec/stream` over a real server and a real VM: events arrive as the guest
//! produces them, `exit` last, errors before the stream are problem+json, and a client that
//! goes away kills its command.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use smolmachines::wire::{SseDecoder, StreamEvent};
use support::{client, content_type, json_ok, problem};

#[tokio::test(flavor = "multi_thread")]
async fn exec_stream_is_live_and_killed_when_the_client_leaves() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfs")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = smol_fleet::testing::spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let other = srv.new_tenant_key("other").await.unwrap();
    let c = client();
    let r = c
        .post(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .json(&json!({"source": {"type": "image", "reference": reg.reference("test/busybox:latest")}}))
        .send()
        .await
        .unwrap();
    let id = json_ok(r, StatusCode::CREATED).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let stream_url = format!("{}/v1/machines/{id}/exec/stream", srv.base_url);
    let exec_url = format!("{}/v1/machines/{id}/exec", srv.base_url);
    let start = |who: &str, body: serde_json::Value| {
        c.post(&stream_url)
            .bearer_auth(who)
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
    };

    // live: the first line arrives long before the command ends; "a\n" survives the
    // framing; stderr separate; exit last with the code
    let t0 = Instant::now();
    let mut r = start(
        &key,
        json!({"command": ["sh", "-c", "echo one; echo err >&2; busybox sleep 4; printf 'two\\n\\n'; exit 7"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(content_type(&r), "text/event-stream");
    let mut dec = SseDecoder::new();
    let mut events = Vec::new();
    let mut first_at = None;
    while let Some(chunk) = r.chunk().await.unwrap() {
        let got = dec.push(&chunk);
        if first_at.is_none() && !got.is_empty() {
            first_at = Some(Instant::now());
        }
        events.extend(got);
    }
    events.extend(dec.finish());
    // the first event came while the command still slept (4 s), not with the exit
    let gap = Instant::now() - first_at.expect("events");
    assert!(
        gap >= Duration::from_secs(2),
        "first event only {gap:?} before the end"
    );
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    let stdout: String = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Stdout(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    let stderr: String = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::Stderr(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout, "one\ntwo\n\n", "{events:?}");
    assert_eq!(stderr, "err\n", "{events:?}");
    assert_eq!(events.last(), Some(&StreamEvent::Exit(7)), "{events:?}");

    // errors before the stream: another tenant 404, malformed 400, problem+json
    problem(
        start(&other, json!({"command": ["echo"]})).await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let r = c
        .post(&stream_url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;

    // a client that leaves after the first event: the command is killed in the guest
    let mut r = start(
        &key,
        json!({"command": ["sh", "-c", "echo started; exec busybox sleep 30"]}),
    )
    .await
    .unwrap();
    let mut dec = SseDecoder::new();
    loop {
        let chunk = r.chunk().await.unwrap().expect("an event before the end");
        if dec
            .push(&chunk)
            .iter()
            .any(|e| matches!(e, StreamEvent::Stdout(s) if s.contains("started")))
        {
            break;
        }
    }
    let sleeping = || async {
        let r = c
            .post(&exec_url)
            .bearer_auth(&key)
            .json(&json!({"command": ["sh", "-c", "busybox ps | busybox grep -c '[s]leep 30'"]}))
            .send()
            .await
            .unwrap();
        json_ok(r, StatusCode::OK).await
    };
    // (the check sees it while the client is there)
    let live = sleeping().await;
    assert_eq!(live["stdout"], "1\n", "{live}");
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = sleeping().await;
        if r["stdout"] == "0\n" {
            break;
        }
        assert!(Instant::now() < deadline, "the command still runs: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let r = c
        .delete(format!("{}/v1/machines/{id}", srv.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}
