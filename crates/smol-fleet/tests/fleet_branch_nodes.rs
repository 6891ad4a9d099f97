//! Branches of a machine on a remote node, through a control replica (issue 15: "branch/fork
//! stay on the source's node"): real processes on 127.0.0.1 over a real PostgreSQL
//! (`testing::pg`), a real QEMU machine on the node. A clone is recorded and reserved on its
//! source's node before the node makes it, answers exec through the replica with the source's
//! memory, diverges from it, and is deleted with its reservation; a batch is all or nothing;
//! a name taken, a source that is not branchable and a cordoned node are refused with nothing
//! left recorded or reserved. Node labels (`--label`, `arch` always) place a machine that asks
//! by its `node.KEY` labels; one asking for labels no node has is refused. Every wait is
//! bounded.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use smol_fleet::testing::pg;
use smol_fleet::{store, Db};
use support::await_node_state as await_state;
use support::procs::{admin, node_line, spawn};

/// What node `id` has reserved: (MiB, vCPUs).
async fn reserved(db: &Db, id: &str) -> (i64, i64) {
    let nodes = db.nodes().await.unwrap();
    let n = nodes.iter().find(|n| n.id == id).unwrap();
    (n.reserved_mib, n.reserved_cpus)
}

#[tokio::test(flavor = "multi_thread")]
async fn branches_of_a_machine_on_a_node_stay_on_its_node() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let image = reg.reference("test/busybox:latest");
    let url = pg::shared()
        .unwrap()
        .database("fleet_branch_nodes")
        .await
        .unwrap();
    // short paths: the engine's sockets live under the node's home
    let dir = tempfile::Builder::new()
        .prefix("sfb")
        .tempdir_in("/tmp")
        .unwrap();
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
    let ctl = p("c");
    admin(&["init", "--db", &url, "--home", &p("c")]).await;
    let token = admin(&["node", "join-token", "--db", &url, "--home", &p("c")]).await;
    let token = token.lines().last().unwrap().to_string();
    let mut control = spawn(
        &[
            "serve",
            "--role",
            "control,edge",
            "--db",
            &url,
            "--home",
            &p("c"),
            "--listen",
            "127.0.0.1:0",
            "--node-listen",
            "127.0.0.1:0",
            "--sweep-interval",
            "300ms",
        ],
        &dir.path().join("c.err"),
    );
    let door = control.line("node door on ").await;
    let door = door.trim_start_matches("node door on ").to_string();
    let key = control.line("bootstrap admin key").await;
    let key = key.rsplit(' ').next().unwrap().to_string();
    let api = control.line("listening on ").await;
    let api = api.trim_start_matches("listening on ").to_string();
    let mut node = spawn(
        &[
            "node",
            "--control",
            &door,
            "--home",
            &p("n"),
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--memory-mib",
            "1024",
            "--cpus",
            "4",
            "--label",
            "region=eu",
            "--token",
            &token,
        ],
        &dir.path().join("n.err"),
    );
    node.line("node API on https://127.0.0.1:").await;
    let (node_id, _) = node_line(&node.line("node node-").await);
    let db = store::open(&url).await.unwrap();
    await_state(&db, &node_id, "ready").await;

    let c = support::client();
    let m = |id: &str, tail: &str| format!("{api}/v1/machines/{id}{tail}");
    let post = |u: String, body: Value| c.post(u).bearer_auth(&key).json(&body).send();
    let sh = |id: String, cmd: &'static str| {
        let c = c.clone();
        let (u, key) = (m(&id, "/exec"), key.clone());
        async move {
            let r = c
                .post(u)
                .bearer_auth(&key)
                .json(&json!({"command": ["sh", "-c", cmd]}))
                .send()
                .await
                .unwrap();
            let out = support::json_ok(r, StatusCode::OK).await;
            assert_eq!(out["exitCode"], 0, "{cmd}: {out}");
            out["stdout"].as_str().unwrap().trim().to_string()
        }
    };
    let list = || async {
        let v: Value = c
            .get(format!("{api}/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };

    // the node's labels: the operator's and its arch, shown by `node list`
    let arch = std::env::consts::ARCH;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.node_status().await.unwrap()[0].labels.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat told the labels"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let shown = admin(&["node", "list", "--db", &url, "--home", &ctl]).await;
    assert!(
        shown.contains(&format!("[arch={arch},region=eu]")),
        "{shown}"
    );
    // a machine asking for labels no node has: 400, nothing recorded
    let r = post(
        format!("{api}/v1/machines"),
        json!({
            "name": "us", "source": {"type": "image", "reference": image},
            "labels": {"node.region": "us"},
        }),
    )
    .await
    .unwrap();
    let p = support::problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("region=us") && detail.contains(&node_id),
        "{p}"
    );
    assert!(list().await.is_empty());
    // a branchable source on the node (asking for its labels), with state in its memory only
    let r = post(
        format!("{api}/v1/machines"),
        json!({
            "name": "src", "source": {"type": "image", "reference": image},
            "resources": {"memoryMb": 256, "cpus": 1}, "branchable": true,
            "labels": {"node.region": "eu", "node.arch": arch, "team": "a"},
        }),
    )
    .await
    .unwrap();
    let src = support::json_ok(r, StatusCode::CREATED).await;
    let src_id = src["id"].as_str().unwrap().to_string();
    let secret = sh(
        src_id.clone(),
        "mkdir -p /mnt/mem && mount -t tmpfs none /mnt/mem && \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /mnt/mem/secret",
    )
    .await;
    assert_eq!(secret.len(), 32, "{secret}");
    assert_eq!(reserved(&db, &node_id).await, (256, 1));

    // one clone: recorded under its own name, on the source's node, reserved there
    let r = post(
        m(&src_id, "/branches"),
        json!({"name": "clone-a", "ports": []}),
    )
    .await
    .unwrap();
    let a = support::json_ok(r, StatusCode::CREATED).await;
    let a_id = a["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&a["name"], &a["state"], &a["ready"]),
        (&"clone-a".into(), &"running".into(), &true.into()),
        "{a}"
    );
    assert_ne!(a_id, src_id);
    assert_eq!(db.machine_node(&a_id).await.unwrap().unwrap().id, node_id);
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    assert_eq!(common::qemu_processes_in(&dir.path().join("n")), 2);
    assert_eq!(common::qemu_processes_in(&dir.path().join("c")), 0);
    // its memory is the source's, then they diverge
    assert_eq!(sh(a_id.clone(), "cat /mnt/mem/secret").await, secret);
    sh(a_id.clone(), "echo clone > /mnt/mem/who").await;
    sh(src_id.clone(), "echo source > /mnt/mem/who").await;
    assert_eq!(sh(a_id.clone(), "cat /mnt/mem/who").await, "clone");
    assert_eq!(sh(src_id.clone(), "cat /mnt/mem/who").await, "source");
    let got: Value = c
        .get(m(&a_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&got["name"], &got["state"]),
        (&"clone-a".into(), &"running".into()),
        "{got}"
    );

    // a taken name: 409, nothing more reserved or made
    let r = post(m(&src_id, "/fork"), json!({"name": "clone-a", "ports": []}))
        .await
        .unwrap();
    support::problem(r, StatusCode::CONFLICT, "conflict").await;
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    // a batch that does not fit the node (2 x 256 MiB more than its 1024): 503 retryable,
    // all or nothing
    let r = post(
        m(&src_id, "/branches/batch"),
        json!({"count": 3, "namePrefix": "many", "ports": []}),
    )
    .await
    .unwrap();
    let p = support::problem(r, StatusCode::SERVICE_UNAVAILABLE, "smolvm_error").await;
    assert!(p["detail"].as_str().unwrap().contains(&node_id), "{p}");
    assert_eq!(p["retryable"], true, "{p}");
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    assert_eq!(list().await, ["clone-a", "src"]);
    // a batch that fits: both clones, named by the prefix, with the source's memory
    let r = post(
        m(&src_id, "/fork-batch"),
        json!({"count": 2, "namePrefix": "b", "ports": []}),
    )
    .await
    .unwrap();
    let batch = support::json_ok(r, StatusCode::CREATED).await;
    let clones = batch["clones"].as_array().unwrap();
    let names: Vec<&str> = clones.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b-1", "b-2"], "{batch}");
    for cl in clones {
        let id = cl["id"].as_str().unwrap().to_string();
        assert_eq!(sh(id, "cat /mnt/mem/who").await, "source");
    }
    assert_eq!(reserved(&db, &node_id).await, (1024, 4));
    assert_eq!(list().await, ["b-1", "b-2", "clone-a", "src"]);

    // deleting a clone gives its reservation back; the node deletes its VM
    let r = c
        .delete(m(&a_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(reserved(&db, &node_id).await, (768, 3));
    for cl in clones {
        let r = c
            .delete(m(cl["id"].as_str().unwrap(), ""))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(reserved(&db, &node_id).await, (256, 1));

    // a checkpoint of the source: taken on its node (the file stays there), recorded here
    let r = post(m(&src_id, "/checkpoints"), json!({})).await.unwrap();
    let ck = support::json_ok(r, StatusCode::CREATED).await;
    let ck_id = ck["id"].as_str().unwrap().to_string();
    assert!(ck_id.starts_with("ckpt-"), "{ck}");
    assert!(ck["sizeBytes"].as_u64().unwrap() > 0, "{ck}");
    let file = dir
        .path()
        .join("n/fleet/checkpoints")
        .join(format!("{ck_id}.smolcheckpoint"));
    assert!(file.exists(), "no {}", file.display());
    assert!(!dir
        .path()
        .join("c/checkpoints")
        .join(format!("{ck_id}.smolcheckpoint"))
        .exists());
    let listed: Value = c
        .get(m(&src_id, "/checkpoints"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], ck_id.as_str());
    // restored on the node that holds it, with the source's memory
    let r = post(
        format!("{api}/v1/checkpoints/{ck_id}/restore"),
        json!({"name": "restored"}),
    )
    .await
    .unwrap();
    let restored = support::json_ok(r, StatusCode::CREATED).await;
    let restored_id = restored["id"].as_str().unwrap().to_string();
    assert_eq!(restored["name"], "restored", "{restored}");
    assert_eq!(
        db.machine_node(&restored_id).await.unwrap().unwrap().id,
        node_id
    );
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    assert_eq!(sh(restored_id.clone(), "cat /mnt/mem/secret").await, secret);
    // in use: not deleted; a taken name: 409, nothing reserved
    let r = c
        .delete(format!("{api}/v1/checkpoints/{ck_id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    support::problem(r, StatusCode::CONFLICT, "invalid_state").await;
    let r = post(
        format!("{api}/v1/checkpoints/{ck_id}/restore"),
        json!({"name": "restored"}),
    )
    .await
    .unwrap();
    support::problem(r, StatusCode::CONFLICT, "conflict").await;
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    // the restored machine, then the checkpoint: its file goes from the node
    let r = c
        .delete(m(&restored_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .delete(format!("{api}/v1/checkpoints/{ck_id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(!file.exists(), "{} stayed on the node", file.display());
    let r = post(
        format!("{api}/v1/checkpoints/{ck_id}/restore"),
        json!({"name": "again"}),
    )
    .await
    .unwrap();
    support::problem(r, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(reserved(&db, &node_id).await, (256, 1));

    // a source that is not branchable: the node's 409, the name released
    let r = post(
        format!("{api}/v1/machines"),
        json!({
            "name": "plain", "source": {"type": "image", "reference": image},
            "resources": {"memoryMb": 256, "cpus": 1},
        }),
    )
    .await
    .unwrap();
    let plain = support::json_ok(r, StatusCode::CREATED).await;
    let plain_id = plain["id"].as_str().unwrap().to_string();
    let r = post(
        m(&plain_id, "/branches"),
        json!({"name": "nope", "ports": []}),
    )
    .await
    .unwrap();
    let p = support::problem(r, StatusCode::CONFLICT, "invalid_state").await;
    assert!(p["detail"].as_str().unwrap().contains("branchable"), "{p}");
    assert_eq!(reserved(&db, &node_id).await, (512, 2));
    assert_eq!(list().await, ["plain", "src"]);

    // lifetimes of a machine on a node: the replica's exec (and its stream) is activity, so
    // a machine in use is not stopped for being idle; left idle, the replica stops it there
    let r = post(
        format!("{api}/v1/machines"),
        json!({
            "name": "idle", "source": {"type": "image", "reference": image},
            "resources": {"memoryMb": 256, "cpus": 1}, "autoStopSeconds": 2,
        }),
    )
    .await
    .unwrap();
    let idle = support::json_ok(r, StatusCode::CREATED).await;
    let idle_id = idle["id"].as_str().unwrap().to_string();
    let busy_until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < busy_until {
        // a streamed exec that lasts longer than the idle time counts while it runs
        let r = c
            .post(m(&idle_id, "/exec/stream"))
            .bearer_auth(&key)
            .json(&json!({"command": ["sh", "-c", "sleep 2.5; echo up"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let sse = r.text().await.unwrap();
        assert!(sse.contains("up"), "{sse}");
    }
    let got: Value = c
        .get(m(&idle_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["state"], "running", "stopped while in use: {got}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got: Value = c
            .get(m(&idle_id, ""))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if got["state"] == "stopped" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never stopped when idle: {got}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = c
        .delete(m(&idle_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // a cordoned node takes no clone either: 503 retryable, nothing recorded
    admin(&["node", "cordon", &node_id, "--db", &url, "--home", &ctl]).await;
    let r = post(
        m(&src_id, "/branches"),
        json!({"name": "late", "ports": []}),
    )
    .await
    .unwrap();
    let p = support::problem(r, StatusCode::SERVICE_UNAVAILABLE, "smolvm_error").await;
    assert!(p["detail"].as_str().unwrap().contains("cordoned"), "{p}");
    assert_eq!(p["retryable"], true, "{p}");
    assert_eq!(list().await, ["plain", "src"]);
    admin(&["node", "uncordon", &node_id, "--db", &url, "--home", &ctl]).await;

    for id in [&plain_id, &src_id] {
        let r = c.delete(m(id, "")).bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(reserved(&db, &node_id).await, (0, 0));
    // the node's VMs go with their deletes (bounded wait: a delete returns as QEMU exits)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::qemu_processes_in(&dir.path().join("n")) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the node's VMs outlived their deletes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(node);
    drop(control);
}
