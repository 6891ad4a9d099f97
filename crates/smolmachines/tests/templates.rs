//! VM tests of booted templates (issue 12): `create` as a clone of a frozen, booted machine
//! (`LocalBackend::with_templates(true)`). Every machine so made must be its own: name,
//! hostname, entropy, disk, ports, labels, lifetime; and it boots cold like any other.

mod common;

use std::sync::Arc;

use common::{config, engine, qemu_processes_in, run};
use smolmachines::local::template::TEMPLATE_LABEL;
use smolmachines::local::{LocalBackend, LocalMachine};
use smolmachines::{Machine, MachineBackend, MachineState, PortSpec};

/// stdout of `script`, which must succeed.
async fn out(m: &LocalMachine, script: &str) -> String {
    let r = run(m, script).await;
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

fn templated() -> Option<(LocalBackend, tempfile::TempDir)> {
    let (engine, dir) = engine()?;
    Some((engine.with_templates(true), dir))
}

/// The template's VMM is gone once it is frozen: only the machines run.
fn running_vmms(dir: &tempfile::TempDir) -> usize {
    qemu_processes_in(dir.path())
}

#[tokio::test]
async fn machines_from_a_template_are_each_their_own() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let a = engine.create_machine(config(Some("ta"))).await.unwrap();
    let mut cb = config(Some("tb"));
    cb.labels.insert("team".into(), "b".into());
    let b = engine.create_machine(cb).await.unwrap();
    // two machines, one frozen template with no VMM, hidden from list
    assert_eq!(running_vmms(&dir), 2);
    let listed = engine.list_machines(&Default::default()).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"ta") && names.contains(&"tb"), "{names:?}");
    assert!(listed
        .iter()
        .all(|m| !m.labels.contains_key(TEMPLATE_LABEL)));
    assert_eq!(
        listed
            .iter()
            .find(|m| m.name == "tb")
            .unwrap()
            .labels
            .get("team"),
        Some(&"b".to_string())
    );
    // their own hostname, entropy and disk
    assert_eq!(out(&a, "hostname").await, "ta");
    assert_eq!(out(&b, "hostname; cat /etc/hostname").await, "tb\ntb");
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb) = (out(&a, read).await, out(&b, read).await);
    assert_eq!(ra.len(), 64, "{ra}");
    assert_ne!(
        ra, rb,
        "two machines from one template read the same random bytes"
    );
    out(&a, "mkdir -p /data && echo a > /data/own && sync").await;
    assert_eq!(
        out(&b, "cat /data/own 2>/dev/null || echo none").await,
        "none"
    );
    // a stop and a start boot the machine cold, from its own disk
    let handle = Machine::from_backend(Arc::new(a.clone()));
    handle.stop().await.unwrap();
    assert_eq!(handle.state().await.unwrap(), MachineState::Stopped);
    handle.start().await.unwrap();
    assert_eq!(out(&a, "cat /data/own; hostname").await, "a\nta");
    for m in [a, b] {
        m.delete().await.unwrap();
    }
    assert_eq!(running_vmms(&dir), 0);
    engine.drop_templates().await.unwrap();
}

#[tokio::test]
async fn published_ports_and_the_workload_are_the_new_machines() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let mut c = config(Some("tp"));
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = free.local_addr().unwrap().port();
    drop(free);
    c.ports = vec![PortSpec {
        host: host_port,
        guest: 8080,
    }];
    // the workload runs in the new machine, after its identity is set
    c.command = Some(vec![
        "sh".into(),
        "-c".into(),
        "hostname > /tmp/workload-saw; while true; do echo hi | nc -l -p 8080; done".into(),
    ]);
    let m = engine.create_machine(c).await.unwrap();
    let mut saw = String::new();
    for _ in 0..100 {
        saw = out(&m, "cat /tmp/workload-saw 2>/dev/null || true").await;
        if !saw.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        saw, "tp",
        "the workload ran with the new machine's hostname"
    );
    let mut got = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            if tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .is_ok()
                && !buf.is_empty()
            {
                got = String::from_utf8_lossy(&buf).trim().to_string();
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(got, "hi");
    m.delete().await.unwrap();
    assert_eq!(running_vmms(&dir), 0);
    engine.drop_templates().await.unwrap();
}

/// A machine the template cannot serve (other memory: another template; networked: cold) and
/// the switch: without templates every create boots cold.
#[tokio::test]
async fn other_inputs_get_another_template_and_templates_can_be_off() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let small = engine.create_machine(config(Some("t1"))).await.unwrap();
    let mut c = config(Some("t2"));
    c.resources.memory_mb = Some(384);
    let big = engine.create_machine(c).await.unwrap();
    assert_eq!(out(&big, "hostname").await, "t2");
    let mem = out(
        &big,
        "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2",
    )
    .await;
    let kib: u64 = mem.parse().unwrap();
    assert!(kib > 300 * 1024, "the 384 MiB machine has {kib} KiB");
    // a cold engine makes no template: the same machine, booted
    let cold = engine.clone().with_templates(false);
    let c3 = cold.create_machine(config(Some("t3"))).await.unwrap();
    assert_eq!(out(&c3, "hostname").await, "t3");
    assert_eq!(running_vmms(&dir), 3);
    for m in [small, big, c3] {
        m.delete().await.unwrap();
    }
    engine.drop_templates().await.unwrap();
    assert_eq!(running_vmms(&dir), 0);
}
