//! `/metrics` over a real machine: machines by state and the exec count move (a real VM on
//! the local engine, an image from the test registry on 127.0.0.1; skipped without
//! `make setup`, failing instead under `SMOL_VM_TESTS=required`).

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use reqwest::{Client, StatusCode};
use serde_json::json;
use smol_fleet::testing::spawn;
use support::{client, json_ok};

/// The value of `series` in a scrape (0 when absent).
async fn sample(c: &Client, base: &str, key: &str, series: &str) -> f64 {
    let r = c
        .get(format!("{base}/metrics"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{e}: {series} {v}")))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn machines_by_state_and_execs_move() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfm")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let c = client();
    let base = srv.base_url.clone();
    let running = "smolfleet_machines{state=\"running\"}";
    let execs = "smolfleet_execs_total{kind=\"exec\"}";
    assert_eq!(sample(&c, &base, &key, running).await, 0.0);

    let r = c
        .post(format!("{base}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({"source": {"type": "image", "reference": reg.reference("test/busybox:latest")}}))
        .send()
        .await
        .unwrap();
    let m = json_ok(r, StatusCode::CREATED).await;
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(sample(&c, &base, &key, running).await, 1.0);

    for i in 0..2 {
        let r = c
            .post(format!("{base}/v1/machines/{id}/exec"))
            .bearer_auth(&key)
            .json(&json!({"command": ["sh", "-c", "exit 3"]}))
            .send()
            .await
            .unwrap();
        // a failing command is still an exec (HTTP 200, exitCode in the body)
        assert_eq!(json_ok(r, StatusCode::OK).await["exitCode"], 3);
        assert_eq!(sample(&c, &base, &key, execs).await, f64::from(i + 1));
    }

    let r = c
        .delete(format!("{base}/v1/machines/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(sample(&c, &base, &key, running).await, 0.0);
    assert_eq!(sample(&c, &base, &key, execs).await, 2.0);
}
