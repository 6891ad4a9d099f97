//! The relay between QEMU's `-netdev stream` (the guest side) and passt (the host side): two
//! threads per networked machine, one a direction, each frame a 4-byte big-endian length and
//! an Ethernet frame. Either side closing or failing ends both directions (logged with the
//! reason); passt (`-1`) then exits, and the guest's link is down until a relay connects to
//! QEMU again (the machine's next boot, or another process taking the link over,
//! `net::resume`): the relay fails closed.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Filter, Outcome};

/// The longest frame either side may send (passt's MTU is 65520; a longer one is a broken or
/// hostile peer, and ends the relay).
const MAX_FRAME: usize = 65535 + 14 + 4;
/// How long the relay waits for QEMU to listen.
const ACCEPT_WAIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    denied: AtomicU64,
    replies: AtomicU64,
    inbound: AtomicU64,
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes (at most {MAX_FRAME})"),
        ));
    }
    buf.resize(n, 0);
    r.read_exact(buf)?;
    Ok(Some(()))
}

fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    w.write_all(&out)
}

/// Waits until QEMU's listening socket `vm` takes a connection, while `upstream` (passt) is
/// still there; `None` after [`ACCEPT_WAIT`] or when passt is gone.
fn connect_to_vm(vm: &std::path::Path, upstream: &UnixStream) -> Option<UnixStream> {
    let deadline = Instant::now() + ACCEPT_WAIT;
    loop {
        match UnixStream::connect(vm) {
            Ok(s) => return Some(s),
            Err(e) => tracing::trace!(error = %e, "egress relay: the VMM does not listen yet"),
        }
        let mut fd = libc::pollfd {
            fd: upstream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: fd is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut fd, 1, 5) };
        if (r > 0 && fd.revents != 0) || Instant::now() >= deadline {
            return None;
        }
    }
}

/// Starts the relay of machine `name` as a client of QEMU's listening `-netdev stream` at
/// `vm` (which accepts the next relay once this one is gone, so another process can take
/// over the link: `net::resume`); `upstream` is the connection to passt. `hold` (the
/// machine's relay lock) is kept for as long as the relay runs.
pub(crate) fn start_to_vm(
    name: &str,
    vm: std::path::PathBuf,
    upstream: UnixStream,
    filter: Filter,
    hold: std::fs::File,
) -> io::Result<std::thread::JoinHandle<()>> {
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("egress-{name}"))
        .spawn(move || {
            let _hold = hold;
            let Some(guest) = connect_to_vm(&vm, &upstream) else {
                tracing::warn!(machine = %name, "egress relay: the VMM never listened (or passt ended first): closing");
                return;
            };
            if let Err(e) = run(&name, guest, upstream, filter) {
                tracing::warn!(machine = %name, error = %e, "egress relay could not start");
            }
        })
}

fn run(name: &str, guest: UnixStream, upstream: UnixStream, filter: Filter) -> io::Result<()> {
    let filter = Arc::new(Mutex::new(filter));
    let counts = Arc::new(Counts::default());
    let to_guest = Arc::new(Mutex::new(guest.try_clone()?));
    let (guest_r, up_r) = (guest.try_clone()?, upstream.try_clone()?);
    // the first side to end says why both did
    let first_why: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let end = {
        let (g, u) = (guest, upstream.try_clone()?);
        let first_why = first_why.clone();
        move |why: &str| {
            first_why
                .lock()
                .expect("reason lock")
                .get_or_insert_with(|| why.to_string());
            // both directions end: the other thread's read returns
            let _ = g.shutdown(std::net::Shutdown::Both);
            let _ = u.shutdown(std::net::Shutdown::Both);
        }
    };
    let end = Arc::new(end);
    // passt -> guest: learn DNS answers, forward everything
    let inbound = {
        let (filter, counts, to_guest, end, name) = (
            filter.clone(),
            counts.clone(),
            to_guest.clone(),
            end.clone(),
            name.to_string(),
        );
        let mut up_r = up_r;
        std::thread::Builder::new()
            .name(format!("egress-in-{name}"))
            .spawn(move || {
                let mut buf = Vec::with_capacity(MAX_FRAME);
                let why = loop {
                    match read_frame(&mut up_r, &mut buf) {
                        Ok(Some(())) => {}
                        Ok(None) => break "passt closed its socket".to_string(),
                        Err(e) => break format!("reading from passt: {e}"),
                    }
                    filter
                        .lock()
                        .expect("filter lock")
                        .inbound(&buf, Instant::now());
                    counts.inbound.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) =
                        write_frame(&mut *to_guest.lock().expect("guest writer lock"), &buf)
                    {
                        break format!("writing to the VMM: {e}");
                    }
                };
                tracing::debug!(machine = %name, "egress relay (passt to guest) ended: {why}");
                end(&why);
            })?
    };
    // guest -> passt: the policy
    let mut guest_r = guest_r;
    let mut up_w = upstream;
    let mut buf = Vec::with_capacity(MAX_FRAME);
    let why = loop {
        match read_frame(&mut guest_r, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => break "the VMM closed its socket".to_string(),
            Err(e) => break format!("reading from the VMM: {e}"),
        }
        let outcome = filter
            .lock()
            .expect("filter lock")
            .outbound(&buf, Instant::now());
        match outcome {
            Outcome::Forward => {
                counts.forwarded.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = write_frame(&mut up_w, &buf) {
                    break format!("writing to passt: {e}");
                }
            }
            Outcome::Drop(reason) => {
                counts.denied.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(machine = %name, reason, "egress: dropped a frame");
            }
            Outcome::Reply(frame, reason) => {
                counts.denied.fetch_add(1, Ordering::Relaxed);
                counts.replies.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(machine = %name, reason, "egress: refused");
                if let Err(e) =
                    write_frame(&mut *to_guest.lock().expect("guest writer lock"), &frame)
                {
                    break format!("writing to the VMM: {e}");
                }
            }
        }
    };
    end(&why);
    if inbound.join().is_err() {
        tracing::warn!(machine = %name, "egress relay: the inbound thread panicked");
    }
    tracing::info!(
        machine = %name,
        forwarded = counts.forwarded.load(Ordering::Relaxed),
        denied = counts.denied.load(Ordering::Relaxed),
        refused_with_reply = counts.replies.load(Ordering::Relaxed),
        to_guest = counts.inbound.load(Ordering::Relaxed),
        "egress relay ended: {}",
        first_why.lock().expect("reason lock").as_deref().unwrap_or(&why)
    );
    Ok(())
}
