use serde_json::{json, Value};

use super::*;
use crate::config::{CredentialSpec, MachineConfig, MachineState, MachineSummary, PortSpec};

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

fn config(image: &str) -> MachineConfig {
    MachineConfig {
        image: Some(image.into()),
        ..Default::default()
    }
}

#[test]
fn the_minimal_create_body_is_the_python_clients_byte_for_byte() {
    // CLOUD-CLIENTS.md §4, observed on the wire from smolmachines 1.32.2.
    let body = CreateMachineBody::try_from(&config("alpine:3.20")).unwrap();
    assert_eq!(
        serde_json::to_string(&body).unwrap(),
        r#"{"name":null,"source":{"type":"image","reference":"alpine:3.20"},"resources":{"diskGb":null},"autoStopSeconds":null,"ttlSeconds":null,"forkable":false}"#
    );
}

#[test]
fn a_full_create_body_sends_the_set_fields_only() {
    let mut c = config("python:3.12");
    c.name = Some("web".into());
    c.resources.cpus = Some(2);
    c.resources.memory_mb = Some(1024);
    c.resources.storage_gb = Some(30);
    c.resources.disk_durability = Some(DiskDurability::Deferred);
    c.network = Some(false);
    c.ports = vec![PortSpec {
        host: 8080,
        guest: 80,
    }];
    c.env.insert("K".into(), "V".into());
    c.workdir = Some("/app".into());
    c.command = Some(vec!["python".into(), "-m".into(), "http.server".into()]);
    c.auto_stop_seconds = Some(300);
    c.ttl_seconds = Some(3600);
    c.branchable = Some(true);
    c.labels.insert("team".into(), "a".into());
    c.credentials = vec![CredentialSpec {
        name: "gh".into(),
        env_var: "GH_TOKEN".into(),
        hosts: vec!["api.github.com".into()],
        value: Some("s3cret".into()),
        methods: None,
    }];
    let body = CreateMachineBody::try_from(&c).unwrap();
    assert_eq!(
        to_json(&body),
        json!({
            "name": "web",
            "source": {"type": "image", "reference": "python:3.12"},
            "resources": {"cpus": 2, "memoryMb": 1024, "diskGb": 30, "diskDurability": "deferred"},
            "network": {"mode": "blocked"},
            "ports": [{"port": 80}],
            "env": {"K": "V"},
            "workdir": "/app",
            "command": ["python", "-m", "http.server"],
            "autoStopSeconds": 300,
            "ttlSeconds": 3600,
            "forkable": true,
            "labels": {"team": "a"},
            "credentials": ["gh"],
        })
    );
    // the secret goes to PUT /v1/credentials/{name} only, and never into Debug
    let cred = CredentialBody::of(&c.credentials[0]).unwrap();
    assert_eq!(
        to_json(&cred),
        json!({"envVar": "GH_TOKEN", "hosts": ["api.github.com"], "value": "s3cret"})
    );
    assert!(!format!("{cred:?}{:?}", c.credentials[0]).contains("s3cret"));
    assert!(!serde_json::to_string(&body).unwrap().contains("s3cret"));

    // allow lists are the allowCidrs mode; network true is open
    let mut c = config("x");
    c.resources.allow_cidrs = vec!["10.0.0.0/8".into()];
    c.resources.allow_hosts = vec!["pypi.org".into()];
    assert_eq!(
        to_json(&CreateMachineBody::try_from(&c).unwrap())["network"],
        json!({"mode": "allowCidrs", "cidrs": ["10.0.0.0/8"], "hosts": ["pypi.org"]})
    );
    c.resources = Default::default();
    c.network = Some(true);
    assert_eq!(
        to_json(&CreateMachineBody::try_from(&c).unwrap())["network"],
        json!({"mode": "open"})
    );
    // the cloud needs an image
    let e = CreateMachineBody::try_from(&MachineConfig::default()).unwrap_err();
    assert_eq!(e.code(), "INVALID_CONFIG");
}

