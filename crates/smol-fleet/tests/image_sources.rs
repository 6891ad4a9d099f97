//! A tenant names registry images only: a local image source (`dir:`, `oci:`,
//! `docker-archive:`, a path, one that exists or not) would boot a machine over the server
//! host's own files, so a create naming one is 422 before any engine work (no VM needed).

mod support;

use reqwest::StatusCode;
use serde_json::json;
use smol_fleet::testing::spawn;
use support::{client, json_ok, problem};

#[tokio::test(flavor = "multi_thread")]
async fn local_image_sources_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().expect("bootstrap key");
    let c = client();
    let here = home.path().display().to_string();
    for reference in [
        "dir:/etc".to_string(),
        format!("dir:{here}"),
        format!("oci:{here}:latest"),
        "docker-archive:/etc/hostname".to_string(),
        "/etc".to_string(),
        here.clone(),
        "./no-such-dir".to_string(),
        "/no/such/path".to_string(),
    ] {
        let r = c
            .post(format!("{}/v1/machines", srv.base_url))
            .bearer_auth(&key)
            .json(&json!({"source": {"type": "image", "reference": reference}}))
            .send()
            .await
            .unwrap();
        let body = problem(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("registry references only"),
            "{reference}: {detail}"
        );
    }
    let list = json_ok(
        c.get(format!("{}/v1/machines", srv.base_url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list, json!([]), "no machine was made");
}
