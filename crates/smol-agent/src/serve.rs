//! Protocol sessions: one per host connection, many concurrent operations per session.

use std::os::fd::AsRawFd;
use std::time::Duration;

use smol_protocol::mux::{Incoming, Mux, MuxConfig, Stream};
use smol_protocol::{
    ErrorKind, Frame, Generations, Hello, Op, RemoteError, MIN_PROTOCOL_VERSION, PORT_NAME,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::init::Config;

/// The generations this agent speaks: all of this crate's, unless the kernel command line
/// capped them (`smol.protocol_max=N`, test-only: an older agent's behaviour).
static SPEAKS: std::sync::OnceLock<Generations> = std::sync::OnceLock::new();

/// The range `cap` leaves of what this crate speaks (never below the oldest generation).
pub fn capped(cap: Option<u16>) -> Generations {
    let max = cap.map_or(PROTOCOL_VERSION, |n| {
        n.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    });
    Generations::new(MIN_PROTOCOL_VERSION, max)
}

fn speaks() -> Generations {
    SPEAKS.get().copied().unwrap_or(Generations::CURRENT)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Serves the virtio-serial port forever, one session per host connection. `restarted`: PID 1
/// started this agent again after the previous one died (see [`end_dead_session`]).
pub fn serve_port(cfg: &Config, restarted: bool) -> ! {
    // what writes of an earlier agent (or boot) left half-done goes first
    crate::pending::enable(std::path::Path::new(crate::pending::LIST));
    let port = crate::port::open(PORT_NAME);
    let fd = port.as_raw_fd();
    let rt = runtime();
    let linger = cfg.linger_ms.map(Duration::from_millis);
    let gens = capped(cfg.protocol_max);
    if gens != Generations::CURRENT {
        eprintln!("smol-agent: speaking protocol generations {gens} only (smol.protocol_max)");
    }
    let _ = SPEAKS.set(gens);
    rt.block_on(async move {
        if restarted {
            end_dead_session(fd).await;
        }
        let mut served = restarted;
        // The hello of a host that arrived while the previous session was still reading.
        let mut next_hello = None;
        loop {
            let away_since = tokio::time::Instant::now();
            while !crate::port::host_connected(fd) {
                // A machine that must not outlive its process powers itself off cleanly
                // (flushing its disk) once the host has been gone for the linger time.
                if let (true, Some(l)) = (served, linger) {
                    if away_since.elapsed() >= l {
                        eprintln!("smol-agent: host gone for {l:?}; powering off");
                        crate::init::power_off();
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            served = true;
            match crate::port::PortIo::new(fd) {
                Ok(io) => {
                    let (r, w) = tokio::io::split(io);
                    next_hello = session(r, w, next_hello.take()).await;
                    // The host went away (it may have died): make everything written so far
                    // durable before anything else can happen to the VM.
                    // SAFETY: sync has no preconditions.
                    unsafe { libc::sync() };
                }
                Err(e) => {
                    eprintln!("smol-agent: port: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// A host still connected when the agent restarts waits on the operations of the agent that
/// died: tell it (a `Goodbye` saying the agent restarted), so that it fails them at once and
/// connects again, then wait (up to 500 ms) for it to close its end before serving the next
/// session on a fresh connection.
async fn end_dead_session(fd: std::os::fd::RawFd) {
    if !crate::port::host_connected(fd) {
        return;
    }
    eprintln!("smol-agent: restarted; ending the host's session with the previous agent");
    match crate::port::PortIo::new(fd) {
        Ok(io) => {
            let (r, w) = tokio::io::split(io);
            let (mux, _incoming) = Mux::spawn(r, w);
            mux.say_goodbye(smol_protocol::mux::AGENT_RESTARTED);
            // the writer sends the queued goodbye before it stops
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(e) => eprintln!("smol-agent: port: {e}"),
    }
    let since = tokio::time::Instant::now();
    while crate::port::host_connected(fd) && since.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves one session per connection on a unix socket (the agent outside a VM, for tests).
pub fn serve_unix(path: &str) {
    let _ = std::fs::remove_file(path);
    let rt = runtime();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(path).expect("bind agent socket");
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (r, w) = sock.into_split();
            tokio::spawn(session(r, w, None));
        }
    });
}

/// Connects to the host's unix socket at `path` and serves it, one session per connection,
/// connecting again (every 100 ms) when the host goes away, as QEMU's `reconnect=1` chardev
/// does: the agent of the tests' fake VMM (`crates/smol-fleet/tests/support/fakevmm.py`),
/// which runs the agent as a host process in place of a guest.
pub fn connect_unix(path: &str) {
    let rt = runtime();
    rt.block_on(async move {
        loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(sock) => {
                    let (r, w) = sock.into_split();
                    // a hello read on a connection that ended answers nobody on the next one
                    let _ = session(r, w, None).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}

/// Runs one session until the host goes away (or a new host says hello: its hello is
/// returned, for the next session). Operations still running are cancelled.
///
/// `host_hello` is the hello of this session's host when the previous session read it: the
/// protocol generation is then settled with it before anything is read.
pub async fn session<R, W>(reader: R, writer: W, host_hello: Option<Hello>) -> Option<Hello>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut greeted = host_hello.is_some();
    // The host session this one serves: the nonce its hellos echo (0 until a host said hello).
    let mut host_session = host_hello.as_ref().map_or(0, |h| h.session.unwrap_or(0));
    let (mux, mut incoming) = Mux::spawn_with(
        reader,
        writer,
        MuxConfig {
            speaks: speaks(),
            peer_hello: host_hello,
        },
    );
    if greeted {
        log_generation(&mux);
    }
    let gens = speaks();
    let hello = |session: u64| Hello {
        version: gens.max,
        software: env!("CARGO_PKG_VERSION").to_string(),
        kernel: crate::init::kernel_release(),
        uptime_ms: uptime_ms(),
        min_version: gens.min,
        session: Some(session),
    };
    // Unasked, so a host that waits for it sees the agent as soon as the port opens ...
    if mux.send_hello(hello(host_session)).is_err() {
        eprintln!("smol-agent: the session closed before its hello");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = None;
    loop {
        tokio::select! {
            inc = incoming.recv() => match inc {
                Some(Incoming::Open(stream, op)) => { tasks.spawn(handle(stream, op)); }
                // A second hello is a new host whose arrival the port did not show (QEMU swapped
                // its chardev without a visible disconnect): start a fresh session for it. The
                // host sends nothing after its hello until it has ours, so nothing is lost.
                // Its hello goes to the next session, which speaks the new host's generation.
                Some(Incoming::Hello(h)) if greeted => {
                    next = Some(h);
                    break;
                }
                Some(Incoming::Hello(h)) => {
                    greeted = true;
                    host_session = h.session.unwrap_or(0);
                    // ... and again as the answer to the host's: the unasked one may have gone
                    // to a connection QEMU dropped while it swapped chardevs (its own reconnect
                    // racing `chardev-change`), and a host waits for a hello before anything
                    // else. Hosts ignore hellos after the first.
                    if mux.send_hello(hello(host_session)).is_err() {
                        eprintln!("smol-agent: the session closed before its answering hello");
                    }
                    log_generation(&mux);
                }
                None => break,
            },
            _ = mux.closed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // A new host's hello the reader passed on just before the channel ended is the next
    // session's: without it that session could never echo the host's nonce.
    while let Ok(inc) = incoming.try_recv() {
        if let (Incoming::Hello(h), None) = (inc, &next) {
            next = Some(h);
        }
    }
    // Dropping the set aborts the handlers; exec handlers kill their process groups on drop.
    drop(tasks);
    // Stop this session's reader and writer before the next session uses the same port: a
    // reader left running would take the next host's frames, a writer would mix this
    // session's last frames into the next one's.
    if !mux.finish(SESSION_END).await {
        eprintln!(
            "smol-agent: the session's writer was still blocked after {SESSION_END:?}; stopped it"
        );
    }
    next
}

/// How long a session that ended may take to write what it had queued (a host that no longer
/// reads would block its writer forever).
const SESSION_END: Duration = Duration::from_secs(1);

/// Says on the console when the host is of another generation (the mux settled it with the
/// host's hello): an older host is served in its generation, one with nothing in common
/// refuses this agent.
fn log_generation(mux: &Mux) {
    match mux.negotiated() {
        Some(Ok(g)) if g < PROTOCOL_VERSION => {
            eprintln!("smol-agent: the host is older: speaking protocol generation {g}")
        }
        Some(Err(e)) => {
            eprintln!("smol-agent: no protocol generation in common with the host: {e}")
        }
        _ => {}
    }
}

async fn handle(stream: Stream, op: Op) {
    let id = stream.id();
    let tx = stream.tx.clone();
    let result = match op {
        Op::Exec(req) => crate::exec::run(stream, req, None).await,
        Op::ExecIn { exec, rootfs } => crate::exec::run(stream, exec, Some(rootfs)).await,
        Op::Spawn { exec, log } => crate::exec::spawn(stream, exec, log).await,
        Op::MountImage {
            path,
            fstype,
            size,
            target,
        } => crate::container::mount_image(stream, path, fstype, size, target).await,
        Op::WriteFile { path, mode } => crate::files::write(stream, &path, mode).await,
        Op::ReadFile { path } => {
            crate::files::read(stream, &path, Some(smol_protocol::READ_FILE_LIMIT)).await
        }
        Op::ReadFileStream { path } => crate::files::read(stream, &path, None).await,
        Op::Identity { hostname, seed } => crate::identity::apply(id, &hostname, &seed),
        Op::Ping => Ok(Frame::Done { id }),
        Op::Connect { port } => crate::relay::connect(stream, port).await,
        Op::Shutdown => {
            eprintln!("smol-agent: shutdown requested");
            // Every user process ends first, in one operation: nothing writes during the sync.
            crate::cgroup::kill_all();
            tokio::task::spawn_blocking(|| crate::init::power_off());
            return;
        }
    };
    let frame = result.unwrap_or_else(|error| Frame::Error { id, error });
    let _ = tx.send(frame);
}

/// Error for a request that is malformed.
pub fn invalid(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    //! The agent's handlers, run on the host over an in-memory channel (no VM).
    use super::*;
    use smol_protocol::mux::StreamReceiver;
    use smol_protocol::{Chan, ExecRequest};

    #[test]
    fn a_cap_narrows_the_generations_within_what_the_crate_speaks() {
        assert_eq!(capped(None), Generations::CURRENT);
        assert_eq!(capped(Some(PROTOCOL_VERSION + 5)), Generations::CURRENT);
        assert_eq!(
            capped(Some(MIN_PROTOCOL_VERSION)),
            Generations::only(MIN_PROTOCOL_VERSION)
        );
        assert_eq!(capped(Some(0)).max, MIN_PROTOCOL_VERSION);
        let three = capped(Some(3));
        assert_eq!((three.min, three.max), (MIN_PROTOCOL_VERSION, 3));
        // a host of this crate negotiates down to the cap
        let hello = Hello {
            version: three.max,
            software: String::new(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: three.min,
            session: None,
        };
        assert_eq!(
            smol_protocol::negotiate(Generations::CURRENT, &hello).ok(),
            Some(3)
        );
    }

    async fn host() -> Mux {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        tokio::spawn(session(ar, aw, None));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = Mux::spawn(br, bw);
        match incoming.recv().await {
            Some(Incoming::Hello(h)) => assert_eq!(h.version, PROTOCOL_VERSION),
            other => panic!("expected hello, got {other:?}"),
        }
        mux
    }

    fn host_hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: MIN_PROTOCOL_VERSION,
            session: None,
        }
    }

    /// The hello of a host of generation 1 (before this change: it says no range).
    fn old_host_hello() -> Hello {
        Hello {
            version: 1,
            software: "old-host".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: 1,
            session: None,
        }
    }

    /// A host mux that speaks only generation 1.
    fn old_host_mux(
        r: tokio::io::ReadHalf<tokio::io::DuplexStream>,
        w: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    ) -> (Mux, tokio::sync::mpsc::UnboundedReceiver<Incoming>) {
        Mux::spawn_with(
            r,
            w,
            MuxConfig {
                speaks: smol_protocol::Generations::only(1),
                peer_hello: None,
            },
        )
    }

    /// A host of generation 1 (a host from before containers): the agent speaks generation 1
    /// with it, and its commands run through the real handlers (a generation-1 `Exec` has no
    /// `user` on the wire: read as generation 2 it would not decode).
    #[tokio::test]
    async fn an_older_host_is_served_in_its_generation() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        tokio::spawn(session(ar, aw, None));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = old_host_mux(br, bw);
        mux.send_hello(old_host_hello()).unwrap();
        match incoming.recv().await {
            Some(Incoming::Hello(h)) => {
                assert_eq!(h.speaks(), smol_protocol::Generations::CURRENT)
            }
            other => panic!("expected hello, got {other:?}"),
        }
        assert_eq!(mux.negotiated(), Some(Ok(1)));
        let mut s = mux
            .open(exec(&["sh", "-c", "echo $SMOL_T"], None, false))
            .unwrap();
        let (out, _, end) = collect(&mut s.rx).await;
        assert_eq!(out, b"v\n");
        assert!(matches!(end, Frame::Exit { code: 0, .. }), "{end:?}");
    }

    /// A new host's hello read by the previous session goes to the next one, which speaks
    /// that host's generation from its first frame.
    #[tokio::test]
    async fn the_next_session_speaks_the_generation_of_the_hello_it_was_given() {
        // the previous session: a current host, then an old one says hello
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let previous = tokio::spawn(session(ar, aw, None));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = Mux::spawn(br, bw);
        mux.send_hello(host_hello()).unwrap();
        assert!(matches!(incoming.recv().await, Some(Incoming::Hello(_))));
        mux.send_hello(old_host_hello()).unwrap();
        let handed_on = tokio::time::timeout(std::time::Duration::from_secs(5), previous)
            .await
            .expect("session did not end")
            .unwrap()
            .expect("the new host's hello was not handed on");
        assert_eq!(handed_on, old_host_hello());

        // the next session on the port: the old host sends no hello again
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        tokio::spawn(session(ar, aw, Some(handed_on)));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = old_host_mux(br, bw);
        assert!(matches!(incoming.recv().await, Some(Incoming::Hello(_))));
        let mut s = mux
            .open(exec(&["sh", "-c", "echo $SMOL_T"], None, false))
            .unwrap();
        let (out, _, end) = collect(&mut s.rx).await;
        assert_eq!(out, b"v\n");
        assert!(matches!(end, Frame::Exit { code: 0, .. }), "{end:?}");
    }

    /// A host that connects while the port never showed the previous one leave says hello in
    /// the middle of a session: the session ends so that a fresh one can greet it.
    #[tokio::test]
    async fn a_second_host_hello_ends_the_session() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let agent = tokio::spawn(session(ar, aw, None));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = Mux::spawn(br, bw);
        mux.send_hello(host_hello()).unwrap();
        assert!(matches!(incoming.recv().await, Some(Incoming::Hello(_))));
        let mut s = mux.open(Op::Ping).unwrap();
        assert!(matches!(s.rx.recv().await.unwrap(), Frame::Done { .. }));
        assert!(!agent.is_finished());
        mux.send_hello(host_hello()).unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), agent)
            .await
            .expect("session did not end")
            .unwrap();
        assert_eq!(
            next,
            Some(host_hello()),
            "the new host's hello goes to the next session"
        );
    }

    /// The agent's unasked hello can be lost (it went to a connection QEMU dropped): the
    /// agent answers the host's hello with another, so the host never waits forever.
    #[tokio::test]
    async fn the_agent_answers_the_host_hello() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        tokio::spawn(session(ar, aw, None));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = Mux::spawn(br, bw);
        // the unasked hello, taken as lost: it belongs to no host session yet
        match incoming.recv().await {
            Some(Incoming::Hello(h)) => assert_eq!(h.session, Some(0)),
            other => panic!("expected the unasked hello, got {other:?}"),
        }
        mux.send_hello(Hello {
            session: Some(42),
            ..host_hello()
        })
        .unwrap();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), incoming.recv())
            .await
            .expect("no answer to the host hello");
        match answer {
            Some(Incoming::Hello(h)) => assert_eq!(h.session, Some(42), "the nonce is echoed"),
            other => panic!("expected the answering hello, got {other:?}"),
        }
    }

    /// A session begun with the hello a previous session read (a branched clone's new host)
    /// echoes that host's nonce in its first hello: the host waits for exactly that one, and
    /// the previous session's reader and writer are stopped before it is sent.
    #[tokio::test]
    async fn a_session_handed_a_hello_echoes_its_nonce_at_once() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let handed = Hello {
            session: Some(7),
            ..host_hello()
        };
        tokio::spawn(session(ar, aw, Some(handed)));
        let (br, bw) = tokio::io::split(b);
        let (mux, mut incoming) = Mux::spawn(br, bw);
        match incoming.recv().await {
            Some(Incoming::Hello(h)) => assert_eq!(h.session, Some(7)),
            other => panic!("expected hello, got {other:?}"),
        }
        let mut s = mux.open(Op::Ping).unwrap();
        assert!(matches!(s.rx.recv().await.unwrap(), Frame::Done { .. }));
    }

    fn exec(argv: &[&str], timeout_ms: Option<u64>, stdin: bool) -> Op {
        Op::Exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("SMOL_T".into(), "v".into())],
            workdir: None,
            timeout_ms,
            stdin,
            user: None,
        })
    }

    async fn collect(rx: &mut StreamReceiver) -> (Vec<u8>, Vec<u8>, Frame) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match rx.recv().await.unwrap() {
                Frame::Data {
                    chan: Chan::Stdout,
                    data,
                    ..
                } => out.extend(data),
                Frame::Data {
                    chan: Chan::Stderr,
                    data,
                    ..
                } => err.extend(data),
                f if f.is_terminal() => return (out, err, f),
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn exec_output_env_stdin_and_exit_code() {
        let mux = host().await;
        let mut s = mux
            .open(exec(
                &["sh", "-c", "echo $SMOL_T; cat; echo e >&2; exit 5"],
                None,
                true,
            ))
            .unwrap();
        s.tx.send_data(Chan::Stdin, b"piped\n").await.unwrap();
        s.tx.send_eof(Chan::Stdin).unwrap();
        let (out, err, end) = collect(&mut s.rx).await;
        assert_eq!(out, b"v\npiped\n");
        assert_eq!(err, b"e\n");
        assert!(matches!(
            end,
            Frame::Exit {
                code: 5,
                timed_out: false,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn missing_command_is_127_and_timeout_is_124() {
        let mux = host().await;
        let mut s = mux.open(exec(&["/no/such/binary"], None, false)).unwrap();
        let (_, err, end) = collect(&mut s.rx).await;
        assert!(String::from_utf8_lossy(&err).contains("command not found"));
        assert!(matches!(end, Frame::Exit { code: 127, .. }));

        let mut s = mux
            .open(exec(&["sh", "-c", "echo a; sleep 20"], Some(300), false))
            .unwrap();
        let t0 = std::time::Instant::now();
        let (out, _, end) = collect(&mut s.rx).await;
        assert_eq!(out, b"a\n");
        assert!(matches!(
            end,
            Frame::Exit {
                code: 124,
                timed_out: true,
                ..
            }
        ));
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    }

    /// `Spawn` answers at once with the pid; the command runs on, its output in the log, and
    /// outlives the session that started it.
    #[tokio::test]
    async fn spawn_runs_in_the_background_and_logs() {
        let dir = std::env::temp_dir().join(format!("smol-spawn-{}", std::process::id()));
        let log = dir.join("sub/out.log");
        let mux = host().await;
        let Op::Exec(req) = exec(
            &["sh", "-c", "sleep 0.3; echo $SMOL_T; echo err >&2"],
            None,
            false,
        ) else {
            unreachable!()
        };
        let t0 = std::time::Instant::now();
        let mut s = mux
            .open(Op::Spawn {
                exec: req,
                log: Some(log.display().to_string()),
            })
            .unwrap();
        let (out, _, end) = collect(&mut s.rx).await;
        assert!(
            t0.elapsed() < std::time::Duration::from_millis(300),
            "answered at once"
        );
        assert!(matches!(end, Frame::Exit { code: 0, .. }), "{end:?}");
        let out = String::from_utf8(out).unwrap();
        let pid: i32 = out.trim().strip_prefix("pid=").unwrap().parse().unwrap();
        assert!(pid > 0);
        drop(mux); // the session ends; the command does not
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(&log).unwrap_or_default() != "v\nerr\n" {
            assert!(std::time::Instant::now() < deadline, "log never filled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        std::fs::remove_dir_all(&dir).unwrap();

        let mux = host().await;
        let Op::Exec(req) = exec(&["no-such-program"], None, false) else {
            unreachable!()
        };
        let mut s = mux
            .open(Op::Spawn {
                exec: req,
                log: None,
            })
            .unwrap();
        let (_, err, end) = collect(&mut s.rx).await;
        assert!(matches!(end, Frame::Exit { code: 127, .. }), "{end:?}");
        assert!(String::from_utf8_lossy(&err).contains("command not found"));
    }

    #[tokio::test]
    async fn cancel_kills_the_command() {
        let mux = host().await;
        let mut s = mux.open(exec(&["sleep", "30"], None, false)).unwrap();
        s.tx.send(Frame::Cancel { id: s.id() }).unwrap();
        let (_, _, end) = collect(&mut s.rx).await;
        assert!(matches!(end, Frame::Exit { code: 137, .. }), "{end:?}");
    }

    #[tokio::test]
    async fn files_roundtrip_and_errors() {
        let mux = host().await;
        let dir = std::env::temp_dir().join(format!("smol-agent-test-{}", std::process::id()));
        let path = dir.join("sub/f.bin");
        let p = path.to_str().unwrap().to_string();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = mux
            .open(Op::WriteFile {
                path: p.clone(),
                mode: Some(0o600),
            })
            .unwrap();
        s.tx.send_data(Chan::File, &data).await.unwrap();
        s.tx.send_eof(Chan::File).unwrap();
        assert!(matches!(s.rx.recv().await.unwrap(), Frame::Done { .. }));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let mut s = mux.open(Op::ReadFile { path: p.clone() }).unwrap();
        let mut back = Vec::new();
        loop {
            match s.rx.recv().await.unwrap() {
                Frame::Data { data, .. } => back.extend(data),
                Frame::Done { .. } => break,
                f => panic!("{f:?}"),
            }
        }
        assert_eq!(back, data);

        for (op, kind) in [
            (
                Op::ReadFile {
                    path: "/no/such".into(),
                },
                ErrorKind::NotFound,
            ),
            (
                Op::ReadFile {
                    path: dir.to_str().unwrap().into(),
                },
                ErrorKind::IsADirectory,
            ),
            (
                Op::ReadFile {
                    path: "relative".into(),
                },
                ErrorKind::InvalidInput,
            ),
            (
                Op::WriteFile {
                    path: dir.to_str().unwrap().into(),
                    mode: None,
                },
                ErrorKind::IsADirectory,
            ),
        ] {
            let mut s = mux.open(op).unwrap();
            match s.rx.recv().await.unwrap() {
                Frame::Error { error, .. } => assert_eq!(error.kind, kind, "{error:?}"),
                f => panic!("{f:?}"),
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The pipelined write keeps the order of chunks of any size, across many batches; a write
    /// the host cancels half-way leaves the old content and no temporary file.
    #[tokio::test]
    async fn pipelined_writes_keep_order_and_a_cancelled_one_keeps_the_old_content() {
        let mux = host().await;
        let dir = std::env::temp_dir().join(format!("smol-agent-pipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let p = path.to_str().unwrap().to_string();
        let mut data = Vec::new();
        let mut s = mux
            .open(Op::WriteFile {
                path: p.clone(),
                mode: None,
            })
            .unwrap();
        // chunk sizes 1 .. MAX_CHUNK, mixed, some 6 MiB in all (several WRITE_AHEADs)
        let mut n = 0u32;
        while data.len() < 6 << 20 {
            n += 1;
            let size = ((n as usize * 7919) % smol_protocol::MAX_CHUNK) + 1;
            let chunk: Vec<u8> = (0..size).map(|i| (i as u32 ^ n) as u8).collect();
            s.tx.send_data(Chan::File, &chunk).await.unwrap();
            data.extend(chunk);
        }
        s.tx.send_eof(Chan::File).unwrap();
        assert!(matches!(s.rx.recv().await.unwrap(), Frame::Done { .. }));
        assert!(std::fs::read(&path).unwrap() == data, "content differs");

        let mut s = mux
            .open(Op::WriteFile {
                path: p.clone(),
                mode: None,
            })
            .unwrap();
        s.tx.send_data(Chan::File, &vec![1u8; 3 << 20])
            .await
            .unwrap();
        s.tx.send(Frame::Cancel { id: s.tx.id() }).unwrap();
        match s.rx.recv().await.unwrap() {
            Frame::Error { error, .. } => assert!(error.message.contains("cancelled"), "{error:?}"),
            f => panic!("{f:?}"),
        }
        assert!(
            std::fs::read(&path).unwrap() == data,
            "the old content was lost"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("f.bin")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Only regular files are read (devices, FIFOs and symlinks to them are refused at once,
    /// naming the path and its type); a file over the limit is refused before any byte; a
    /// stream read has no limit.
    #[tokio::test]
    async fn reads_refuse_non_regular_files_and_big_ones() {
        let mux = host().await;
        let dir = std::env::temp_dir().join(format!("smol-agent-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let big = dir.join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(smol_protocol::READ_FILE_LIMIT + 1).unwrap(); // sparse
        let cases = [
            (
                "/dev/zero".to_string(),
                ErrorKind::Unsupported,
                "a character device",
            ),
            (
                fifo.to_str().unwrap().into(),
                ErrorKind::Unsupported,
                "a FIFO",
            ),
            (
                link.to_str().unwrap().into(),
                ErrorKind::Unsupported,
                "resolves to /dev/zero",
            ),
            (
                big.to_str().unwrap().into(),
                ErrorKind::InvalidInput,
                "268435457 bytes, over the read limit of 268435456 bytes",
            ),
        ];
        for (path, kind, says) in cases {
            let mut s = mux.open(Op::ReadFile { path: path.clone() }).unwrap();
            let start = std::time::Instant::now();
            match s.rx.recv().await.unwrap() {
                Frame::Error { error, .. } => {
                    assert_eq!(error.kind, kind, "{error:?}");
                    assert!(
                        error.message.contains(says) && error.message.contains(&path),
                        "{error:?}"
                    );
                }
                f => panic!("{path}: {f:?}"),
            }
            assert!(start.elapsed() < Duration::from_secs(5));
        }
        // the stream read has no limit: the first chunk of the big file comes
        let mut s = mux
            .open(Op::ReadFileStream {
                path: big.to_str().unwrap().into(),
            })
            .unwrap();
        assert!(matches!(s.rx.recv().await.unwrap(), Frame::Data { .. }));
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
