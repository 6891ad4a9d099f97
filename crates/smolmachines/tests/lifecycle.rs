//! Machines across processes: persistence, detach, the reaper, labels, published ports, the
//! engine home. Real VMs; the "other processes" are this test binary run again as a child
//! (`child_process_entry`).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{argv, config, run, sh};
use smolmachines::local::LocalBackend;
use smolmachines::{Error, ExecOptions, MachineBackend, MachineState, PortSpec};

fn engine_at(home: &std::path::Path) -> LocalBackend {
    LocalBackend::at(home)
        .with_assets(common::vm_assets().expect("the guest assets of `make setup`"))
}

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sml")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Runs this test binary as a child process in `mode` against `home`.
fn child(mode: &str, home: &std::path::Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SMOL_TEST_CHILD", mode)
        .env("SMOL_TEST_HOME", home)
        .env("SMOL_TEST_ARG", arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for the child's line starting with `READY` and returns it.
fn ready_line(c: &mut Child) -> String {
    let out = c.stdout.as_mut().unwrap();
    let mut r = BufReader::new(out);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 {
        // libtest prints "test child_process_entry ... " before the child's own output
        if let Some(i) = line.find("READY") {
            return line[i..].trim().to_string();
        }
        line.clear();
    }
    panic!("child ended without READY");
}

#[test]
#[ignore = "helper: runs only as a child process of the other tests"]
fn child_process_entry() {
    if common::vm_assets().is_none() {
        return;
    }
    let Ok(mode) = std::env::var("SMOL_TEST_CHILD") else {
        return;
    };
    let home = std::path::PathBuf::from(std::env::var("SMOL_TEST_HOME").unwrap());
    let arg = std::env::var("SMOL_TEST_ARG").unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let engine = engine_at(&home);
        match mode.as_str() {
            // a persistent machine whose process just exits (no stop, no delete, no Drop)
            "persistent-exit" => {
                let mut cfg = config(Some("keeper"));
                cfg.persistent = true;
                let m = engine.create_machine(cfg).await.unwrap();
                run(&m, "echo v1 > /root/data").await;
                println!("READY {}", m.pid().unwrap());
                std::process::exit(0);
            }
            // a persistent and an ephemeral machine whose process gets SIGKILLed
            "killed" => {
                let mut cfg = config(Some("pk"));
                cfg.persistent = true;
                let pk = engine.create_machine(cfg).await.unwrap();
                let ek = engine.create_machine(config(Some("ek"))).await.unwrap();
                run(&pk, "echo synced > /root/synced; sync").await;
                println!("READY {} {}", pk.pid().unwrap(), ek.pid().unwrap());
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            // ten detached machines created at once
            "create-ten" => {
                let mut tasks = Vec::new();
                for i in 0..10 {
                    let engine = engine.clone();
                    let name = format!("{arg}-{i}");
                    tasks.push(tokio::spawn(async move {
                        let mut cfg = config(Some(&name));
                        cfg.detach = true;
                        cfg.resources.memory_mb = Some(128);
                        engine.create_machine(cfg).await.map(|_| ())
                    }));
                }
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
                println!("READY");
            }
            // a detached machine paused by this process, which then exits
            "paused-detached" => {
                let mut cfg = config(Some("pz"));
                cfg.detach = true;
                cfg.resources.memory_mb = Some(128);
                let m = engine.create_machine(cfg).await.unwrap();
                run(&m, "echo before > /root/data").await;
                m.pause().await.unwrap();
                println!("READY {}", m.pid().unwrap());
                std::process::exit(0);
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn alive(pid: u32) -> bool {
    smolmachines::local::record::pid_alive(pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_machine_outlives_its_process_and_boots_again_on_connect() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("persistent-exit", h.path(), "");
    let line = ready_line(&mut c);
    let vmm: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(c.wait().unwrap().success());
    // no detach: the VM shuts itself down cleanly once its process is gone
    assert!(
        wait_until(Duration::from_secs(20), || !alive(vmm)),
        "VM still running"
    );
    let engine = engine_at(h.path());
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].name.as_str(), list[0].state),
        ("keeper", MachineState::Stopped)
    );

    let m = engine.connect_machine("keeper").await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Running);
    assert_eq!(m.read_file("/root/data").await.unwrap(), b"v1\n");
    let disk = h.path().join("machines/keeper/disk.qcow2");
    assert!(disk.exists());
    let pid = m.pid().unwrap();
    m.delete().await.unwrap();
    assert!(!alive(pid));
    assert!(!disk.exists(), "disk left after delete");
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
    let e = engine.connect_machine("keeper").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_process_leaves_no_ghosts_and_loses_no_synced_data() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("killed", h.path(), "");
    let line = ready_line(&mut c);
    let pids: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    // the next engine start reaps: no orphan VMM, no stale disk, no ghost in the list
    let engine = engine_at(h.path());
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["pk"], "{list:?}");
    assert!(list
        .iter()
        .all(|m| m.state != MachineState::Running || m.pid.is_some()));
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pids[1])),
        "orphan VMM of ek"
    );
    assert!(!h.path().join("machines/ek").exists(), "stale disk of ek");
    assert!(wait_until(Duration::from_secs(10), || !alive(pids[0])));
    let pk = engine.connect_machine("pk").await.unwrap();
    assert_eq!(pk.read_file("/root/synced").await.unwrap(), b"synced\n");
    pk.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_machines_from_two_processes_at_once() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut a = child("create-ten", h.path(), "a");
    let mut b = child("create-ten", h.path(), "b");
    ready_line(&mut a);
    ready_line(&mut b);
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let engine = engine_at(h.path());
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(list.len(), 20, "{list:?}");
    assert!(
        list.iter().all(|m| m.state == MachineState::Running),
        "{list:?}"
    );
    let mut names: Vec<String> = list.iter().map(|m| m.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), 20);
    for m in list {
        engine
            .open_machine(&m.name)
            .await
            .unwrap()
            .delete()
            .await
            .unwrap();
    }
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
}

