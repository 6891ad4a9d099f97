//! The OpenAPI document: the checked-in copy is what the code generates, the server serves
//! it at `/openapi.json` behind a key, and every route of the document answers.

mod support;

use std::process::Command;

use reqwest::StatusCode;
use smol_fleet::testing::spawn;
use support::{client, json_ok, unauthorized};

const CHECKED_IN: &str = include_str!("../openapi.json");

#[test]
fn the_checked_in_document_is_current() {
    let generated = smol_fleet::openapi::document_json();
    assert!(!generated.is_empty());
    assert!(
        generated == CHECKED_IN,
        "crates/smol-fleet/openapi.json is out of date; regenerate it with\n  \
         cargo run -q -p smol-fleet --bin smolfleet -- openapi > crates/smol-fleet/openapi.json"
    );
    // the binary prints the same document
    let out = Command::new(env!("CARGO_BIN_EXE_smolfleet"))
        .arg("openapi")
        .output()
        .expect("run smolfleet");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), generated);
}

#[tokio::test(flavor = "multi_thread")]
async fn served_behind_a_key_and_every_path_exists() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().expect("bootstrap key");
    let c = client();
    let url = format!("{}/openapi.json", srv.base_url);
    unauthorized(c.get(&url).send().await.unwrap()).await;
    let doc = json_ok(
        c.get(&url).bearer_auth(&key).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let checked_in: serde_json::Value = serde_json::from_str(CHECKED_IN).unwrap();
    assert_eq!(doc, checked_in);
    assert_eq!(doc["info"]["title"], "smolfleet API");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{paths:?}");
    // every documented operation is routed: none answers the unknown-route 404 (route)
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let p = path
                .replace("{id}", "mach-0000000000000000")
                .replace("{path}", "rel/x");
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = c
                .request(m, format!("{}{p}", srv.base_url))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(r#"{"command":["true"]}"#)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            assert!(
                !text.contains("not found: route"),
                "{method} {path}: {status} {text}"
            );
            assert!(
                !status.is_server_error(),
                "{method} {path}: {status} {text}"
            );
        }
    }
    // the schemas of the core's wire types are there, camelCase as on the wire
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["CommandBody"]["properties"]["timeoutSeconds"].is_object(),
        "{schemas}"
    );
    assert!(
        schemas["MachineInfo"]["properties"]["readyAt"].is_object(),
        "{schemas}"
    );
}
