//! Node certificates expire and are renewed (issue 15: certificate rotation): a replica
//! signing certificates valid 6 s (`--node-cert-validity`), a node that renews its own past
//! two thirds of that over mutual TLS, again and again, staying ready past the first one's
//! expiry; the certificate it renewed is refused at once (403), an expired one at the
//! handshake; the node's API serves the renewed certificate without a restart. Real processes
//! on 127.0.0.1 over a real PostgreSQL (`testing::pg`); no VM. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use smol_fleet::nodeagent::{self, Beat, Membership, NodeConfig};
use smol_fleet::testing::pg;
use smol_fleet::{fleetca, store};
use support::await_node_state as await_state;
use support::procs::{admin, admin_fails, node_line, spawn};

fn fingerprint_of(path: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(path).unwrap();
    fleetca::fingerprint(&fleetca::first_cert(&pem).unwrap())
}

/// Waits (bounded) until `path` holds a certificate other than `was`; its fingerprint.
/// Now, Unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sleeps until Unix second `at` has passed.
async fn sleep_past(at: i64) {
    let now = unix_now();
    if now <= at {
        tokio::time::sleep(Duration::from_secs((at - now + 1) as u64)).await;
    }
}

async fn renewed_from(path: &std::path::Path, was: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = fingerprint_of(path);
        if now != was {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the certificate was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fingerprint of the certificate the node's API at `addr` serves, reached as a control
/// replica (a client certificate of the fleet CA with the control subject).
async fn served_by(addr: &str, ca: &fleetca::FleetCa, node_id: &str) -> String {
    let config = ca.control_client_config().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(node_id.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("the node's API handshakes with a control certificate");
    let (_, conn) = tls.get_ref();
    fleetca::fingerprint(&conn.peer_certificates().unwrap()[0])
}

#[tokio::test(flavor = "multi_thread")]
async fn node_certificates_expire_and_are_renewed_in_place() {
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database("fleet_certs")
        .await
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("sfc")
        .tempdir_in("/tmp")
        .unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
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
            "--node-lease",
            "1s",
            "--node-lost-after",
            "2s",
            "--node-cert-validity",
            "6s",
        ],
        &dir.path().join("c.err"),
    );
    let door = control.line("node door on ").await;
    let door = door.trim_start_matches("node door on ").to_string();
    let home = dir.path().join("n");
    let mut node = spawn(
        &[
            "node",
            "--control",
            &door,
            "--token",
            &token,
            "--home",
            &p("n"),
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ],
        &dir.path().join("n.err"),
    );
    let api = node.line("node API on https://").await;
    let api = api
        .trim_start_matches("node API on https://")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (node_id, _) = node_line(&node.line("node node-").await);
    let db = store::open(&url).await.unwrap();
    await_state(&db, &node_id, "ready").await;
    let ca = smol_fleet::nodedoor::load_ca(&db).await.unwrap();

    // the first certificate: valid 6 s (from 5 minutes back, for clocks that differ)
    let crt = home.join("node.crt");
    let first_pem = std::fs::read_to_string(&crt).unwrap();
    let first_key = std::fs::read_to_string(home.join("node.key")).unwrap();
    let (signed, expires) = fleetca::cert_validity(&first_pem).unwrap();
    assert!(
        (5..=7).contains(&(expires - signed)),
        "{signed} .. {expires}"
    );
    let first = fingerprint_of(&crt);
    assert_eq!(served_by(&api, &ca, &node_id).await, first);

    // renewed past two thirds of its life; the one renewed is refused at once
    let second = renewed_from(&crt, &first).await;
    let old = fleetca::node_client_config(
        &std::fs::read_to_string(home.join("ca.crt")).unwrap(),
        &first_pem,
        &first_key,
    )
    .unwrap();
    let m: Membership =
        serde_json::from_str(&std::fs::read_to_string(home.join("node.json")).unwrap()).unwrap();
    let cfg = NodeConfig {
        api_url: None,
        home: home.clone(),
        name: "old".into(),
        memory_mib: 1,
        cpus: 1,
        orphan_grace: smol_fleet::reconcile::DEFAULT_GRACE,
        cordon_after_failed_boots: 0,
        labels: Default::default(),
    };
    match nodeagent::heartbeat(&old, &m, 0, &cfg, None, None).await {
        Ok((_, Beat::Refused(e))) => {
            assert!(e.to_string().contains("no node holds"), "{e}")
        }
        Ok((_, Beat::Renewed(r))) => panic!("the renewed certificate still renews: {r:?}"),
        // the old one expired already on a slow host: refused at the handshake
        Err(e) => {
            assert!(
                unix_now() >= expires,
                "refused before it expired, and not by the store: {e}"
            );
        }
    }
    // the node's API serves the new one without a restart (or a newer one still)
    let served = served_by(&api, &ca, &node_id).await;
    assert!(
        served == second || served == fingerprint_of(&crt),
        "{served}"
    );
    assert_ne!(served, first);

    // again and again: past the first one's expiry the node is ready, renewing its lease
    let third = renewed_from(&crt, &second).await;
    assert_ne!(third, first);
    sleep_past(expires).await;
    let before = db.node_status().await.unwrap()[0].lease_until.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let nodes = db.node_status().await.unwrap();
    assert_eq!(nodes[0].shown_state(), "ready", "{nodes:?}");
    assert!(nodes[0].lease_until.unwrap() > before, "{nodes:?}");
    // an expired certificate is refused at the handshake
    let late = nodeagent::heartbeat(&old, &m, 0, &cfg, None, None).await;
    assert!(late.is_err(), "an expired certificate was taken: {late:?}");

    // a node away for longer than its certificate's life stops at its start, saying how to
    // join again (a typed error, `FleetError::NodeCertExpired`)
    node.child.kill().await.unwrap();
    let (_, last) = fleetca::cert_validity(&std::fs::read_to_string(&crt).unwrap()).unwrap();
    sleep_past(last).await;
    let said = admin_fails(&[
        "node",
        "--control",
        &door,
        "--home",
        &p("n"),
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
    ])
    .await;
    assert!(
        said.contains("the node certificate expired") && said.contains("join again"),
        "{said}"
    );
    drop(control);
}
