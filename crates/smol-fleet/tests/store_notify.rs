//! The replica route cache's invalidation (`cache.rs`, `store/pg/notify.rs`): a PostgreSQL of
//! this test's own, two stores on it as two replicas. What one replica keeps goes when the
//! other changes it (the store's `NOTIFY`); a change that does not make it wrong leaves it; a
//! cut listening connection drops everything until it is back. SQLite keeps nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smol_fleet::cache::{Cache, LISTENER_NAME};
use smol_fleet::placement::{Need, NodeRow, Placed};
use smol_fleet::testing::pg::PgCluster;
use smol_fleet::{store, Db, MachineRow};

/// Waits (at most 10 s) for `what` to hold.
async fn until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn machine(id: &str, tenant: &str) -> MachineRow {
    MachineRow {
        id: id.into(),
        tenant_id: tenant.into(),
        name: format!("{id}-name"),
        engine_name: format!("e-{id}"),
        spec: "{\"labels\":{}}".into(),
        created_at: 0,
        auto_stop_seconds: None,
        ttl_seconds: None,
        expires_at: None,
        ephemeral: false,
        last_activity_at: None,
    }
}

/// The one node of both tests, ready with room.
fn node_a() -> NodeRow {
    NodeRow {
        id: "node-a".into(),
        state: "ready".into(),
        memory_mib: 4096,
        cpus: 4,
        reserved_mib: 0,
        reserved_cpus: 0,
    }
}

/// What each machine of the tests reserves.
const NEED: Need = Need {
    memory_mib: 256,
    cpus: 1,
};

/// Keeps machine `id`'s route as replica `a` reads it (by id and by name); asserts it is kept.
async fn keep(a: &Db, cache: &Cache, t: &str, id: &str) {
    let e = cache.epoch();
    let row = a.machine(t, id).await.unwrap().expect("the machine");
    let node = a.machine_node(id).await.unwrap().expect("its node");
    assert_eq!(node.liveness, "live", "{node:?}");
    cache.keep_route(e, t, id, &row, &node);
    cache.keep_route(e, t, &row.name, &row, &node);
    assert!(cache.route(t, id).is_some(), "{id} kept");
    assert!(cache.route(t, &row.name).is_some(), "{id} kept by name");
}

