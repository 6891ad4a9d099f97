//! The store conformance suite: one set of cases, run against both stores — SQLite (a file in a
//! temporary directory) and PostgreSQL (a cluster of this test's own, `testing::pg`, one
//! database per case) — covering every operation the server performs. Then the fleet over a
//! PostgreSQL that stops: requests are 503 retryable, and it recovers when the cluster is back.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use reqwest::StatusCode;
use serde_json::Value;
use smol_fleet::nodes::{Joining, Lease, Removed};
use smol_fleet::placement::{Need, NodeRow, Placed};
use smol_fleet::testing::pg::PgCluster;
use smol_fleet::{keys, store, CheckpointDeleted, CheckpointRow, Db, MachineRow, Restored};

type Case = fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every case, by name; each gets the URL of an empty store and may open it again.
const CASES: &[(&str, Case)] = &[
    ("bootstrap_once", |u| Box::pin(bootstrap_once(u))),
    ("keys_hashed_found_revoked", |u| {
        Box::pin(keys_hashed_found_revoked(u))
    }),
    ("machines_per_tenant", |u| Box::pin(machines_per_tenant(u))),
    ("machine_lifetimes", |u| Box::pin(machine_lifetimes(u))),
    ("checkpoints", |u| Box::pin(checkpoints(u))),
    ("concurrent_names", |u| Box::pin(concurrent_names(u))),
    ("reopened", |u| Box::pin(reopened(u))),
    ("placement_and_operations", |u| {
        Box::pin(placement_and_operations(u))
    }),
    ("concurrent_placements", |u| {
        Box::pin(concurrent_placements(u))
    }),
    ("concurrent_deletes_release_once", |u| {
        Box::pin(concurrent_deletes_release_once(u))
    }),
    ("join_tokens_and_leases", |u| {
        Box::pin(join_tokens_and_leases(u))
    }),
];

async fn open(url: &str) -> Db {
    store::open(url).await.expect("the store opens")
}

fn machine(id: &str, tenant: &str, name: &str) -> MachineRow {
    MachineRow {
        id: id.into(),
        tenant_id: tenant.into(),
        name: name.into(),
        engine_name: format!("e-{id}"),
        spec: format!("{{\"name\":\"{name}\"}}"),
        created_at: 0,
        auto_stop_seconds: None,
        ttl_seconds: None,
        expires_at: None,
        ephemeral: false,
        last_activity_at: None,
    }
}

async fn bootstrap_once(url: String) {
    let db = open(&url).await;
    assert!(!db.has_tenants().await.unwrap());
    let key = db
        .bootstrap("default", "admin")
        .await
        .unwrap()
        .expect("a key");
    assert!(keys::well_formed(&key));
    assert!(db.has_tenants().await.unwrap());
    // a second server over the same store makes nothing
    let again = open(&url).await;
    assert_eq!(again.bootstrap("default", "admin").await.unwrap(), None);
    let found = again.key_of_hash(&keys::hash(&key)).await.unwrap().unwrap();
    assert_eq!(found.scopes, "admin");
    assert!(again.tenant_exists(&found.tenant_id).await.unwrap());
    assert_eq!(again.list_keys().await.unwrap().len(), 1);
}

async fn keys_hashed_found_revoked(url: String) {
    let db = open(&url).await;
    let t = db.create_tenant("a").await.unwrap();
    assert!(t.starts_with("ten-"));
    assert!(db.tenant_exists(&t).await.unwrap());
    assert!(!db.tenant_exists("ten-0000000000000000").await.unwrap());
    let (id, key) = db.create_key(&t, "machine:read", Some("ci")).await.unwrap();
    let (id2, key2) = db.create_key(&t, "admin", None).await.unwrap();
    assert_ne!(key, key2);
    let found = db.key_of_hash(&keys::hash(&key)).await.unwrap().unwrap();
    assert_eq!(
        (
            found.id.as_str(),
            found.tenant_id.as_str(),
            found.scopes.as_str()
        ),
        (id.as_str(), t.as_str(), "machine:read")
    );
    assert_eq!(
        db.key_of_hash(&keys::hash("smk_other")).await.unwrap(),
        None
    );
    // the key is not the stored form
    assert_eq!(db.key_of_hash(&key).await.unwrap(), None);
    let listed = db.list_keys().await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.id.as_str()).collect::<HashSet<_>>(),
        HashSet::from([id.as_str(), id2.as_str()])
    );
    for k in &listed {
        assert!(k.prefix.len() < key.len(), "only a prefix is listed");
        assert!(k.created_at > 0);
        assert_eq!(k.revoked_at, None);
    }
    assert!(db.revoke_key(&id).await.unwrap());
    assert!(!db.revoke_key(&id).await.unwrap());
    assert!(!db.revoke_key("key-missing").await.unwrap());
    assert_eq!(db.key_of_hash(&keys::hash(&key)).await.unwrap(), None);
    assert!(db.key_of_hash(&keys::hash(&key2)).await.unwrap().is_some());
    let revoked = db.list_keys().await.unwrap();
    let r = revoked.iter().find(|k| k.id == id).unwrap();
    assert!(r.revoked_at.is_some());
}

