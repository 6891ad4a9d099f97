//! The `smolfleet` binary killed with SIGKILL and started again over the same home loses
//! nothing: its bootstrap key still works (and is not printed again), the machine kept
//! running (a file in its memory-backed /tmp is still there, so it was not rebooted), and
//! an exec right after the restart works. Real VMs, the test registry on 127.0.0.1.

mod child;
#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::json;
use support::{client, json_ok};

async fn scenario(home: PathBuf, image: String) {
    let c = client();
    let (mut first, url, key) = child::spawn(&home).await;
    let key = key.expect("the first start prints the bootstrap key");
    let r = c
        .post(format!("{url}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({"name": "keeper", "source": {"type": "image", "reference": image}}))
        .send()
        .await
        .unwrap();
    let id = json_ok(r, StatusCode::CREATED).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let exec = |url: &str, cmd: serde_json::Value| {
        c.post(format!("{url}/v1/machines/{id}/exec"))
            .bearer_auth(&key)
            .json(&json!({ "command": cmd }))
            .send()
    };
    let r = exec(&url, json!(["sh", "-c", "echo booted-once > /tmp/marker"]))
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await["exitCode"], 0);

    first.kill().await.expect("SIGKILL the server");
    // the old server is gone
    assert!(c.get(format!("{url}/health")).send().await.is_err());

    let (_second, url, again) = child::spawn(&home).await;
    assert!(again.is_none(), "a restart prints no key");
    let g = c
        .get(format!("{url}/v1/machines/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let g = json_ok(g, StatusCode::OK).await;
    assert_eq!(
        (g["name"].as_str(), g["state"].as_str()),
        (Some("keeper"), Some("running")),
        "{g}"
    );
    let r = exec(&url, json!(["cat", "/tmp/marker"])).await.unwrap();
    let r = json_ok(r, StatusCode::OK).await;
    assert_eq!(r["stdout"], "booted-once\n", "the VM was rebooted: {r}");
    let r = c
        .delete(format!("{url}/v1/machines/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_restarts_and_finds_its_running_machines() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfr")
        .tempdir_in("/tmp")
        .unwrap();
    let run = tokio::spawn(scenario(
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
