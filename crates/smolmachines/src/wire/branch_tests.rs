use serde_json::{json, Value};

use super::*;

fn opts(ports: &[(u16, u16)], branchable: bool) -> BranchOptions {
    BranchOptions {
        ports: ports
            .iter()
            .map(|&(host, guest)| PortSpec { host, guest })
            .collect(),
        branchable,
        freeze_source: false,
    }
}

fn to_json(b: &BranchBody) -> Value {
    serde_json::to_value(b).unwrap()
}

#[test]
fn the_branch_body_is_the_python_clients() {
    // transport.py `fork` (1.32.2): name and ports always, the flags only when true
    let b = BranchBody::new(BranchRoute::Branches, "c1", &opts(&[], false));
    assert_eq!(
        serde_json::to_string(&b).unwrap(),
        r#"{"name":"c1","ports":[]}"#
    );
    let b = BranchBody::new(BranchRoute::Branches, "c1", &opts(&[(0, 8080)], true));
    assert_eq!(
        to_json(&b),
        json!({"name": "c1", "ports": [{"port": 8080, "hostPort": 0}], "branchable": true})
    );
    // the legacy route names the flag `forkable`
    let b = BranchBody::new(BranchRoute::Fork, "c1", &opts(&[(9000, 80)], true));
    assert_eq!(
        to_json(&b),
        json!({"name": "c1", "ports": [{"port": 80, "hostPort": 9000}], "forkable": true})
    );
    // freezeSource only when true, on either route
    let mut frozen = opts(&[], false);
    frozen.freeze_source = true;
    for route in [BranchRoute::Branches, BranchRoute::Fork] {
        let b = BranchBody::new(route, "c1", &frozen);
        assert_eq!(
            to_json(&b),
            json!({"name": "c1", "ports": [], "freezeSource": true})
        );
        assert!(b.into_options().unwrap().freeze_source);
    }
    assert_eq!(
        BranchRoute::Branches.path("mach-1"),
        "/v1/machines/mach-1/branches"
    );
    assert_eq!(BranchRoute::Fork.path("mach-1"), "/v1/machines/mach-1/fork");
}

#[test]
fn what_the_published_clients_send_reads_as_the_engines_options() {
    // Python, branches: `branchable` and `freezeSource` only when set
    let b: BranchBody = serde_json::from_value(
        json!({"name": "c1", "ports": [{"port": 8080, "hostPort": 0}], "branchable": true}),
    )
    .unwrap();
    assert_eq!(b.clone().into_options().unwrap(), opts(&[(0, 8080)], true));
    // Python / Node 1.9, fork: `forkable`
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "ports": [], "forkable": true})).unwrap();
    assert_eq!(b.into_options().unwrap(), opts(&[], true));
    // ports null or absent, unknown fields dropped
    for v in [
        json!({"name": "c1", "ports": null}),
        json!({"name": "c1", "extra": 1}),
    ] {
        let b: BranchBody = serde_json::from_value(v).unwrap();
        assert_eq!(b.into_options().unwrap(), opts(&[], false));
    }
    // a hostPort of null lets the server pick, as 0 does
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "ports": [{"port": 8080, "hostPort": null}]}))
            .unwrap();
    assert_eq!(b.into_options().unwrap(), opts(&[(0, 8080)], false));
}

#[test]
fn a_missing_name_or_a_mistyped_field_does_not_read() {
    for v in [
        json!({"ports": []}),
        json!({"name": 5, "ports": []}),
        json!({"name": "c1", "ports": [{"port": 70000}]}),
        json!({"name": "c1", "branchable": "yes"}),
    ] {
        let e = serde_json::from_value::<BranchBody>(v.clone()).unwrap_err();
        assert!(e.is_data(), "{v}: {e}");
    }
}

#[test]
fn freeze_source_reads_and_the_aliases_must_agree() {
    use crate::error::ErrorCode;
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "ports": [], "freezeSource": true})).unwrap();
    assert!(b.into_options().unwrap().freeze_source);
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "freezeSource": false})).unwrap();
    assert!(!b.into_options().unwrap().freeze_source);
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "branchable": true, "forkable": false}))
            .unwrap();
    assert_eq!(
        b.into_options().unwrap_err().code(),
        ErrorCode::InvalidConfig
    );
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "branchable": true, "forkable": true}))
            .unwrap();
    assert!(b.into_options().unwrap().branchable);
    let b: BranchBody =
        serde_json::from_value(json!({"name": "c1", "ports": [{"port": 0}]})).unwrap();
    assert_eq!(
        b.into_options().unwrap_err().code(),
        ErrorCode::InvalidConfig
    );
}

#[test]
fn the_batch_body_reads_as_transport_py_sends_it() {
    // fork_batch(names=["a", "b"], ports=[PortSpec(0, 8080)], freeze_source=True)
    let b: BranchBatchBody = serde_json::from_value(json!({
        "ports": [{"port": 8080, "hostPort": 0}], "names": ["a", "b"], "freezeSource": true
    }))
    .unwrap();
    let o = b.into_options("golden").unwrap();
    assert_eq!(o.clone_names().unwrap(), ["a", "b"]);
    assert_eq!(
        o.ports,
        [PortSpec {
            host: 0,
            guest: 8080
        }]
    );
    assert!(o.freeze_source);
    // fork_batch(3): the prefix is the server's (the source's name here)
    let b: BranchBatchBody = serde_json::from_value(json!({"ports": [], "count": 3})).unwrap();
    assert_eq!(
        b.into_options("golden").unwrap().clone_names().unwrap(),
        ["golden-1", "golden-2", "golden-3"]
    );
    let b: BranchBatchBody =
        serde_json::from_value(json!({"ports": [], "count": 2, "namePrefix": "rl"})).unwrap();
    assert_eq!(
        b.into_options("golden").unwrap().clone_names().unwrap(),
        ["rl-1", "rl-2"]
    );
    // neither count nor names, or 65 of them, is refused by the engine's check
    for v in [json!({"ports": []}), json!({"ports": [], "count": 65})] {
        let b: BranchBatchBody = serde_json::from_value(v.clone()).unwrap();
        let e = b.into_options("golden").unwrap().clone_names().unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::InvalidConfig, "{v}");
    }
    // the shape it writes is the one it reads: ports always, the rest when set
    let b = BranchBatchBody {
        count: Some(2),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&b).unwrap(),
        json!({"ports": [], "count": 2})
    );
    let r: BranchBatchResponse =
        serde_json::from_value(json!({"clones": [{"id": "mach-1", "state": "running"}]})).unwrap();
    assert_eq!(r.clones[0].id, "mach-1");
}