async fn machines_per_tenant(url: String) {
    let db = open(&url).await;
    let a = db.create_tenant("a").await.unwrap();
    let b = db.create_tenant("b").await.unwrap();
    assert!(db
        .insert_machine(&machine("mach-1", &a, "web"))
        .await
        .unwrap());
    assert!(!db
        .insert_machine(&machine("mach-2", &a, "web"))
        .await
        .unwrap());
    assert!(db
        .insert_machine(&machine("mach-3", &b, "web"))
        .await
        .unwrap());
    assert!(db
        .insert_machine(&machine("mach-4", &a, "db"))
        .await
        .unwrap());
    // the engine name is unique too
    let mut clash = machine("mach-5", &a, "other");
    clash.engine_name = "e-mach-1".into();
    assert!(!db.insert_machine(&clash).await.unwrap());
    let m1 = db.machine(&a, "mach-1").await.unwrap().unwrap();
    assert_eq!(
        (m1.name.as_str(), m1.engine_name.as_str()),
        ("web", "e-mach-1")
    );
    assert_eq!(m1.spec, "{\"name\":\"web\"}");
    assert!(m1.created_at > 0);
    assert_eq!(
        db.machine(&b, "mach-1").await.unwrap(),
        None,
        "another tenant's"
    );
    let listed: Vec<String> = db
        .machines(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&"mach-1".into()) && listed.contains(&"mach-4".into()));
    assert_eq!(db.machines(&b).await.unwrap().len(), 1);
    assert_eq!(db.all_machines().await.unwrap().len(), 3);
    db.set_machine_spec("mach-1", "{\"ports\":[1]}")
        .await
        .unwrap();
    assert_eq!(
        db.machine(&a, "mach-1").await.unwrap().unwrap().spec,
        "{\"ports\":[1]}"
    );
    db.delete_machine("mach-1").await.unwrap();
    db.delete_machine("mach-1").await.unwrap();
    assert_eq!(db.machine(&a, "mach-1").await.unwrap(), None);
    // the name is free again
    assert!(db
        .insert_machine(&machine("mach-6", &a, "web"))
        .await
        .unwrap());
}

async fn machine_lifetimes(url: String) {
    let db = open(&url).await;
    let t = db.create_tenant("a").await.unwrap();
    assert!(db
        .insert_machine(&machine("mach-plain", &t, "plain"))
        .await
        .unwrap());
    assert!(
        db.swept_machines().await.unwrap().is_empty(),
        "no lifetime: nothing to sweep"
    );
    let mut m = machine("mach-ttl", &t, "ttl");
    m.ttl_seconds = Some(60);
    m.auto_stop_seconds = Some(u64::MAX);
    m.ephemeral = true;
    assert!(db.insert_machine(&m).await.unwrap());
    let stored = db.machine(&t, "mach-ttl").await.unwrap().unwrap();
    assert_eq!(stored.expires_at, Some(stored.created_at + 60));
    assert_eq!(stored.last_activity_at, Some(stored.created_at));
    assert_eq!(stored.ttl_seconds, Some(60));
    assert_eq!(
        stored.auto_stop_seconds,
        Some(i64::MAX as u64),
        "clamped to the column"
    );
    assert!(stored.ephemeral);
    let mut idle = machine("mach-idle", &t, "idle");
    idle.auto_stop_seconds = Some(30);
    assert!(db.insert_machine(&idle).await.unwrap());
    let swept: Vec<String> = db
        .swept_machines()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(swept.len(), 2);
    assert!(!swept.contains(&"mach-plain".to_string()));
    let at = stored.created_at + 7;
    db.set_last_activity(&[("mach-ttl".into(), at), ("mach-gone".into(), at)])
        .await
        .unwrap();
    db.set_last_activity(&[]).await.unwrap();
    let after = db.machine(&t, "mach-ttl").await.unwrap().unwrap();
    assert_eq!(after.last_activity_at, Some(at));
}

fn checkpoint_row(id: &str, tenant: &str) -> CheckpointRow {
    CheckpointRow {
        id: id.into(),
        tenant_id: tenant.into(),
        machine_id: "mach-src".into(),
        spec: "{}".into(),
        status: "ready".into(),
        size_bytes: 1 << 40,
        arch: "x86_64".into(),
        created_at: 0,
        node_id: None,
    }
}