#[test]
fn a_server_reads_the_clients_bodies_into_a_validated_config() {
    // the Python client's body, with its nulls
    let body: CreateMachineBody = serde_json::from_str(
        r#"{"name": null, "source": {"type": "image", "reference": "alpine:3.20"},
            "resources": {"diskGb": null}, "autoStopSeconds": null, "ttlSeconds": null,
            "forkable": false, "someFutureField": 1}"#,
    )
    .unwrap();
    let c = MachineConfig::try_from(body).unwrap();
    assert_eq!(c.image.as_deref(), Some("alpine:3.20"));
    assert_eq!(c.name, None);
    assert!(!c.is_branchable());
    assert_eq!(c.effective_network(), None);

    // the Rust crate's alias, ports, network, sizes
    let body: CreateMachineBody = serde_json::from_value(json!({
        "name": "b1", "source": {"type": "image", "reference": "x"},
        "resources": {"cpus": 2, "memoryMb": 512, "diskGb": 5},
        "network": {"mode": "allowCidrs", "cidrs": ["10.1.0.0/16"], "hosts": null},
        "ports": [{"port": 80}, {"port": 81, "hostPort": 9081}],
        "branchable": true, "labels": null, "ttlSeconds": 60,
    }))
    .unwrap();
    let c = MachineConfig::try_from(body).unwrap();
    assert!(c.is_branchable());
    assert_eq!(c.resources.allow_cidrs, vec!["10.1.0.0/16".to_string()]);
    assert_eq!(c.resources.storage_gb, Some(5));
    assert_eq!(
        c.ports,
        vec![
            PortSpec { host: 0, guest: 80 },
            PortSpec {
                host: 9081,
                guest: 81
            }
        ]
    );
    assert_eq!(c.ttl_seconds, Some(60));

    // both aliases at once are refused, as the server does
    let both = json!({"source": {"type": "image", "reference": "x"},
                      "forkable": true, "branchable": true});
    let e = MachineConfig::try_from(serde_json::from_value::<CreateMachineBody>(both).unwrap())
        .unwrap_err();
    assert_eq!(e.code(), "INVALID_CONFIG");
    assert!(e.to_string().contains("forkable"), "{e}");
    // the core's validation applies to wire bodies too
    let big = json!({"source": {"type": "image", "reference": "x"}, "resources": {"cpus": 100000}});
    let e = MachineConfig::try_from(serde_json::from_value::<CreateMachineBody>(big).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("resources.cpus"), "{e}");
    // no source is a shape error; a top-level image is not a source (SPEC §10.3)
    assert!(serde_json::from_value::<CreateMachineBody>(json!({"image": "x"})).is_err());
    // credentials by name need a store; with one they resolve
    let named = json!({"source": {"type": "image", "reference": "x"}, "credentials": ["gh"]});
    let body: CreateMachineBody = serde_json::from_value(named).unwrap();
    assert_eq!(
        MachineConfig::try_from(body.clone()).unwrap_err().code(),
        "NOT_SUPPORTED"
    );
    let c = body
        .into_config(|n| {
            Ok(CredentialSpec {
                name: n.into(),
                env_var: "T".into(),
                hosts: vec!["h.example".into()],
                ..Default::default()
            })
        })
        .unwrap();
    assert_eq!(c.credentials[0].name, "gh");
    // what the core cannot hold is refused, not dropped
    for extra in [
        json!({"ephemeral": true}),
        json!({"public": true}),
        json!({"mounts": [{"volume": "v", "mountPath": "/d"}]}),
    ] {
        let mut b = json!({"source": {"type": "image", "reference": "x"}});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let body: CreateMachineBody = serde_json::from_value(b).unwrap();
        assert_eq!(
            MachineConfig::try_from(body).unwrap_err().code(),
            "NOT_SUPPORTED"
        );
    }
}

#[test]
fn config_round_trips_through_the_create_body() {
    let mut c = config("alpine:3.20");
    c.name = Some("rt".into());
    c.resources.cpus = Some(4);
    c.resources.memory_mb = Some(2048);
    c.resources.storage_gb = Some(20);
    c.resources.allow_hosts = vec!["example.com".into()];
    c.ports = vec![PortSpec {
        host: 0,
        guest: 8080,
    }];
    c.env.insert("A".into(), "1".into());
    c.workdir = Some("/w".into());
    c.command = Some(vec!["sleep".into(), "1".into()]);
    c.auto_stop_seconds = Some(30);
    c.labels.insert("k".into(), "v".into());
    let json = serde_json::to_string(&CreateMachineBody::try_from(&c).unwrap()).unwrap();
    let back =
        MachineConfig::try_from(serde_json::from_str::<CreateMachineBody>(&json).unwrap()).unwrap();
    assert_eq!(back.name, c.name);
    assert_eq!(back.image, c.image);
    assert_eq!(back.resources, c.resources);
    assert_eq!(back.ports, c.ports);
    assert_eq!(back.env, c.env);
    assert_eq!(back.workdir, c.workdir);
    assert_eq!(back.command, c.command);
    assert_eq!(back.auto_stop_seconds, c.auto_stop_seconds);
    assert_eq!(back.labels, c.labels);
    assert_eq!(back.is_branchable(), c.is_branchable());
}

