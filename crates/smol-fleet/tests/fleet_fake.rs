//! Many machines through two control replicas to three nodes, over a real PostgreSQL: the
//! nodes' engines run the fake VMM (`support/fakevmm.py`, `SMOL_QEMU`) instead of QEMU, so a
//! 2-core host holds 60 machines at once. Everything but the guest is real: the replicas, the
//! nodes, their engines, the store, the agent protocol and the agent (`smol-agent connect`,
//! run on the host).
//!
//! 2 replicas x 60 concurrent creates on nodes with room for 60 machines in all: exactly 60
//! are made and the rest are `503 retryable`, no node is reserved past its capacity, each
//! node runs exactly the machines placed on it; each machine answers exec through either
//! replica; deleting them all gives every reservation back and leaves no VMM.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use smol_fleet::testing::pg;
use smol_fleet::{store, Db};
use support::await_node_state as await_state;
use support::procs::{admin, node_line, spawn, spawn_with, vmms_in, Proc};

/// Nodes, and how many 128 MiB / 1 vCPU machines each holds.
const NODES: usize = 3;
const PER_NODE: usize = 20;
const MIB: i64 = 128;

/// The fake VMM and the agent it runs: `None` (the test skips) without the static agent of
/// `make setup`; a panic when that agent predates `smol-agent connect`.
fn fake_vmm() -> Option<(PathBuf, PathBuf)> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let agent = target.join("x86_64-unknown-linux-gnu/release-agent/smol-agent");
    if !agent.exists() {
        assert!(
            std::env::var("SMOL_VM_TESTS").as_deref() != Ok("required"),
            "no {}: run `make setup`",
            agent.display()
        );
        eprintln!("skipping: no {} (`make setup` builds it)", agent.display());
        return None;
    }
    let usage = std::process::Command::new(&agent).output().unwrap();
    assert!(
        String::from_utf8_lossy(&usage.stderr).contains("serve|connect"),
        "{} predates `smol-agent connect`: run `make setup`",
        agent.display()
    );
    let vmm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fakevmm.py");
    Some((vmm, agent))
}

/// The environment of a node whose engine runs the fake VMM.
fn fake_env(vmm: &Path, agent: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("SMOL_QEMU", vmm.to_path_buf()),
        ("SMOL_FAKE_AGENT", agent.to_path_buf()),
        // a template is a booted, frozen guest: the fake has none
        ("SMOL_TEMPLATES", "0".into()),
        // the agent binary lies outside what Landlock lets a VMM reach
        ("SMOL_NO_LANDLOCK", "1".into()),
    ]
}

/// Two replicas and three fake-VMM nodes over one fresh database.
struct Fleet {
    url: String,
    apis: Vec<String>,
    key: String,
    db: Db,
    nodes: Vec<(String, PathBuf)>,
    _procs: Vec<Proc>,
}

