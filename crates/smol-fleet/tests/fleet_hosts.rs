//! The fleet's topology of issue 15 on one machine: three hosts, each a network namespace on a
//! bridge with a `smolfleet node` of its own (its API on its own address, real QEMU machines
//! under its home), and two control replicas over one PostgreSQL (`testing::pg`), their node
//! doors on the bridge. Creates through either replica spread over the three nodes and answer
//! exec through the other replica; a labelled node takes the machine that asks for its label; a
//! partition (an nft rule in one node's namespace) makes that node lost, its machine
//! `ready=false` with an `errorReason` through both replicas and its delete tombstoned, the
//! other machines unaffected; healed, the node is ready again and the waiting delete runs (its
//! QEMU gone). With two sweepers, a machine in use through one replica is not stopped for
//! being idle by the other; a TTL deletes a machine once. Needs root (`ip netns`, `nft`) and the VM assets; elsewhere it says so and
//! passes nothing. Every wait is bounded.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use smol_fleet::store;
use smol_fleet::testing::pg;
use support::await_node_state as await_state;
use support::procs::{admin, node_line, sh, spawn, spawn_program, Proc, BIN};

/// A bridge on this host (`10.253.N.1/24`) and `n` namespaces on it (`10.253.N.2`, `.3`, …),
/// removed when dropped.
struct Hosts {
    bridge: String,
    /// The bridge's address (the replicas' node doors listen there).
    host_ip: String,
    subnet: u32,
    /// Each namespace and the host end of its veth pair.
    nets: Vec<(String, String)>,
}

