//! A node on a host of its own: `smolfleet node` in a network namespace of this test's
//! (a veth pair to this host, its own loopback: it cannot reach the PostgreSQL of the test,
//! which listens on this host's 127.0.0.1, nor needs to), joined to a control replica whose
//! node door listens on the veth's host side. A partition (an nft rule in the node's namespace
//! dropping what it sends to the control replica) makes it suspect (no placement), then lost;
//! healed (the rule deleted), it is ready again with no restart. Needs root (`ip netns`,
//! `nft`); elsewhere it says so and passes nothing. Every wait is bounded.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use smol_fleet::placement::{Need, Placed};
use smol_fleet::store;
use smol_fleet::testing::pg;
use support::procs::sh;
use support::{await_node_state as await_state, machine_row as machine};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_smolfleet");
const WAIT: Duration = Duration::from_secs(60);

/// The test's namespace and veth pair, removed when dropped.
struct Netns {
    name: String,
    host_if: String,
    /// The host side's address (the node door listens there).
    host_ip: String,
}

impl Netns {
    /// A namespace with `lo` up and a veth pair: the host's side `10.254.N.1/30`, the
    /// namespace's `10.254.N.2/30`. None where namespaces cannot be made.
    fn make() -> Option<Netns> {
        let pid = std::process::id();
        let n = pid % 250;
        let ns = Netns {
            name: format!("smolft{pid}"),
            host_if: format!("sfv{pid}a"),
            host_ip: format!("10.254.{n}.1"),
        };
        let peer = format!("sfv{pid}b");
        let ns_ip = format!("10.254.{n}.2/30");
        let host_cidr = format!("{}/30", ns.host_ip);
        if !sh("ip", &["netns", "add", &ns.name]) {
            return None;
        }
        let ok = sh(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        ) && sh("ip", &["link", "set", &peer, "netns", &ns.name])
            && sh("ip", &["addr", "add", &host_cidr, "dev", &ns.host_if])
            && sh("ip", &["link", "set", &ns.host_if, "up"])
            && ns.exec_ok(&["ip", "addr", "add", &ns_ip, "dev", &peer])
            && ns.exec_ok(&["ip", "link", "set", &peer, "up"])
            && ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    fn exec_ok(&self, cmd: &[&str]) -> bool {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        sh("ip", &args)
    }

    /// Drops what the namespace sends to the host side (a partition), or lets it go again.
    fn partition(&self, on: bool) {
        let ok = if on {
            self.exec_ok(&["nft", "add", "table", "inet", "smolft"])
                && self.exec_ok(&[
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "smolft",
                    "out",
                    "{ type filter hook output priority 0; policy accept; }",
                ])
                && self.exec_ok(&[
                    "nft",
                    "add",
                    "rule",
                    "inet",
                    "smolft",
                    "out",
                    "ip",
                    "daddr",
                    &self.host_ip,
                    "drop",
                ])
        } else {
            self.exec_ok(&["nft", "delete", "table", "inet", "smolft"])
        };
        assert!(ok, "nft in the namespace");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // the namespace's end of the pair goes with it, and the host's end with that
        let _ = sh("ip", &["netns", "del", &self.name]);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

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

/// Spawns `program ARGS` (stderr to `err`); the child and its first stdout line starting with
/// `prefix`.
async fn spawn_until(
    program: &str,
    args: &[&str],
    err: &Path,
    prefix: &str,
) -> (tokio::process::Child, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(err).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("it starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with(prefix) {
                return Some(l);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "no line {prefix:?} from {args:?}; stderr: {}",
            std::fs::read_to_string(err).unwrap_or_default()
        )
    });
    // keep reading so the child never blocks on a full pipe
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_in_its_own_namespace_joins_and_a_partition_makes_it_suspect_lost_then_ready() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let Some(ns) = Netns::make() else {
        eprintln!("skipped: cannot make a network namespace here (see above)");
        return;
    };
    let url = pg::shared()
        .expect("PostgreSQL starts")
        .database("fleet_netns")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _reaper = support::procs::QemuReaper(dir.path().to_path_buf());
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
    let ctl = p("control");
    admin(&["init", "--db", &url, "--home", &ctl]).await;
    let token = admin(&["node", "join-token", "--db", &url, "--home", &ctl]).await;
    let token = token.lines().last().unwrap().to_string();

    let node_listen = format!("{}:0", ns.host_ip);
    let (_control, door) = spawn_until(
        BIN,
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
            &node_listen,
            "--node-san",
            &ns.host_ip,
            "--node-lease",
            "1s",
            "--node-lost-after",
            "2s",
        ],
        &dir.path().join("control.err"),
        "node door on ",
    )
    .await;
    let door = door.trim_start_matches("node door on ").to_string();
    assert!(
        door.starts_with(&format!("https://{}:", ns.host_ip)),
        "{door}"
    );

    let home = p("node");
    let (_node, line) = spawn_until(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            BIN,
            "node",
            "--control",
            &door,
            "--token",
            &token,
            "--home",
            &home,
            "--name",
            "ns-host",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--memory-mib",
            "2048",
            "--cpus",
            "2",
        ],
        &dir.path().join("node.err"),
        "node node-",
    )
    .await;
    let id = line.split_whitespace().nth(1).unwrap().to_string();
    let db = store::open(&url).await.unwrap();
    await_state(&db, &id, "ready").await;

    // partitioned: suspect (no placement), then lost
    let tenant = db.create_tenant("t").await.unwrap();
    let need = Need {
        memory_mib: 256,
        cpus: 1,
    };
    ns.partition(true);
    await_state(&db, &id, "suspect").await;
    assert_eq!(
        db.reserve(&machine("mach-1", &tenant), need).await.unwrap(),
        Placed::NoCapacity
    );
    await_state(&db, &id, "lost").await;

    // healed: the same process renews its lease; ready and placeable
    ns.partition(false);
    await_state(&db, &id, "ready").await;
    assert!(matches!(
        db.reserve(&machine("mach-1", &tenant), need).await.unwrap(),
        Placed::Placed { node_id, .. } if node_id == id
    ));
}