async fn checkpoints(url: String) {
    let db = open(&url).await;
    let a = db.create_tenant("a").await.unwrap();
    let b = db.create_tenant("b").await.unwrap();
    let stored = db
        .insert_checkpoint(&checkpoint_row("ckpt-1", &a))
        .await
        .unwrap();
    assert!(stored.created_at > 0);
    assert_eq!(stored.size_bytes, 1 << 40);
    assert_eq!(
        db.checkpoint(&a, "ckpt-1").await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(db.checkpoint(&b, "ckpt-1").await.unwrap(), None);
    assert_eq!(
        db.checkpoints_of(&a, "mach-src").await.unwrap(),
        vec![stored]
    );
    assert!(db.checkpoints_of(&b, "mach-src").await.unwrap().is_empty());
    assert!(db
        .checkpoints_of(&a, "mach-other")
        .await
        .unwrap()
        .is_empty());
    // another tenant can neither restore nor delete it
    assert_eq!(
        db.insert_restored(&machine("mach-b", &b, "r"), "ckpt-1")
            .await
            .unwrap(),
        Restored::NoCheckpoint
    );
    assert_eq!(db.machine(&b, "mach-b").await.unwrap(), None);
    assert_eq!(
        db.delete_checkpoint(&b, "ckpt-1").await.unwrap(),
        CheckpointDeleted::NotFound
    );
    assert_eq!(
        db.insert_restored(&machine("mach-r", &a, "r"), "ckpt-1")
            .await
            .unwrap(),
        Restored::Reserved
    );
    assert!(db.machine(&a, "mach-r").await.unwrap().is_some());
    // a taken name reserves nothing, and the transaction leaves no link behind
    assert_eq!(
        db.insert_restored(&machine("mach-r2", &a, "r"), "ckpt-1")
            .await
            .unwrap(),
        Restored::NameTaken
    );
    assert_eq!(db.machine(&a, "mach-r2").await.unwrap(), None);
    assert_eq!(
        db.delete_checkpoint(&a, "ckpt-1").await.unwrap(),
        CheckpointDeleted::InUse(vec!["mach-r".into()])
    );
    // deleting the restored machine releases the checkpoint
    db.delete_machine("mach-r").await.unwrap();
    assert_eq!(
        db.delete_checkpoint(&a, "ckpt-1").await.unwrap(),
        CheckpointDeleted::Deleted
    );
    assert_eq!(db.checkpoint(&a, "ckpt-1").await.unwrap(), None);
    assert_eq!(
        db.delete_checkpoint(&a, "ckpt-1").await.unwrap(),
        CheckpointDeleted::NotFound
    );

    // a checkpoint on a node: recorded with it, restored there (reserved and linked in one
    // transaction), never for another tenant
    db.put_node(&node("node-k", "ready", 1024, 4))
        .await
        .unwrap();
    let on_node = CheckpointRow {
        node_id: Some("node-k".into()),
        ..checkpoint_row("ckpt-2", &a)
    };
    db.insert_checkpoint(&on_node).await.unwrap();
    assert_eq!(
        db.checkpoint(&a, "ckpt-2")
            .await
            .unwrap()
            .unwrap()
            .node_id
            .as_deref(),
        Some("node-k")
    );
    assert_eq!(
        db.reserve_restored(&machine("mach-x", &b, "x"), SMALL, "node-k", "ckpt-2")
            .await
            .unwrap(),
        Placed::NoCheckpoint
    );
    assert_eq!(db.machine(&b, "mach-x").await.unwrap(), None);
    assert!(matches!(
        db.reserve_restored(&machine("mach-k", &a, "k"), SMALL, "node-k", "ckpt-2")
            .await
            .unwrap(),
        Placed::Placed { node_id, .. } if node_id == "node-k"
    ));
    assert_eq!(
        db.machine_node("mach-k").await.unwrap().unwrap().id,
        "node-k"
    );
    assert_eq!(
        db.delete_checkpoint(&a, "ckpt-2").await.unwrap(),
        CheckpointDeleted::InUse(vec!["mach-k".into()])
    );
    let n = db.nodes().await.unwrap().remove(0);
    assert_eq!((n.reserved_mib, n.reserved_cpus), (256, 1));
    assert_eq!(db.node_at("node-k").await.unwrap().unwrap().id, "node-k");
    assert_eq!(db.node_at("node-none").await.unwrap(), None);
}

/// Many creates of one name at once (two servers' worth of connections): exactly one wins.
async fn concurrent_names(url: String) {
    let one = open(&url).await;
    let two = open(&url).await;
    let t = one.create_tenant("a").await.unwrap();
    let tries = (0..24).map(|i| {
        let db = if i % 2 == 0 { one.clone() } else { two.clone() };
        let row = machine(&format!("mach-{i}"), &t, "same");
        tokio::spawn(async move { db.insert_machine(&row).await.unwrap() })
    });
    let mut won = 0;
    for t in tries {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    assert_eq!(one.machines(&t).await.unwrap().len(), 1);
}

async fn reopened(url: String) {
    let t = {
        let db = open(&url).await;
        let t = db.create_tenant("a").await.unwrap();
        assert!(db
            .insert_machine(&machine("mach-1", &t, "web"))
            .await
            .unwrap());
        db.insert_checkpoint(&checkpoint_row("ckpt-1", &t))
            .await
            .unwrap();
        t
    };
    let db = open(&url).await;
    assert!(db.machine(&t, "mach-1").await.unwrap().is_some());
    assert!(db.checkpoint(&t, "ckpt-1").await.unwrap().is_some());
    assert!(!db
        .insert_machine(&machine("mach-2", &t, "web"))
        .await
        .unwrap());
}

fn node(id: &str, state: &str, memory_mib: i64, cpus: i64) -> NodeRow {
    NodeRow {
        id: id.into(),
        state: state.into(),
        memory_mib,
        cpus,
        reserved_mib: 0,
        reserved_cpus: 0,
    }
}

const SMALL: Need = Need {
    memory_mib: 256,
    cpus: 1,
};

/// The fleet CA stored once; a join token redeemed once (of two joins at once, one wins),
/// never when expired or unknown; heartbeats by certificate; a lapsed lease makes a node
/// suspect (no placements), then lost; a renewed one makes it live and placeable again. The
/// leases are timed by the database's clock: a negative lease has lapsed already.
async fn join_tokens_and_leases(url: String) {
    let db = open(&url).await;
    let t = db.create_tenant("a").await.unwrap();
    assert_eq!(db.ca().await.unwrap(), None);
    assert!(db.put_ca("cert-a", "key-a").await.unwrap());
    assert!(!db.put_ca("cert-b", "key-b").await.unwrap());
    assert_eq!(
        db.ca().await.unwrap(),
        Some(("cert-a".to_string(), "key-a".to_string()))
    );
    let lease = Lease {
        lease_ms: 600_000,
        lost_after_ms: 600_000,
    };
    let joining = |id: &str| Joining {
        id: id.into(),
        name: format!("host-{id}"),
        cert_sha256: format!("sha-{id}"),
        memory_mib: 4096,
        cpus: 4,
    };
    assert!(db
        .create_join_token("hash-1", 600_000)
        .await
        .unwrap()
        .starts_with("jt-"));
    db.create_join_token("hash-expired", -1).await.unwrap();
    let (a, b) = (joining("node-a"), joining("node-b"));
    let (ja, jb) = tokio::join!(
        db.join_node("hash-1", &a, lease),
        db.join_node("hash-1", &b, lease)
    );
    let (ja, jb) = (ja.unwrap(), jb.unwrap());
    assert!(ja ^ jb, "one join of the token wins: {ja} {jb}");
    let winner = if ja { &a } else { &b };
    for (hash, n) in [
        ("hash-1", "node-c"),
        ("hash-expired", "node-d"),
        ("hash-unknown", "node-e"),
    ] {
        assert!(
            !db.join_node(hash, &joining(n), lease).await.unwrap(),
            "{hash}"
        );
    }
    let status = db.node_status().await.unwrap();
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].node.id, winner.id);
    assert_eq!(status[0].name.as_deref(), Some(winner.name.as_str()));
    assert_eq!(
        (status[0].liveness.as_str(), status[0].shown_state()),
        ("live", "ready")
    );
    assert_eq!(
        db.heartbeat(&winner.cert_sha256, lease, 8192, 8)
            .await
            .unwrap(),
        Some((winner.id.clone(), "ready".to_string()))
    );
    assert_eq!(db.heartbeat("sha-other", lease, 1, 1).await.unwrap(), None);
    assert_eq!(db.node_status().await.unwrap()[0].node.memory_mib, 8192);
    // labels: none until told, then as told (twice: unchanged), replaced when they change
    assert!(db.node_status().await.unwrap()[0].labels.is_empty());
    for json in [
        r#"{"arch":"x86_64","region":"eu"}"#,
        r#"{"arch":"x86_64","region":"eu"}"#,
        r#"{"arch":"x86_64","gpu":"h200"}"#,
    ] {
        db.set_node_labels(&winner.id, json).await.unwrap();
        let told: smol_fleet::labels::Labels = serde_json::from_str(json).unwrap();
        assert_eq!(db.node_status().await.unwrap()[0].labels, told);
    }
    let need = Need {
        memory_mib: 512,
        cpus: 1,
    };
    // a joined node runs machines once it has told its API
    assert_eq!(
        db.reserve(&machine("mach-1", &t, "one"), need)
            .await
            .unwrap(),
        Placed::NoCapacity
    );
    db.set_node_api(&winner.id, "https://127.0.0.1:8703")
        .await
        .unwrap();
    assert!(matches!(
        db.reserve(&machine("mach-1", &t, "one"), need).await.unwrap(),
        Placed::Placed { node_id, .. } if node_id == winner.id
    ));
    // the machine's node, its API and liveness; a tombstone marks it deleting, once
    let at = db.machine_node("mach-1").await.unwrap().expect("placed");
    assert_eq!(
        (
            at.id.as_str(),
            at.api_url.as_deref(),
            at.liveness.as_str(),
            at.deleting
        ),
        (
            winner.id.as_str(),
            Some("https://127.0.0.1:8703"),
            "live",
            false
        )
    );
    assert_eq!(db.machine_node("mach-none").await.unwrap(), None);
    // what reconciliation asks: the machines placed on a node
    assert_eq!(db.placed_machines(&winner.id).await.unwrap(), ["mach-1"]);
    assert!(db.placed_machines("node-none").await.unwrap().is_empty());
    db.tombstone("mach-1").await.unwrap();
    db.tombstone("mach-1").await.unwrap();
    assert!(db.machine_node("mach-1").await.unwrap().unwrap().deleting);
    let dead = db.tombstoned().await.unwrap();
    assert_eq!(
        dead.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["mach-1"]
    );
    let beat = |lease_ms, lost_after_ms| {
        db.heartbeat(
            &winner.cert_sha256,
            Lease {
                lease_ms,
                lost_after_ms,
            },
            8192,
            8,
        )
    };
    beat(-1, 600_000).await.unwrap().unwrap();
    assert_eq!(db.node_status().await.unwrap()[0].shown_state(), "suspect");
    assert_eq!(
        db.reserve(&machine("mach-2", &t, "two"), need)
            .await
            .unwrap(),
        Placed::NoCapacity,
        "a suspect node gets no placement"
    );
    beat(-2, 1).await.unwrap().unwrap();
    assert_eq!(db.node_status().await.unwrap()[0].shown_state(), "lost");
    beat(600_000, 600_000).await.unwrap().unwrap();
    assert_eq!(db.node_status().await.unwrap()[0].shown_state(), "ready");
    // cordoned: live, no placement; a heartbeat keeps it cordoned
    assert!(db.set_node_state(&winner.id, "cordoned").await.unwrap());
    assert!(!db.set_node_state("node-missing", "cordoned").await.unwrap());
    assert_eq!(
        beat(600_000, 600_000).await.unwrap(),
        Some((winner.id.clone(), "cordoned".to_string()))
    );
    assert_eq!(
        db.reserve(&machine("mach-2", &t, "two"), need)
            .await
            .unwrap(),
        Placed::NoCapacity
    );
    assert!(db.set_node_state(&winner.id, "ready").await.unwrap());
    assert!(matches!(
        db.reserve(&machine("mach-2", &t, "two"), need)
            .await
            .unwrap(),
        Placed::Placed { .. }
    ));
    // removed: refused with machines placed on it; without, gone and its certificate unknown
    assert_eq!(
        db.remove_node(&winner.id).await.unwrap(),
        Removed::HasMachines(2)
    );
    assert_eq!(
        db.remove_node("node-missing").await.unwrap(),
        Removed::NotFound
    );
    db.create_join_token("hash-2", 600_000).await.unwrap();
    let other = joining("node-f");
    assert!(db.join_node("hash-2", &other, lease).await.unwrap());
    assert_eq!(db.remove_node(&other.id).await.unwrap(), Removed::Removed);
    assert_eq!(
        db.heartbeat(&other.cert_sha256, lease, 1, 1).await.unwrap(),
        None
    );
    assert_eq!(db.node_status().await.unwrap().len(), 1);
}

