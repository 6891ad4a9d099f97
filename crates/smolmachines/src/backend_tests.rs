//! `Machine`'s validation and the seam's contracts, against the in-memory fake backend (no VM).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::fake::FakeBackend;

fn named(name: &str) -> MachineConfig {
    MachineConfig {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn create_on_an_injected_backend() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, named("one")).await.unwrap();
    assert_eq!(m.name(), "one");
    assert_eq!(m.state().await.unwrap(), MachineState::Running);
    let r = m
        .exec(&argv(&["echo", "hi"]), ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "echo hi\n");
    m.write_file("/tmp/x", b"data", None).await.unwrap();
    assert_eq!(m.read_file("/tmp/x").await.unwrap(), b"data");
    // the same name twice is a conflict; open finds it without booting, list shows it
    let e = Machine::create_on(&fake, named("one")).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    let again = Machine::open_on(&fake, "one").await.unwrap();
    assert_eq!(again.name(), "one");
    let listed = Machine::list_on(&fake, &BTreeMap::new()).await.unwrap();
    assert_eq!(listed.len(), 1);
    m.delete().await.unwrap();
    let e = Machine::connect_on(&fake, "one").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(
        fake.calls(),
        [
            "create one",
            "exec one echo hi",
            "write_file one /tmp/x",
            "read_file one /tmp/x",
            "create one",
            "open one",
            "list",
            "delete one",
            "connect one"
        ]
    );
}

/// Every refusal below happens in `Machine`: the backend never sees the call.
#[tokio::test]
async fn machine_validates_before_the_backend() {
    let fake = FakeBackend::new();
    let bad_name = Machine::create_on(&fake, named("Not A Name!")).await;
    assert!(
        matches!(bad_name, Err(Error::InvalidConfig { .. })),
        "{bad_name:?}"
    );
    let mut zero = named("z");
    zero.ready_timeout = Some(Duration::ZERO);
    assert!(matches!(
        Machine::create_on(&fake, zero).await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Machine::open_on(&fake, "../escape").await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Machine::connect_on(&fake, "").await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    let m = Machine::create_on(&fake, named("v")).await.unwrap();
    let before = fake.calls().len();
    let invalid = |r: Result<()>| assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    invalid(m.exec(&[], ExecOptions::default()).await.map(drop));
    invalid(m.exec(&argv(&[""]), ExecOptions::default()).await.map(drop));
    invalid(m.exec_stream(&[], ExecOptions::default()).await.map(drop));
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    invalid(m.exec_stream(&argv(&["sleep", "1"]), bg).await.map(drop));
    invalid(m.write_file("relative/path", b"x", None).await);
    invalid(m.write_file("/tmp/x", b"x", Some(0o17777)).await);
    invalid(m.read_file("tmp/x").await.map(drop));
    invalid(m.publish(0, None, "tcp").await.map(drop));
    invalid(m.publish(80, Some(0), "tcp").await.map(drop));
    invalid(m.publish(80, None, "sctp").await.map(drop));
    invalid(m.unpublish(None, None, "tcp").await);
    invalid(m.endpoint(0, None).map(drop));
    invalid(
        m.run(" ", &argv(&["true"]), ExecOptions::default())
            .await
            .map(drop),
    );
    invalid(m.pull_image("").await.map(drop));
    invalid(
        m.wait_until_ready(Duration::ZERO, Duration::from_millis(1))
            .await,
    );
    assert_eq!(fake.calls().len(), before, "{:?}", &fake.calls()[before..]);
}

/// Target rules live behind the seam: the fake relays UDP and has its own endpoint URLs,
/// the local engine refuses UDP (checked in `local::ports`).
#[tokio::test]
async fn target_rules_are_the_backends() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, named("ports")).await.unwrap();
    let p = m.publish(53, Some(5353), "udp").await.unwrap();
    assert_eq!((p.host, p.guest), (5353, 53));
    let e = m.endpoint(53, Some("/x")).unwrap();
    assert_eq!(e.http_url, "http://fake.invalid:5353/x");
    let e = m.endpoint(54, None).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(m.ready().await.unwrap());
    m.stop().await.unwrap();
    assert!(!m.ready().await.unwrap());
    let e = m
        .wait_until_ready(Duration::from_millis(30), Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    m.unpublish(Some(53), None, "udp").await.unwrap();
    assert!(m.ports().is_empty());
    let e = crate::local::LocalBackend::at(std::env::temp_dir().join("smol-seam-unused"));
    assert_eq!(e.target(), Target::Local);
}

#[tokio::test]
async fn the_default_backend_is_one_engine_per_home() {
    let a = crate::local::LocalBackend::shared();
    let b = crate::local::LocalBackend::shared();
    assert!(
        Arc::ptr_eq(&a, &b),
        "backend_for / shared return the same engine"
    );
    let home = tempfile::tempdir().unwrap();
    let x = crate::local::LocalBackend::open_home(home.path());
    let y = crate::local::LocalBackend::open_home(home.path().join("."));
    assert!(Arc::ptr_eq(&x, &y));
    // a value view shares the engine; another run directory is another engine
    let v = crate::local::LocalBackend::at(home.path());
    assert!(v.same_engine(&x));
    let other = v.clone().with_run_dir(home.path().join("elsewhere"));
    assert!(!other.same_engine(&x));
    assert!(other
        .clone()
        .with_run_dir(home.path().join("run"))
        .same_engine(&x));
}

#[tokio::test]
async fn a_streamed_write_collects_on_a_backend_without_streaming() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, named("stream")).await.unwrap();
    let chunks = futures::stream::iter([Ok(b"ab".to_vec()), Ok(Vec::new()), Ok(b"c".to_vec())]);
    m.write_file_stream("/tmp/s", Box::pin(chunks), None)
        .await
        .unwrap();
    assert_eq!(m.read_file("/tmp/s").await.unwrap(), b"abc");
    // the source's error is the write's, and nothing is written
    let failing = futures::stream::iter([
        Ok(b"x".to_vec()),
        Err(Error::Connection {
            message: "client went away".into(),
        }),
    ]);
    let e = m
        .write_file_stream("/tmp/t", Box::pin(failing), None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connection { .. }), "{e:?}");
    assert!(m.read_file("/tmp/t").await.is_err());
    // the same checks as write_file, before any chunk is read
    let none = || Box::pin(futures::stream::empty()) as crate::FileChunks;
    assert!(matches!(
        m.write_file_stream("relative", none(), None).await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        m.write_file_stream("/tmp/x", none(), Some(0o17777)).await,
        Err(Error::InvalidConfig { .. })
    ));
    m.delete().await.unwrap();
}

#[tokio::test]
async fn branch_arguments_are_checked_before_the_backend_and_pause_defaults_to_not_supported() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, named("src")).await.unwrap();
    let e = m.branch("Bad Name", Vec::new()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = m
        .branch(
            "c1",
            vec![PortSpec {
                host: 8080,
                guest: 0,
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    // a backend without them says so, by operation
    let e = m.branch("c1", Vec::new()).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotSupported { message } if message.contains("branch")),
        "{e:?}"
    );
    for (e, op) in [
        (m.pause().await.unwrap_err(), "pause"),
        (m.resume().await.unwrap_err(), "resume"),
    ] {
        assert!(
            matches!(&e, Error::NotSupported { message } if message.contains(op)),
            "{e:?}"
        );
    }
    m.delete().await.unwrap();
}
