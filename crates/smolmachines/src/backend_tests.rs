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

fn branchable(name: &str) -> MachineConfig {
    MachineConfig {
        branchable: Some(true),
        ..named(name)
    }
}

fn batch_of(names: &[&str]) -> BranchBatchOptions {
    BranchBatchOptions {
        names: argv(names),
        ..Default::default()
    }
}

#[tokio::test]
async fn branch_arguments_are_checked_before_the_backend() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, branchable("src")).await.unwrap();
    let before = fake.calls().len();
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
    let fixed = vec![PortSpec {
        host: 8080,
        guest: 80,
    }];
    let bad: Vec<(BranchBatchOptions, &str)> = vec![
        (BranchBatchOptions::default(), "requires count >= 1"),
        (
            BranchBatchOptions {
                count: Some(0),
                ..Default::default()
            },
            "requires count >= 1",
        ),
        (
            BranchBatchOptions {
                count: Some(65),
                ..Default::default()
            },
            "1..=64",
        ),
        (
            BranchBatchOptions {
                count: Some(2),
                name_prefix: Some("Bad Prefix".into()),
                ..Default::default()
            },
            "invalid machine name",
        ),
        (
            BranchBatchOptions {
                count: Some(60),
                name_prefix: Some("p".repeat(62)),
                ..Default::default()
            },
            "invalid machine name",
        ),
        (batch_of(&["a", "bad name!", "c"]), "invalid machine name"),
        (batch_of(&["a", "b", "a"]), "given twice"),
        (
            BranchBatchOptions {
                names: (0..65).map(|i| format!("n{i}")).collect(),
                ..Default::default()
            },
            "at most 64",
        ),
        (
            BranchBatchOptions {
                count: Some(2),
                ports: fixed.clone(),
                ..Default::default()
            },
            "host port 8080",
        ),
        (
            BranchBatchOptions {
                count: Some(1),
                ports: vec![PortSpec { host: 0, guest: 0 }],
                ..Default::default()
            },
            "guest ports",
        ),
    ];
    for (opts, why) in bad {
        let e = m.branch_batch(opts.clone()).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig { message } if message.contains(why)),
            "{opts:?}: {e:?}"
        );
    }
    let invalid = |r: Result<ExecResult>| {
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    };
    invalid(m.reward_fork(&[], ExecOptions::default(), None).await);
    invalid(
        m.reward_fork(&argv(&[""]), ExecOptions::default(), None)
            .await,
    );
    invalid(
        m.reward_fork(&argv(&["true"]), ExecOptions::default(), Some("no spaces"))
            .await,
    );
    assert_eq!(fake.calls().len(), before, "{:?}", &fake.calls()[before..]);
    // one clone may have a fixed host port
    let one = m
        .branch_batch(BranchBatchOptions {
            count: Some(1),
            ports: fixed,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(one[0].ports()[0].host, 8080);
    m.delete().await.unwrap();
}

#[tokio::test]
async fn branch_batch_names_count_and_prefix() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, branchable("src")).await.unwrap();
    m.write_file("/tmp/f", b"before", None).await.unwrap();
    let three = m
        .branch_batch(BranchBatchOptions {
            count: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<&str> = three.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["branch-1", "branch-2", "branch-3"]);
    for c in &three {
        assert_eq!(c.read_file("/tmp/f").await.unwrap(), b"before");
        assert_eq!(c.state().await.unwrap(), MachineState::Running);
    }
    // names win over count; the prefix applies to generated names only
    let named = m
        .branch_batch(BranchBatchOptions {
            count: Some(5),
            names: argv(&["x", "y"]),
            name_prefix: Some("ignored".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(named.len(), 2);
    assert_eq!((named[0].name(), named[1].name()), ("x", "y"));
    let prefixed = m
        .branch_batch(BranchBatchOptions {
            count: Some(2),
            name_prefix: Some("rl".into()),
            branchable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(prefixed[1].name(), "rl-2");
    // a branchable clone branches in turn, a plain one does not
    prefixed[0].branch("rl-1-1", Vec::new()).await.unwrap();
    let e = three[0].branch("nope", Vec::new()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    #[allow(deprecated)]
    {
        let f = m.fork("forked", Vec::new()).await.unwrap();
        assert_eq!(f.name(), "forked");
        let fb = m.fork_batch(batch_of(&["fb-a"])).await.unwrap();
        assert_eq!(fb[0].name(), "fb-a");
        let e = m
            .fork_batch(BranchBatchOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    }
    assert_eq!(fake.names().len(), 11, "{:?}", fake.names());
}

/// A failure in the middle of a batch deletes the clones made before it (and only those: a
/// machine that already had a clone's name stays), and returns the failure.
#[tokio::test]
async fn branch_batch_is_all_or_nothing() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, branchable("src")).await.unwrap();
    fake.fail_branch("b");
    let e = m
        .branch_batch(batch_of(&["a", "b", "c"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BootFailed { .. }), "{e:?}");
    assert_eq!(fake.names(), ["src"]);
    let calls = fake.calls();
    let tail: Vec<&str> = calls
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|s| s.as_str())
        .collect();
    assert_eq!(tail, ["branch src a", "branch src b", "delete a"]);
    // a taken name: the clones before it go, the machine that had the name stays
    Machine::create_on(&fake, named("branch-3")).await.unwrap();
    let e = m
        .branch_batch(BranchBatchOptions {
            count: Some(4),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    assert_eq!(fake.names(), ["branch-3", "src"]);
    // the first clone failing leaves nothing to delete
    let before = fake.calls().len();
    let e = m.branch_batch(batch_of(&["b"])).await.unwrap_err();
    assert!(matches!(e, Error::BootFailed { .. }), "{e:?}");
    assert_eq!(fake.calls()[before..], ["branch src b"]);
    // a source that is not branchable: nothing is made
    let plain = Machine::create_on(&fake, named("plain")).await.unwrap();
    let e = plain
        .branch_batch(batch_of(&["p1", "p2"]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    assert_eq!(fake.names(), ["branch-3", "plain", "src"]);
}

#[tokio::test]
async fn reward_fork_runs_in_a_clone_and_always_deletes_it() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, branchable("src")).await.unwrap();
    let r = m
        .reward_fork(&argv(&["grade", "it"]), ExecOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(r.stdout, "grade it\n");
    assert_eq!(fake.names(), ["src"]);
    let calls = fake.calls();
    let branch = calls.iter().find(|c| c.starts_with("branch ")).unwrap();
    let clone = branch.strip_prefix("branch src ").unwrap();
    let hex = clone.strip_prefix("src-rf-").unwrap();
    assert!(
        hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{clone}"
    );
    assert!(
        calls.contains(&format!("exec {clone} grade it")),
        "{calls:?}"
    );
    assert!(calls.contains(&format!("delete {clone}")), "{calls:?}");
    // a name of its own; a long one is cut to fit a machine name
    m.reward_fork(&argv(&["true"]), ExecOptions::default(), Some("ep"))
        .await
        .unwrap();
    let long = "l".repeat(63);
    m.reward_fork(&argv(&["true"]), ExecOptions::default(), Some(&long))
        .await
        .unwrap();
    let calls = fake.calls();
    assert!(calls.iter().any(|c| c.starts_with("branch src ep-rf-")));
    let cut = format!("branch src {}-rf-", "l".repeat(51));
    assert!(calls.iter().any(|c| c.starts_with(&cut)), "{calls:?}");
    assert_eq!(fake.names(), ["src"]);
    // a paused source cannot branch: that error, and nothing is left
    m.pause().await.unwrap();
    let e = m
        .reward_fork(&argv(&["true"]), ExecOptions::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    assert_eq!(fake.names(), ["src"]);
}

#[tokio::test]
async fn pause_and_resume_on_the_fake() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, named("p")).await.unwrap();
    m.pause().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Paused);
    let e = m
        .exec(&argv(&["true"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    m.resume().await.unwrap();
    m.exec(&argv(&["true"]), ExecOptions::default())
        .await
        .unwrap();
    m.stop().await.unwrap();
    let e = m.pause().await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
}

#[tokio::test]
async fn a_batch_with_freeze_source_leaves_a_frozen_base() {
    let fake = FakeBackend::new();
    let m = Machine::create_on(&fake, branchable("base")).await.unwrap();
    let clones = m
        .branch_batch(BranchBatchOptions {
            count: Some(2),
            freeze_source: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(clones.len(), 2);
    assert_eq!(m.state().await.unwrap(), MachineState::Frozen);
    let e = m
        .exec(&argv(&["true"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    m.branch("again", Vec::new()).await.unwrap();
}
