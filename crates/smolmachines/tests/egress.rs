//! The egress policy (local::egress, docs/NETWORK.md) with real VMs, real QEMU and real passt,
//! in network namespaces of the test's own: "inner" runs the machine's passt (its loopback
//! stands in for the host's), "outer" holds the test's hosts, its DNS server (dnsmasq, whose
//! table the test rewrites) and a stand-in for the cloud metadata address. No packet leaves
//! them.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{config, run};
use smolmachines::local::LocalBackend;
use smolmachines::{ExecResult, MachineBackend};

/// The allowed host's first and its later address, a denied host, a block allowed by CIDR,
/// the DNS server.
const FIRST: &str = "10.250.0.1";
const MOVED: &str = "10.250.0.7";
const DENIED: &str = "10.250.0.9";
const BY_CIDR: &str = "10.250.0.100";
const DNS: &str = "10.250.0.53";
const METADATA: &str = "169.254.169.254";

struct NetLab {
    inner: String,
    outer: String,
    hosts_file: std::path::PathBuf,
    dns_pid: u32,
    servers: Vec<Child>,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2) is needed");
    assert!(
        st.success(),
        "ip {args:?} failed (the egress tests need root)"
    );
}

impl NetLab {
    fn new() -> NetLab {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{:04x}{}",
            std::process::id() & 0xffff,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let (inner, outer) = (format!("egi{tag}"), format!("ego{tag}"));
        let (vi, vo) = (format!("evi{tag}"), format!("evo{tag}"));
        for ns in [&inner, &outer] {
            // left over from an earlier run with this tag, if any
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        ip(&["netns", "add", &inner]);
        ip(&["netns", "add", &outer]);
        ip(&["link", "add", &vi, "type", "veth", "peer", "name", &vo]);
        ip(&["link", "set", &vi, "netns", &inner]);
        ip(&["link", "set", &vo, "netns", &outer]);
        ip(&["-n", &inner, "addr", "add", "10.250.0.2/24", "dev", &vi]);
        for a in [FIRST, MOVED, DENIED, BY_CIDR, DNS] {
            ip(&["-n", &outer, "addr", "add", &format!("{a}/24"), "dev", &vo]);
        }
        ip(&[
            "-n",
            &outer,
            "addr",
            "add",
            &format!("{METADATA}/32"),
            "dev",
            &vo,
        ]);
        for (ns, dev) in [(&inner, &vi), (&outer, &vo)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &inner, "route", "add", "default", "via", FIRST]);
        let dir = tempfile::Builder::new()
            .prefix("egl")
            .tempdir_in("/tmp")
            .unwrap();
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
        // a web server for the measurement: 64 MiB and a small file
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("small"), b"small\n").unwrap();
        let f = std::fs::File::create(www.join("big")).unwrap();
        f.set_len(64 << 20).unwrap();
        let httpd = Command::new("ip")
            .args([
                "netns", "exec", &outer, "busybox", "httpd", "-f", "-p", "9100", "-h",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // DNS: passt forwards the guest's queries to the inner namespace's resolver, a
        // dnsmasq in the outer one answering from a hosts file (TTL 2 s) the test rewrites
        let etc = format!("/etc/netns/{inner}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), format!("nameserver {DNS}\n")).unwrap();
        let hosts_file = dir.path().join("hosts");
        std::fs::write(
            &hosts_file,
            format!("{FIRST} allowed.smol.test\n{DENIED} denied.smol.test\n"),
        )
        .unwrap();
        let dns = Command::new("ip")
            .args(["netns", "exec", &outer, "dnsmasq", "--no-daemon"])
            .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .args(["--local-ttl=2", "--bind-interfaces", "--pid-file="])
            .arg(format!("--listen-address={DNS}"))
            .args(["--user=root", "--group=root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian: dnsmasq-base) is needed");
        let dns_pid = dns.id();
        let servers = vec![
            serve(&outer, "9000", "egress-ok"),
            serve(&inner, "9001", "loopback-leak"),
            httpd,
            dns,
        ];
        std::thread::sleep(Duration::from_millis(300)); // servers listening
        NetLab {
            inner,
            outer,
            hosts_file,
            dns_pid,
            servers,
            _dir: dir,
        }
    }

    /// Points allowed.smol.test at `addr` (dnsmasq reads its hosts file again on SIGHUP).
    fn move_allowed_host(&self, addr: &str) {
        std::fs::write(
            &self.hosts_file,
            format!("{addr} allowed.smol.test\n{DENIED} denied.smol.test\n"),
        )
        .unwrap();
        // SAFETY: kill(2) with a pid of our own child process.
        assert_eq!(unsafe { libc::kill(self.dns_pid as i32, libc::SIGHUP) }, 0);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// A passt wrapper that runs it in the inner namespace.
    fn passt_wrapper(&self) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self._dir.path().join("passt-in-netns");
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

    fn engine(&self, home: &std::path::Path) -> LocalBackend {
        LocalBackend::at(home)
            .with_assets(common::vm_assets().expect("the guest assets of `make setup`"))
            .with_passt(self.passt_wrapper())
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

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sme")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A connection that gets the server's reply. (stdin stays open for a second: when the guest
/// half-closes before the reply, Debian 12's passt sometimes never delivers the server's FIN.)
async fn reaches(m: &smolmachines::local::LocalMachine, host: &str, port: u16) -> ExecResult {
    run(
        m,
        &format!("sleep 1 | timeout 20 nc -w 5 {host} {port}; echo rc=$?"),
    )
    .await
}

fn reached(r: &ExecResult, reply: &str) -> bool {
    r.stdout.lines().next() == Some(reply)
}

/// Routes 127.0.0.1 out of the guest's eth0 to the gateway (root in the guest can): what a
/// guest does to try the host's loopback through passt.
const LOOPBACK_OUT: &str = "sysctl -qw net.ipv4.conf.all.route_localnet=1 \
     net.ipv4.conf.eth0.route_localnet=1 && \
     ip route del local 127.0.0.1 dev lo table local; \
     ip route del local 127.0.0.0/8 dev lo table local; \
     ip route add 127.0.0.1/32 via 10.0.2.2 dev eth0 && echo routed";

/// What every mode refuses: the metadata address and the host's loopback.
async fn assert_metadata_and_loopback_refused(m: &smolmachines::local::LocalMachine) {
    let r = reaches(m, METADATA, 9000).await;
    assert!(!r.stdout.contains("egress-ok"), "metadata reached: {r:?}");
    let r = run(m, LOOPBACK_OUT).await;
    assert!(r.stdout.contains("routed"), "{r:?}");
    let r = reaches(m, "127.0.0.1", 9001).await;
    assert!(
        !r.stdout.contains("loopback-leak"),
        "host loopback reached: {r:?}"
    );
}

#[tokio::test]
async fn open_egress_reaches_the_world_but_never_metadata_or_the_host_loopback() {
    if common::vm_assets().is_none() {
        return;
    }
    common::log_to_stderr();
    let lab = NetLab::new();
    let h = home();
    let engine = lab.engine(h.path());
    let mut cfg = config(Some("open"));
    cfg.network = Some(true);
    let m = engine.create_machine(cfg).await.unwrap();
    let r = reaches(&m, FIRST, 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    // any name resolves in open mode
    let r = run(&m, "nslookup denied.smol.test").await;
    assert!(r.stdout.contains(DENIED), "{r:?}");
    let r = reaches(&m, "denied.smol.test", 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    assert_metadata_and_loopback_refused(&m).await;

    // passt dies: the filter ends both directions (and logs why); the machine and its agent
    // (vsock) go on, its egress is gone rather than unfiltered, and delete still works
    let passt = passt_of(&m.dir());
    assert_eq!(passt.len(), 1, "one passt for the machine: {passt:?}");
    // SAFETY: kill(2) of the passt this test's machine runs.
    assert_eq!(unsafe { libc::kill(passt[0], libc::SIGKILL) }, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = run(&m, "echo alive").await;
    assert_eq!(r.stdout, "alive\n", "{r:?}");
    let r = run(&m, &format!("timeout 10 nc -w 2 {FIRST} 9000; echo rc=$?")).await;
    assert!(!r.stdout.contains("egress-ok"), "{r:?}");
    m.delete().await.unwrap();
}

/// Whether the allowed host answers within `within` (tried again until then): a filter
/// serves the link. (QEMU 7.2 does not drop the guest's carrier when the filter goes.)
async fn link_up(m: &smolmachines::local::LocalMachine, within: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if reached(&reaches(m, FIRST, 9000).await, "egress-ok") {
            return true;
        }
        if t0.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether the allowed host does not answer: no filter serves the link.
async fn link_down(m: &smolmachines::local::LocalMachine) -> bool {
    let r = run(m, &format!("timeout 10 nc -w 2 {FIRST} 9000; echo rc=$?")).await;
    !r.stdout.contains("egress-ok")
}

/// A detached machine's egress filter runs in the process that started it; once that filter
/// is gone (here its passt killed, as the process's exit would end it), the next process
/// serves the link: `hold_network` (what `smol machine create --network` leaves running)
/// without attaching, or any process that attaches (`connect`). Only one at a time.
#[tokio::test(flavor = "multi_thread")]
async fn a_detached_machines_link_is_served_again_by_the_next_process() {
    if common::vm_assets().is_none() {
        return;
    }
    common::log_to_stderr();
    let lab = NetLab::new();
    let h = home();
    let mut cfg = config(Some("netd"));
    cfg.network = Some(true);
    cfg.detach = true;
    cfg.persistent = true;
    let m = lab.engine(h.path()).create_machine(cfg).await.unwrap();
    let dir = m.dir();
    assert!(reached(&reaches(&m, FIRST, 9000).await, "egress-ok"));
    let kill_passt = || {
        let passt = passt_of(&dir);
        assert_eq!(passt.len(), 1, "one passt for the machine: {passt:?}");
        // SAFETY: kill(2) of the passt this test's machine runs.
        assert_eq!(unsafe { libc::kill(passt[0], libc::SIGKILL) }, 0);
    };
    kill_passt();
    assert!(link_down(&m).await, "the link outlived its filter");
    drop(m);

    // a holder (another engine, as another process would be) serves the link; a process
    // that attaches meanwhile leaves it to the holder
    let holder = {
        let engine = lab.engine(h.path());
        tokio::spawn(async move { engine.hold_network("netd").await })
    };
    let m = lab.engine(h.path()).connect_machine("netd").await.unwrap();
    assert!(
        link_up(&m, Duration::from_secs(30)).await,
        "the holder serves the link"
    );
    assert_metadata_and_loopback_refused(&m).await;
    assert_eq!(
        passt_of(&dir).len(),
        1,
        "the attach started no second filter"
    );
    // the holder ends with the VMM
    m.stop().await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(30), holder)
        .await
        .expect("the holder ends with the VMM")
        .unwrap();
    assert_eq!(held.unwrap(), Some(true));
    assert_eq!(
        lab.engine(h.path()).hold_network("netd").await.unwrap(),
        None
    );

    // started again (this process's filter), that filter gone, the machine handle dropped:
    // the next process that attaches starts the filter again itself
    m.start().await.unwrap();
    assert!(reached(&reaches(&m, FIRST, 9000).await, "egress-ok"));
    kill_passt();
    assert!(link_down(&m).await, "the link outlived its filter");
    drop(m);
    let m = lab.engine(h.path()).connect_machine("netd").await.unwrap();
    assert!(
        link_up(&m, Duration::from_secs(30)).await,
        "the attaching process serves the link"
    );
    assert_metadata_and_loopback_refused(&m).await;
    m.delete().await.unwrap();
}

/// The passt processes whose command line names `dir` (the machine's run directory).
fn passt_of(dir: &std::path::Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).to_string();
            let argv0 = cmd.split('\0').next().unwrap_or("").to_string();
            (argv0.ends_with("passt") && cmd.contains(&needle)).then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn allow_lists_pass_allowed_names_and_blocks_and_follow_a_name_that_moves() {
    if common::vm_assets().is_none() {
        return;
    }
    common::log_to_stderr();
    let lab = NetLab::new();
    let h = home();
    let engine = lab.engine(h.path());
    let mut cfg = config(Some("allow"));
    // no `network: true`: an allow-list turns networking on (SPEC §3.1). The metadata and
    // loopback blocks in it do not lift their denial.
    cfg.resources.allow_hosts = vec!["allowed.smol.test".into()];
    cfg.resources.allow_cidrs = vec![
        format!("{BY_CIDR}/32"),
        "169.254.0.0/16".into(),
        "127.0.0.0/8".into(),
    ];
    let m = engine.create_machine(cfg).await.unwrap();

    // an allowed host by name
    let r = run(&m, "nslookup allowed.smol.test").await;
    assert!(r.stdout.contains(FIRST), "{r:?}");
    let r = reaches(&m, "allowed.smol.test", 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    // an allowed block
    let r = reaches(&m, BY_CIDR, 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    // a denied host: its name is refused at DNS, and its address by IP
    let r = run(&m, "nslookup denied.smol.test; echo rc=$?").await;
    assert!(!r.stdout.contains(DENIED), "{r:?}");
    assert!(
        r.stdout.contains("REFUSED") || r.stderr.contains("REFUSED"),
        "{r:?}"
    );
    let r = reaches(&m, "denied.smol.test", 9000).await;
    assert!(!r.stdout.contains("egress-ok"), "{r:?}");
    let r = reaches(&m, DENIED, 9000).await;
    assert!(!r.stdout.contains("egress-ok"), "{r:?}");
    // refused with a reset: at once, not after a connect timeout
    assert!(
        r.stderr.contains("refused") || r.stdout.contains("refused"),
        "{r:?}"
    );

    // the name moves: once the old answer's TTL (2 s) has passed, the new address is allowed
    // and the old one no longer is
    lab.move_allowed_host(MOVED);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = run(&m, "nslookup allowed.smol.test").await;
    assert!(
        r.stdout.contains(MOVED) && !r.stdout.contains(FIRST),
        "{r:?}"
    );
    let r = reaches(&m, "allowed.smol.test", 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    let r = reaches(&m, MOVED, 9000).await;
    assert!(reached(&r, "egress-ok"), "{r:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = reaches(&m, FIRST, 9000).await;
    assert!(
        !r.stdout.contains("egress-ok"),
        "the old address is still allowed: {r:?}"
    );

    assert_metadata_and_loopback_refused(&m).await;
    m.delete().await.unwrap();
}

async fn timed(m: &smolmachines::local::LocalMachine, script: &str) -> f64 {
    let t0 = Instant::now();
    let r = run(m, script).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    t0.elapsed().as_secs_f64()
}

/// What the filter costs (docs/NETWORK.md): a 64 MiB download and a small request's round
/// trip, through the filter and with QEMU on passt directly. The direct machine is also the
/// control of the tests above: without the filter the metadata stand-in and the host's
/// loopback are reached. Not timed in CI (tests never assert timings):
/// `cargo test --release -p smolmachines --test egress -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn what_the_filter_costs_and_what_passt_alone_lets_through() {
    if common::vm_assets().is_none() {
        return;
    }
    common::log_to_stderr();
    let lab = NetLab::new();
    let h = home();
    let engine = lab.engine(h.path());
    let mut figures = Vec::new();
    for direct in [false, true] {
        smolmachines::local::egress::bypass_for_measurement(direct);
        let mut cfg = config(Some(if direct { "direct" } else { "filtered" }));
        cfg.network = Some(true);
        let m = engine.create_machine(cfg).await.unwrap();
        smolmachines::local::egress::bypass_for_measurement(false);
        let base = timed(&m, "true").await;
        let url = format!("http://{FIRST}:9100");
        // warm up (ARP, passt's first connection)
        timed(&m, &format!("wget -q -O /dev/null {url}/small")).await;
        let mut big = f64::MAX;
        for _ in 0..3 {
            big = big.min(timed(&m, &format!("wget -q -O /dev/null {url}/big")).await - base);
        }
        let n = 20;
        let t = timed(
            &m,
            &format!("for i in $(seq {n}); do wget -q -O /dev/null {url}/small; done"),
        )
        .await
            - base;
        let mibs = 64.0 / big;
        let rtt_ms = t / f64::from(n) * 1e3;
        println!(
            "{}: 64 MiB in {big:.2} s ({mibs:.0} MiB/s); a small request {rtt_ms:.1} ms",
            if direct { "passt alone" } else { "filtered" }
        );
        figures.push((mibs, rtt_ms));
        if direct {
            let r = reaches(&m, METADATA, 9000).await;
            println!("passt alone, metadata stand-in: {:?}", r.stdout);
            let _ = run(&m, LOOPBACK_OUT).await;
            let r = reaches(&m, "127.0.0.1", 9001).await;
            println!("passt alone, host loopback: {:?}", r.stdout);
        } else {
            assert_metadata_and_loopback_refused(&m).await;
        }
        m.delete().await.unwrap();
    }
    println!("figures (filtered, direct): {figures:?}");
}
