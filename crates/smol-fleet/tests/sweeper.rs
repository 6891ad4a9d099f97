//! Machine lifetimes through the fleet (SPEC §10.6), real VMs: `autoStopSeconds` stops an idle
//! machine (activity and an exec in flight keep it running), `ttlSeconds` deletes it, also
//! when the TTL passed while the server was down, `ephemeral` deletes it when it stops (a stop
//! request, the idle stop, its VM exiting), bad values are 422; a dropped test server leaves
//! no VM. Timings are never asserted: states are polled under generous deadlines.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use smol_fleet::testing::{spawn, TestServer};
use support::{client, json_ok, problem};

/// How long a state change the sweeper owes may take before the test fails (TCG hosts are
/// slow, and two helpers may share the CPUs).
const DEADLINE: Duration = Duration::from_secs(180);

/// The sweep interval of these tests.
const SWEEP: Duration = Duration::from_secs(1);

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sfs")
        .tempdir_in("/tmp")
        .unwrap()
}

struct Api {
    c: Client,
    base: String,
    key: String,
}

impl Api {
    fn of(srv: &TestServer, key: &str) -> Api {
        Api {
            c: client(),
            base: srv.base_url.clone(),
            key: key.to_string(),
        }
    }

    async fn create(&self, body: Value) -> reqwest::Response {
        self.c
            .post(format!("{}/v1/machines", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn create_ok(&self, mut body: Value, image: &str) -> Value {
        body["source"] = json!({"type": "image", "reference": image});
        json_ok(self.create(body).await, StatusCode::CREATED).await
    }

    /// The machine's record, or `None` once it is gone (404).
    async fn get(&self, id: &str) -> Option<Value> {
        let r = self
            .c
            .get(format!("{}/v1/machines/{id}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            return None;
        }
        Some(json_ok(r, StatusCode::OK).await)
    }

    async fn exec(&self, id: &str, cmd: Value) -> Value {
        let r = self
            .c
            .post(format!("{}/v1/machines/{id}/exec", self.base))
            .bearer_auth(&self.key)
            .json(&json!({ "command": cmd }))
            .send()
            .await
            .unwrap();
        json_ok(r, StatusCode::OK).await
    }

    async fn post(&self, id: &str, action: &str) -> Value {
        let r = self
            .c
            .post(format!("{}/v1/machines/{id}/{action}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        json_ok(r, StatusCode::OK).await
    }

    /// Polls the record until `done` holds for it (`None`: gone); panics past [`DEADLINE`].
    async fn wait_for(&self, id: &str, what: &str, done: impl Fn(Option<&Value>) -> bool) {
        let t0 = Instant::now();
        loop {
            let m = self.get(id).await;
            if done(m.as_ref()) {
                eprintln!("{id}: {what} after {:?}", t0.elapsed());
                return;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "{id}: not {what} within {DEADLINE:?}: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_gone(&self, id: &str) {
        self.wait_for(id, "gone", |m| m.is_none()).await
    }
}

fn state(m: Option<&Value>) -> Option<&str> {
    m.and_then(|m| m["state"].as_str())
}

/// The node has no machine left and no QEMU runs in its run directory.
async fn node_is_empty(srv: &TestServer) {
    let engine = srv.fleet.engine();
    let left = smolmachines::Machine::list_on(&**engine, &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "machines left on the node: {left:?}");
    assert_eq!(common::qemu_processes_in(engine.run_dir()), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_stop_stops_an_idle_machine_and_activity_resets_the_clock() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    srv.fleet.set_sweep_interval(SWEEP);
    let api = Api::of(&srv, srv.admin_key.as_deref().unwrap());
    let idle = 6u64;
    let m = api
        .create_ok(json!({"autoStopSeconds": idle, "ttlSeconds": null}), &image)
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&m["autoStopSeconds"], &m["ttlSeconds"], &m["ephemeral"]),
        (&json!(idle), &Value::Null, &json!(false)),
        "{m}"
    );
    assert_eq!(m["state"], "running", "{m}");

    // activity resets the clock: an exec every second for three idle periods keeps it up
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3 * idle) {
        let r = api.exec(&id, json!(["echo", "busy"])).await;
        assert_eq!(r["stdout"], "busy\n", "{r}");
        let g = api.get(&id).await;
        assert_eq!(
            state(g.as_ref()),
            Some("running"),
            "stopped while used: {g:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // the record shows the activity (RFC 3339 sorts as time)
    let before = m["lastActivityAt"]
        .as_str()
        .expect("lastActivityAt")
        .to_string();
    let g = api.get(&id).await.unwrap();
    let after = g["lastActivityAt"]
        .as_str()
        .expect("lastActivityAt")
        .to_string();
    assert!(after > before, "{before} -> {after}");
    // an exec in flight keeps it busy: one lasting twice the idle period completes
    let r = api
        .exec(
            &id,
            json!(["sh", "-c", format!("sleep {}; echo done", 2 * idle)]),
        )
        .await;
    assert_eq!(
        (&r["exitCode"], &r["stdout"]),
        (&json!(0), &json!("done\n")),
        "{r}"
    );

    // left alone, it is stopped (not deleted)
    api.wait_for(&id, "stopped", |m| state(m) == Some("stopped"))
        .await;
    assert_eq!(
        common::qemu_processes_in(srv.fleet.engine().run_dir()),
        0,
        "a stopped machine's VM still runs"
    );
    // an exec boots it again, and the idle stop applies again
    let r = api.exec(&id, json!(["echo", "back"])).await;
    assert_eq!(r["stdout"], "back\n", "{r}");
    api.wait_for(&id, "stopped again", |m| state(m) == Some("stopped"))
        .await;
    assert_eq!(srv.teardown().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_deletes_the_machine() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    srv.fleet.set_sweep_interval(SWEEP);
    let api = Api::of(&srv, srv.admin_key.as_deref().unwrap());
    let m = api.create_ok(json!({"ttlSeconds": 5}), &image).await;
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        (&m["ttlSeconds"], &m["autoStopSeconds"]),
        (&json!(5), &Value::Null),
        "{m}"
    );
    // a machine without a lifetime, next to it, stays
    let keeper = api.create_ok(json!({}), &image).await;
    let keeper = keeper["id"].as_str().unwrap().to_string();
    api.wait_gone(&id).await;
    assert_eq!(
        state(api.get(&keeper).await.as_ref()),
        Some("running"),
        "the machine without a TTL went too"
    );
    let r = api
        .c
        .delete(format!("{}/v1/machines/{keeper}", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    node_is_empty(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_machines_are_deleted_when_they_stop() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    srv.fleet.set_sweep_interval(SWEEP);
    let api = Api::of(&srv, srv.admin_key.as_deref().unwrap());

    // a stop request: the answer says deleted, and it is
    let m = api.create_ok(json!({"ephemeral": true}), &image).await;
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["ephemeral"], true, "{m}");
    let r = api.exec(&id, json!(["echo", "hi"])).await;
    assert_eq!(r["stdout"], "hi\n", "{r}");
    let s = api.post(&id, "stop").await;
    assert_eq!(s["state"], "deleted", "{s}");
    assert!(api.get(&id).await.is_none(), "still listed after its stop");

    // its VM exiting (killed from outside): the sweeper deletes it
    let m = api.create_ok(json!({"ephemeral": true}), &image).await;
    let id = m["id"].as_str().unwrap().to_string();
    let pid = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == id)
        .and_then(|s| s.pid)
        .expect("the VMM's pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    api.wait_gone(&id).await;

    // the idle stop of an ephemeral machine deletes it too
    let m = api
        .create_ok(json!({"ephemeral": true, "autoStopSeconds": 2}), &image)
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    api.wait_gone(&id).await;

    // a machine that is not ephemeral survives its stop
    let m = api.create_ok(json!({"ephemeral": false}), &image).await;
    let id = m["id"].as_str().unwrap().to_string();
    let s = api.post(&id, "stop").await;
    assert_eq!(s["state"], "stopped", "{s}");
    tokio::time::sleep(3 * SWEEP).await;
    assert_eq!(state(api.get(&id).await.as_ref()), Some("stopped"));
    assert_eq!(srv.teardown().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ttl_that_passed_while_the_server_was_down_is_swept_at_the_next_start() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    let home = home();
    let mut srv = spawn(home.path()).await.unwrap();
    // the first server never sweeps in time: only the second can delete it
    srv.fleet.set_sweep_interval(Duration::from_secs(3600));
    let key = srv.admin_key.clone().unwrap();
    let api = Api::of(&srv, &key);
    let ttl = 4;
    let m = api.create_ok(json!({"ttlSeconds": ttl}), &image).await;
    let id = m["id"].as_str().unwrap().to_string();
    let keeper = api
        .create_ok(json!({"autoStopSeconds": 3600}), &image)
        .await;
    let keeper = keeper["id"].as_str().unwrap().to_string();
    srv.keep_machines();
    drop(srv);
    // the TTL passes while no server runs
    tokio::time::sleep(Duration::from_secs(ttl + 2)).await;
    let srv = spawn(home.path()).await.unwrap();
    srv.fleet.set_sweep_interval(Duration::from_secs(3600));
    let api = Api::of(&srv, &key);
    api.wait_gone(&id).await;
    let k = api.get(&keeper).await;
    assert_eq!(state(k.as_ref()), Some("running"), "{k:?}");
    assert_eq!(k.as_ref().unwrap()["autoStopSeconds"], 3600, "{k:?}");
    assert_eq!(srv.teardown().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_lifetimes_are_422_naming_the_field() {
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let api = Api::of(&srv, srv.admin_key.as_deref().unwrap());
    let src = json!({"type": "image", "reference": "127.0.0.1:1/none:latest"});
    for field in ["autoStopSeconds", "ttlSeconds"] {
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("60"),
            json!(366u64 * 24 * 3600 + 1),
            json!(u64::MAX),
        ] {
            let r = api.create(json!({"source": src, field: bad})).await;
            let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
            let detail = p["detail"].as_str().unwrap();
            assert!(detail.contains(field), "{field}={bad}: {p}");
        }
    }
    let r = api.create(json!({"source": src, "ephemeral": "yes"})).await;
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
    assert!(p["detail"].as_str().unwrap().contains("ephemeral"), "{p}");
    // nothing was made
    let r = api
        .c
        .get(format!("{}/v1/machines", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await, json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_test_server_leaves_no_vm() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let api = Api::of(&srv, srv.admin_key.as_deref().unwrap());
    let m = api.create_ok(json!({"name": "left-behind"}), &image).await;
    assert_eq!(m["state"], "running", "{m}");
    let engine = srv.fleet.engine().clone();
    assert_eq!(common::qemu_processes_in(engine.run_dir()), 1);
    // no teardown: the drop is the backstop
    drop(srv);
    assert_eq!(common::qemu_processes_in(engine.run_dir()), 0);
    let left = smolmachines::Machine::list_on(&*engine, &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}
