//! VM tests of booted templates (issue 12): `create` as a clone of a frozen, booted machine
//! (`LocalBackend::with_templates(true)`). Every machine so made must be its own: name,
//! hostname, entropy, disk, ports, labels, lifetime; and it boots cold like any other.

mod common;
mod common_registry;

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

/// Templates without warm pool clones: every create is a clone made then.
fn templated() -> Option<(LocalBackend, tempfile::TempDir)> {
    let (engine, dir) = engine()?;
    Some((engine.with_templates(true).with_template_pool(0), dir))
}

/// The process ids of the QEMUs whose command line names `dir`.
fn qemu_pids_in(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).to_string();
            (c.contains("qemu") && c.contains(&needle)).then_some(pid)
        })
        .collect()
}

/// Paths under `dir` whose name starts with `prefix`.
fn named_under(dir: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(prefix) {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            }
        }
    }
    found
}

/// A create with a warm pool clone ready takes over its running VM: the machine gets the
/// clone's VMM (no new QEMU), its own name, hostname, entropy, disk, ports and labels; the
/// pool is filled again in the background; a pool clone whose VMM died only costs a cold boot.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_takes_over_a_warm_pool_clone() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let engine = engine.with_templates(true).with_template_pool(1);
    let a = engine.create_machine(config(Some("pa"))).await.unwrap();
    assert_eq!(
        engine
            .settle_pool(std::time::Duration::from_secs(120))
            .await,
        1
    );
    let before = qemu_pids_in(dir.path());
    assert_eq!(before.len(), 2, "pa and one warm clone: {before:?}");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = free.local_addr().unwrap().port();
    drop(free);
    let mut cb = config(Some("pb"));
    cb.labels.insert("team".into(), "b".into());
    cb.ports = vec![PortSpec {
        host: host_port,
        guest: 8080,
    }];
    cb.command = Some(vec![
        "sh".into(),
        "-c".into(),
        "while true; do hostname | nc -l -p 8080; done".into(),
    ]);
    let b = engine.create_machine(cb).await.unwrap();
    let pid = b.pid().expect("pb runs");
    assert!(
        before.contains(&pid),
        "pb runs in the warm clone's VMM {before:?}, not a new one ({pid})"
    );
    assert_eq!(out(&b, "hostname; cat /etc/hostname").await, "pb\npb");
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb) = (out(&a, read).await, out(&b, read).await);
    assert_eq!(rb.len(), 64, "{rb}");
    assert_ne!(ra, rb);
    out(&a, "mkdir -p /data && echo a > /data/own && sync").await;
    assert_eq!(
        out(&b, "cat /data/own 2>/dev/null || echo none").await,
        "none"
    );
    let listed = engine.list_machines(&Default::default()).await.unwrap();
    let mut names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["pa", "pb"], "pool clones and templates are hidden");
    let team = listed
        .iter()
        .find(|m| m.name == "pb")
        .unwrap()
        .labels
        .get("team");
    assert_eq!(team, Some(&"b".to_string()));
    // its published port reaches its workload
    let mut got = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            let read = s.read_to_end(&mut buf);
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
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
    assert_eq!(got, "pb");
    // the machine is its own: stopped and started, it boots cold from its own disk
    out(&b, "mkdir -p /data && echo b > /data/own && sync").await;
    let handle = Machine::from_backend(Arc::new(b.clone()));
    handle.stop().await.unwrap();
    assert!(
        !smolmachines::local::record::pid_alive(pid),
        "its VMM ended"
    );
    // the stop returned once the exit was handled: a start right after it binds a new agent
    // socket, which a late cleanup of the old VM removed (the VMM then failed to connect)
    let sock = b.dir().join("agent.sock");
    assert!(!sock.exists(), "{sock:?} is still there after the stop");
    handle.start().await.unwrap();
    assert_eq!(out(&b, "cat /data/own; hostname").await, "b\npb");
    // the pool was filled again; its clone's VMM killed, the next create boots cold
    assert_eq!(
        engine
            .settle_pool(std::time::Duration::from_secs(120))
            .await,
        1
    );
    let busy = [a.pid().unwrap(), b.pid().unwrap()];
    let warm: Vec<u32> = qemu_pids_in(dir.path())
        .into_iter()
        .filter(|p| !busy.contains(p))
        .collect();
    assert_eq!(warm.len(), 1, "{warm:?}");
    // SAFETY: kills a QEMU this test's engine started; no memory involved.
    unsafe { libc::kill(warm[0] as i32, libc::SIGKILL) };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let c = engine.create_machine(config(Some("pc"))).await.unwrap();
    assert_eq!(out(&c, "hostname").await, "pc");
    assert!(!warm.contains(&c.pid().unwrap()));
    for m in [a, b, c] {
        m.delete().await.unwrap();
    }
    engine
        .settle_pool(std::time::Duration::from_secs(120))
        .await;
    engine.drop_templates().await.unwrap();
    assert_eq!(running_vmms(&dir), 0);
    assert!(engine
        .list_machines(&Default::default())
        .await
        .unwrap()
        .is_empty());
    let left = named_under(dir.path(), "pool-");
    assert!(left.is_empty(), "pool clones left files: {left:?}");
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

/// An image machine comes from a template of its image (and a warm clone of it): the image's
/// files, env and working directory, its own hostname, and the image's workload launched once,
/// by the new machine (the template and the pool clone run none).
#[tokio::test(flavor = "multi_thread")]
async fn image_machines_come_from_a_template_of_their_image() {
    let reg = common_registry::shared();
    let Some((engine, dir)) = engine() else {
        return;
    };
    let engine = engine.with_templates(true).with_template_pool(1);
    let busybox = reg.reference("test/busybox:latest");
    let log = "/var/log/smol/workload.log";
    let mut made = Vec::new();
    for name in ["ia", "ib"] {
        let mut c = config(Some(name));
        c.image = Some(busybox.clone());
        let m = engine.create_machine(c).await.unwrap();
        assert_eq!(
            out(&m, "echo $SMOL_FIXTURE; pwd; cat /etc/motd; hostname").await,
            format!("busybox\n/data\nmotd from layer 3\n{name}")
        );
        let mut seen = String::new();
        for _ in 0..100 {
            seen = out(&m, &format!("cat {log} 2>/dev/null || true")).await;
            if !seen.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(seen, "motd from layer 3", "{name}: the workload ran once");
        made.push(m);
        // the next one finds a warm clone of the image's template
        assert_eq!(
            engine
                .settle_pool(std::time::Duration::from_secs(120))
                .await,
            1
        );
    }
    // a plain machine is not made of the image's template
    let plain = engine.create_machine(config(Some("ip"))).await.unwrap();
    assert_eq!(
        out(
            &plain,
            "cat /etc/motd 2>/dev/null || echo no-motd; hostname"
        )
        .await,
        "no-motd\nip"
    );
    made.push(plain);
    for m in made {
        m.delete().await.unwrap();
    }
    engine
        .settle_pool(std::time::Duration::from_secs(120))
        .await;
    engine.drop_templates().await.unwrap();
    assert_eq!(running_vmms(&dir), 0);
}
