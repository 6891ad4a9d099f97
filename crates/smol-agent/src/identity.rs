//! `Op::Identity`: a branched clone's own identity (hostname, a reseeded kernel RNG).
//!
//! A clone starts with its source's memory, so its kernel RNG state is its source's: without a
//! reseed two clones would read the same bytes from `/dev/urandom`. The host's seed is mixed in
//! with `RNDADDENTROPY` (credited as entropy) and `RNDRESEEDCRNG` makes the kernel derive a new
//! CRNG key at once rather than at its next scheduled reseed. Processes that keep their own
//! userspace RNG state keep it (it is their memory).

use std::os::fd::AsRawFd;

#[cfg(test)]
use smol_protocol::ErrorKind;
use smol_protocol::{Frame, RemoteError};

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool (needs CAP_SYS_ADMIN).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (needs CAP_SYS_ADMIN).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most seed bytes accepted.
const MAX_SEED: usize = 512;
/// Fewest seed bytes accepted.
const MIN_SEED: usize = 32;

/// `struct rand_pool_info` with its buffer inline.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_SEED],
}

/// Sets the hostname and reseeds the kernel RNG with `seed`.
pub fn apply(id: u32, hostname: &str, seed: &[u8]) -> Result<Frame, RemoteError> {
    if hostname.is_empty() || hostname.len() > 64 {
        return Err(crate::serve::invalid(format!(
            "hostname {hostname:?} must be 1..=64 bytes"
        )));
    }
    if !(MIN_SEED..=MAX_SEED).contains(&seed.len()) {
        return Err(crate::serve::invalid(format!(
            "the RNG seed has {} bytes; {MIN_SEED}..={MAX_SEED} are needed",
            seed.len()
        )));
    }
    reseed(seed)?;
    // SAFETY: pointer and length describe a valid byte slice.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(RemoteError::from_io(&e, "sethostname"));
    }
    if let Err(e) = std::fs::write("/etc/hostname", format!("{hostname}\n")) {
        return Err(RemoteError::from_io(&e, "/etc/hostname"));
    }
    eprintln!("smol-agent: new identity: hostname {hostname}, RNG reseeded");
    Ok(Frame::Done { id })
}

fn reseed(seed: &[u8]) -> Result<(), RemoteError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| RemoteError::from_io(&e, "/dev/urandom"))?;
    let mut info = PoolInfo {
        entropy_count: (seed.len() * 8) as libc::c_int,
        buf_size: seed.len() as libc::c_int,
        buf: [0; MAX_SEED],
    };
    info.buf[..seed.len()].copy_from_slice(seed);
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        RemoteError::new(
            smol_protocol::ErrorKind::Io,
            format!("{what} on /dev/urandom: {e}"),
        )
    };
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds buf_size bytes; `info`
    // is one, alive for the call, and the descriptor is ours.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info as *const PoolInfo) } != 0 {
        return Err(fail("RNDADDENTROPY"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is ours.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(fail("RNDRESEEDCRNG"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_refused_before_anything_changes() {
        let e = apply(1, "", &[0; 32]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        let e = apply(1, "h", &[0; 8]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("8 bytes"), "{}", e.message);
        let e = apply(1, "h", &[0; MAX_SEED + 1]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }
}
