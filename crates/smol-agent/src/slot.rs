//! Image slots: read-only virtio-blk devices the host reserves at boot (serial `smol-slot-N`)
//! and points at an image file while the machine runs (QMP `blockdev-reopen`), so that
//! `run(image)` mounts the image where it lies on the host instead of copying it over the
//! channel first. `Op::MountImage` names a slot as `/dev/disk/by-serial/<serial>`; an older
//! agent finds no such file (`NotFound`) and the host copies the image as before.
//!
//! The guest read a slot's size when it probed the device at boot (a 4 KiB placeholder, or
//! the image a restarted or branched machine already had there). A slot pointed at a bigger
//! image since is re-probed: its virtio driver is unbound and bound again, which reads the
//! size anew and starts with an empty page cache (nothing of the placeholder is kept).

use std::fs;
use std::io;
use std::time::{Duration, Instant};

/// The path prefix that names a slot in `Op::MountImage`.
pub const PREFIX: &str = "/dev/disk/by-serial/";

/// How long a re-probed slot may take to come back.
const REPROBE: Duration = Duration::from_secs(3);

/// The block device (`vdX`) whose virtio serial is `serial`, if there is one now.
fn by_serial(serial: &str) -> Option<String> {
    fs::read_dir("/sys/block").ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// The size in bytes the guest knows of block device `name`.
fn size_of(name: &str) -> io::Result<u64> {
    let sectors = fs::read_to_string(format!("/sys/block/{name}/size"))?;
    sectors
        .trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Whether `/dev/<name>` is mounted anywhere.
fn mounted(name: &str) -> bool {
    let dev = format!("/dev/{name}");
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines().any(|l| {
                l.split(" - ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').nth(1))
                    == Some(dev.as_str())
            })
        })
        .unwrap_or(false)
}

/// Unbinds and binds the virtio driver of block device `name`, so that the guest reads its
/// size again.
fn reprobe(name: &str) -> io::Result<()> {
    let device = fs::canonicalize(format!("/sys/block/{name}/device"))?;
    let id = device
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{name}: no virtio device")))?
        .to_string();
    let driver = "/sys/bus/virtio/drivers/virtio_blk";
    fs::write(format!("{driver}/unbind"), &id)?;
    fs::write(format!("{driver}/bind"), &id)
}

/// The block device of slot `serial` (`/dev/vdX`), holding at least `size` bytes: re-probed
/// first when the guest still knows a smaller size. `NotFound` when there is no such slot, or
/// when it does not hold the image (the host then copies the image instead).
pub fn resolve(serial: &str, size: u64) -> io::Result<String> {
    // a device's size is whole 512-byte sectors
    let size = size & !511;
    let not_found = |why: String| io::Error::new(io::ErrorKind::NotFound, why);
    let name =
        by_serial(serial).ok_or_else(|| not_found(format!("no disk with serial {serial}")))?;
    if size_of(&name)? >= size {
        return Ok(format!("/dev/{name}"));
    }
    if mounted(&name) {
        return Err(io::Error::other(format!(
            "slot {serial} (/dev/{name}) is mounted with a smaller image"
        )));
    }
    reprobe(&name)?;
    let since = Instant::now();
    loop {
        if let Some(name) = by_serial(serial) {
            let have = size_of(&name).unwrap_or(0);
            if have >= size && fs::metadata(format!("/dev/{name}")).is_ok() {
                return Ok(format!("/dev/{name}"));
            }
            if since.elapsed() > REPROBE {
                return Err(not_found(format!(
                    "slot {serial} (/dev/{name}) holds {have} bytes, not the {size} of the image"
                )));
            }
        } else if since.elapsed() > REPROBE {
            return Err(not_found(format!(
                "slot {serial} did not come back within {REPROBE:?} of its re-probe"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_no_disk_has_is_not_found() {
        // on the build host as in a guest without slots: NotFound, so the host copies instead
        let e = resolve("smol-slot-no-such", 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