/// Waits for a notification that `b` makes (machine `marker`'s spec changed): every change
/// `b` committed before it has been heard by then (notifications come in commit order).
async fn heard_so_far(a: &Db, b: &Db, cache: &Cache, t: &str, marker: &str) {
    keep(a, cache, t, marker).await;
    b.set_machine_spec(marker, "{\"labels\":{\"marked\":\"yes\"}}")
        .await
        .unwrap();
    until("the marker's change is heard", || {
        cache.route(t, marker).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_notifies_the_changes_that_make_kept_keys_and_routes_wrong() {
    let cluster = PgCluster::start().expect("a PostgreSQL cluster (apt-get install postgresql)");
    let url = cluster.database("notify").await.unwrap();
    let a = store::open(&url).await.unwrap();
    // the other replica (its start finds the triggers made)
    let b = store::open(&url).await.unwrap();
    let cache = Arc::new(Cache::default());
    assert!(!cache.is_live());
    a.watch_changes(cache.clone());
    until("the cache goes live", || cache.is_live()).await;

    let t = b.create_tenant("a").await.unwrap();
    // a machine on a node, its route kept
    b.put_node(&node_a()).await.unwrap();
    b.set_node_api("node-a", "https://10.0.0.1:7001")
        .await
        .unwrap();
    for id in ["mach-1", "mach-2", "marker"] {
        assert!(matches!(
            b.reserve(&machine(id, &t), NEED).await.unwrap(),
            Placed::Placed { .. }
        ));
    }
    keep(&a, &cache, &t, "mach-1").await;
    keep(&a, &cache, &t, "mach-2").await;

    // what does not make it wrong leaves it: activity, another placement, a cordon
    let before = cache.stats().notifications;
    b.set_last_activity(&[("mach-1".to_string(), 1_000)])
        .await
        .unwrap();
    assert!(matches!(
        b.reserve(&machine("mach-3", &t), NEED).await.unwrap(),
        Placed::Placed { .. }
    ));
    assert!(b.set_node_state("node-a", "cordoned").await.unwrap());
    assert!(b.set_node_state("node-a", "ready").await.unwrap());
    heard_so_far(&a, &b, &cache, &t, "marker").await;
    assert_eq!(
        cache.stats().notifications,
        before + 1,
        "only the marker was notified"
    );
    assert!(cache.route(&t, "mach-1").is_some());

    // its spec (labels) changed: dropped, by id and by name; the other machine's stays
    b.set_machine_spec("mach-1", "{\"labels\":{\"x\":\"y\"}}")
        .await
        .unwrap();
    until("a changed spec drops the route", || {
        cache.route(&t, "mach-1").is_none() && cache.route(&t, "mach-1-name").is_none()
    })
    .await;
    assert!(cache.route(&t, "mach-2").is_some());
    // tombstoned: dropped
    keep(&a, &cache, &t, "mach-1").await;
    b.tombstone("mach-1").await.unwrap();
    until("a tombstone drops the route", || {
        cache.route(&t, "mach-1").is_none()
    })
    .await;
    assert!(a.machine_node("mach-1").await.unwrap().unwrap().deleting);
    // the node's API moved: every route through it dropped
    keep(&a, &cache, &t, "mach-1").await;
    b.set_node_api("node-a", "https://10.0.0.1:7002")
        .await
        .unwrap();
    until("a moved node API drops its routes", || {
        cache.route(&t, "mach-1").is_none() && cache.route(&t, "mach-2").is_none()
    })
    .await;
    // deleted: dropped
    keep(&a, &cache, &t, "mach-2").await;
    b.delete_machine("mach-2").await.unwrap();
    until("a delete drops the route", || {
        cache.route(&t, "mach-2").is_none()
    })
    .await;

    // the listening connection cut: nothing is kept until it is back, then kept again
    keep(&a, &cache, &t, "mach-1").await;
    let (client, conn) = tokio_postgres::connect(&cluster.url("notify"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let cut = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = $1",
            &[&LISTENER_NAME],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(cut, 1, "one listening connection");
    until("a cut listener drops everything", || {
        !cache.is_live() && cache.route(&t, "mach-1").is_none()
    })
    .await;
    let e = cache.epoch();
    let row = a.machine(&t, "mach-1").await.unwrap().unwrap();
    let node = a.machine_node("mach-1").await.unwrap().unwrap();
    cache.keep_route(e, &t, "mach-1", &row, &node);
    assert!(
        cache.route(&t, "mach-1").is_none(),
        "nothing kept while not heard"
    );
    until("the listener is back", || cache.is_live()).await;
    keep(&a, &cache, &t, "mach-1").await;
    b.set_machine_spec("mach-1", "{\"labels\":{}}")
        .await
        .unwrap();
    until("a change is heard again", || {
        cache.route(&t, "mach-1").is_none()
    })
    .await;
    drop(client);
    let _ = conn.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = store::open(&dir.path().join("fleet.db").to_string_lossy())
        .await
        .unwrap();
    let cache = Arc::new(Cache::default());
    db.watch_changes(cache.clone());
    let t = db.create_tenant("a").await.unwrap();
    db.put_node(&node_a()).await.unwrap();
    db.reserve(&machine("mach-1", &t), NEED).await.unwrap();
    let row = db.machine(&t, "mach-1").await.unwrap().unwrap();
    let node = db.machine_node("mach-1").await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    cache.keep_route(cache.epoch(), &t, "mach-1", &row, &node);
    assert!(!cache.is_live());
    assert_eq!(cache.route(&t, "mach-1"), None);
}
