//! Nodes of a multi-host fleet, as real processes on 127.0.0.1 over a real PostgreSQL
//! (`testing::pg`): `smolfleet init` makes the CA, `node join-token` a one-time token, a
//! control replica (`serve --role control,edge --db postgres://… --node-listen`) signs the CSR
//! of a joining `smolfleet node`, which then renews its lease over mutual TLS only. A reused
//! token is refused, a client without a certificate (or with one of another CA) is refused;
//! with the replica it joined through killed, the node renews through a second replica; a node
//! killed with SIGKILL becomes suspect (no placement) then lost, and comes back ready when
//! restarted over its home (no token needed again). Every wait is bounded.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use smol_fleet::placement::{Need, Placed};
use smol_fleet::testing::pg;
use smol_fleet::{store, Db};
use support::{await_node_state as await_state, machine_row as machine};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_smolfleet");
/// The most any one wait takes.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `smolfleet ARGS` to its end; its stdout (it must succeed).
async fn admin(args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, Command::new(BIN).args(args).output())
        .await
        .expect("the admin command ends")
        .expect("smolfleet runs");
    assert!(
        out.status.success(),
        "smolfleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `smolfleet ARGS`, which must fail; its stderr.
async fn admin_fails(args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, Command::new(BIN).args(args).output())
        .await
        .expect("the admin command ends")
        .expect("smolfleet runs");
    assert!(!out.status.success(), "smolfleet {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// A running `smolfleet`, its stdout lines and its stderr in a file.
struct Proc {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: std::path::PathBuf,
}

fn spawn(args: &[&str], stderr: &Path) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("smolfleet starts");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut out = BufReader::new(out).lines();
        while let Ok(Some(l)) = out.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Proc {
        child,
        lines,
        stderr: stderr.to_path_buf(),
    }
}

impl Proc {
    /// The first stdout line starting with `prefix`.
    async fn line(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(l) = self.lines.recv().await {
                if l.starts_with(prefix) {
                    return Some(l);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            _ => panic!(
                "no line {prefix:?}; stderr: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
        }
    }
}

/// When node `id`'s lease ends (database clock, ms).
async fn lease_of(db: &Db, id: &str) -> i64 {
    let nodes = db.node_status().await.unwrap();
    let n = nodes.iter().find(|n| n.node.id == id).unwrap();
    n.lease_until.expect("a joined node has a lease")
}

/// `node node-… of https://…; health on http://ADDR/health` as (node id, health URL).
fn node_line(l: &str) -> (String, String) {
    let id = l.split_whitespace().nth(1).unwrap().to_string();
    let health = l.rsplit(' ').next().unwrap().to_string();
    assert!(
        id.starts_with("node-") && health.starts_with("http://127.0.0.1:"),
        "{l}"
    );
    (id, health)
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_join_once_renew_over_mutual_tls_and_are_suspect_then_lost_when_killed() {
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database("fleet_nodes")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
    let ctl = p("control");

    let made = admin(&["init", "--db", &url, "--home", &ctl]).await;
    assert!(
        made.starts_with("fleet CA made; fingerprint sha256:"),
        "{made}"
    );
    let fp = made.trim().rsplit(':').next().unwrap().to_string();
    let again = admin(&["init", "--db", &url, "--home", &ctl]).await;
    assert_eq!(
        again.trim(),
        format!("fleet CA already made; fingerprint sha256:{fp}")
    );
    let token = admin(&["node", "join-token", "--db", &url, "--home", &ctl]).await;
    let token = token.lines().last().unwrap().to_string();
    assert!(
        token.starts_with("smoljoin_") && token.ends_with(&fp),
        "{token}"
    );

    let replica = |home: &str, err: &str| {
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
                "--node-lease",
                "1s",
                "--node-lost-after",
                "2s",
            ],
            &dir.path().join(err),
        )
    };
    // two control replicas over the one store
    let mut control = replica("control", "control.err");
    let door = control.line("node door on ").await;
    let door = door.trim_start_matches("node door on ").to_string();
    let api = control.line("listening on ").await;
    let api = api.trim_start_matches("listening on ").to_string();
    let mut control_b = replica("control-b", "control-b.err");
    let door_b = control_b.line("node door on ").await;
    let door_b = door_b.trim_start_matches("node door on ").to_string();
    let doors = format!("{door},{door_b}");

    let node_args = |home: &str, token: Option<&str>| {
        let mut a = vec![
            "node".to_string(),
            "--control".into(),
            doors.clone(),
            "--home".into(),
            p(home),
            "--name".into(),
            format!("host-{home}"),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--memory-mib".into(),
            "4096".into(),
            "--cpus".into(),
            "4".into(),
        ];
        if let Some(t) = token {
            a.extend(["--token".to_string(), t.to_string()]);
        }
        a
    };
    let spawn_node = |home: &str, token: Option<&str>, err: &str| {
        let args = node_args(home, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(&args, &dir.path().join(err))
    };

    // join
    let mut a = spawn_node("a", Some(&token), "a.err");
    let (id, health) = node_line(&a.line("node node-").await);
    let db = store::open(&url).await.unwrap();
    await_state(&db, &id, "ready").await;
    for f in ["node.key", "node.crt", "ca.crt", "node.json"] {
        assert!(dir.path().join("a").join(f).exists(), "{f}");
    }
    let http = reqwest::Client::new();
    let h: serde_json::Value = http
        .get(&health)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["nodeId"], id.as_str(), "{h}");
    // the replica's /health counts it: its own engine and the node that joined
    let h: serde_json::Value = http
        .get(format!("{api}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&h["nodesTotal"], &h["nodesReady"]),
        (&2.into(), &2.into()),
        "{h}"
    );
    // the node's own door answers health routes only
    let other = health.replace("/health", "/v1/machines");
    let r = http.get(&other).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);

    // the token again, from another host: refused, and nothing is issued
    let mut b = spawn_node("b", Some(&token), "b.err");
    let status = tokio::time::timeout(WAIT, b.child.wait())
        .await
        .expect("the refused node exits")
        .unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.path().join("b.err")).unwrap();
    assert!(err.contains("join token refused"), "{err}");
    assert!(!dir.path().join("b").join("node.crt").exists());
    assert_eq!(db.node_status().await.unwrap().len(), 1);

    // a token past its expiry (by the database's clock) is refused too
    let short = admin(&[
        "node",
        "join-token",
        "--ttl",
        "100ms",
        "--db",
        &url,
        "--home",
        &ctl,
    ])
    .await;
    let short = short.lines().last().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut e = spawn_node("e", Some(&short), "e.err");
    let status = tokio::time::timeout(WAIT, e.child.wait())
        .await
        .expect("the refused node exits")
        .unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.path().join("e.err")).unwrap();
    assert!(err.contains("join token refused"), "{err}");
    assert_eq!(db.node_status().await.unwrap().len(), 1);

    // a client without a node certificate: 401; with one of another CA: no handshake
    let ca = std::fs::read(dir.path().join("a").join("ca.crt")).unwrap();
    let beat = serde_json::json!({"memoryMib": 1, "cpus": 1});
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let r = anonymous
        .post(format!("{door}/fleet/v1/heartbeat"))
        .json(&beat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let stranger = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    };
    let r = stranger
        .post(format!("{door}/fleet/v1/heartbeat"))
        .json(&beat)
        .send()
        .await;
    assert!(r.is_err(), "a certificate of another CA was served: {r:?}");
    // nor may a node join without a token of this CA
    let r = anonymous
        .post(format!("{door}/fleet/v1/join"))
        .json(
            &serde_json::json!({"token": "smoljoin_x", "csr": "", "name": "x",
                                  "memoryMib": 1, "cpus": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);

    // the replica the node joined through dies: its lease is renewed through the other
    control.child.start_kill().unwrap();
    control.child.wait().await.unwrap();
    let before = lease_of(&db, &id).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while lease_of(&db, &id).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was not renewed through the second replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9: suspect (no placement), then lost
    let tenant = db.create_tenant("t").await.unwrap();
    let need = Need {
        memory_mib: 512,
        cpus: 1,
    };
    assert!(matches!(
        db.reserve(&machine("mach-1", &tenant), need).await.unwrap(),
        Placed::Placed { node_id, .. } if node_id == id
    ));
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    await_state(&db, &id, "suspect").await;
    assert_eq!(
        db.reserve(&machine("mach-2", &tenant), need).await.unwrap(),
        Placed::NoCapacity,
        "a node whose lease lapsed gets no placement"
    );
    await_state(&db, &id, "lost").await;
    assert!(http.get(&health).send().await.is_err(), "the node is gone");

    // restarted over its home: the same node, no token, ready again and placeable
    let mut a2 = spawn_node("a", None, "a2.err");
    let (id2, _) = node_line(&a2.line("node node-").await);
    assert_eq!(id2, id);
    await_state(&db, &id, "ready").await;
    assert!(matches!(
        db.reserve(&machine("mach-2", &tenant), need).await.unwrap(),
        Placed::Placed { node_id, .. } if node_id == id
    ));
    let listed = admin(&["node", "list", "--db", &url, "--home", &ctl]).await;
    assert!(
        listed.contains(&format!("{id}  ready  host-a  1024/4096 MiB")),
        "{listed}"
    );
    // cordoned: still renewing, no placement; uncordoned: placeable again
    let said = admin(&["node", "cordon", &id, "--db", &url, "--home", &ctl]).await;
    assert_eq!(said.trim(), format!("{id} cordoned"));
    await_state(&db, &id, "cordoned").await;
    assert_eq!(
        db.reserve(&machine("mach-3", &tenant), need).await.unwrap(),
        Placed::NoCapacity
    );
    admin(&["node", "uncordon", &id, "--db", &url, "--home", &ctl]).await;
    await_state(&db, &id, "ready").await;
    assert!(matches!(
        db.reserve(&machine("mach-3", &tenant), need).await.unwrap(),
        Placed::Placed { .. }
    ));

    // removed: refused while machines are placed on it; a node without is removed, and its
    // agent, now refused, stops
    let err = admin_fails(&["node", "remove", &id, "--db", &url, "--home", &ctl]).await;
    assert!(err.contains("has 3 machine(s) placed on it"), "{err}");
    let token2 = admin(&["node", "join-token", "--db", &url, "--home", &ctl]).await;
    let token2 = token2.lines().last().unwrap().to_string();
    let mut c = spawn_node("c", Some(&token2), "c.err");
    let (id_c, _) = node_line(&c.line("node node-").await);
    assert_ne!(id_c, id);
    await_state(&db, &id_c, "ready").await;
    let said = admin(&["node", "remove", &id_c, "--db", &url, "--home", &ctl]).await;
    assert_eq!(said.trim(), format!("{id_c} removed"));
    let status = tokio::time::timeout(WAIT, c.child.wait())
        .await
        .expect("the removed node's agent stops")
        .unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.path().join("c.err")).unwrap();
    assert!(err.contains("no node holds this certificate"), "{err}");
    assert!(db
        .node_status()
        .await
        .unwrap()
        .iter()
        .all(|n| n.node.id != id_c));
    drop(a2);
    drop(control_b);
}

/// Not a check: the cost of a heartbeat (a new mutual-TLS connection, the lease renewed in
/// PostgreSQL) ÷ a refused one (a new TLS connection without a client certificate, 401, no
/// store call), medians of 200 each, interleaved, same run:
/// `cargo test --release -p smol-fleet --test fleet_nodes measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_heartbeat_vs_refused_request() {
    use smol_fleet::nodeagent::{self, Beat, Membership, NodeConfig};
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database("fleet_nodes_measure")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
    let ctl = p("control");
    let made = admin(&["init", "--db", &url, "--home", &ctl]).await;
    let fp = made.trim().rsplit(':').next().unwrap().to_string();
    let token = admin(&["node", "join-token", "--db", &url, "--home", &ctl]).await;
    let token = token.lines().last().unwrap().to_string();
    let mut control = spawn(
        &[
            "serve",
            "--role",
            "control,edge",
            "--db",
            &url,
            "--home",
            &ctl,
            "--listen",
            "127.0.0.1:0",
            "--node-listen",
            "127.0.0.1:0",
        ],
        &dir.path().join("control.err"),
    );
    let door = control.line("node door on ").await;
    let door = door.trim_start_matches("node door on ").to_string();
    let cfg = NodeConfig {
        home: dir.path().join("node"),
        name: "bench".into(),
        memory_mib: 1024,
        cpus: 1,
    };
    let m: Membership = nodeagent::join(&cfg, std::slice::from_ref(&door), Some(&token))
        .await
        .unwrap();
    let mtls = nodeagent::client_config(&cfg.home).unwrap();
    let anonymous = smol_fleet::fleetca::join_client_config(&fp).unwrap();
    let (mut beats, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = std::time::Instant::now();
        let (_, b) = nodeagent::heartbeat(&mtls, &m, 0, &cfg).await.unwrap();
        beats.push(t.elapsed());
        assert!(matches!(b, Beat::Renewed(_)), "{b:?}");
        let t = std::time::Instant::now();
        let (_, b) = nodeagent::heartbeat(&anonymous, &m, 0, &cfg).await.unwrap();
        refused.push(t.elapsed());
        assert!(matches!(b, Beat::Refused(_)), "{b:?}");
    }
    beats.sort();
    refused.sort();
    let (b, r) = (beats[100], refused[100]);
    println!(
        "heartbeat (mTLS + lease in PostgreSQL) / refused (TLS, 401): {:.2}x ({b:?} vs {r:?}, medians of 200)",
        b.as_secs_f64() / r.as_secs_f64()
    );
}