#[test]
fn machine_info_reads_what_servers_send() {
    // SPEC §10.2, with nulls where old servers send them and a field nobody knows
    let info: MachineInfo = serde_json::from_str(
        r#"{"id": "mach-1", "name": "web", "state": "running", "ready": true,
            "readyAt": "2026-01-01T00:00:00Z",
            "source": {"type": "image", "reference": "python:3.12", "arch": "amd64"},
            "resources": {"cpus": 4, "memoryMb": 8192, "diskGb": 20},
            "network": {"mode": "open", "cidrs": [], "hosts": []},
            "ports": [{"port": 8080, "hostPort": 31234, "protocol": "tcp"}, {"port": 9000, "hostPort": null}],
            "env": {"K": "V"}, "workdir": null, "ephemeral": false, "ttlSeconds": null,
            "autoStopSeconds": 300, "labels": {"k": "v"}, "branchable": false, "forkable": true,
            "capabilities": {"exec": true, "branch": false}, "url": null,
            "lastActivityAt": null, "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "x",
            "newField": {"a": 1}}"#,
    )
    .unwrap();
    assert_eq!(info.ready, Some(true));
    assert_eq!(info.ports[1].host_port, None);
    assert_eq!(info.ports[1].protocol, "tcp");
    assert_eq!(info.auto_stop_seconds, Some(300));
    let s = MachineSummary::try_from(&info).unwrap();
    assert_eq!((s.id.as_str(), s.name.as_str()), ("mach-1", "web"));
    assert_eq!(s.state, MachineState::Running);
    assert!(s.branchable && s.persistent);
    assert_eq!(s.image.as_deref(), Some("python:3.12"));
    assert_eq!(
        s.ports[0],
        PortSpec {
            host: 31234,
            guest: 8080
        }
    );
    // a bare record (id + state) and a null list are fine; no id is not
    let bare: MachineInfo =
        serde_json::from_str(r#"{"id":"mach-2","state":"started","ports":null}"#).unwrap();
    assert_eq!(
        MachineSummary::try_from(&bare).unwrap().state,
        MachineState::Running
    );
    assert_eq!(MachineSummary::try_from(&bare).unwrap().name, "mach-2");
    assert!(serde_json::from_str::<MachineInfo>(r#"{"state":"running"}"#).is_err());
}

#[test]
fn lists_come_bare_or_wrapped_and_a_local_summary_maps_to_a_record() {
    let s = MachineSummary {
        id: "m1".into(),
        name: "m1".into(),
        state: MachineState::Stopped,
        cpus: 2,
        memory_mb: 512,
        pid: None,
        accel: "tcg".into(),
        labels: [("a".to_string(), "b".to_string())].into(),
        persistent: true,
        detached: false,
        image: None,
        created_unix: 1_700_000_000,
        storage_gb: 20,
        ports: vec![PortSpec {
            host: 8080,
            guest: 80,
        }],
        branchable: false,
    };
    let info = MachineInfo::from(&s);
    let v = to_json(&info);
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["createdAt"], "2023-11-14T22:13:20Z");
    assert_eq!(
        v["resources"],
        json!({"cpus": 2, "memoryMb": 512, "diskGb": 20})
    );
    assert_eq!(
        v["ports"],
        json!([{"port": 80, "hostPort": 8080, "protocol": "tcp"}])
    );
    assert_eq!(v["persistent"], true);
    assert!(v.get("source").is_none() && v.get("pid").is_none());
    let back = MachineSummary::try_from(&info).unwrap();
    assert_eq!(
        (back.name, back.ports, back.labels, back.cpus),
        (s.name.clone(), s.ports.clone(), s.labels.clone(), 2)
    );

    let bare = format!("[{}]", serde_json::to_string(&info).unwrap());
    let wrapped = format!(r#"{{"machines": {bare}}}"#);
    for text in [bare.as_str(), wrapped.as_str()] {
        let l: MachineList = serde_json::from_str(text).unwrap();
        assert_eq!(l.into_vec(), vec![info.clone()]);
    }
    // serialized bare (SPEC §12.18)
    assert!(serde_json::to_string(&MachineList::Bare(vec![]))
        .unwrap()
        .starts_with('['));
    assert!(serde_json::from_str::<MachineList>(r#"{"items": []}"#).is_err());
}

#[test]
fn ports_bodies() {
    let ports = [
        PortSpec { host: 1, guest: 80 },
        PortSpec {
            host: 0,
            guest: 443,
        },
    ];
    let body = SetPortsBody::from(&ports[..]);
    assert_eq!(
        to_json(&body),
        json!({"ports": [{"port": 80}, {"port": 443}]})
    );
    let back: SetPortsBody = serde_json::from_str(r#"{"ports":[{"port":8080}]}"#).unwrap();
    assert_eq!(back.ports[0].port, 8080);
}
