//! The `smolfleet` binary killed with SIGKILL and started again over the same home loses
//! nothing: its bootstrap key still works (and is not printed again), the machine kept
//! running (a file in its memory-backed /tmp is still there, so it was not rebooted), and
//! an exec right after the restart works. Real VMs, the test registry on 127.0.0.1.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::{client, json_ok};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `smolfleet serve` child: its base URL and the key it printed (if any).
async fn serve(home: &Path) -> (Child, String, Option<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smolfleet"))
        .args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("SMOL_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn smolfleet");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut key = None;
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(k) = line.split_whitespace().find(|w| w.starts_with("smk_")) {
                key = Some(k.to_string());
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                return u.to_string();
            }
        }
        panic!("smolfleet exited before listening");
    })
    .await
    .expect("smolfleet did not start");
    // keep draining stdout so the server never blocks on it
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, key)
}

async fn scenario(home: PathBuf, image: String) {
    let c = client();
    let (mut first, url, key) = serve(&home).await;
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

    let (_second, url, again) = serve(&home).await;
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
    let engine = smolmachines::local::LocalBackend::open_home(home.path().join("engine"));
    for s in smolmachines::Machine::list_on(&*engine, &Default::default())
        .await
        .unwrap()
    {
        eprintln!("cleaning up machine {} ({})", s.name, s.state.as_str());
        let m = smolmachines::Machine::open_on(&*engine, &s.name)
            .await
            .unwrap();
        m.delete().await.unwrap();
    }
    if let Err(e) = run {
        std::panic::resume_unwind(e.into_panic());
    }
}