fn invalid_state(e: &Error) -> Option<&str> {
    match e {
        Error::InvalidState { state, .. } => Some(state),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_paused_by_another_process_is_paused_here_and_resumes() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("paused-detached", h.path(), "");
    let line = ready_line(&mut c);
    let vmm: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(c.wait().unwrap().success());
    assert!(alive(vmm), "the detached VM outlives its process");
    let engine = engine_at(h.path());
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(
        list.iter()
            .map(|m| (m.name.as_str(), m.state))
            .collect::<Vec<_>>(),
        [("pz", MachineState::Paused)],
        "{list:?}"
    );
    // open and connect attach to the paused VM at once: no wait for an agent that cannot
    // answer while the vCPUs are stopped
    let t0 = Instant::now();
    let m = engine.open_machine("pz").await.unwrap();
    let again = engine.connect_machine("pz").await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(again.same_handle(&m));
    assert_eq!(m.state().await.unwrap(), MachineState::Paused);
    assert_eq!(m.pid(), Some(vmm));
    assert!(!m.ready().await.unwrap());
    let e = m
        .exec(&sh("true"), &ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");
    let e = m.read_file("/root/data").await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");

    // resume from this process: the guest goes on with its memory and files
    m.resume().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Running);
    assert_eq!(m.read_file("/root/data").await.unwrap(), b"before\n");
    let r = run(&m, "echo after").await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "after\n"), "{r:?}");
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(list[0].state, MachineState::Running, "{list:?}");

    // this handle's pause is recorded too, and a stop clears it
    m.pause().await.unwrap();
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(list[0].state, MachineState::Paused, "{list:?}");
    m.stop().await.unwrap();
    assert!(!m.record().paused);
    let list = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(list[0].state, MachineState::Stopped, "{list:?}");
    assert!(!alive(vmm));
    m.delete().await.unwrap();
}

