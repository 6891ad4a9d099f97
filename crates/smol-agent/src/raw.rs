//! Raw channel mode (`smol.mode=raw`), the benchmark's baseline: no framing, no multiplexing.
//!
//! The host sends a 9-byte header, an op byte and a little-endian u64 `n`:
//! `e` echo `n` bytes back; `s` read and discard `n` bytes, then answer one byte `k`;
//! `o` send `n` bytes; `x` spawn and wait for `/bin/true` `n` times (std's spawn: posix_spawn,
//! a vfork), then answer the nanoseconds that took as a little-endian u64: the floor of an exec,
//! the guest's own cost of starting a process.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

fn read_exact_blocking(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match f.read(&mut buf[off..]) {
            Ok(0) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Nanoseconds to spawn and wait for `/bin/true` `n` times.
fn spawn_floor(n: usize) -> std::io::Result<u64> {
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        let st = std::process::Command::new("/bin/true").status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!("/bin/true: {st}")));
        }
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// Serves the raw protocol forever.
pub fn run() -> ! {
    let mut port = crate::port::open(smol_protocol::PORT_NAME);
    let fd = port.as_raw_fd();
    // SAFETY: fd is the open port; clearing O_NONBLOCK makes reads and writes block.
    unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
    println!("SMOL_RAW_READY");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut hdr = [0u8; 9];
        if read_exact_blocking(&mut port, &mut hdr).is_err() {
            crate::init::power_off();
        }
        let mut n = u64::from_le_bytes(hdr[1..9].try_into().expect("8 bytes")) as usize;
        let result = match hdr[0] {
            b'e' => {
                let n = n.min(buf.len());
                read_exact_blocking(&mut port, &mut buf[..n])
                    .and_then(|_| port.write_all(&buf[..n]))
            }
            b's' => {
                let mut r = Ok(());
                while n > 0 && r.is_ok() {
                    let k = n.min(buf.len());
                    r = read_exact_blocking(&mut port, &mut buf[..k]);
                    n -= k;
                }
                r.and_then(|_| port.write_all(b"k"))
            }
            b'o' => {
                let mut r = Ok(());
                while n > 0 && r.is_ok() {
                    let k = n.min(buf.len());
                    r = port.write_all(&buf[..k]);
                    n -= k;
                }
                r
            }
            b'x' => spawn_floor(n).and_then(|ns| port.write_all(&ns.to_le_bytes())),
            _ => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("smol-agent raw: {e}");
        }
    }
}