impl Hosts {
    fn make(n: usize) -> Option<Hosts> {
        let pid = std::process::id();
        let subnet = pid % 250;
        let mut hosts = Hosts {
            bridge: format!("sfbr{pid}"),
            host_ip: format!("10.253.{subnet}.1"),
            subnet,
            nets: Vec::new(),
        };
        let cidr = format!("{}/24", hosts.host_ip);
        if !(sh("ip", &["link", "add", &hosts.bridge, "type", "bridge"])
            && sh("ip", &["addr", "add", &cidr, "dev", &hosts.bridge])
            && sh("ip", &["link", "set", &hosts.bridge, "up"]))
        {
            return None;
        }
        for k in 0..n {
            let ns = format!("smolfh{pid}-{k}");
            let (host_if, peer) = (format!("sfh{pid}{k}a"), format!("sfh{pid}{k}b"));
            if !sh("ip", &["netns", "add", &ns]) {
                return None;
            }
            hosts.nets.push((ns.clone(), host_if.clone()));
            let addr = format!("{}/24", hosts.ip(k));
            let exec = |cmd: &[&str]| {
                let mut a = vec!["netns", "exec", &ns];
                a.extend_from_slice(cmd);
                sh("ip", &a)
            };
            let ok = sh(
                "ip",
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
                ],
            ) && sh("ip", &["link", "set", &peer, "netns", &ns])
                && sh("ip", &["link", "set", &host_if, "master", &hosts.bridge])
                && sh("ip", &["link", "set", &host_if, "up"])
                && exec(&["ip", "addr", "add", &addr, "dev", &peer])
                && exec(&["ip", "link", "set", &peer, "up"])
                && exec(&["ip", "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(hosts)
    }

    /// Namespace `k`'s address.
    fn ip(&self, k: usize) -> String {
        format!("10.253.{}.{}", self.subnet, k + 2)
    }

    fn exec_ok(&self, k: usize, cmd: &[&str]) -> bool {
        let mut args = vec!["netns", "exec", self.nets[k].0.as_str()];
        args.extend_from_slice(cmd);
        sh("ip", &args)
    }

    /// Drops what namespace `k` sends to the bridge's address (the replicas), or lets it go.
    fn partition(&self, k: usize, on: bool) {
        let ok = if on {
            self.exec_ok(k, &["nft", "add", "table", "inet", "smolfh"])
                && self.exec_ok(
                    k,
                    &[
                        "nft",
                        "add",
                        "chain",
                        "inet",
                        "smolfh",
                        "out",
                        "{ type filter hook output priority 0; policy accept; }",
                    ],
                )
                && self.exec_ok(
                    k,
                    &[
                        "nft",
                        "add",
                        "rule",
                        "inet",
                        "smolfh",
                        "out",
                        "ip",
                        "daddr",
                        &self.host_ip,
                        "drop",
                    ],
                )
        } else {
            self.exec_ok(k, &["nft", "delete", "table", "inet", "smolfh"])
        };
        assert!(ok, "nft in namespace {k}");
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (ns, host_if) in &self.nets {
            let _ = sh("ip", &["netns", "del", ns]);
            let _ = std::process::Command::new("ip")
                .args(["link", "del", host_if])
                .stderr(Stdio::null())
                .status();
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
    }
}

/// A TCP relay on `ip` to `to` for the test's life; its `ip:port`.
async fn relay(ip: &str, to: String) -> String {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let at = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    at
}

/// Polls `GET url` until `done` holds of its JSON (within 60 s); that JSON.
async fn until(c: &reqwest::Client, url: &str, key: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = c
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{url} never got there: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hosts_two_replicas_spread_route_and_survive_a_partition() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    if common::vm_assets().is_none() {
        return;
    }
    let Some(hosts) = Hosts::make(3) else {
        eprintln!("skipped: cannot make a bridge and network namespaces here (see above)");
        return;
    };
    // the test's registry listens on this host's loopback, which a namespace has its own of:
    // the nodes pull through a relay on the bridge (plain HTTP, allowed for that address)
    let reg = common_registry::shared();
    let local = reg.reference("test/busybox:latest");
    let (registry, path) = local.split_once('/').unwrap();
    let relay = relay(&hosts.host_ip, registry.to_string()).await;
    let image = format!("{relay}/{path}");
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database("fleet_hosts")
        .await
        .unwrap();
    // short paths: the engines' sockets live under the nodes' homes
    let dir = tempfile::Builder::new()
        .prefix("sfh")
        .tempdir_in("/tmp")
        .unwrap();
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
    admin(&["init", "--db", &url, "--home", &p("c0")]).await;

    // two replicas, their node doors on the bridge
    let door_listen = format!("{}:0", hosts.host_ip);
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
                &door_listen,
                "--node-san",
                &hosts.host_ip,
                "--node-lease",
                "1s",
                "--node-lost-after",
                "2s",
                "--sweep-interval",
                "500ms",
            ],
            &dir.path().join(format!("{home}.err")),
        )
    };
    let mut r0 = replica("c0");
    let door0 = r0.line("node door on ").await;
    let door0 = door0.trim_start_matches("node door on ").to_string();
    let key = r0.line("bootstrap admin key").await;
    let key = key.rsplit(' ').next().unwrap().to_string();
    let api0 = r0.line("listening on ").await;
    let api0 = api0.trim_start_matches("listening on ").to_string();
    let mut r1 = replica("c1");
    let door1 = r1.line("node door on ").await;
    let door1 = door1.trim_start_matches("node door on ").to_string();
    let api1 = r1.line("listening on ").await;
    let api1 = api1.trim_start_matches("listening on ").to_string();
    let apis = [api0.clone(), api1.clone()];
    let controls = format!("{door0},{door1}");

    // three nodes, each in its namespace, its API on its own address; the last labelled
    let db = store::open(&url).await.unwrap();
    let mut nodes: Vec<(Proc, String)> = Vec::new();
    for k in 0..3 {
        let token = admin(&["node", "join-token", "--db", &url, "--home", &p("c0")]).await;
        let token = token.lines().last().unwrap().to_string();
        let (home, api_listen) = (p(&format!("n{k}")), format!("{}:0", hosts.ip(k)));
        let mut args = vec![
            "netns",
            "exec",
            hosts.nets[k].0.as_str(),
            BIN,
            "node",
            "--control",
            &controls,
            "--token",
            &token,
            "--home",
            &home,
            "--name",
            ["h0", "h1", "h2"][k],
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            &api_listen,
            "--memory-mib",
            "1024",
            "--cpus",
            "4",
        ];
        if k == 2 {
            args.extend(["--label", "gpu=h200"]);
        }
        let mut n = spawn_program(
            "ip",
            &args,
            &dir.path().join(format!("n{k}.err")),
            &[("SMOL_INSECURE_REGISTRIES", std::path::Path::new(&relay))],
        );
        let api_line = n.line("node API on https://").await;
        assert!(api_line.contains(&hosts.ip(k)), "{api_line}");
        let (id, _) = node_line(&n.line("node node-").await);
        await_state(&db, &id, "ready").await;
        nodes.push((n, id));
    }
    let node_ids: Vec<String> = nodes.iter().map(|(_, id)| id.clone()).collect();