async fn fleet(dir: &Path, vmm: &Path, agent: &Path, database: &str) -> Fleet {
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database(database)
        .await
        .unwrap();
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    admin(&["init", "--db", &url, "--home", &p("c")]).await;
    let replica = |home: &str| {
        spawn(
            &[
                "serve",
                "--role",
                "control,edge",
                "--db",
                &url,
                "--home",
                &p(home),
                "--listen",
                "127.0.0.1:0",
                "--node-listen",
                "127.0.0.1:0",
                "--sweep-interval",
                "300ms",
            ],
            &dir.join(format!("{home}.err")),
        )
    };
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    let mut doors = Vec::new();
    let mut key = String::new();
    for home in ["c", "c2"] {
        let mut r = replica(home);
        let door = r.line("node door on ").await;
        doors.push(door.trim_start_matches("node door on ").to_string());
        if home == "c" {
            let k = r.line("bootstrap admin key").await;
            key = k.rsplit(' ').next().unwrap().to_string();
        }
        let api = r.line("listening on ").await;
        apis.push(api.trim_start_matches("listening on ").to_string());
        procs.push(r);
    }
    let doors = doors.join(",");
    let env = fake_env(vmm, agent);
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let db = store::open(&url).await.unwrap();
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let token = admin(&["node", "join-token", "--db", &url, "--home", &p("c")]).await;
        let token = token.lines().last().unwrap().to_string();
        let home = dir.join(format!("n{i}"));
        let memory = (PER_NODE as i64 * MIB).to_string();
        let cpus = PER_NODE.to_string();
        let args = [
            "node",
            "--control",
            &doors,
            "--home",
            home.to_str().unwrap(),
            "--name",
            &format!("fake-{i}"),
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--memory-mib",
            &memory,
            "--cpus",
            &cpus,
            "--token",
            &token,
        ];
        let mut n = spawn_with(&args, &dir.join(format!("n{i}.err")), &env);
        let (id, _) = node_line(&n.line("node node-").await);
        await_state(&db, &id, "ready").await;
        nodes.push((id, home));
        procs.push(n);
    }
    Fleet {
        url,
        apis,
        key,
        db,
        nodes,
        _procs: procs,
    }
}

/// One create through `api`: its status and body.
/// The image every fake machine is made of (the cloud API needs one; each node pulls it once):
/// its workload (`/bin/sh` without a terminal, which ends at once) runs on the host, and has
/// no working directory the host lacks.
fn image() -> String {
    common_registry::shared().reference("test/busybox:multi")
}

