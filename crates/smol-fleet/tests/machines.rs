//! Machines through the fleet: a real server on 127.0.0.1, real VMs on the local engine, an
//! image from the test registry on 127.0.0.1 (skipped without `make setup`, as every VM
//! test; `SMOL_VM_TESTS=required` fails instead).

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::RngCore;
use reqwest::StatusCode;
use serde_json::{json, Value};
use smol_fleet::testing::spawn;
use support::{client, content_type, json_ok, problem};

#[tokio::test(flavor = "multi_thread")]
async fn create_exec_files_stop_autostart_delete() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sft")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = spawn(home.path()).await.unwrap();
    // SMOL_FLEET_TEST_STORE=postgres runs it over PostgreSQL (docs/FLEET.md)
    assert_eq!(srv.fleet.db().kind(), smol_fleet::testing::store_kind());
    let key = srv.admin_key.clone().unwrap();
    let other = srv.new_tenant_key("other").await.unwrap();
    let c = client();
    let url = |p: &str| format!("{}{p}", srv.base_url);
    let image = reg.reference("test/busybox:latest");

    // create as the published client does (name null, its nulls, an unknown field ignored)
    let t0 = Instant::now();
    let r = c
        .post(url("/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({
            "name": null,
            "source": {"type": "image", "reference": image},
            "resources": {"diskGb": null},
            "autoStopSeconds": null, "ttlSeconds": null, "forkable": false,
            "labels": {"team": "a", "tier": "x y"},
            "ports": [{"port": 8080}],
            "someFieldFromTheFuture": {"a": 1},
        }))
        .send()
        .await
        .unwrap();
    let m = json_ok(r, StatusCode::CREATED).await;
    eprintln!("create took {:?}", t0.elapsed());
    let id = m["id"].as_str().unwrap().to_string();
    let name = m["name"].as_str().unwrap().to_string();
    assert!(id.starts_with("mach-"), "{m}");
    assert!(name.starts_with("smol-") && name.len() == 13, "{m}");
    assert_eq!(m["state"], "running", "{m}");
    // nothing listens on the published 8080: not ready (SPEC 9.4: every published port answers)
    assert_eq!(m["ready"], false, "{m}");
    assert_eq!(m["source"]["reference"], image.as_str(), "{m}");
    assert_eq!(m["labels"]["team"], "a", "{m}");
    assert!(m.get("pid").is_none() && m.get("accel").is_none(), "{m}");
    // a published port: the node picked a host port
    assert_eq!(m["ports"][0]["port"], 8080, "{m}");
    let host_port = m["ports"][0]["hostPort"].as_u64().expect("hostPort") as u16;
    // the node listens there (on loopback)
    tokio::net::TcpStream::connect(("127.0.0.1", host_port))
        .await
        .expect("the published port's host listener");
    let mpath = |p: &str| url(&format!("/v1/machines/{id}{p}"));

    // the same name again is 409 (conflict), nothing booted for it
    let r = c
        .post(url("/v1/machines"))
        .bearer_auth(&key)
        .json(&json!({"name": name, "source": {"type": "image", "reference": image}}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::CONFLICT, "conflict").await;

    // get, list, label filters
    let got = json_ok(
        c.get(mpath("")).bearer_auth(&key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["ready"], false);
    let list = |q: &'static str| {
        let c = c.clone();
        let key = key.clone();
        let u = url(&format!("/v1/machines{q}"));
        async move {
            json_ok(
                c.get(u).bearer_auth(&key).send().await.unwrap(),
                StatusCode::OK,
            )
            .await
        }
    };
    assert_eq!(list("").await.as_array().unwrap().len(), 1);
    assert_eq!(list("?label=team%3Da").await[0]["id"], id.as_str());
    assert_eq!(
        list("?label=team%3Da&label=tier%3Dx%20y")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(list("?label=team%3Da&label=tier%3Dz").await, json!([]));
    assert_eq!(list("?label=team%3Db").await, json!([]));

    // another tenant sees nothing of it: 404 on every route, an empty list
    for (method, p) in [
        ("GET", ""),
        ("DELETE", ""),
        ("POST", "/start"),
        ("POST", "/stop"),
        ("POST", "/exec"),
        ("GET", "/files//etc/motd"),
        ("PUT", "/files//tmp/x"),
    ] {
        let r = c
            .request(method.parse().unwrap(), mpath(p))
            .bearer_auth(&other)
            .header("content-type", "application/json")
            .body(r#"{"command": ["true"]}"#)
            .send()
            .await
            .unwrap();
        problem(r, StatusCode::NOT_FOUND, "not_found").await;
    }
    let r = c
        .get(url("/v1/machines"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await, json!([]));

    // exec: exit code, stdout/stderr text and b64, the user echoed when named
    let exec = |body: Value, q: &'static str| {
        let c = c.clone();
        let key = key.clone();
        let u = mpath(&format!("/exec{q}"));
        async move {
            json_ok(
                c.post(u)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
                StatusCode::OK,
            )
            .await
        }
    };
    let script = json!({"command": ["sh", "-c", "echo hi; echo err >&2; exit 3"], "env": {}, "cwd": null, "timeoutSeconds": null});
    let r = exec(script.clone(), "").await;
    assert_eq!(r["exitCode"], 3, "{r}");
    assert_eq!(r["stdout"], "hi\n", "{r}");
    assert_eq!(r["stderr"], "err\n", "{r}");
    assert_eq!(r["stdoutB64"], "aGkK", "{r}");
    assert_eq!(r["stdoutTruncated"], false, "{r}");
    assert_eq!(r["machineId"], id.as_str(), "{r}");
    assert!(r.get("user").is_none(), "{r}");
    let r = exec(script.clone(), "?output=text").await;
    assert!(r.get("stdoutB64").is_none() && r["stdout"] == "hi\n", "{r}");
    let r = exec(script, "?output=b64").await;
    assert!(r["stdout"] == "" && r["stdoutB64"] == "aGkK", "{r}");
    let r = exec(
        json!({"command": "echo $A from $(pwd)", "env": {"A": "env"}, "cwd": "/tmp"}),
        "",
    )
    .await;
    assert_eq!(r["stdout"], "env from /tmp\n", "{r}");
    let r = exec(json!({"command": ["id", "-u"], "user": "root"}), "").await;
    assert_eq!(
        (r["stdout"].as_str(), r["user"].as_str()),
        (Some("0\n"), Some("root")),
        "{r}"
    );
    // a command that cannot be found is still HTTP 200, exit 127
    let r = exec(json!({"command": ["no-such-program"]}), "").await;
    assert_eq!(r["exitCode"], 127, "{r}");

    // a timeout is exit 124 in a 200, within the timeout (plus grace)
    let t0 = Instant::now();
    let r = exec(
        json!({"command": ["busybox", "sleep", "60"], "timeoutSeconds": 1}),
        "",
    )
    .await;
    assert_eq!(r["exitCode"], 124, "{r}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());

    // malformed exec bodies: 400 / 422, problem+json
    let raw = |body: &'static str| {
        c.post(mpath("/exec"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    problem(
        raw("{\"command\":").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_config",
    )
    .await;
    problem(
        raw("{\"command\": 5}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    problem(
        raw("{}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
    )
    .await;
    let r = c
        .post(mpath("/exec?output=xml"))
        .bearer_auth(&key)
        .json(&json!({"command": ["echo"]}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;

    // files: 1 MiB of random bytes, written with the client's double slash, read back with
    // the relative form, byte-exact
    let mut blob = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut blob);
    let r = c
        .put(mpath("/files//data/dir%20a/blob.bin"))
        .bearer_auth(&key)
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", r.text().await);
    for form in [
        "/files/data/dir%20a/blob.bin",
        "/files//data/dir%20a/blob.bin",
    ] {
        let r = c.get(mpath(form)).bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(content_type(&r), "application/octet-stream");
        let got = r.bytes().await.unwrap();
        assert!(got.as_ref() == blob.as_slice(), "{} bytes back", got.len());
    }
    // the guest sees the same bytes
    let r = exec(
        json!({"command": ["busybox", "head", "-c", "16", "/data/dir a/blob.bin"]}),
        "",
    )
    .await;
    assert_eq!(
        r["stdoutB64"],
        base64::engine::general_purpose::STANDARD.encode(&blob[..16]),
        "{r}"
    );
    let r = c
        .get(mpath("/files//no/such/file"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;

    // stop: a clean power-off; the disk stays; stop again is fine
    let s = json_ok(
        c.post(mpath("/stop"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (s["state"].as_str(), s["ready"].as_bool()),
        (Some("stopped"), Some(false)),
        "{s}"
    );
    let s = json_ok(
        c.post(mpath("/stop"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(s["state"], "stopped", "{s}");
    let g = json_ok(
        c.get(mpath("")).bearer_auth(&key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(g["state"], "stopped", "{g}");

    // exec auto-starts it, and the file is still there
    let r = exec(
        json!({"command": ["busybox", "wc", "-c", "/data/dir a/blob.bin"]}),
        "",
    )
    .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    assert!(r["stdout"].as_str().unwrap().starts_with("1048576"), "{r}");
    let g = json_ok(
        c.get(mpath("")).bearer_auth(&key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(g["state"], "running", "{g}");
    // start of a running machine is a no-op 200
    let s = json_ok(
        c.post(mpath("/start"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (s["state"].as_str(), s["ready"].as_bool()),
        (Some("running"), Some(false)),
        "{s}"
    );

    // a server over the same home (a restart) finds the machine and execs on it
    let mut srv = srv;
    srv.keep_machines();
    drop(srv);
    let srv = spawn(home.path()).await.unwrap();
    let mpath = |p: &str| format!("{}/v1/machines/{id}{p}", srv.base_url);
    let r = c
        .post(mpath("/exec"))
        .bearer_auth(&key)
        .json(&json!({"command": ["echo", "again"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await["stdout"], "again\n");

    // delete: 204, then 404 everywhere; the name is free again
    let r = c.delete(mpath("")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    problem(
        c.get(mpath("")).bearer_auth(&key).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        c.delete(mpath("")).bearer_auth(&key).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let r = c
        .post(mpath("/exec"))
        .bearer_auth(&key)
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = c
        .get(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await, json!([]));
    // nothing is left on the node
    let left = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_that_fails_leaves_nothing() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sft")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let c = client();
    // an image the registry does not have: the core's typed error, the name released
    let r = c
        .post(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .json(&json!({"name": "ghost", "source": {"type": "image", "reference": reg.reference("test/none:latest")}}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let ct = content_type(&r);
    let body: Value = r.json().await.unwrap();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status} {body}"
    );
    assert_eq!(ct, "application/problem+json", "{body}");
    assert!(
        body["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
    let r = c
        .get(format!("{}/v1/machines", srv.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await, json!([]));
    let left = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}
