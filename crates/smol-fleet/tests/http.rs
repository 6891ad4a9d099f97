//! The HTTP contract without a VM: authentication on every path, request ids, body errors,
//! health. A real server on 127.0.0.1 over a temporary home and real SQLite.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use smol_fleet::testing::spawn;
use support::{client, content_type, json_ok, oversized, problem, unauthorized};

#[tokio::test(flavor = "multi_thread")]
async fn every_path_needs_a_valid_key() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().expect("first start prints a key");
    assert!(smol_fleet::keys::well_formed(&key), "{key}");
    let c = client();
    let url = |p: &str| format!("{}{p}", srv.base_url);

    // no key, a bad key of the right shape, garbage, another scheme: 401 with an empty body,
    // on a known path and an unknown one, any method
    let fake = smol_fleet::keys::generate();
    for path in [
        "/v1/machines",
        "/v1/nope",
        "/nope",
        "/livez",
        "/v1/machines/mach-1/exec",
    ] {
        unauthorized(c.get(url(path)).send().await.unwrap()).await;
        unauthorized(c.post(url(path)).bearer_auth(&fake).send().await.unwrap()).await;
        unauthorized(
            c.get(url(path))
                .bearer_auth("garbage")
                .send()
                .await
                .unwrap(),
        )
        .await;
        unauthorized(
            c.get(url(path))
                .header("authorization", format!("Basic {key}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
    }
    // the right key: the known path answers, the unknown one is a 404 problem
    let list = json_ok(
        c.get(url("/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list, json!([]));
    problem(
        c.get(url("/v1/nope"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // the scheme name is case-insensitive
    let r = c
        .get(url("/livez"))
        .header("authorization", format!("bearer {key}"))
        .send()
        .await
        .unwrap();
    json_ok(r, StatusCode::OK).await;

    // /health answers without a key
    let h = json_ok(c.get(url("/health")).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(h["apiVersion"], 2);
    assert_eq!(h["status"], "ok", "{h}");
    // the embedded node of `--role all`, live and ready
    assert_eq!(
        (&h["nodesTotal"], &h["nodesReady"]),
        (&json!(1), &json!(1)),
        "{h}"
    );
    let features: Vec<&str> = h["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(features.contains(&"machine.portable_checkpoint"), "{h}");
    assert!(features.contains(&"machine.branch_source_continues"), "{h}");
    let r = c
        .get(url("/readyz"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(r, StatusCode::OK).await["status"], "ready");

    // a revoked key is refused at once
    let other = srv.new_tenant_key("other").await.unwrap();
    json_ok(
        c.get(url("/v1/machines"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    let rows = srv.fleet.db().list_keys().await.unwrap();
    let row = rows.iter().find(|k| other.starts_with(&k.prefix)).unwrap();
    assert!(
        !rows.iter().any(|k| k.prefix == other),
        "the key is not stored"
    );
    let id = row.id.clone();
    assert!(srv.fleet.db().revoke_key(&id).await.unwrap());
    unauthorized(
        c.get(url("/v1/machines"))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
    )
    .await;

    // another tenant's (or a missing) machine id is 404
    let other = srv.new_tenant_key("third").await.unwrap();
    for path in ["/v1/machines/mach-0000000000000000", "/v1/machines/x/start"] {
        let r = if path.ends_with("start") {
            c.post(url(path)).bearer_auth(&other).send().await.unwrap()
        } else {
            c.get(url(path)).bearer_auth(&other).send().await.unwrap()
        };
        problem(r, StatusCode::NOT_FOUND, "not_found").await;
    }

    // a restarted server over the same home keeps its keys and prints none
    drop(srv);
    let again = spawn(home.path()).await.unwrap();
    assert!(again.admin_key.is_none());
    json_ok(
        c.get(format!("{}/v1/machines", again.base_url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_and_body_errors() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let c = client();
    let machines = format!("{}/v1/machines", srv.base_url);

    // a safe client id is echoed, an unsafe one replaced, none gets one; 401s carry it too
    let r = c
        .get(&machines)
        .header("x-request-id", "my-req.1_A")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-req.1_A");
    let r = c
        .get(&machines)
        .header("x-request-id", "bad id!")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.starts_with("req-") && id.len() > 8, "{id}");
    let long = "a".repeat(129);
    let r = c
        .get(&machines)
        .header("x-request-id", &long)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], long.as_str());
    let a = c.get(&machines).bearer_auth(&key).send().await.unwrap();
    let b = c.get(&machines).bearer_auth(&key).send().await.unwrap();
    assert_ne!(a.headers()["x-request-id"], b.headers()["x-request-id"]);

    // malformed JSON 400, schema violations 422 (no image: `source` missing, wrong types,
    // an empty reference), problem+json with the core's codes
    let post = |body: &'static str| {
        c.post(&machines)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for bad in ["{", "not json", "", "{\"name\": }"] {
        problem(
            post(bad).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_config",
        )
        .await;
    }
    for schema in [
        r#"{"name": null}"#,
        r#"{"image": "alpine:3.20"}"#,
        r#"{"source": {"type": "image"}}"#,
        r#"{"source": {"type": "image", "reference": ""}}"#,
        r#"{"source": {"type": "image", "reference": "x"}, "resources": {"cpus": "two"}}"#,
        r#"[1, 2]"#,
    ] {
        let p = problem(
            post(schema).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
        )
        .await;
        assert!(p["detail"].as_str().unwrap().len() > 5, "{p}");
    }
    // more than 4 published ports (SPEC §10.2): 422 naming the limit, at create and on
    // PUT …/ports, before any engine work (no machine is looked up or made)
    let five = json!([{"port": 1}, {"port": 2}, {"port": 3}, {"port": 4}, {"port": 5}]);
    let r = c
        .post(&machines)
        .bearer_auth(&key)
        .json(&json!({"source": {"type": "image", "reference": "x"}, "ports": five}))
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
    assert!(p["detail"].as_str().unwrap().contains("at most 4"), "{p}");
    let r = c
        .put(format!("{machines}/mach-none/ports"))
        .bearer_auth(&key)
        .json(&json!({ "ports": five }))
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
    assert!(p["detail"].as_str().unwrap().contains("at most 4"), "{p}");
    // `node.KEY` labels ask for node labels: one host's only node is labelled with its arch
    let r = c
        .post(&machines)
        .bearer_auth(&key)
        .json(&json!({"source": {"type": "image", "reference": "x"}, "labels": {"node.region": "eu"}}))
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("region=eu") && detail.contains(std::env::consts::ARCH),
        "{p}"
    );
    // four are taken (then the machine is looked up: 404)
    let four = json!({"ports": [{"port": 1}, {"port": 2}, {"port": 3}, {"port": 4}]});
    let r = c
        .put(format!("{machines}/mach-none/ports"))
        .bearer_auth(&key)
        .json(&four)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // an invalid name is the core's InvalidConfig (400), before any engine work
    let r = c
        .post(&machines)
        .bearer_auth(&key)
        .json(&json!({"name": "-bad name", "source": {"type": "image", "reference": "x"}}))
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::BAD_REQUEST, "invalid_config").await;
    assert!(p["detail"].as_str().unwrap().contains("name"), "{p}");
    // nothing was recorded by the refused creates
    let list = json_ok(
        c.get(&machines).bearer_auth(&key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list, json!([]));

    // a JSON body over the limit is 413 (problem+json), also on an unknown machine's exec
    let (status, text) = oversized(
        srv.addr,
        "POST",
        "/v1/machines",
        &key,
        smol_fleet::JSON_LIMIT + 1,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(
        text.to_lowercase().contains("application/problem+json"),
        "{text}"
    );
    // a file over 100 MiB is 413
    let (status, text) = oversized(
        srv.addr,
        "PUT",
        "/v1/machines/mach-0000000000000000/files//tmp/big",
        &key,
        smol_fleet::FILE_LIMIT + 1,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    // the same without a key is still a 401
    let (status, _) = oversized(srv.addr, "POST", "/v1/machines", "nokey", 10).await;
    assert_eq!(status, 401);

    // the JSON 2xx content type is exactly application/json
    let r = c
        .get(format!("{}/health", srv.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(content_type(&r), "application/json");
}