async fn create(c: &reqwest::Client, api: &str, key: &str) -> (StatusCode, serde_json::Value) {
    let r = c
        .post(format!("{api}/v1/machines"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "source": {"type": "image", "reference": image()},
            "resources": {"memoryMb": MIB, "cpus": 1},
        }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let retryable = r.headers().contains_key("retry-after");
    let mut body: serde_json::Value = r.json().await.unwrap_or_default();
    body["retryAfterHeader"] = retryable.into();
    (status, body)
}

async fn delete(c: &reqwest::Client, api: &str, key: &str, id: &str) -> StatusCode {
    c.delete(format!("{api}/v1/machines/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
}

/// Each node's (reserved MiB, reserved vCPUs, capacity MiB, capacity vCPUs).
async fn reservations(db: &Db) -> BTreeMap<String, (i64, i64, i64, i64)> {
    db.nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| {
            (
                n.id.clone(),
                (n.reserved_mib, n.reserved_cpus, n.memory_mib, n.cpus),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_times_sixty_concurrent_creates_never_over_reserve_a_node() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some((vmm, agent)) = fake_vmm() else {
        return;
    };
    let dir = support::home("sff");
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let f = fleet(dir.path(), &vmm, &agent, "fleet_fake").await;
    let c = support::client();

    // 2 replicas x 60 creates at once, for 60 places
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..(2 * NODES * PER_NODE) {
        let (c, api, key) = (c.clone(), f.apis[i % 2].clone(), f.key.clone());
        tasks.spawn(async move { create(&c, &api, &key).await });
    }
    let mut made = Vec::new();
    let mut full = 0;
    while let Some(r) = tasks.join_next().await {
        let (status, body) = r.unwrap();
        match status {
            StatusCode::CREATED => {
                assert_eq!(
                    (&body["state"], &body["ready"]),
                    (&"running".into(), &true.into()),
                    "{body}"
                );
                made.push(body["id"].as_str().unwrap().to_string());
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["retryable"], true, "{body}");
                assert_eq!(body["retryAfterHeader"], true, "{body}");
                full += 1;
            }
            other => panic!("create: {other}: {body}"),
        }
    }
    eprintln!(
        "{} creates in {:.1} s: {} made, {full} refused (full)",
        2 * NODES * PER_NODE,
        t0.elapsed().as_secs_f64(),
        made.len()
    );
    assert_eq!(made.len(), NODES * PER_NODE, "every place is used");
    assert_eq!(full, NODES * PER_NODE);
    let reserved = reservations(&f.db).await;
    for (node, (mib, cpus, cap_mib, cap_cpus)) in &reserved {
        assert!(
            mib <= cap_mib && cpus <= cap_cpus,
            "{node} over-reserved: {reserved:?}"
        );
    }
    let total: i64 = reserved.values().map(|r| r.0).sum();
    assert_eq!(total, MIB * made.len() as i64, "{reserved:?}");
    // each node runs exactly what is placed on it
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    for id in &made {
        let n = f.db.machine_node(id).await.unwrap().expect("placed");
        *placed.entry(n.id).or_default() += 1;
    }
    for (id, home) in &f.nodes {
        let on = placed.get(id).copied().unwrap_or(0);
        assert_eq!(on, PER_NODE, "{placed:?}");
        assert_eq!(vmms_in(home).len(), on, "VMMs of {id}");
        assert_eq!(reserved[id].0, MIB * on as i64, "{reserved:?}");
    }

    // each machine answers through either replica
    let mut execs = tokio::task::JoinSet::new();
    for (i, id) in made.iter().enumerate() {
        let (c, api, key, id) = (
            c.clone(),
            f.apis[(i + 1) % 2].clone(),
            f.key.clone(),
            id.clone(),
        );
        execs.spawn(async move {
            let r = c
                .post(format!("{api}/v1/machines/{id}/exec"))
                .bearer_auth(&key)
                .json(&serde_json::json!({"command": ["echo", &id]}))
                .send()
                .await
                .unwrap();
            let out = support::json_ok(r, StatusCode::OK).await;
            assert_eq!(out["stdout"], format!("{id}\n"), "{out}");
        });
    }
    while let Some(r) = execs.join_next().await {
        r.unwrap();
    }

    // all deleted at once: every reservation back, no VMM left
    let mut dels = tokio::task::JoinSet::new();
    for (i, id) in made.iter().enumerate() {
        let (c, api, key, id) = (c.clone(), f.apis[i % 2].clone(), f.key.clone(), id.clone());
        dels.spawn(async move { delete(&c, &api, &key, &id).await });
    }
    while let Some(r) = dels.join_next().await {
        let s = r.unwrap();
        assert!(s.is_success(), "delete: {s}");
    }
    let reserved = reservations(&f.db).await;
    assert!(
        reserved.values().all(|r| r.0 == 0 && r.1 == 0),
        "{reserved:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for (id, home) in &f.nodes {
        while !vmms_in(home).is_empty() {
            assert!(Instant::now() < deadline, "VMMs left on {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Creates per second, `n` at a time `inflight` in flight through `apis` in turn, then all
/// deleted (not timed).
async fn creates_per_second(apis: &[String], key: &str, n: usize, inflight: usize) -> f64 {
    let c = support::client();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(inflight));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (c, api, key, sem) = (
            c.clone(),
            apis[i % apis.len()].clone(),
            key.to_string(),
            sem.clone(),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let (status, body) = create(&c, &api, &key).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            (api, body["id"].as_str().unwrap().to_string())
        });
    }
    let mut made = Vec::new();
    while let Some(r) = tasks.join_next().await {
        made.push(r.unwrap());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    for (api, id) in made {
        assert!(delete(&c, &api, key, &id).await.is_success());
    }
    rate
}

/// Creates per second through two replicas to three fake-VMM nodes ÷ through one `--role all`
/// server whose embedded node runs the same fake VMM, same run, interleaved (`cargo test
/// --release -p smol-fleet --test fleet_fake measure -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_creates_per_second_two_replicas_vs_role_all() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some((vmm, agent)) = fake_vmm() else {
        return;
    };
    let dir = support::home("sfm");
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let env = fake_env(&vmm, &agent);
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let home = dir.path().join("all");
    let mut all = spawn_with(
        &[
            "serve",
            "--home",
            home.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &dir.path().join("all.err"),
        &env,
    );
    let key_all = all.line("bootstrap admin key").await;
    let key_all = key_all.rsplit(' ').next().unwrap().to_string();
    let api_all = all.line("listening on ").await;
    let api_all = vec![api_all.trim_start_matches("listening on ").to_string()];
    let f = fleet(dir.path(), &vmm, &agent, "fleet_fake_measure").await;
    let (n, inflight) = (NODES * PER_NODE / 2, 8);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        base.push(creates_per_second(&api_all, &key_all, n, inflight).await);
        ours.push(creates_per_second(&f.apis, &f.key, n, inflight).await);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, b) = (median(ours.clone()), median(base.clone()));
    println!(
        "creates/s, {n} per round, {inflight} in flight, fake VMM: 2 replicas -> 3 nodes {o:.1}/s \
         (rounds {ours:.1?}) vs --role all {b:.1}/s (rounds {base:.1?}): {:.2}x",
        o / b
    );
}

/// A node refuses a request whose placement epoch is lower than one it was sent: straight to
/// the node's API with a control replica's certificate (as a replica that the control plane
/// has moved on from would send it), and through a replica whose store still says 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_a_stale_placement_epoch() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some((vmm, agent)) = fake_vmm() else {
        return;
    };
    let dir = support::home("sfe");
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let f = fleet(dir.path(), &vmm, &agent, "fleet_fake_epochs").await;
    let c = support::client();
    let (status, body) = create(&c, &f.apis[0], &f.key).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let echo = serde_json::json!({"command": ["echo", "hi"]});
    let through_replica = |header: Option<String>| {
        let mut r = c
            .post(format!("{}/v1/machines/{id}/exec", f.apis[1]))
            .bearer_auth(&f.key)
            .json(&echo);
        if let Some(h) = header {
            r = r.header(smol_fleet::epochs::HEADER, h);
        }
        r.send()
    };
    let out = support::json_ok(through_replica(None).await.unwrap(), StatusCode::OK).await;
    assert_eq!(out["stdout"], "hi\n");
    let at = f.db.machine_node(&id).await.unwrap().expect("placed");
    assert_eq!(at.placement.as_ref().map(|p| p.epoch), Some(1));

    // the node's API, as a replica reaches it
    let ca = smol_fleet::nodedoor::load_ca(&f.db).await.unwrap();
    let tls = (*ca.control_client_config().unwrap()).clone();
    let url = at.api_url.clone().unwrap();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let node = reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls(tls)
        .resolve(&at.id, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap();
    let direct = |method: reqwest::Method, tail: &str, epoch: Option<&str>| {
        let mut r = node.request(
            method,
            format!("https://{}:{port}/v1/machines/{id}{tail}", at.id),
        );
        if tail == "/exec" {
            r = r.json(&echo);
        }
        if let Some(e) = epoch {
            r = r.header(smol_fleet::epochs::HEADER, format!("{id} {e}"));
        }
        r.send()
    };
    let post = reqwest::Method::POST;
    let r = direct(post.clone(), "/exec", Some("1")).await.unwrap();
    support::json_ok(r, StatusCode::OK).await;
    for bad in ["0", "x"] {
        let r = direct(post.clone(), "/exec", Some(bad)).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "epoch {bad}");
    }
    // the control plane moved on (epoch 5): the node holds it from then on
    let r = direct(post.clone(), "/exec", Some("5")).await.unwrap();
    support::json_ok(r, StatusCode::OK).await;
    let r = direct(post.clone(), "/exec", Some("4")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["retryable"], true, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("placement epoch 4") && text.contains("epoch 5"),
        "{text}"
    );
    // a replica whose store says 1 is refused; a client cannot name an epoch of its own
    for header in [None, Some(format!("{id} 9"))] {
        let r = through_replica(header).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body.to_string().contains("placement epoch 1"), "{body}");
    }
    // the machine itself is untouched: the current epoch still reaches it
    let r = direct(post.clone(), "/exec", Some("5")).await.unwrap();
    let out = support::json_ok(r, StatusCode::OK).await;
    assert_eq!(out["stdout"], "hi\n");

    // a replica that stalls between its create's commit and its node call: the sweep of a
    // replica claims the overdue operation (raising the epoch to 2) and asks the node, which
    // has no such machine: failed, the record and reservation gone. The stalled create then
    // reaches the node with epoch 1 and is refused: no machine, no orphan.
    let tenant =
        f.db.all_machines()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.id == id)
            .unwrap()
            .tenant_id;
    let ghost = support::machine_row("mach-ghost", &tenant);
    let need = smol_fleet::placement::Need {
        memory_mib: MIB,
        cpus: 1,
    };
    let placed =
        f.db.reserve_on(&ghost, need, std::slice::from_ref(&at.id))
            .await
            .unwrap();
    assert!(
        matches!(placed, smol_fleet::placement::Placed::Placed { .. }),
        "{placed:?}"
    );
    let (sql, conn) = tokio_postgres::connect(&f.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    sql.execute(
        "UPDATE operations SET deadline_at = 0 WHERE machine_id = 'mach-ghost'",
        &[],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.db.machine(&tenant, "mach-ghost").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the overdue create was not finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vmms = vmms_in(&f.nodes.iter().find(|n| n.0 == at.id).unwrap().1).len();
    let late = node
        .post(format!("https://{}:{port}/v1/machines", at.id))
        .header(smol_fleet::epochs::HEADER, "mach-ghost 1")
        .json(&serde_json::json!({
            "name": "mach-ghost",
            "source": {"type": "image", "reference": image()},
            "resources": {"memoryMb": MIB, "cpus": 1},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = late.text().await.unwrap();
    assert!(
        text.contains("placement epoch 1") && text.contains("epoch 2"),
        "{text}"
    );
    let r = node
        .get(format!("https://{}:{port}/v1/machines/mach-ghost", at.id))
        .header(smol_fleet::epochs::HEADER, "mach-ghost 2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no machine made");
    assert_eq!(
        vmms_in(&f.nodes.iter().find(|n| n.0 == at.id).unwrap().1).len(),
        vmms
    );

    // a node that has not told its labels (between its join and its first heartbeat) may be
    // the one a create asks for: 503 retryable naming it, not 400; told again by its next
    // heartbeat, the same create is 400 (no node has them)
    sql.execute("UPDATE nodes SET labels = NULL WHERE id = $1", &[&at.id])
        .await
        .unwrap();
    let labelled = || {
        c.post(format!("{}/v1/machines", f.apis[0]))
            .bearer_auth(&f.key)
            .json(&serde_json::json!({
                "source": {"type": "image", "reference": image()},
                "resources": {"memoryMb": MIB, "cpus": 1},
                "labels": {"node.gpu": "h200"},
            }))
            .send()
    };
    let r = labelled().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["retryable"], true, "{body}");
    assert!(body.to_string().contains(&at.id), "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = labelled().await.unwrap();
        if r.status() == StatusCode::BAD_REQUEST {
            let text = r.text().await.unwrap();
            assert!(
                text.contains("no node of this fleet has gpu=h200"),
                "{text}"
            );
            break;
        }
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "the node never told its labels again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // deleted on its node (its epoch goes with it), then through the replica
    let r = direct(reqwest::Method::DELETE, "", Some("5"))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let s = delete(&c, &f.apis[0], &f.key, &id).await;
    assert!(s.is_success() || s == StatusCode::NOT_FOUND, "{s}");
    let reserved = reservations(&f.db).await;
    assert!(reserved.values().all(|r| r.0 == 0), "{reserved:?}");
}
