//! Portable checkpoints through the fleet (SPEC §10.5.9): a real server on 127.0.0.1, real
//! VMs of the local engine, the image from the test registry; the machines are driven through
//! the Rust cloud target (`Machine` with `Target::Cloud`) and raw HTTP. The VM test skips
//! without `make setup` (`SMOL_VM_TESTS=required` fails instead); the scope and body test
//! needs no VM.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use smol_fleet::testing::spawn;
use smolmachines::{
    CheckpointOptions, ErrorCode, ExecOptions, Machine, MachineConfig, RestoreOptions,
};
use support::{client, cloud, json_ok, key_with, problem};

fn home() -> tempfile::TempDir {
    support::home("sfc")
}

async fn sh_out(m: &Machine, script: &str) -> String {
    let r = m
        .exec(
            &common::sh(script),
            ExecOptions {
                timeout: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routes_need_their_scopes_and_a_valid_body() {
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let c = client();
    let url = |p: &str| format!("{}{p}", srv.base_url);
    let read_only = key_with(home.path(), &["machine:read"]);
    let create_only = key_with(home.path(), &["machine:create"]);
    let delete_only = key_with(home.path(), &["machine:delete"]);
    let machine = "/v1/machines/mach-0000000000000000/checkpoints";
    let restore = "/v1/checkpoints/ckpt-0000000000000000/restore";
    let one = "/v1/checkpoints/ckpt-0000000000000000";
    let body = json!({"name": "r1"});
    let send = |method: reqwest::Method, path: &str, key: &str| {
        c.request(method, url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    use reqwest::Method as M;
    // (method, path, the scope it needs)
    let routes = [
        (M::POST, machine, "machine:create"),
        (M::GET, machine, "machine:read"),
        (M::POST, restore, "machine:create"),
        (M::DELETE, one, "machine:delete"),
    ];
    for (method, path, scope) in &routes {
        for key in [&read_only, &create_only, &delete_only] {
            let r = send(method.clone(), path, key).await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            let holds = (key == &read_only && *scope == "machine:read")
                || (key == &create_only && *scope == "machine:create")
                || (key == &delete_only && *scope == "machine:delete");
            if holds {
                // the scope lets it through to the lookup: nothing of that id is the tenant's
                assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {text}");
                assert!(text.contains("not_found"), "{method} {path}: {text}");
            } else {
                assert_eq!(
                    (status, text.as_str()),
                    (
                        StatusCode::FORBIDDEN,
                        format!("missing scope: {scope}").as_str()
                    ),
                    "{method} {path}"
                );
            }
        }
    }

    // a restore body: not JSON 400, no name 422, a bad name 400, then the lookup (404)
    let post = |raw: &'static str| {
        c.post(url(restore))
            .bearer_auth(&create_only)
            .header("content-type", "application/json")
            .body(raw)
            .send()
    };
    let p = problem(
        post(r#"{"name": "#).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_config",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("malformed"), "{p}");
    problem(
        post(r#"{"network": {"mode": "open"}}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    problem(
        post(r#"{"name": 7}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    let p = problem(
        post(r#"{"name": "Bad Name!"}"#).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_config",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("Bad Name!"), "{p}");
    let p = problem(
        post(r#"{"name": "ok", "network": {"mode": "open"}}"#)
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("ckpt-0000000000000000"),
        "{p}"
    );

    // the core refuses what the cloud does not take before sending anything
    let conn = cloud(&srv.base_url, &create_only);
    let e = Machine::restore_checkpoint(
        "ckpt-0000000000000000",
        "r1",
        Some(conn.clone()),
        RestoreOptions {
            keep_identity: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotSupported, "{e}");
    let e = Machine::restore_checkpoint(
        "ckpt-0000000000000000",
        "r1",
        Some(conn.clone()),
        RestoreOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    let e = Machine::delete_checkpoint("ckpt-0000000000000000", Some(conn))
        .await
        .unwrap_err();
    // the create-only key may not delete
    assert_eq!(e.http_status(), 403, "{e}");
    srv.teardown().await.unwrap();
}

/// The counter a background shell keeps in its own memory, written to a tmpfs file each
/// tenth of a second (renamed into place: a reader never sees the file empty, mid-write).
const COUNTER: &str =
    "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/n.t; mv /dev/shm/n.t /dev/shm/n; sleep 0.1; done";

/// The counter of `m`, once it has gone past `after` (its process runs).
async fn counter_past(m: &Machine, after: u64) -> u64 {
    for _ in 0..300 {
        // nothing until the loop's first write
        let n: Option<u64> = sh_out(m, "cat /dev/shm/n 2>/dev/null || true")
            .await
            .parse()
            .ok();
        if let Some(n) = n.filter(|&n| n > after) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the counter did not pass {after} within a minute: its process does not run");
}

/// Disk, tmpfs and a live process of `m` are those of the checkpoint: `disk` and `secret`
/// the files' contents, the counter at least `counted` and still counting.
async fn assert_restored(m: &Machine, disk: &str, secret: &str, counted: u64) {
    assert_eq!(sh_out(m, "cat /root/disk.txt").await, disk);
    assert_eq!(sh_out(m, "cat /dev/shm/secret").await, secret);
    assert_eq!(
        sh_out(m, "test -e /root/after || echo absent").await,
        "absent"
    );
    let n: u64 = sh_out(m, "cat /dev/shm/n").await.parse().unwrap();
    assert!(n >= counted, "the counter went back: {n} < {counted}");
    counter_past(m, n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_restore_list_and_delete_survive_a_restart_and_stay_per_tenant() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let conn = cloud(&srv.base_url, &key);
    let other_key = srv.new_tenant_key("other").await.unwrap();
    let other = cloud(&srv.base_url, &other_key);
    let c = client();
    let config = MachineConfig {
        image: Some(reg.reference("test/busybox:latest")),
        branchable: Some(true),
        ..Default::default()
    };
    let src = Machine::create(config, conn.clone()).await.unwrap();

    // state on its disk, in a tmpfs and in a process' memory
    let secret = sh_out(
        &src,
        "echo before > /root/disk.txt && \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /dev/shm/secret",
    )
    .await;
    assert_eq!(secret.len(), 32, "{secret}");
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    src.exec(&common::sh(COUNTER), bg).await.unwrap();
    let counted = counter_past(&src, 0).await;

    // output / store are local only: refused before any request
    let e = src
        .checkpoint(CheckpointOptions {
            output: Some("/tmp/x.smolcheckpoint".into()),
            store: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidConfig, "{e}");
    let ck = src.checkpoint(CheckpointOptions::default()).await.unwrap();
    assert!(ck.id.starts_with("ckpt-"), "{ck:?}");
    assert_eq!(ck.machine_id, src.id());
    assert_eq!(ck.status, "ready");
    assert_eq!(ck.arch, std::env::consts::ARCH);
    assert!(ck.download_url.is_none() && ck.path.is_none(), "{ck:?}");
    let file = home
        .path()
        .join("checkpoints")
        .join(format!("{}.smolcheckpoint", ck.id));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), ck.size_bytes);
    assert_eq!(src.checkpoints().await.unwrap(), vec![ck.clone()]);
    // the source goes on, and changes after the checkpoint
    sh_out(&src, "echo after > /root/disk.txt && touch /root/after").await;

    // the restore: a new machine of the tenant with the checkpoint's disk, tmpfs and process
    let r1 =
        Machine::restore_checkpoint(&ck.id, "restored", Some(conn.clone()), Default::default())
            .await
            .unwrap();
    assert_eq!(r1.name(), "restored");
    assert!(r1.id().starts_with("mach-") && r1.id() != src.id());
    assert_restored(&r1, "before", &secret, counted).await;
    assert_eq!(sh_out(&r1, "hostname").await, r1.id());
    let rec = json_ok(
        c.get(format!("{}/v1/machines/{}", srv.base_url, r1.id()))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (&rec["name"], &rec["state"]),
        (&json!("restored"), &json!("running")),
        "{rec}"
    );
    assert_eq!(rec["branchable"], true, "{rec}");
    // a taken name (the restored one's, the source's) is 409; nothing else is made
    for name in ["restored", src.name()] {
        let e = Machine::restore_checkpoint(&ck.id, name, Some(conn.clone()), Default::default())
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.http_status()),
            (ErrorCode::Conflict, 409),
            "{name}: {e}"
        );
    }
    // another tenant sees none of it
    let e = Machine::restore_checkpoint(&ck.id, "theirs", Some(other.clone()), Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    let e = Machine::delete_checkpoint(&ck.id, Some(other.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    problem(
        c.get(format!(
            "{}/v1/machines/{}/checkpoints",
            srv.base_url,
            src.id()
        ))
        .bearer_auth(&other_key)
        .send()
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // in use by the restored machine: kept (409)
    let e = Machine::delete_checkpoint(&ck.id, Some(conn.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert!(e.to_string().contains(r1.id()), "{e}");
    assert!(file.exists());

    // a restart: the machines go (the test server deletes them), the checkpoint stays
    srv.teardown().await.unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let conn = cloud(&srv.base_url, &key);
    let listed = json_ok(
        c.get(format!(
            "{}/v1/machines/{}/checkpoints",
            srv.base_url,
            src.id()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed, json!([serde_json::to_value(&ck).unwrap()]));
    let r2 = Machine::restore_checkpoint(&ck.id, "again", Some(conn.clone()), Default::default())
        .await
        .unwrap();
    assert_restored(&r2, "before", &secret, counted).await;
    r2.delete().await.unwrap();

    // delete: the row and the file; then it is gone for every call
    Machine::delete_checkpoint(&ck.id, Some(conn.clone()))
        .await
        .unwrap();
    assert!(!file.exists());
    let e = Machine::restore_checkpoint(&ck.id, "late", Some(conn.clone()), Default::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    let e = Machine::delete_checkpoint(&ck.id, Some(conn.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    // the source is gone too: its id names nothing of the tenant now
    problem(
        c.get(format!(
            "{}/v1/machines/{}/checkpoints",
            srv.base_url,
            src.id()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    srv.teardown().await.unwrap();
}