async fn placement_and_operations(url: String) {
    let db = open(&url).await;
    let t = db.create_tenant("a").await.unwrap();
    // no node: no capacity, and nothing recorded
    assert_eq!(
        db.reserve(&machine("mach-0", &t, "zero"), SMALL)
            .await
            .unwrap(),
        Placed::NoCapacity
    );
    assert_eq!(db.machine(&t, "mach-0").await.unwrap(), None);
    db.put_node(&node("node-a", "ready", 1024, 4))
        .await
        .unwrap();
    db.put_node(&node("node-b", "ready", 2048, 4))
        .await
        .unwrap();
    db.put_node(&node("node-c", "cordoned", 1 << 20, 64))
        .await
        .unwrap();
    let placed = |p: Placed| match p {
        Placed::Placed {
            node_id,
            operation_id,
        } => (node_id, operation_id),
        other => panic!("not placed: {other:?}"),
    };
    // the least reserved ready node (by memory share, then id)
    let (n1, op1) = placed(
        db.reserve(&machine("mach-1", &t, "one"), SMALL)
            .await
            .unwrap(),
    );
    assert_eq!(n1, "node-a");
    assert!(op1.starts_with("op-"));
    let (n2, _) = placed(
        db.reserve(&machine("mach-2", &t, "two"), SMALL)
            .await
            .unwrap(),
    );
    assert_eq!(n2, "node-b", "node-a is 25% reserved, node-b 0%");
    assert!(db.machine(&t, "mach-1").await.unwrap().is_some());
    // a taken name reserves nothing (the same transaction)
    let before = db.nodes().await.unwrap();
    assert_eq!(
        db.reserve(&machine("mach-3", &t, "one"), SMALL)
            .await
            .unwrap(),
        Placed::NameTaken
    );
    assert_eq!(db.nodes().await.unwrap(), before);
    // too big for any ready node: the cordoned one is never used
    assert_eq!(
        db.reserve(
            &machine("mach-4", &t, "big"),
            Need {
                memory_mib: 4096,
                cpus: 1
            }
        )
        .await
        .unwrap(),
        Placed::NoCapacity
    );
    assert_eq!(db.machine(&t, "mach-4").await.unwrap(), None);
    // on named nodes only (a branch on its source's node, a machine's node labels): the
    // less reserved node-b is passed over; a cordoned node, one unknown or without room, an
    // id that is not one, takes nothing; of several, the least reserved
    let on = |n: &str| vec![n.to_string()];
    let (n5, op5) = placed(
        db.reserve_on(&machine("mach-5", &t, "five"), SMALL, &on("node-a"))
            .await
            .unwrap(),
    );
    assert_eq!(n5, "node-a");
    for n in ["node-c", "node-x", "node-a,node-b", "node-%"] {
        assert_eq!(
            db.reserve_on(&machine("mach-6", &t, "six"), SMALL, &on(n))
                .await
                .unwrap(),
            Placed::NoCapacity,
            "{n}"
        );
    }
    let big = Need {
        memory_mib: 1024,
        cpus: 1,
    };
    assert_eq!(
        db.reserve_on(&machine("mach-6", &t, "six"), big, &on("node-a"))
            .await
            .unwrap(),
        Placed::NoCapacity,
        "node-a has 512 MiB left"
    );
    assert_eq!(
        db.reserve_on(&machine("mach-6", &t, "five"), SMALL, &on("node-a"))
            .await
            .unwrap(),
        Placed::NameTaken
    );
    assert_eq!(db.machine(&t, "mach-6").await.unwrap(), None);
    let (n7, op7) = placed(
        db.reserve_on(
            &machine("mach-7", &t, "seven"),
            SMALL,
            &["node-c".into(), "node-b".into(), "node-a".into()],
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        n7, "node-b",
        "node-a is 50% reserved, node-b 12.5%, node-c cordoned"
    );
    for (op, id) in [(op5, "mach-5"), (op7, "mach-7")] {
        assert!(db.finish_operation(&op, "failed").await.unwrap());
        db.delete_machine(id).await.unwrap();
    }
    let nodes = db.nodes().await.unwrap();
    let reserved: Vec<(i64, i64)> = nodes
        .iter()
        .map(|n| (n.reserved_mib, n.reserved_cpus))
        .collect();
    assert_eq!(reserved, vec![(256, 1), (256, 1), (0, 0)]);
    // updating a node keeps its reservations
    db.put_node(&node("node-a", "ready", 2048, 8))
        .await
        .unwrap();
    let a = db.nodes().await.unwrap().remove(0);
    assert_eq!(
        (a.memory_mib, a.cpus, a.reserved_mib, a.reserved_cpus),
        (2048, 8, 256, 1)
    );
    // deleting the machine gives its reservation back
    db.delete_machine("mach-1").await.unwrap();
    assert_eq!(db.nodes().await.unwrap()[0].reserved_mib, 0);

    // operations: the creates' rows are pending until their deadline, then claimed once
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        db.claim_overdue(now, 10, 60).await.unwrap().is_empty(),
        "not due yet"
    );
    let later = now + smol_fleet::placement::CREATE_DEADLINE_SECS + 1;
    // a placement's epoch: 1 when made, raised by each claim of its machine's operation
    let epoch = |id: &'static str| {
        let db = db.clone();
        async move {
            let at = db.machine_node(id).await.unwrap().expect("placed");
            let p = at.placement.expect("a machine's node names its placement");
            assert_eq!(p.machine_id, id);
            p.epoch
        }
    };
    let other = "mach-2";
    assert_eq!(epoch(other).await, 1, "made");
    let claimed = db.claim_overdue(later, 10, 60).await.unwrap();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert!(claimed.iter().any(|o| o.machine_id == other), "{claimed:?}");
    assert_eq!(epoch(other).await, 2, "claimed once");
    assert!(claimed
        .iter()
        .all(|o| o.kind == "create" && o.state == "claimed"));
    assert!(claimed
        .iter()
        .any(|o| o.id == op1 && o.machine_id == "mach-1"));
    assert!(
        db.claim_overdue(later, 10, 60).await.unwrap().is_empty(),
        "claimed for 60 s"
    );
    // a claim that lapses may be claimed again; a finished operation never is
    assert!(db.finish_operation(&op1, "done").await.unwrap());
    assert!(!db.finish_operation("op-missing", "done").await.unwrap());
    let again = db.claim_overdue(later + 61, 10, 60).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].id, op1);
    assert_eq!(epoch(other).await, 3, "claimed twice");

    // a node's epochs: the highest it was sent, kept until the machine's record goes
    assert_eq!(db.raise_epoch("mach-9", 2).await.unwrap(), 2);
    assert_eq!(db.raise_epoch("mach-9", 5).await.unwrap(), 5);
    assert_eq!(
        db.raise_epoch("mach-9", 3).await.unwrap(),
        5,
        "never lowered"
    );
    assert_eq!(db.raise_epoch("mach-8", 1).await.unwrap(), 1, "per machine");
    db.delete_machine("mach-9").await.unwrap();
    assert_eq!(
        db.raise_epoch("mach-9", 1).await.unwrap(),
        1,
        "gone with it"
    );
}

