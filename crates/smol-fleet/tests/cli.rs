//! `smolfleet keys create|list|revoke` against a home, and the keys they make used on a
//! server over that home (no VM needed).

mod support;

use std::process::Command;

use reqwest::StatusCode;
use support::{client, json_ok, unauthorized};

fn smolfleet(home: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smolfleet"))
        .args(args)
        .arg("--home")
        .arg(home)
        .env("SMOL_LOG", "warn")
        .output()
        .expect("run smolfleet");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} in {out}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_created_listed_and_revoked() {
    let home = tempfile::tempdir().unwrap();
    // a key for a new tenant on a home no server has opened yet
    let (ok, out, err) = smolfleet(home.path(), &["keys", "create", "--name", "acme"]);
    assert!(ok, "{out}{err}");
    let key = field(&out, "key: ").to_string();
    let key_id = field(&out, "key id: ").to_string();
    let tenant = field(&out, "tenant: ").to_string();
    assert!(smol_fleet::keys::well_formed(&key), "{out}");
    assert!(
        key_id.starts_with("key-") && tenant.starts_with("ten-"),
        "{out}"
    );
    // a second key for the same tenant; an unknown tenant is refused
    let (ok, out2, err) = smolfleet(home.path(), &["keys", "create", "--tenant", &tenant]);
    assert!(ok, "{out2}{err}");
    assert_eq!(field(&out2, "tenant: "), tenant);
    let key2 = field(&out2, "key: ").to_string();
    let (ok, _, err) = smolfleet(home.path(), &["keys", "create", "--tenant", "ten-nope"]);
    assert!(!ok && err.contains("ten-nope"), "{err}");

    // the listing shows prefixes, never a key
    let (ok, list, err) = smolfleet(home.path(), &["keys", "list"]);
    assert!(ok, "{err}");
    assert!(
        list.contains(&key_id) && list.contains(&key[..12]),
        "{list}"
    );
    assert!(!list.contains(&key) && !list.contains(&key2), "{list}");

    // the server over this home: both keys work, the first one stops working once revoked,
    // the second (same tenant) still does, sees the same (empty) machine list
    let srv = smol_fleet::testing::spawn(home.path()).await.unwrap();
    assert!(srv.admin_key.is_none(), "a tenant exists: no bootstrap key");
    let c = client();
    let machines = format!("{}/v1/machines", srv.base_url);
    for k in [&key, &key2] {
        json_ok(
            c.get(&machines).bearer_auth(k).send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
    }
    let (ok, out, err) = smolfleet(home.path(), &["keys", "revoke", &key_id]);
    assert!(ok && out.contains(&key_id), "{out}{err}");
    unauthorized(c.get(&machines).bearer_auth(&key).send().await.unwrap()).await;
    json_ok(
        c.get(&machines).bearer_auth(&key2).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let (ok, _, err) = smolfleet(home.path(), &["keys", "revoke", &key_id]);
    assert!(!ok && err.contains(&key_id), "{err}");
    let (_, list, _) = smolfleet(home.path(), &["keys", "list"]);
    assert!(list.contains("revoked"), "{list}");
}

/// `--role`: `all`, or `control,edge` over a `--db` store (a node is `smolfleet node`);
/// anything else is refused by name, before anything starts. A node door without the fleet
/// CA is refused. `--db`: a bad URL and a PostgreSQL that is not there are refused with what
/// to do.
#[test]
fn roles_not_built_and_bad_stores_are_refused_at_start() {
    let home = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        smolfleet(home.path(), &args)
    };
    let (ok, _, err) = serve(&["--role", "control,edge"]);
    assert!(!ok && err.contains("give --db"), "{err}");
    let (ok, _, err) = serve(&["--role", "node,edge"]);
    assert!(!ok && err.contains("smolfleet node --control"), "{err}");
    let (ok, _, err) = serve(&["--role", "edge", "--db", "x.db"]);
    assert!(
        !ok && err.contains("edge-only process is not built"),
        "{err}"
    );
    let db = home.path().join("roles.db");
    let db = db.to_str().unwrap();
    let (ok, _, err) = serve(&[
        "--role",
        "control,edge",
        "--db",
        db,
        "--node-listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok && err.contains("run `smolfleet init`"), "{err}");
    let (ok, _, err) = serve(&["--role", "leader"]);
    assert!(!ok && err.contains("\"leader\" is not a role"), "{err}");
    let (ok, _, err) = serve(&["--db", "postgres://a@b:notaport/x"]);
    assert!(
        !ok && err.contains("--db:") && err.contains("postgres://USER@"),
        "{err}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/fleet");
    let (ok, _, err) = smolfleet(home.path(), &["keys", "list", "--db", &url]);
    assert!(!ok && err.contains("fleet database unavailable"), "{err}");
    // nothing was made in the home's SQLite file by the refused starts
    assert!(!home.path().join("fleet.db").exists());
}

/// `smolfleet keys create --db postgres://…` makes a key a server over that database accepts.
#[tokio::test(flavor = "multi_thread")]
async fn keys_made_on_postgres_are_accepted_by_a_server_over_it() {
    let cluster = smol_fleet::testing::pg::PgCluster::start().expect("PostgreSQL (postgresql)");
    let url = cluster.database("fleet").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let (ok, out, err) = smolfleet(
        home.path(),
        &["keys", "create", "--name", "acme", "--db", &url],
    );
    assert!(ok, "{out}{err}");
    let key = field(&out, "key: ").to_string();
    assert!(
        !home.path().join("fleet.db").exists(),
        "the key went to PostgreSQL"
    );
    let srv =
        smol_fleet::testing::spawn_on(home.path(), smol_fleet::store::open(&url).await.unwrap())
            .await
            .unwrap();
    assert_eq!(srv.fleet.db().kind(), "postgres");
    let r = client()
        .get(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await, serde_json::json!([]));
    let (ok, out, err) = smolfleet(home.path(), &["keys", "list", "--db", &url]);
    assert!(ok, "{err}");
    // a tenant existed, so the server made no bootstrap key
    assert_eq!(srv.admin_key, None);
    assert_eq!(out.lines().count(), 1, "acme's key only: {out}");
}
