//! Image slots: `Machine::run(image)` without copying the image into the machine.
//!
//! Every machine of this engine boots with up to [`SLOTS`] read-only virtio-blk devices
//! (serial `smol-slot-N`, the last devices, so the others keep their transports) backed by a
//! 4 KiB placeholder. The first `run` of an image points a free slot at the image's erofs
//! file in the host's cache: the engine opens the file and hands QEMU the descriptor
//! (`add-fd`: a VMM that dropped its uid or is confined by Landlock needs no access to the
//! path), adds it as a block node and swaps it in under the slot's device
//! (`blockdev-reopen`). The agent then re-probes the device (its size is read anew) and
//! mounts it. Nothing crosses the agent channel but the mount request.
//!
//! The slot keeps its image for the machine's life: the record says which image each slot
//! holds, a boot attaches it from the start, and branches and checkpoints carry it (a clone's
//! guest has the image mounted where its source had it). A restore on a host whose cache
//! lacks the image pulls it first. A machine without a free slot, or an agent too old to
//! mount one (`NotFound`), copies the image onto its disk as before (`local::container`).

use std::os::fd::AsFd;
use std::path::Path;

use super::qmp::{Qmp, QmpError};

/// The most slots a machine gets (fewer when its other devices leave fewer of microvm's
/// virtio-mmio transports free: `vmm::free_transports`).
pub const SLOTS: usize = 2;

/// The size of an empty slot's placeholder (`null-co`, reads as zeros).
pub const PLACEHOLDER: u64 = 4096;

/// The block node of slot `i` (the `raw` node under its device).
pub fn node(i: usize) -> String {
    format!("slot{i}")
}

/// The node slot `i`'s device reads through at boot: the placeholder or the image's file.
pub fn boot_node(i: usize) -> String {
    format!("slot{i}-boot")
}

/// The node of the image file a running machine's slot `i` was pointed at.
pub fn image_node(i: usize) -> String {
    format!("slot{i}-image")
}

/// The virtio serial of slot `i`'s device.
pub fn serial(i: usize) -> String {
    format!("smol-slot-{i}")
}

/// The path `Op::MountImage` names slot `i` by (the agent resolves the serial).
pub fn guest_path(i: usize) -> String {
    format!("/dev/disk/by-serial/{}", serial(i))
}

/// Points slot `i` of the VMM listening on `qmp_socket` at `file` (read-only).
pub async fn attach(qmp_socket: &Path, i: usize, file: &Path) -> Result<(), QmpError> {
    let f = std::fs::File::open(file)?;
    let mut qmp = Qmp::connect(qmp_socket).await?;
    let set = qmp
        .execute_with_fd(
            "add-fd",
            serde_json::json!({ "opaque": format!("image slot {i}: {}", file.display()) }),
            f.as_fd(),
        )
        .await?;
    let id = set["fdset-id"]
        .as_i64()
        .ok_or_else(|| QmpError::Protocol(format!("add-fd answered {set}")))?;
    let added = qmp
        .execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "file",
                "node-name": image_node(i),
                "filename": format!("/dev/fdset/{id}"),
                "read-only": true,
            })),
        )
        .await;
    // the set keeps its descriptor (QEMU may reopen the node through it) until the node goes
    added?;
    let swapped = qmp
        .execute(
            "blockdev-reopen",
            Some(serde_json::json!({ "options": [{
                "driver": "raw",
                "node-name": node(i),
                "file": image_node(i),
                "read-only": true,
            }]})),
        )
        .await;
    if let Err(e) = swapped {
        let _ = qmp
            .execute(
                "blockdev-del",
                Some(serde_json::json!({ "node-name": image_node(i) })),
            )
            .await;
        return Err(e);
    }
    if let Err(e) = qmp
        .execute(
            "blockdev-del",
            Some(serde_json::json!({ "node-name": boot_node(i) })),
        )
        .await
    {
        tracing::debug!(error = %e, slot = i, "the slot's placeholder node stays");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_with_the_agent() {
        // the agent resolves this prefix (smol-agent/src/slot.rs)
        assert_eq!(guest_path(1), "/dev/disk/by-serial/smol-slot-1");
        assert_ne!(node(0), boot_node(0));
        assert_ne!(boot_node(0), image_node(0));
    }
}