/// Two stores (two servers' connections) x 60 concurrent creates over nodes with 29 places
/// in all: exactly 29 placed, no node over its capacity, every reservation accounted for by a
/// machine and an operation.
async fn concurrent_placements(url: String) {
    let one = open(&url).await;
    let two = open(&url).await;
    let t = one.create_tenant("a").await.unwrap();
    // 8 + 8 + 8 places by memory, 5 by vCPUs
    for (id, mib, cpus) in [
        ("node-1", 2048, 64),
        ("node-2", 2048 + 255, 64),
        ("node-3", 2048, 8),
        ("node-4", 8192, 5),
    ] {
        one.put_node(&node(id, "ready", mib, cpus)).await.unwrap();
    }
    let tries: Vec<_> = (0..120)
        .map(|i| {
            let db = if i % 2 == 0 { one.clone() } else { two.clone() };
            let row = machine(&format!("mach-{i}"), &t, &format!("m{i}"));
            tokio::spawn(async move { db.reserve(&row, SMALL).await.unwrap() })
        })
        .collect();
    let mut per_node = std::collections::HashMap::<String, i64>::new();
    let mut refused = 0;
    for t in tries {
        match t.await.unwrap() {
            Placed::Placed { node_id, .. } => *per_node.entry(node_id).or_default() += 1,
            Placed::NoCapacity => refused += 1,
            Placed::NameTaken | Placed::NoCheckpoint => panic!("names are distinct"),
        }
    }
    let placed: i64 = per_node.values().sum();
    assert_eq!((placed, refused), (29, 91), "{per_node:?}");
    for n in one.nodes().await.unwrap() {
        let count = per_node.get(&n.id).copied().unwrap_or(0);
        assert_eq!(
            (n.reserved_mib, n.reserved_cpus),
            (count * 256, count),
            "{n:?}"
        );
        assert!(
            n.reserved_mib <= n.memory_mib && n.reserved_cpus <= n.cpus,
            "{n:?}"
        );
    }
    assert_eq!(one.machines(&t).await.unwrap().len(), 29);
    let ops = two.claim_overdue(i64::MAX / 2, 1000, 60).await.unwrap();
    assert_eq!(ops.len(), 29);
}

