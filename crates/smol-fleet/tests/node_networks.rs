//! The fleet denies its node's own private networks to every machine (issue 14: "always denied
//! ... on the fleet the private ranges of the node's own networks"), with real VMs: a service on
//! a private address of this host is reached by a machine of a plain engine (the path works)
//! and refused to a machine of `smolfleet serve` whose egress is open.

mod child;
#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::io::Write;
use std::net::{IpAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;

use child::{unpooled, with_server};
use smolmachines::local::egress::{node, Cidr};
use smolmachines::MachineBackend;
use support::json_ok;

const REPLY: &str = "node-service";

/// A TCP service on `ip` answering [`REPLY`] to each connection; its port and a count of the
/// connections it accepted.
fn service(ip: IpAddr) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).expect("bind the node service");
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            n.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(format!("{REPLY}\n").as_bytes());
        }
    });
    (port, accepted)
}

fn probe(ip: IpAddr, port: u16) -> String {
    format!("sleep 1 | timeout 20 nc -w 5 {ip} {port}; echo rc=$?")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_machine_never_reaches_the_nodes_own_private_networks() {
    if common::vm_assets().is_none() {
        return;
    }
    // a private IPv4 address of this host (the service listens there, not on the loopback,
    // which every engine denies anyway)
    let Some(ip) = node::interface_addresses()
        .into_iter()
        .map(|(ip, _)| ip)
        .find(|ip| ip.is_ipv4() && node::is_private(*ip))
    else {
        eprintln!("this host has no private IPv4 address: skipped");
        return;
    };
    let nets = node::node_private_networks();
    assert!(
        nets.iter()
            .any(|n| n.contains('/') && Cidr::parse(n).is_some_and(|c| c.contains(ip))),
        "{ip} is not in the node's networks {nets:?}"
    );
    let (port, accepted) = service(ip);

    // the control: a plain engine's machine with open egress reaches it
    let (engine, _dir) = common::engine().expect("assets");
    let mut c = common::config(Some("control"));
    c.network = Some(true);
    let m = engine.create_machine(c).await.unwrap();
    let r = common::run(&m, &probe(ip, port)).await;
    assert_eq!(
        r.stdout.lines().next(),
        Some(REPLY),
        "without the fleet a guest reaches {ip}:{port}: {r:?}"
    );
    m.delete().await.unwrap();
    let before = accepted.load(Ordering::SeqCst);
    assert!(before >= 1);

    // the fleet: open egress, and the node's network refused
    let image = common_registry::shared().reference("test/busybox:latest");
    with_server("smnn", move |srv| async move {
        let c = unpooled();
        let r = c
            .post(srv.url("/v1/machines"))
            .bearer_auth(&srv.key)
            .json(&json!({
                "source": {"type": "image", "reference": image},
                "network": {"mode": "open"},
            }))
            .send()
            .await
            .expect("create");
        let v = json_ok(r, StatusCode::CREATED).await;
        let id = v["id"].as_str().unwrap().to_string();
        // it has a network ...
        let addr = srv.run(&c, &id, "ip -4 addr show eth0").await;
        assert!(addr.contains("10.0.2.15"), "{addr}");
        // ... and the node's own network is not on it
        let out = srv.run(&c, &id, &probe(ip, port)).await;
        assert!(
            !out.contains(REPLY),
            "a fleet machine reached {ip}:{port}: {out}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            before,
            "the node service saw a connection from the fleet's machine"
        );
    })
    .await;
}
