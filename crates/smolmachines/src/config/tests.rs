//! Tests of the config types, their validation and the targets' tables.

use super::*;

/// A named change to a default config.
type Case = (&'static str, Box<dyn Fn(&mut MachineConfig)>);

#[test]
fn names() {
    assert!(validate_name("worker-1.a_b").is_ok());
    for bad in ["", "-x", "a/b", "a b", &"x".repeat(64), "..", "ä"] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
    let n = generate_name();
    assert!(n.starts_with("smol-") && n.len() == 13);
    assert!(validate_name(&n).is_ok());
}

#[test]
fn exec_options_validation_and_rounding() {
    let o = ExecOptions {
        timeout: Some(Duration::from_micros(1500)),
        ..Default::default()
    };
    assert_eq!(o.timeout_ms(), Some(2));
    assert!(o.validate().is_ok());
    let o = ExecOptions {
        timeout: Some(Duration::ZERO),
        ..Default::default()
    };
    assert!(matches!(o.validate(), Err(Error::InvalidConfig { .. })));
    let o = ExecOptions {
        workdir: Some("tmp".into()),
        ..Default::default()
    };
    assert!(o.validate().is_err());
    let o = ExecOptions {
        user: Some(String::new()),
        ..Default::default()
    };
    assert!(o.validate().is_err());
}

#[test]
fn target_resolution() {
    let c = ConnectOptions::default();
    if std::env::var("SMOL_CLOUD_TOKEN")
        .unwrap_or_default()
        .is_empty()
    {
        assert_eq!(c.resolve_target(), Target::Local);
    }
    let c = ConnectOptions {
        api_key: Some("smk_x".into()),
        ..Default::default()
    };
    assert_eq!(c.resolve_target(), Target::Cloud);
    assert!(!format!("{c:?}").contains("smk_x"));
    let c = ConnectOptions {
        target: Some(Target::Local),
        api_key: Some("smk_x".into()),
        ..Default::default()
    };
    assert_eq!(c.resolve_target(), Target::Local);
}

#[test]
fn assert_success() {
    let r = ExecResult::from_bytes(3, false, b"o".to_vec(), b"e".to_vec());
    let err = r.assert_success(&["false".into()]).unwrap_err();
    assert!(matches!(err, Error::CommandFailed { exit_code: 3, .. }));
    assert_eq!(err.to_string(), "command exited with code 3: false");
}

#[test]
fn targets_parse_in_one_place() {
    assert_eq!("local".parse::<Target>().unwrap(), Target::Local);
    assert_eq!("cloud".parse::<Target>().unwrap(), Target::Cloud);
    assert_eq!(Target::parse_opt(None).unwrap(), None);
    let e = Target::parse_opt(Some("moon")).unwrap_err();
    assert_eq!(e.code(), "INVALID_CONFIG");
    assert!(e.to_string().contains("moon"), "{e}");
    assert_eq!(Target::Cloud.to_string(), "cloud");
    assert_eq!(cap_wait(Duration::MAX), MAX_WAIT);
    assert!(tokio::time::Instant::now().checked_add(MAX_WAIT).is_some());
}

#[test]
fn one_validation_with_one_set_of_limits() {
    assert!(MachineConfig::default().validate().is_ok());
    let with = |f: &dyn Fn(&mut MachineConfig)| {
        let mut c = MachineConfig::default();
        f(&mut c);
        c.validate()
    };
    let bad: Vec<Case> = vec![
        ("resources.cpus", Box::new(|c| c.resources.cpus = Some(0))),
        (
            "resources.cpus",
            Box::new(|c| c.resources.cpus = Some(limits::MAX_CPUS + 1)),
        ),
        (
            "resources.memory_mb",
            Box::new(|c| c.resources.memory_mb = Some(1)),
        ),
        (
            "resources.storage_gb",
            Box::new(|c| c.resources.storage_gb = Some(0)),
        ),
        (
            "resources.allow_cidrs",
            Box::new(|c| c.resources.allow_cidrs = vec!["10.0.0.0/33".into()]),
        ),
        (
            "resources.allow_cidrs",
            Box::new(|c| c.resources.allow_cidrs = vec!["nope".into()]),
        ),
        (
            "guest ports",
            Box::new(|c| c.ports = vec![PortSpec { host: 1, guest: 0 }]),
        ),
        (
            "twice",
            Box::new(|c| c.ports = vec![PortSpec { host: 1, guest: 2 }; 2]),
        ),
        ("ttl_seconds", Box::new(|c| c.ttl_seconds = Some(0))),
        (
            "auto_stop_seconds",
            Box::new(|c| c.auto_stop_seconds = Some(0)),
        ),
        (
            "ready_timeout",
            Box::new(|c| c.ready_timeout = Some(Duration::ZERO)),
        ),
        (
            "forkable",
            Box::new(|c| {
                c.branchable = Some(true);
                c.forkable = Some(true);
            }),
        ),
        (
            "staged",
            Box::new(|c| {
                c.mounts = vec![MountSpec {
                    source: "/s".into(),
                    target: "/t".into(),
                    read_only: true,
                    staged: true,
                }]
            }),
        ),
        (
            "mount target",
            Box::new(|c| {
                c.mounts = vec![MountSpec {
                    source: "/s".into(),
                    target: "t".into(),
                    ..Default::default()
                }]
            }),
        ),
        (
            "branchable",
            Box::new(|c| {
                c.forkable = Some(true);
                c.egress_interceptor = Some(EgressInterceptor {
                    address: "127.0.0.1:9".into(),
                    token: "a".repeat(64),
                });
            }),
        ),
        (
            "token",
            Box::new(|c| {
                c.egress_interceptor = Some(EgressInterceptor {
                    address: "127.0.0.1:9".into(),
                    token: "short".into(),
                })
            }),
        ),
        (
            "credential name",
            Box::new(|c| {
                c.credentials = vec![CredentialSpec {
                    name: "Bad Name".into(),
                    env_var: "T".into(),
                    hosts: vec!["h".into()],
                    ..Default::default()
                }]
            }),
        ),
        (
            "wildcards",
            Box::new(|c| {
                c.credentials = vec![CredentialSpec {
                    name: "ok".into(),
                    env_var: "T".into(),
                    hosts: vec!["*.h".into()],
                    ..Default::default()
                }]
            }),
        ),
        (
            "cache_disk",
            Box::new(|c| c.cache_disk = Some(CacheDiskRef::default())),
        ),
        (
            "invalid machine name",
            Box::new(|c| c.name = Some("-x".into())),
        ),
        ("workdir", Box::new(|c| c.workdir = Some("rel".into()))),
        (
            "command",
            Box::new(|c| c.command = Some(vec![String::new()])),
        ),
    ];
    for (what, f) in bad {
        let e = with(&*f).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG", "{what}: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // the limits the bindings used to check on their own hold here
    assert!(with(&|c| c.resources.cpus = Some(limits::MAX_CPUS)).is_ok());
    assert!(with(&|c| c.resources.memory_mb = Some(limits::MAX_MEMORY_MB)).is_ok());
    assert!(with(&|c| c.resources.storage_gb = Some(limits::MAX_DISK_GB)).is_ok());
    // the aliases: either one alone is fine
    assert!(with(&|c| c.forkable = Some(true)).is_ok());
    assert!(with(&|c| c.branchable = Some(false)).is_ok());
    assert!(with(&|c| c.resources.allow_cidrs = vec!["10.0.0.0/8".into(), "::1".into()]).is_ok());
}

fn refused_locally(f: impl Fn(&mut MachineConfig)) -> Error {
    let mut c = MachineConfig::default();
    f(&mut c);
    c.validate().expect("a valid config");
    // accepted by a target that honours it ...
    assert!(c
        .refuse_unsupported(&Capabilities::honouring_all(Target::Local))
        .is_ok());
    // ... refused by the local engine
    c.refuse_unsupported(&Capabilities::LOCAL).unwrap_err()
}

#[test]
fn the_local_engine_refuses_what_it_cannot_honour_naming_field_and_target() {
    let cred = CredentialSpec {
        name: "gh".into(),
        env_var: "GH_TOKEN".into(),
        hosts: vec!["api.github.com".into()],
        value: Some("secret".into()),
        methods: None,
    };
    let cases: Vec<Case> = vec![
        (
            "credentials",
            Box::new(move |c| c.credentials = vec![cred.clone()]),
        ),
        (
            "cache_disk",
            Box::new(|c| {
                c.cache_disk = Some(CacheDiskRef {
                    cache: "deps".into(),
                    ..Default::default()
                })
            }),
        ),
        ("resources.gpu", Box::new(|c| c.resources.gpu = Some(true))),
        (
            "resources.overlay_gb",
            Box::new(|c| c.resources.overlay_gb = Some(10)),
        ),
        (
            "deferred",
            Box::new(|c| c.resources.disk_durability = Some(DiskDurability::Deferred)),
        ),
        (
            "tsi",
            Box::new(|c| c.resources.network_backend = Some(NetworkBackend::Tsi)),
        ),
        (
            "mounts[].staged",
            Box::new(|c| {
                c.mounts = vec![MountSpec {
                    source: "/s".into(),
                    target: "/t".into(),
                    staged: true,
                    ..Default::default()
                }]
            }),
        ),
        (
            "ports[].host = 0",
            Box::new(|c| c.ports = vec![PortSpec { host: 0, guest: 80 }]),
        ),
        (
            "egress_interceptor",
            Box::new(|c| {
                c.egress_interceptor = Some(EgressInterceptor {
                    address: "127.0.0.1:9".into(),
                    token: "a".repeat(64),
                })
            }),
        ),
    ];
    for (field, f) in cases {
        let e = refused_locally(f);
        assert_eq!(e.code(), "NOT_SUPPORTED", "{field}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(field) && msg.contains("local target"),
            "{field}: {msg}"
        );
    }
    // ignored locally as SPEC §11 says; honoured defaults
    let mut c = MachineConfig {
        auto_stop_seconds: Some(60),
        ttl_seconds: Some(600),
        wait_for_ports: Some(false),
        branchable: Some(false),
        ..Default::default()
    };
    c.resources.disk_durability = Some(DiskDurability::Full);
    c.resources.network_backend = Some(NetworkBackend::VirtioNet);
    c.resources.cpus = Some(2);
    assert!(c.refuse_unsupported(&Capabilities::LOCAL).is_ok());
    assert_eq!(c.unsupported_on(&Capabilities::LOCAL), None);
    // branch sources are honoured locally (issue 12), by either name
    for alias in [false, true] {
        let mut b = c.clone();
        b.branchable = None;
        if alias {
            b.forkable = Some(true);
        } else {
            b.branchable = Some(true);
        }
        assert!(b.refuse_unsupported(&Capabilities::LOCAL).is_ok());
    }
    // the cloud's table: host mounts and workload users are refused there
    c.user = Some("app".into());
    c.image = Some("x".into());
    assert_eq!(
        c.unsupported_on(&Capabilities::CLOUD),
        Some(ConfigField::User)
    );
    let e = c.refuse_unsupported(&Capabilities::CLOUD).unwrap_err();
    assert!(e.to_string().contains("cloud target"), "{e}");
}

#[test]
fn secrets_stay_out_of_debug_and_times_are_rfc3339() {
    let c = MachineConfig {
        credentials: vec![CredentialSpec {
            value: Some("hunter2".into()),
            ..Default::default()
        }],
        egress_interceptor: Some(EgressInterceptor {
            address: "127.0.0.1:1".into(),
            token: "tok3n".into(),
        }),
        ..Default::default()
    };
    let d = format!("{c:?}");
    assert!(!d.contains("hunter2") && !d.contains("tok3n"), "{d}");
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_738_324_800), "2025-01-31T12:00:00Z");
    let o = ExecOptions {
        timeout: Some(Duration::from_millis(1001)),
        ..Default::default()
    };
    assert_eq!(o.timeout_secs(), Some(2));
    assert_eq!("b64".parse::<ExecOutput>().unwrap(), ExecOutput::B64);
    assert!("x".parse::<ExecOutput>().is_err());
    assert_eq!(
        "running".parse::<MachineState>().unwrap(),
        MachineState::Running
    );
}