/// Two stores delete the same machines at once, 4 times each (two replicas' sweepers ending
/// one TTL): each reservation is given back once, never below zero (the CI run's fleet_hosts
/// failure: a node left at -256 MiB, -1 vCPU).
async fn concurrent_deletes_release_once(url: String) {
    let one = open(&url).await;
    let two = open(&url).await;
    let t = one.create_tenant("a").await.unwrap();
    one.put_node(&node("node-1", "ready", 8192, 64))
        .await
        .unwrap();
    for round in 0..5 {
        let ids: Vec<String> = (0..8).map(|i| format!("mach-{round}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let row = machine(id, &t, &format!("m{round}-{i}"));
            assert!(matches!(
                one.reserve(&row, SMALL).await.unwrap(),
                Placed::Placed { .. }
            ));
        }
        // one machine stays: its reservation must survive the others' deletes
        let keep = machine(&format!("keep-{round}"), &t, &format!("k{round}"));
        one.reserve(&keep, SMALL).await.unwrap();
        let deletes: Vec<_> = (0..ids.len() * 8)
            .map(|k| {
                let db = if k % 2 == 0 { one.clone() } else { two.clone() };
                let id = ids[k % ids.len()].clone();
                tokio::spawn(async move { db.delete_machine(&id).await.unwrap() })
            })
            .collect();
        for d in deletes {
            d.await.unwrap();
        }
        let n = one.nodes().await.unwrap().remove(0);
        assert_eq!(
            (n.reserved_mib, n.reserved_cpus),
            (256 * (round + 1), round + 1),
            "round {round}: {n:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_conforms() {
    for (name, case) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("fleet.db").display());
        eprintln!("sqlite: {name}");
        case(url).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_conforms() {
    let cluster = PgCluster::start().expect("a PostgreSQL cluster (apt-get install postgresql)");
    for (i, (name, case)) in CASES.iter().enumerate() {
        let url = cluster.database(&format!("case_{i}")).await.unwrap();
        // the unix socket for every other case
        let url = if i % 2 == 0 {
            url
        } else {
            cluster.socket_url(&format!("case_{i}"))
        };
        eprintln!("postgres: {name} ({url})");
        case(url).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_url_and_a_cluster_not_running_are_typed_errors() {
    let err = store::open("postgres://a@b:notaport/x").await.unwrap_err();
    assert!(
        matches!(err, smol_fleet::FleetError::StoreConfig { .. }),
        "{err}"
    );
    // nothing listens there (a port just freed)
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = store::open(&format!("postgres://postgres@127.0.0.1:{port}/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, smol_fleet::FleetError::StoreUnavailable { .. }),
        "{err}"
    );
    let e: smolmachines::Error = err.into();
    assert!(e.retryable());
    assert_eq!(e.to_problem().status, 503);
}

/// The fleet over PostgreSQL: with the cluster stopped, reads and mutations are 503 retryable
/// (with Retry-After), readiness fails; started again, the same server answers as before.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_is_503_retryable_and_recovers() {
    let cluster = PgCluster::start().expect("a PostgreSQL cluster (apt-get install postgresql)");
    let url = cluster.database("fleet").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let srv = smol_fleet::testing::spawn_on(home.path(), store::open(&url).await.unwrap())
        .await
        .unwrap();
    let key = srv.admin_key.clone().expect("the bootstrap key");
    let c = reqwest::Client::new();
    let get = |p: &str| {
        c.get(format!("{}{p}", srv.base_url))
            .bearer_auth(&key)
            .send()
    };
    let r = get("/v1/machines").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), serde_json::json!([]));
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);

    cluster.stop().unwrap();
    let unavailable = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().get("retry-after").is_some());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["retryable"], true, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("unavailable")
                || body["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("unavailable"),
            "{body}"
        );
    };
    unavailable(get("/v1/machines").await.unwrap()).await;
    unavailable(get("/readyz").await.unwrap()).await;
    let create = c
        .post(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .json(&serde_json::json!({"source": {"type": "image", "reference": "busybox"}}))
        .send()
        .await
        .unwrap();
    unavailable(create).await;
    let tenant = c
        .post(format!(
            "{}/v1/machines/mach-0000000000000000/stop",
            srv.base_url
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    unavailable(tenant).await;

    cluster.start_again().unwrap();
    let r = get("/v1/machines").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the server connects again");
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);
    assert!(srv.teardown().await.is_ok());
}

/// Not a check (ignored; run with `--ignored --nocapture`, in release): an authenticated
/// `GET /v1/machines` (one key lookup and one list: two store reads) through a server over
/// PostgreSQL ÷ the same through a server over SQLite, medians of the same run.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_request_latency_postgres_vs_sqlite() {
    async fn median_us(srv: &smol_fleet::testing::TestServer, n: usize) -> f64 {
        let key = srv.admin_key.clone().unwrap();
        let c = reqwest::Client::new();
        let url = format!("{}/v1/machines", srv.base_url);
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 50 {
            let t = std::time::Instant::now();
            let r = c.get(&url).bearer_auth(&key).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.bytes().await.unwrap();
            if i >= 50 {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        times.sort_by(f64::total_cmp);
        times[n / 2]
    }
    let cluster = PgCluster::start().unwrap();
    let url = cluster.database("bench").await.unwrap();
    let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sqlite = smol_fleet::testing::spawn_on(
        h1.path(),
        store::open(&h1.path().join("fleet.db").to_string_lossy())
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let pg = smol_fleet::testing::spawn_on(h2.path(), store::open(&url).await.unwrap())
        .await
        .unwrap();
    let mut ratios = Vec::new();
    for round in 0..3 {
        let s = median_us(&sqlite, 1000).await;
        let p = median_us(&pg, 1000).await;
        println!(
            "round {round}: sqlite {s:.0} us, postgres {p:.0} us, ratio {:.2}",
            p / s
        );
        ratios.push(p / s);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "GET /v1/machines postgres / sqlite: median ratio {:.2}",
        ratios[1]
    );
}

/// Not a check (ignored; run with `--ignored --nocapture`, in release): placements per second
/// with two replicas' stores over one PostgreSQL (the contended part of a create on a fleet of
/// nodes: the record, the one-statement reservation and its operation, in one transaction),
/// 32 in flight, over 4 nodes (`SMOL_BENCH_NODES`) with room for all, ÷ plain machine records (`insert_machine`, no
/// reservation) the same way, same run. No VM and no node process: what is measured is the
/// store's part, which every replica shares.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_placements_per_second() {
    const N: usize = 2000;
    const IN_FLIGHT: usize = 32;
    let cluster = PgCluster::start().expect("a PostgreSQL cluster (apt-get install postgresql)");
    let url = cluster.database("bench_placements").await.unwrap();
    let one = open(&url).await;
    let two = open(&url).await;
    let t = one.create_tenant("a").await.unwrap();
    let nodes: usize = std::env::var("SMOL_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    for i in 0..nodes {
        one.put_node(&node(&format!("node-{i}"), "ready", 1 << 30, 1 << 20))
            .await
            .unwrap();
    }
    // each round: N rows of prefix `p`, IN_FLIGHT at a time, half through each store
    async fn round(one: &Db, two: &Db, t: &str, p: &str, place: bool) -> f64 {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..IN_FLIGHT)
            .map(|w| {
                let db = if w % 2 == 0 { one.clone() } else { two.clone() };
                let (next, t, p) = (next.clone(), t.to_string(), p.to_string());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= N {
                            break;
                        }
                        let row = machine(&format!("mach-{p}{i}"), &t, &format!("{p}{i}"));
                        if place {
                            let placed = db.reserve(&row, SMALL).await.unwrap();
                            assert!(matches!(placed, Placed::Placed { .. }), "{placed:?}");
                        } else {
                            assert!(db.insert_machine(&row).await.unwrap());
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        N as f64 / started.elapsed().as_secs_f64()
    }
    // interleaved, twice each, after a warm-up of both
    round(&one, &two, &t, "w", true).await;
    round(&one, &two, &t, "x", false).await;
    let mut placed = Vec::new();
    let mut plain = Vec::new();
    for r in 0..2 {
        placed.push(round(&one, &two, &t, &format!("p{r}-"), true).await);
        plain.push(round(&one, &two, &t, &format!("r{r}-"), false).await);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!(
        "placements/s (2 replicas' stores, {IN_FLIGHT} in flight, {nodes} nodes, PostgreSQL): {:.0}; plain \
         records/s: {:.0}; placement ÷ plain record throughput = {:.2} (runs: {placed:.0?} vs \
         {plain:.0?})",
        best(&placed),
        best(&plain),
        best(&placed) / best(&plain)
    );
    let nodes = one.nodes().await.unwrap();
    let reserved: i64 = nodes.iter().map(|n| n.reserved_cpus).sum();
    assert_eq!(reserved, 3 * N as i64, "every placement reserved once");
    cluster.stop().unwrap();
}
