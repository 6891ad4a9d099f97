//! Pause, resume and branch through the fleet (SPEC §10.5.2, §10.5.10): a real server on
//! 127.0.0.1, real VMs of the local engine, the image from the test registry; the machines
//! are driven through the Rust cloud target (`Machine` with `Target::Cloud`) and raw HTTP.
//! The VM test skips without `make setup` (`SMOL_VM_TESTS=required` fails instead); the
//! scope and body tests need no VM.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use smol_fleet::testing::spawn;
use smolmachines::{ErrorCode, ExecOptions, Machine, MachineConfig, MachineState};
use support::{client, cloud, json_ok, key_with, problem};

fn home() -> tempfile::TempDir {
    support::home("sfb")
}

async fn sh_out(m: &Machine, script: &str) -> String {
    let r = m
        .exec(&common::sh(script), ExecOptions::default())
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
    let url = |p: &str| format!("{}/v1/machines/mach-0000000000000000{p}", srv.base_url);
    let body = json!({"name": "c1", "ports": []});
    let read_only = key_with(home.path(), &["machine:read"]);
    let exec_only = key_with(home.path(), &["machine:exec"]);
    let create_only = key_with(home.path(), &["machine:create"]);
    let forbidden = |key: &str, route: &str| {
        let r = c.post(url(route)).bearer_auth(key).json(&body).send();
        async move {
            let r = r.await.unwrap();
            let status = r.status();
            (status, r.text().await.unwrap())
        }
    };
    for route in [
        "/pause",
        "/resume",
        "/branches",
        "/fork",
        "/branches/batch",
        "/fork-batch",
    ] {
        let (status, text) = forbidden(&read_only, route).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{route}: {text}");
        assert!(
            text.starts_with("missing scope: machine:"),
            "{route}: {text}"
        );
    }
    // pausing is a lifecycle operation (exec); a branch makes a machine (create)
    for route in ["/pause", "/resume"] {
        let (status, text) = forbidden(&exec_only, route).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{route}: {text}");
        let (status, text) = forbidden(&create_only, route).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::FORBIDDEN, "missing scope: machine:exec")
        );
    }
    for route in ["/branches", "/fork", "/branches/batch", "/fork-batch"] {
        let (status, text) = forbidden(&exec_only, route).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::FORBIDDEN, "missing scope: machine:create")
        );
        let (status, text) = forbidden(&create_only, route).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{route}: {text}");
    }

    // bodies: as everywhere in the fleet, a schema miss is 422, a bad value 400, not JSON 400
    let post = |route: &'static str, body: &'static str| {
        c.post(url(route))
            .bearer_auth(&create_only)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for route in ["/branches", "/fork"] {
        problem(
            post(route, r#"{"ports": []}"#).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        )
        .await;
        problem(
            post(route, r#"{"name": "c1", "ports": [{"port": "x"}]}"#)
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        )
        .await;
        let p = problem(
            post(route, r#"{"name": "Bad Name!", "ports": []}"#)
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_config",
        )
        .await;
        assert!(p["detail"].as_str().unwrap().contains("Bad Name!"), "{p}");
        problem(
            post(route, r#"{"name": "c1", "ports": [{"port": 0}]}"#)
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_config",
        )
        .await;
        problem(
            post(route, r#"{"name": "#).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_config",
        )
        .await;
        // a valid body for a machine that is not there
        problem(
            post(route, r#"{"name": "c1", "ports": []}"#).await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    srv.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_branch_through_the_cloud_target() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let conn = cloud(&srv.base_url, &key);
    let c = client();
    let url = |p: &str| format!("{}{p}", srv.base_url);
    let image = reg.reference("test/busybox:latest");
    let config = MachineConfig {
        image: Some(image.clone()),
        branchable: Some(true),
        ..Default::default()
    };
    let src = Machine::create(config, conn.clone()).await.unwrap();
    let rec = json_ok(
        c.get(url(&format!("/v1/machines/{}", src.id())))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(rec["branchable"], true, "{rec}");
    assert_eq!(rec["capabilities"]["branch"], true, "{rec}");

    // pause: exec and files are 409 INVALID_STATE, the record reads paused
    src.pause().await.unwrap();
    src.pause().await.unwrap(); // a no-op
    assert_eq!(src.state().await.unwrap(), MachineState::Paused);
    let e = src
        .exec(&common::sh("true"), ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidState, "{e}");
    assert_eq!(e.http_status(), 409, "{e}");
    assert!(e.to_string().contains("paused"), "{e}");
    let e = src.read_file("/etc/hostname").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidState, "{e}");
    // resume (twice: idempotent) and exec works again
    src.resume().await.unwrap();
    src.resume().await.unwrap();
    assert_eq!(src.state().await.unwrap(), MachineState::Running);
    assert_eq!(sh_out(&src, "echo back").await, "back");

    // state in the source's memory only (a tmpfs of its own), then the branch
    let secret = sh_out(
        &src,
        "mkdir -p /mnt/mem && mount -t tmpfs none /mnt/mem && \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /mnt/mem/secret",
    )
    .await;
    assert_eq!(secret.len(), 32, "{secret}");
    let clone = src.branch("clone-a", Vec::new()).await.unwrap();
    assert_eq!(clone.name(), "clone-a");
    assert!(clone.id().starts_with("mach-") && clone.id() != src.id());
    assert_eq!(clone.state().await.unwrap(), MachineState::Running);
    assert_eq!(sh_out(&clone, "cat /mnt/mem/secret").await, secret);
    assert_eq!(sh_out(&clone, "hostname").await, clone.id());
    // then they diverge
    sh_out(&src, "echo source > /mnt/mem/who").await;
    sh_out(&clone, "echo clone > /mnt/mem/who").await;
    assert_eq!(sh_out(&src, "cat /mnt/mem/who").await, "source");
    assert_eq!(sh_out(&clone, "cat /mnt/mem/who").await, "clone");
    // the source was not made unbranchable, the clone was made without branchable
    let e = clone
        .branch("clone-of-clone", Vec::new())
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert_eq!(e.code(), ErrorCode::InvalidState, "{e}");

    // the fleet records the clone as one of the tenant's machines
    let list = json_ok(
        c.get(url("/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == clone.id())
        .unwrap_or_else(|| panic!("no clone in {list}"))
        .clone();
    assert_eq!(row["name"], "clone-a", "{row}");
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["source"]["reference"], image.as_str(), "{row}");
    assert_eq!(row["branchable"], false, "{row}");
    // the clone's name is taken now: 409
    problem(
        c.post(url(&format!("/v1/machines/{}/branches", src.id())))
            .bearer_auth(&key)
            .json(&json!({"name": "clone-a", "ports": []}))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;

    // a published port on a clone (hostPort 0: the node picks one), answered without waiting
    // for it to be ready (nothing listens on 8080 in the guest)
    let ported = json_ok(
        c.post(url(&format!("/v1/machines/{}/branches", src.id())))
            .bearer_auth(&key)
            .json(&json!({"name": "port-c", "ports": [{"port": 8080, "hostPort": 0}]}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(ported["state"], "running", "{ported}");
    assert_eq!(ported["ready"], false, "{ported}");
    assert_eq!(ported["ports"][0]["port"], 8080, "{ported}");
    let host_port = ported["ports"][0]["hostPort"].as_u64().unwrap_or(0) as u16;
    assert!(host_port > 0, "{ported}");
    tokio::net::TcpStream::connect(("127.0.0.1", host_port))
        .await
        .expect("the clone's published port listens on the node");
    let r = c
        .delete(url(&format!(
            "/v1/machines/{}",
            ported["id"].as_str().unwrap()
        )))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // the legacy route, a branchable clone
    let forked = json_ok(
        c.post(url(&format!("/v1/machines/{}/fork", src.id())))
            .bearer_auth(&key)
            .json(&json!({"name": "fork-b", "ports": [], "forkable": true}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(forked["name"], "fork-b", "{forked}");
    assert_eq!(forked["state"], "running", "{forked}");
    assert_eq!(forked["branchable"], true, "{forked}");
    let fork_id = forked["id"].as_str().unwrap().to_string();
    let fork = Machine::connect(&fork_id, conn.clone()).await.unwrap();
    assert_eq!(sh_out(&fork, "cat /mnt/mem/secret").await, secret);
    // a branchable clone is a source in turn
    let grandchild = fork.branch("fork-b-1", Vec::new()).await.unwrap();
    assert_eq!(sh_out(&grandchild, "cat /mnt/mem/secret").await, secret);

    // delete through the fleet: gone from it and from the node
    clone.delete().await.unwrap();
    problem(
        c.get(url(&format!("/v1/machines/{}", clone.id())))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let on_node = Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(on_node.iter().all(|s| s.name != clone.id()), "{on_node:?}");
    // stop and start of a clone
    grandchild.stop().await.unwrap();
    assert_eq!(grandchild.state().await.unwrap(), MachineState::Stopped);
    grandchild.start().await.unwrap();
    assert_eq!(sh_out(&grandchild, "echo up").await, "up");

    // a batch is all or nothing: a taken name refuses it whole, no clone made
    let batch = |route: &str, body: Value| {
        c.post(url(&format!("/v1/machines/{}/{route}", src.id())))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    problem(
        batch(
            "branches/batch",
            json!({"ports": [], "names": ["batch-x", "fork-b"]}),
        )
        .await
        .unwrap(),
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    for body in [
        json!({"ports": [], "count": 0}),
        json!({"ports": [], "count": 65}),
    ] {
        problem(
            batch("branches/batch", body).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_config",
        )
        .await;
    }
    let names_of = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let list = json_ok(
        c.get(url("/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(!names_of(&list).contains(&"batch-x".to_string()), "{list}");
    let on_node = Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert_eq!(on_node.len(), list.as_array().unwrap().len(), "{on_node:?}");
    // the legacy route, names from the source's name
    let made = json_ok(
        batch("fork-batch", json!({"ports": [], "count": 2}))
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let clones = made["clones"].as_array().unwrap();
    assert_eq!(
        names_of(&made["clones"]),
        [format!("{}-1", src.name()), format!("{}-2", src.name())],
        "{made}"
    );
    for m in clones {
        assert_eq!(m["state"], "running", "{m}");
        let b = Machine::connect(m["id"].as_str().unwrap(), conn.clone())
            .await
            .unwrap();
        assert_eq!(sh_out(&b, "cat /mnt/mem/secret").await, secret);
        assert_eq!(sh_out(&b, "hostname").await, b.id());
    }

    // freezeSource: the source becomes a frozen base, branched again from the same instant
    sh_out(&src, "echo before-freeze > /mnt/mem/who").await;
    let frozen_opts = smolmachines::BranchOptions {
        freeze_source: true,
        ..Default::default()
    };
    let f1 = src.branch_with("frozen-1", frozen_opts).await.unwrap();
    assert_eq!(src.state().await.unwrap(), MachineState::Frozen);
    let e = src
        .exec(&common::sh("true"), ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert!(e.to_string().contains("frozen"), "{e}");
    sh_out(&f1, "echo f1 > /mnt/mem/who").await;
    let f2 = src.branch("frozen-2", Vec::new()).await.unwrap();
    assert_eq!(sh_out(&f2, "cat /mnt/mem/who").await, "before-freeze");
    assert_eq!(sh_out(&f1, "cat /mnt/mem/who").await, "f1");

    // a source created without branchable: 409 through the cloud target and on both routes
    let plain = Machine::create(
        MachineConfig {
            image: Some(image.clone()),
            ..Default::default()
        },
        conn.clone(),
    )
    .await
    .unwrap();
    let e = plain.branch("nope", Vec::new()).await.unwrap_err();
    assert_eq!(e.http_status(), 409, "{e}");
    assert_eq!(e.code(), ErrorCode::InvalidState, "{e}");
    for route in ["branches", "fork"] {
        let p = problem(
            c.post(url(&format!("/v1/machines/{}/{route}", plain.id())))
                .bearer_auth(&key)
                .json(&json!({"name": "nope", "ports": []}))
                .send()
                .await
                .unwrap(),
            StatusCode::CONFLICT,
            "invalid_state",
        )
        .await;
        assert!(p["detail"].as_str().unwrap().contains("branchable"), "{p}");
    }
    // the refused name was released
    let list: Value = json_ok(
        c.get(url("/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(
        list.as_array().unwrap().iter().all(|m| m["name"] != "nope"),
        "{list}"
    );
    // pausing a stopped machine is 409
    plain.stop().await.unwrap();
    let e = plain.pause().await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidState, "{e}");
    srv.teardown().await.unwrap();
}