#[tokio::test]
async fn labels_filter_the_list() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let mut a = config(Some("la"));
    a.labels = BTreeMap::from([("team".into(), "red".into()), ("tier".into(), "1".into())]);
    let mut b = config(Some("lb"));
    b.labels = BTreeMap::from([("team".into(), "blue".into())]);
    let (ma, mb) = tokio::join!(engine.create_machine(a), engine.create_machine(b));
    let (ma, mb) = (ma.unwrap(), mb.unwrap());
    let red = BTreeMap::from([("team".to_string(), "red".to_string())]);
    let l = engine.list_machines(&red).await.unwrap();
    assert_eq!(
        l.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["la"]
    );
    assert_eq!(l[0].labels.get("tier").map(String::as_str), Some("1"));
    assert_eq!(
        engine.list_machines(&BTreeMap::new()).await.unwrap().len(),
        2
    );
    let none = BTreeMap::from([("team".to_string(), "green".to_string())]);
    assert!(engine.list_machines(&none).await.unwrap().is_empty());
    ma.delete().await.unwrap();
    mb.delete().await.unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn published_ports_relay_many_connections_and_large_transfers() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let (echo, web, closed) = (free_port(), free_port(), free_port());
    let mut cfg = config(Some("ported"));
    cfg.ports = vec![
        PortSpec {
            host: echo,
            guest: 7000,
        },
        PortSpec {
            host: web,
            guest: 8000,
        },
        PortSpec {
            host: closed,
            guest: 7001,
        },
    ];
    let m = engine.create_machine(cfg).await.unwrap();
    let big: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    m.write_file("/www/big.bin", &big, None).await.unwrap();
    let r = run(
        &m,
        "nc -ll -p 7000 -e cat >/dev/null 2>&1 & httpd -p 8000 -h /www; \
         for i in $(seq 100); do netstat -ltn | grep -q ':7000 ' && netstat -ltn | grep -q ':8000 ' && exit 0; sleep 0.05; done; exit 1",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");

    // ten connections at once through the echo server
    let handles: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", echo)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let msg: Vec<u8> = (0..64 * 1024).map(|j| (i * 7 + j) as u8).collect();
                s.write_all(&msg).unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).unwrap();
                back == msg
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap(), "echo mismatch");
    }

    // 8 MiB over HTTP, byte-exact
    let mut s = std::net::TcpStream::connect(("127.0.0.1", web)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /big.bin HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&resp[..body_at]).to_string();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(resp[body_at..] == big[..], "body differs");

    // nothing listens on guest 7001: the host side closes the client
    let mut s = std::net::TcpStream::connect(("127.0.0.1", closed)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);

    // a busy host port is a typed error at create, and the machine holding it is untouched
    let mut cfg = config(Some("clash"));
    cfg.ports = vec![PortSpec {
        host: echo,
        guest: 7000,
    }];
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(
        matches!(e, Error::PortUnavailable { port, .. } if port == echo),
        "{e:?}"
    );
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .iter()
        .all(|m| m.name != "clash"));
    assert_eq!(m.url(), None);
    assert_eq!(run(&m, "echo ok").await.stdout, "ok\n");
    m.delete().await.unwrap();
    // the port is free again
    std::net::TcpListener::bind(("127.0.0.1", echo)).unwrap();
}

fn mount_tmpfs(dir: &std::path::Path, opts: &str) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (the VM tests run as root in CI)"
    );
}

fn umount(dir: &std::path::Path) {
    let _ = Command::new("umount").arg(dir).status();
}

#[tokio::test]
async fn engine_home_on_a_read_only_or_full_disk_is_a_clear_error() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let ro = h.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    mount_tmpfs(&ro, "ro,size=1m");
    let e = engine_at(&ro.join("home"))
        .create_machine(config(None))
        .await
        .unwrap_err();
    umount(&ro);
    assert!(matches!(e, Error::Storage { .. }), "{e:?}");
    assert!(e.hint().unwrap().contains("SMOL_HOME"));

    let full = h.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    mount_tmpfs(&full, "size=600k");
    let e = engine_at(&full)
        .create_machine(config(Some("nospace")))
        .await
        .unwrap_err();
    // the state stays consistent: no record of the machine that could not be made
    let listed = engine_at(&full).list_machines(&BTreeMap::new()).await;
    umount(&full);
    assert!(
        matches!(e, Error::NoSpace { .. } | Error::Storage { .. }),
        "{e:?}"
    );
    if let Ok(l) = listed {
        assert!(l.is_empty(), "{l:?}");
    }
}

#[tokio::test]
async fn written_files_survive_stop_and_start() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let m = engine.create_machine(config(None)).await.unwrap();
    m.write_file("/data/kept.txt", b"on disk", None)
        .await
        .unwrap();
    run(&m, "echo more >> /etc/motd").await;
    m.stop().await.unwrap();
    m.start().await.unwrap();
    assert_eq!(m.read_file("/data/kept.txt").await.unwrap(), b"on disk");
    let r = m
        .exec(&argv(&["cat", "/etc/motd"]), &ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "more\n");
    // /tmp is memory, as on any Linux
    let r = m
        .exec(&sh("ls /tmp | wc -l"), &ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "0");
    m.delete().await.unwrap();
}