    let c = support::client();
    let m = |api: &str, id: &str, tail: &str| format!("{api}/v1/machines/{id}{tail}");
    let exec = |api: String, id: String, cmd: &'static str| {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let r = c
                .post(format!("{api}/v1/machines/{id}/exec"))
                .bearer_auth(&key)
                .json(&json!({"command": ["sh", "-c", cmd]}))
                .send()
                .await
                .unwrap();
            support::json_ok(r, StatusCode::OK).await
        }
    };

    // the labelled node takes the machine that asks for its label
    let r = c
        .post(format!("{api1}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({
            "name": "gpu", "source": {"type": "image", "reference": image},
            "resources": {"memoryMb": 256, "cpus": 1}, "labels": {"node.gpu": "h200"},
        }))
        .send()
        .await
        .unwrap();
    let gpu = support::json_ok(r, StatusCode::CREATED).await;
    let gpu_id = gpu["id"].as_str().unwrap().to_string();
    assert_eq!(
        db.machine_node(&gpu_id).await.unwrap().unwrap().id,
        node_ids[2]
    );
    // creates through either replica spread over the nodes (the least reserved first)
    let mut placed = std::collections::BTreeMap::<String, Vec<String>>::new();
    for i in 0..5 {
        let r = c
            .post(format!("{}/v1/machines", apis[i % 2]))
            .bearer_auth(&key)
            .json(&json!({
                "name": format!("m{i}"), "source": {"type": "image", "reference": image},
                "resources": {"memoryMb": 256, "cpus": 1},
            }))
            .send()
            .await
            .unwrap();
        let v = support::json_ok(r, StatusCode::CREATED).await;
        let id = v["id"].as_str().unwrap().to_string();
        let node = db.machine_node(&id).await.unwrap().unwrap().id;
        placed.entry(node).or_default().push(id);
    }
    let counts: Vec<usize> = node_ids
        .iter()
        .map(|n| placed.get(n).map_or(0, Vec::len) + usize::from(*n == node_ids[2]))
        .collect();
    assert_eq!(counts, [2, 2, 2], "{placed:?}");
    for (k, n) in node_ids.iter().enumerate() {
        let vms = common::qemu_processes_in(&dir.path().join(format!("n{k}")));
        assert_eq!(vms, 2, "node {n}");
    }
    assert_eq!(common::qemu_processes_in(&dir.path().join("c0")), 0);
    assert_eq!(common::qemu_processes_in(&dir.path().join("c1")), 0);
    // every machine answers exec through both replicas, from its own node's engine
    for ids in placed.values() {
        for id in ids {
            for api in &apis {
                let out = exec(api.clone(), id.clone(), "hostname").await;
                assert_eq!(out["exitCode"], 0, "{out}");
            }
        }
    }

    // node 0 partitioned: lost; its machines unready through both replicas, a delete waits
    let (lost_node, lost_ids) = (&node_ids[0], placed[&node_ids[0]].clone());
    hosts.partition(0, true);
    await_state(&db, lost_node, "lost").await;
    for api in &apis {
        let v = until(&c, &m(api, &lost_ids[0], ""), &key, |v| v["ready"] == false).await;
        let why = v["errorReason"].as_str().unwrap_or_default();
        assert!(why.contains(lost_node.as_str()), "{v}");
        let r = c
            .post(m(api, &lost_ids[0], "/exec"))
            .bearer_auth(&key)
            .json(&json!({"command": ["true"]}))
            .send()
            .await
            .unwrap();
        let p = support::problem(r, StatusCode::SERVICE_UNAVAILABLE, "smolvm_error").await;
        assert_eq!(p["retryable"], true, "{p}");
    }
    let r = c
        .delete(m(&api0, &lost_ids[1], ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let v = support::json_ok(r, StatusCode::ACCEPTED).await;
    assert_eq!(v["state"], "deleting", "{v}");
    // the other nodes' machines go on, and new creates avoid the lost node
    for n in &node_ids[1..] {
        let out = exec(api1.clone(), placed[n][0].clone(), "true").await;
        assert_eq!(out["exitCode"], 0, "{out}");
    }
    let r = c
        .post(format!("{api0}/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({
            "name": "late", "source": {"type": "image", "reference": image},
            "resources": {"memoryMb": 256, "cpus": 1},
        }))
        .send()
        .await
        .unwrap();
    let late = support::json_ok(r, StatusCode::CREATED).await;
    let late_node = db
        .machine_node(late["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap()
        .id;
    assert_ne!(&late_node, lost_node);

    // healed: the node is ready with no restart, the waiting delete runs, the other machine
    // on it answers again
    hosts.partition(0, false);
    await_state(&db, lost_node, "ready").await;
    until(&c, &m(&api1, &lost_ids[1], ""), &key, |v| {
        v["code"] == "not_found" || v["status"] == 404
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::qemu_processes_in(&dir.path().join("n0")) > 1 {
        assert!(Instant::now() < deadline, "the waiting delete left its VM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = until(&c, &m(&api0, &lost_ids[0], ""), &key, |v| {
        v["ready"] == true
    })
    .await;
    assert_eq!(v["state"], "running", "{v}");
    let out = exec(api0.clone(), lost_ids[0].clone(), "true").await;
    assert_eq!(out["exitCode"], 0, "{out}");

    // lifetimes with two sweepers: a machine in use through replica 1 (a streamed exec
    // longer than its autoStopSeconds) is not stopped by replica 0's sweeper, which reads
    // its activity from the store; idle, it is stopped; a TTL deletes a machine once
    let mk = |name: &'static str, extra: Value| {
        let (c, key, api, image) = (c.clone(), key.clone(), api0.clone(), image.clone());
        async move {
            let mut body = json!({
                "name": name, "source": {"type": "image", "reference": image},
                "resources": {"memoryMb": 256, "cpus": 1},
            });
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = c
                .post(format!("{api}/v1/machines"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let v = support::json_ok(r, StatusCode::CREATED).await;
            v["id"].as_str().unwrap().to_string()
        }
    };
    let busy_id = mk("busy", json!({"autoStopSeconds": 2})).await;
    let ttl_id = mk("short", json!({"ttlSeconds": 3})).await;
    let r = c
        .post(m(&api1, &busy_id, "/exec/stream"))
        .bearer_auth(&key)
        .json(&json!({"command": ["sh", "-c", "sleep 6; echo done"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sse = r.text().await.unwrap();
    assert!(
        sse.contains("done") && sse.contains("\"exitCode\":0"),
        "{sse}"
    );
    let v: Value = c
        .get(m(&api0, &busy_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["state"], "running", "stopped while in use: {v}");
    until(&c, &m(&api1, &busy_id, ""), &key, |v| {
        v["state"] == "stopped"
    })
    .await;
    until(&c, &m(&api0, &ttl_id, ""), &key, |v| v["status"] == 404).await;
    let r = c
        .delete(m(&api0, &busy_id, ""))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // every machine deleted through one replica or the other: no VM left on any host
    let list: Value = c
        .get(format!("{api0}/v1/machines"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (i, mach) in list.as_array().unwrap().iter().enumerate() {
        let r = c
            .delete(m(&apis[i % 2], mach["id"].as_str().unwrap(), ""))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{mach}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|k| common::qemu_processes_in(&dir.path().join(format!("n{k}"))) > 0) {
        assert!(Instant::now() < deadline, "VMs outlived their deletes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in db.nodes().await.unwrap() {
        assert_eq!((n.reserved_mib, n.reserved_cpus), (0, 0), "{n:?}");
    }
    drop(nodes);
    drop((r0, r1));
}
