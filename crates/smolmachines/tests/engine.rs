//! The engine as a server holds it (issue 9 §2, §5): one engine per home, one live handle per
//! machine, concurrent opens and starts. Real VMs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, engine, qemu_processes_in, run};
use smolmachines::local::{LocalBackend, Phase};
use smolmachines::{Backend, Machine, MachineBackend, MachineState};

#[tokio::test]
async fn a_held_machine_opens_as_the_same_handle_at_once() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(Some("held"))).await.unwrap();
    let t0 = Instant::now();
    let again = engine.open_machine("held").await.unwrap();
    let connected = engine.connect_machine("held").await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(m.same_handle(&again) && m.same_handle(&connected));
    assert!(engine
        .live_machine("held")
        .is_some_and(|l| l.same_handle(&m)));
    // through the seam, on the engine of the same home opened again
    let shared: Arc<dyn Backend> = LocalBackend::open_dirs(engine.home(), engine.run_dir());
    let via_seam = Machine::open_on(&*shared, "held").await.unwrap();
    assert_eq!(via_seam.state().await.unwrap(), MachineState::Running);
    assert_eq!(run(&again, "echo same").await.stdout, "same\n");
    assert_eq!(m.boots(), 1);
    assert_eq!(qemu_processes_in(engine.run_dir()), 1);
    // a handle whose VM died is still the handle; a deleted machine leaves the engine
    m.stop().await.unwrap();
    assert!(engine.open_machine("held").await.unwrap().same_handle(&m));
    via_seam.delete().await.unwrap();
    assert!(engine.live_machine("held").is_none());
    let e = engine.open_machine("held").await.unwrap_err();
    assert!(matches!(e, smolmachines::Error::NotFound { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_opens_attach_once() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut cfg = config(Some("many"));
    cfg.detach = true;
    let first = engine.create_machine(cfg).await.unwrap();
    let pid = first.pid().unwrap();
    drop(first); // this process no longer holds it: the opens must attach
    assert!(engine.live_machine("many").is_none());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let e = engine.clone();
            tokio::spawn(async move { e.open_machine("many").await })
        })
        .collect();
    let mut handles = Vec::new();
    for t in tasks {
        handles.push(t.await.unwrap().expect("open"));
    }
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(handles.iter().all(|h| h.same_handle(&handles[0])));
    assert_eq!(handles[0].pid(), Some(pid));
    assert_eq!(handles[0].boots(), 0, "attached, not booted");
    assert_eq!(run(&handles[0], "echo attached").await.stdout, "attached\n");
    handles[0].delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_starts_boot_one_vm() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine
        .create_machine(config(Some("starter")))
        .await
        .unwrap();
    m.stop().await.unwrap();
    assert_eq!(m.phase(), Phase::Stopped);
    assert_eq!(qemu_processes_in(engine.run_dir()), 0);
    let (a, b) = tokio::join!(m.start(), m.start());
    a.unwrap();
    b.unwrap();
    assert_eq!(m.boots(), 2, "one boot at create, one for both starts");
    assert_eq!(m.phase(), Phase::Running);
    assert_eq!(qemu_processes_in(engine.run_dir()), 1);
    assert_eq!(run(&m, "echo up").await.stdout, "up\n");

    // a stop racing a start ends in a defined state, the one of whichever ran last
    let (s, t) = tokio::join!(m.stop(), m.start());
    s.unwrap();
    t.unwrap();
    let phase = m.phase();
    let running = qemu_processes_in(engine.run_dir());
    match phase {
        Phase::Running => assert_eq!(running, 1),
        Phase::Stopped => assert_eq!(running, 0),
        other => panic!("undefined end state {other:?}"),
    }
    m.delete().await.unwrap();
    assert_eq!(m.phase(), Phase::Deleted);
    assert_eq!(qemu_processes_in(engine.run_dir()), 0);
}