#[tokio::test]
async fn mounts_share_host_directories_and_nothing_else() {
    if common::vm_assets().is_none() {
        return;
    }
    use smolmachines::MountSpec;
    let h = home();
    let engine = engine_at(h.path());
    let root = h.path().join("share");
    let (rw, ro) = (root.join("rw"), root.join("ro"));
    std::fs::create_dir_all(rw.join("sub")).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(rw.join("hello.txt"), "from the host\n").unwrap();
    std::fs::write(ro.join("keep.txt"), "read only\n").unwrap();
    std::fs::write(root.join("outside.txt"), "secret\n").unwrap();
    std::os::unix::fs::symlink("/etc", rw.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", rw.join("rel-link")).unwrap();

    // bad sources are typed errors at create
    for (src, what) in [("relative/dir", "relative"), ("/no/such/dir", "missing")] {
        let mut cfg = config(None);
        cfg.mounts = vec![MountSpec {
            source: src.into(),
            target: "/w".into(),
            read_only: false,
            staged: false,
        }];
        let e = engine.create_machine(cfg).await.unwrap_err();
        let typed = match what {
            "missing" => matches!(&e, Error::NotFound { what } if what.contains(src)),
            _ => matches!(&e, Error::InvalidConfig { message } if message.contains(src)),
        };
        assert!(typed, "{what}: {e:?}");
    }
    let mut cfg = config(None);
    let file = rw.join("hello.txt").display().to_string();
    cfg.mounts = vec![MountSpec {
        source: file,
        target: "/w".into(),
        read_only: false,
        staged: false,
    }];
    assert!(matches!(
        engine.create_machine(cfg).await.unwrap_err(),
        Error::InvalidConfig { .. }
    ));

    let mut cfg = config(Some("mounted"));
    cfg.mounts = vec![
        MountSpec {
            source: rw.display().to_string(),
            target: "/work".into(),
            read_only: false,
            staged: false,
        },
        MountSpec {
            source: ro.display().to_string(),
            target: "/ro".into(),
            read_only: true,
            staged: false,
        },
    ];
    let m = engine.create_machine(cfg).await.unwrap();
    assert_eq!(
        run(&m, "cat /work/hello.txt").await.stdout,
        "from the host\n"
    );
    assert_eq!(
        run(&m, "echo from the guest > /work/sub/new.txt; echo $?")
            .await
            .stdout,
        "0\n"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("sub/new.txt")).unwrap(),
        "from the guest\n"
    );

    // symlinks and .. resolve inside the guest, never to host paths outside the source
    assert_eq!(
        run(&m, "cat /work/abs-link/hostname").await.stdout,
        "mounted\n"
    );
    let r = run(
        &m,
        "cat /work/rel-link; cat /work/../outside.txt; ls /work/..",
    )
    .await;
    assert!(
        !r.stdout.contains("secret") && !r.stderr.contains("secret"),
        "{r:?}"
    );

    // read-only is enforced by the host: even after the guest remounts read-write
    let r = run(&m, "echo x > /ro/keep.txt; echo rc=$?").await;
    assert!(
        r.stdout.contains("rc=1") || r.stdout.contains("rc=2"),
        "{r:?}"
    );
    let r = run(
        &m,
        "mount -o remount,rw /ro; echo x > /ro/keep.txt; echo rc=$?; touch /ro/new; echo rc=$?",
    )
    .await;
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
    assert_eq!(
        std::fs::read_to_string(ro.join("keep.txt")).unwrap(),
        "read only\n"
    );
    assert!(!ro.join("new").exists());

    let run_dir = engine.run_dir().join("machines/mounted");
    m.delete().await.unwrap();
    assert!(!run_dir.exists());
    // the virtiofsd daemons are gone with the machine
    let daemons = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).to_string())
        .filter(|c| c.contains("virtiofsd") && c.contains(&run_dir.display().to_string()))
        .count();
    assert_eq!(daemons, 0);
}

/// Two network namespaces of the test's own: "inner" runs the machine's passt (its loopback
/// stands in for the host's), "outer" is a test host at 10.250.0.1 reached through a veth.
/// No packet leaves them.
struct NetLab {
    inner: String,
    outer: String,
    servers: Vec<Child>,
}

impl NetLab {
    fn ip(args: &[&str]) {
        let st = Command::new("ip")
            .args(args)
            .status()
            .expect("ip (iproute2) is needed");
        assert!(
            st.success(),
            "ip {args:?} failed (the network test needs root)"
        );
    }

