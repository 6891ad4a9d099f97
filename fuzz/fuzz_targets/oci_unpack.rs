//! The OCI layer unpacker (smolmachines::image, unpack.rs): tar paths, links, whiteouts, opaque
//! directories, from bytes a registry sent. The input is split into layers at a line of
//! `--layer--` (seeds are up to three layers); every layer is applied, in order, to a fresh
//! root directory. Whatever the layers hold, nothing may be written outside the root: the
//! root's parent directory must hold only the root afterwards.
#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smolmachines::image::fuzzing::{normalise_entry_path, unpack_layers};

const SPLIT: &[u8] = b"\n--layer--\n";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SPLIT.len()).position(|w| w == SPLIT) {
        out.push(&rest[..i]);
        rest = &rest[i + SPLIT.len()..];
    }
    out.push(rest);
    out
}

/// Makes every directory under `p` writable and searchable again (a layer may set mode 000),
/// so that the tree can be removed.
fn open_up(p: &Path) {
    let Ok(m) = fs::symlink_metadata(p) else {
        return;
    };
    if !m.is_dir() {
        return;
    }
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            open_up(&e.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    static BASE: OnceLock<std::path::PathBuf> = OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let base = BASE.get_or_init(|| {
        let b = std::env::temp_dir().join(format!("smol-fuzz-unpack-{}", std::process::id()));
        fs::create_dir_all(&b).expect("base dir");
        b
    });
    let cell = base.join(N.fetch_add(1, Ordering::Relaxed).to_string());
    let root = cell.join("root");
    fs::create_dir_all(&root).expect("root dir");

    let layers = split(data);
    let _ = unpack_layers(&root, &layers);
    // the path normaliser on its own: never a path that climbs or is absolute
    if let Ok(p) = normalise_entry_path(data) {
        assert!(p.is_relative(), "{p:?}");
        assert!(
            !p.components().any(|c| c == std::path::Component::ParentDir),
            "{p:?}"
        );
    }

    let names: Vec<_> = fs::read_dir(&cell)
        .expect("read cell")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("root")],
        "an entry escaped the root"
    );
    open_up(&cell);
    fs::remove_dir_all(&cell).expect("remove the cell");
});
