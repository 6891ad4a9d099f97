//! The Rust core's cloud target (`smolmachines::CloudBackend`) against the real fleet server:
//! `Machine::create(config, ConnectOptions { target: cloud, base_url, api_key })` on a server
//! on 127.0.0.1 over real VMs of the local engine, an image from the test registry on
//! 127.0.0.1. The VM test skips without `make setup` (`SMOL_VM_TESTS=required` fails instead);
//! the key tests need no VM.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;

use std::collections::BTreeMap;

use smol_fleet::testing::spawn;
use smolmachines::{
    ConnectOptions, Error, ErrorCode, ExecOptions, Machine, MachineConfig, MachineState, Target,
};

fn cloud(base_url: &str, key: &str) -> ConnectOptions {
    ConnectOptions {
        target: Some(Target::Cloud),
        base_url: Some(base_url.to_string()),
        api_key: Some(key.to_string()),
    }
}

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sfc")
        .tempdir_in("/tmp")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_exec_files_stop_exec_delete_through_the_fleet() {
    if common::vm_assets().is_none() {
        return;
    }
    let reg = common_registry::shared();
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let conn = cloud(&srv.base_url, &key);
    let config = MachineConfig {
        image: Some(reg.reference("test/busybox:latest")),
        labels: [("suite".to_string(), "cloud-backend".to_string())].into(),
        ..Default::default()
    };

    let m = Machine::create(config.clone(), conn.clone()).await.unwrap();
    assert!(m.name().starts_with("smol-"), "{}", m.name());
    assert_eq!(m.state().await.unwrap(), MachineState::Running);
    assert!(m.ready().await.unwrap());

    // exec: exit code, both streams, env, stdin
    let sh = |s: &str| common::sh(s);
    let opts = ExecOptions {
        env: [("GREETING".to_string(), "hi".to_string())].into(),
        stdin: Some(b"from stdin".to_vec()),
        ..Default::default()
    };
    let r = m
        .exec(&sh("echo $GREETING; cat; echo err >&2; exit 3"), opts)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 3, "{r:?}");
    assert_eq!(r.stdout, "hi\nfrom stdin");
    assert_eq!(r.stderr, "err\n");
    assert_eq!(r.stdout_bytes, b"hi\nfrom stdin");

    // files: 1 MiB of every byte value, byte-exact, at a path that needs encoding
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let path = "/root/dir with space/a?b#c.bin";
    m.exec(
        &common::argv(&["mkdir", "-p", "/root/dir with space"]),
        ExecOptions::default(),
    )
    .await
    .unwrap();
    m.write_file(path, &data, None).await.unwrap();
    assert_eq!(m.read_file(path).await.unwrap(), data);
    let e = m.read_file("/root/missing").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");

    // a streamed command (when the server has the stream route: a 404 until it does)
    match m
        .exec_stream(
            &sh("echo one; echo two >&2; exit 4"),
            ExecOptions::default(),
        )
        .await
    {
        Ok(mut st) => {
            let (mut out, mut exit) = (Vec::new(), None);
            while let Some(ev) = st.next_event().await {
                match ev {
                    smolmachines::ExecEvent::Stdout(b) | smolmachines::ExecEvent::Stderr(b) => {
                        out.extend(b)
                    }
                    smolmachines::ExecEvent::Exit(c) => exit = Some(c),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(exit, Some(4));
            let out = String::from_utf8_lossy(&out).into_owned();
            assert!(out.contains("one\n") && out.contains("two\n"), "{out:?}");
        }
        Err(e) => assert_eq!(e.code(), ErrorCode::NotFound, "{e}"),
    }

    // listed, by label; connect by name is the same machine
    let labels: BTreeMap<String, String> =
        [("suite".to_string(), "cloud-backend".to_string())].into();
    let listed = Machine::list(conn.clone(), &labels).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, m.name());
    assert!(listed[0].id.starts_with("mach-"), "{listed:?}");
    let again = Machine::connect(m.name(), conn.clone()).await.unwrap();
    assert_eq!(again.name(), m.name());

    // stop: the disk stays; an exec starts the machine again and finds the file
    m.stop().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    let r = m
        .exec(
            &common::argv(&["sh", "-c", "test -f \"$1\" && echo present", "sh", path]),
            ExecOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "present\n"), "{r:?}");
    assert_eq!(m.read_file(path).await.unwrap(), data);
    assert_eq!(m.state().await.unwrap(), MachineState::Running);

    // the same name again is the server's typed conflict
    let dup = MachineConfig {
        name: Some(m.name().to_string()),
        ..config.clone()
    };
    let e = Machine::create(dup, conn.clone()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict, "{e}");

    m.delete().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Deleted);
    let e = Machine::open(m.name(), conn.clone()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    let e = again
        .exec(&common::argv(&["true"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_is_unauthorized_and_nothing_is_created() {
    let home = home();
    let srv = spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let bad = cloud(&srv.base_url, "smk_not_a_key_of_this_fleet");
    let config = MachineConfig {
        image: Some("busybox:latest".into()),
        ..Default::default()
    };
    let e = Machine::create(config, bad.clone()).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("cloud POST /v1/machines → 401"), "{msg}");
    assert!(msg.contains("[request id: "), "{msg}");
    assert!(!msg.contains("smk_not_a_key"), "{msg}");
    let e = Machine::list(bad.clone(), &BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthorized, "{e}");
    let e = Machine::connect("mach-x", bad).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthorized, "{e}");

    // with the right key: nothing was made, a missing machine is NotFound
    let good = cloud(&srv.base_url, &key);
    assert!(Machine::list(good.clone(), &BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
    let e = Machine::open("smol-missing", good.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    // no image: refused before any request
    let e = Machine::create(MachineConfig::default(), good)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidConfig, "{e}");
}