    fn new() -> NetLab {
        let tag = format!("{:04x}", std::process::id() & 0xffff);
        let (inner, outer) = (format!("smoli{tag}"), format!("smolo{tag}"));
        let (vi, vo) = (format!("svi{tag}"), format!("svo{tag}"));
        let _ = Command::new("ip").args(["netns", "del", &inner]).status();
        let _ = Command::new("ip").args(["netns", "del", &outer]).status();
        Self::ip(&["netns", "add", &inner]);
        Self::ip(&["netns", "add", &outer]);
        Self::ip(&["link", "add", &vi, "type", "veth", "peer", "name", &vo]);
        Self::ip(&["link", "set", &vi, "netns", &inner]);
        Self::ip(&["link", "set", &vo, "netns", &outer]);
        for (ns, dev, addr) in [
            (&inner, &vi, "10.250.0.2/24"),
            (&outer, &vo, "10.250.0.1/24"),
        ] {
            Self::ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            Self::ip(&["-n", ns, "link", "set", dev, "up"]);
            Self::ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Self::ip(&["-n", &inner, "route", "add", "default", "via", "10.250.0.1"]);
        let serve = |ns: &str, port: &str, reply: &str| {
            Command::new("ip")
                .args([
                    "netns", "exec", ns, "busybox", "nc", "-ll", "-p", port, "-e", "echo", reply,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        // DNS: the inner namespace's resolver (what passt forwards the guest's queries to) is
        // a dnsmasq in the outer one that knows one name
        let etc = format!("/etc/netns/{inner}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 10.250.0.53\n").unwrap();
        Self::ip(&["-n", &outer, "addr", "add", "10.250.0.53/24", "dev", &vo]);
        let dns = Command::new("ip")
            .args([
                "netns",
                "exec",
                &outer,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
            ])
            .args([
                "--listen-address=10.250.0.53",
                "--user=root",
                "--group=root",
            ])
            .args(["--address=/egress.smol.test/10.250.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian: dnsmasq-base) is needed");
        let servers = vec![
            serve(&outer, "9000", "egress-ok"),
            serve(&inner, "9001", "loopback-leak"),
            dns,
        ];
        NetLab {
            inner,
            outer,
            servers,
        }
    }

    /// A passt wrapper that runs it in the inner namespace.
    fn passt_wrapper(&self, dir: &std::path::Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("passt-in-netns");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexec ip netns exec {} passt \"$@\"\n",
                self.inner
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.inner])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.inner));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.outer])
            .status();
    }
}

#[tokio::test]
async fn network_is_off_by_default_and_never_reaches_host_loopback() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let lab = NetLab::new();
    let engine = engine_at(h.path()).with_passt(lab.passt_wrapper(h.path()));
    std::thread::sleep(Duration::from_millis(300)); // servers listening

    // default: no network device at all
    let off = engine
        .create_machine(config(Some("offline")))
        .await
        .unwrap();
    // (sit0 is the kernel's built-in IPv6-in-IPv4 tunnel stub, not a way out)
    let r = run(
        &off,
        "ls /sys/class/net | grep -v -e '^lo$' -e '^sit0$' | wc -l",
    )
    .await;
    assert_eq!(r.stdout.trim(), "0", "{r:?}");
    // (busybox nc's -w bounds the connect only: `timeout` bounds a connection that opens but
    // never answers, which passt can show the guest for an address it then cannot reach)
    let r = run(&off, "timeout 10 nc -w 2 10.250.0.1 9000; echo rc=$?").await;
    assert!(!r.stdout.contains("egress-ok"), "{r:?}");

    let mut cfg = config(Some("online"));
    cfg.network = Some(true);
    let on = engine.create_machine(cfg).await.unwrap();
    let r = run(&on, "ip -4 addr show eth0; cat /etc/resolv.conf").await;
    assert!(
        r.stdout.contains("10.0.2.15/24") && r.stdout.contains("nameserver 10.0.2.3"),
        "{r:?}"
    );
    // egress to a host beyond the gateway works. (stdin stays open for a second: when the guest
    // half-closes before the reply, Debian 12's passt (2023-03-09) sometimes never delivers the
    // server's FIN, so nc would wait for the `timeout`.)
    let r = run(&on, "sleep 1 | timeout 20 nc -w 5 10.250.0.1 9000").await;
    assert_eq!(r.stdout.trim(), "egress-ok", "{r:?}");
    // DNS through passt's forwarder (10.0.2.3) to the namespace's resolver, then egress by name
    let r = run(&on, "nslookup egress.smol.test").await;
    assert!(r.stdout.contains("10.250.0.1"), "{r:?}");
    let r = run(&on, "sleep 1 | timeout 20 nc -w 5 egress.smol.test 9000").await;
    assert_eq!(r.stdout.trim(), "egress-ok", "{r:?}");
    // the gateway is not the host: services on the host's loopback stay out of reach
    let r = run(&on, "timeout 10 nc -w 2 10.0.2.2 9001; echo rc=$?").await;
    assert!(!r.stdout.contains("loopback-leak"), "{r:?}");
    on.delete().await.unwrap();
    off.delete().await.unwrap();
}
