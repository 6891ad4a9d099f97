//! Connections from a control replica to its nodes' APIs, kept open for the next request
//! (issue 15: a new TCP + mutual-TLS connection per exec made the hop 1.8x an exec on one
//! host).
//!
//! A connection is one HTTP/1.1 `SendRequest` of hyper. After a request it goes back to its
//! node's idle list once hyper says it is ready again, that is once the answer (and the
//! request's body) went through whole; one whose exchange did not end cleanly (a client that
//! left mid-download, an upgrade to a raw stream, a node that closed it) is never ready again
//! and is dropped. A request takes the most recently used idle connection of its node; when
//! that connection turns out closed before the request went out (a node restarted while it
//! sat idle), hyper hands the request back and the next connection, or a new one, sends it,
//! so a node's restart costs no request. Idle connections older than [`IDLE_FOR`] are closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::client::conn::http1::SendRequest;

/// The most idle connections kept per node.
const IDLE_PER_NODE: usize = 16;
/// How long a connection may sit idle before it is closed.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(30);

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// How long data sent to a node may stay unacknowledged before its connection is dropped
/// (`TCP_USER_TIMEOUT`): a request written on a kept connection to a node that went away
/// behind a partition fails in this time, as a new connection's connect would.
const UNACKED_FOR: Duration = Duration::from_secs(20);
/// Keepalive probes on a connection idle this long, every [`PROBE_EVERY`], [`PROBES`] times:
/// an idle connection to a node that vanished is known dead in under half a minute.
const PROBE_AFTER: Duration = Duration::from_secs(10);
const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBES: libc::c_int = 3;

fn set_opt(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `fd` is an open socket borrowed for the call; the option value is a c_int on
    // the stack, its size passed with it, and the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(
            level,
            name,
            error = %std::io::Error::last_os_error(),
            "cannot set a node connection's socket option"
        );
    }
}

/// Bounds how long a kept connection can hang on a node that is gone without a word (a
/// partition, a host powered off): unacknowledged data and keepalive probes end it.
pub(crate) fn bound_silence(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let secs = |d: Duration| d.as_secs() as libc::c_int;
    set_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        UNACKED_FOR.as_millis() as libc::c_int,
    );
    set_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(PROBE_AFTER));
    set_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        secs(PROBE_EVERY),
    );
    set_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, PROBES);
}

/// Idle connections by node (its id and where its API answers), and how many were opened.
#[derive(Default)]
pub(crate) struct NodePool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    opened: AtomicU64,
}

impl NodePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        // a panic while the map was held leaves nothing half-done in it: take it as it is
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection to `key` that is still open; those closed or
    /// idle for too long are dropped on the way.
    pub(crate) fn take(&self, key: &str) -> Option<SendRequest<Body>> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if !c.sender.is_closed() && c.sender.is_ready() && c.since.elapsed() < IDLE_FOR {
                return Some(c.sender);
            }
        }
        None
    }

    /// Counts a connection opened to a node.
    pub(crate) fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections to nodes were opened since the start.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Puts `sender` back for `key` once its exchange has ended cleanly (never, when it did
    /// not: then it is dropped and its connection closes).
    pub(crate) fn give_back(self: &Arc<Self>, key: String, mut sender: SendRequest<Body>) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.lock();
            // the connections of nodes no request asked for in a while go too
            idle.retain(|_, l| {
                l.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_FOR);
                !l.is_empty()
            });
            let list = idle.entry(key).or_default();
            if list.len() < IDLE_PER_NODE {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }

    /// How many idle connections are kept for `key` now (tests).
    #[cfg(test)]
    fn idle_for(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server answering `len` bytes of `h` to each request, closing each
    /// connection after `per_connection` answers.
    async fn server(per_connection: usize, len: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_connection {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let mut answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n")
                                .into_bytes();
                        answer.resize(answer.len() + len, b'h');
                        if tcp.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn connect(addr: std::net::SocketAddr) -> SendRequest<Body> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get_req() -> hyper::Request<Body> {
        hyper::Request::get("/").body(Body::empty()).unwrap()
    }

    async fn read(resp: hyper::Response<hyper::body::Incoming>) -> Vec<u8> {
        axum::body::to_bytes(Body::new(resp.into_body()), 64 << 20)
            .await
            .unwrap()
            .to_vec()
    }

    async fn wait_idle(pool: &NodePool, key: &str, n: usize) {
        for _ in 0..200 {
            if pool.idle_for(key) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} idle connections, not {n}", pool.idle_for(key));
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let addr = server(usize::MAX, 2).await;
        let pool = Arc::new(NodePool::default());
        assert!(pool.take("n").is_none());
        let mut s = connect(addr).await;
        let resp = s.send_request(get_req()).await.unwrap();
        assert_eq!(read(resp).await, b"hh");
        pool.give_back("n".into(), s);
        wait_idle(&pool, "n", 1).await;
        // the same connection answers the next request, and is handed out once
        let mut s = pool.take("n").expect("the idle connection");
        assert!(pool.take("n").is_none(), "taken once");
        let resp = s.send_request(get_req()).await.unwrap();
        assert_eq!(read(resp).await, b"hh");
        pool.give_back("n".into(), s);
        wait_idle(&pool, "n", 1).await;
        // a long answer dropped unread (a client that left mid-download): the connection is
        // never ready again, so not kept
        let big = server(usize::MAX, 32 << 20).await;
        let mut s = connect(big).await;
        let resp = s.send_request(get_req()).await.unwrap();
        drop(resp);
        pool.give_back("big".into(), s);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pool.idle_for("big"), 0);
        assert!(pool.take("big").is_none());
        assert_eq!(pool.connections_opened(), 0);
        pool.opened();
        assert_eq!(pool.connections_opened(), 1);
    }

    fn get_opt(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket; `v` and `len` are live locals the kernel writes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        v
    }

    #[tokio::test]
    async fn a_node_connection_ends_when_the_node_goes_silent() {
        use std::os::fd::AsRawFd;
        let addr = server(usize::MAX, 2).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        bound_silence(&tcp);
        let fd = tcp.as_raw_fd();
        assert_eq!(
            get_opt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            20_000
        );
        assert_eq!(get_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 10);
        assert_eq!(get_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 5);
        assert_eq!(get_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
    }

    #[tokio::test]
    async fn a_connection_its_server_closed_is_not_handed_out_and_gives_its_request_back() {
        let addr = server(1, 2).await;
        let pool = Arc::new(NodePool::default());
        let mut s = connect(addr).await;
        let resp = s.send_request(get_req()).await.unwrap();
        assert_eq!(read(resp).await, b"hh");
        pool.give_back("n".into(), s);
        // the server closed it after its one answer: take sees it closed
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.take("n").is_none());
        // a request on a connection closed under it comes back unsent, to be sent again
        let mut s = connect(addr).await;
        let resp = s.send_request(get_req()).await.unwrap();
        assert_eq!(read(resp).await, b"hh");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut e = s
            .try_send_request(get_req())
            .await
            .expect_err("the connection is closed");
        assert!(e.take_message().is_some(), "the request comes back");
    }
}
