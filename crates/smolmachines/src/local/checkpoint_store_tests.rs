//! The chunk store on real files: dedup between checkpoints, damage refused, export, prune.

use std::os::unix::fs::FileExt;

use super::*;
use crate::local::checkpoint_file::tests::manifest;
use crate::local::checkpoint_file::{self as file, Parts};

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Parts named `tag`: an 8 MiB sparse RAM file with 4 MiB of data at 1 MiB (byte `fill` in
/// its last MiB, pseudo-random elsewhere), a 3 MiB disk and a small state naming `fill`.
fn parts(d: &Dir, tag: &str, fill: u8) -> (PathBuf, PathBuf, PathBuf) {
    let (state, ram, disk) = (
        d.p(&format!("{tag}.state")),
        d.p(&format!("{tag}.ram")),
        d.p(&format!("{tag}.disk")),
    );
    std::fs::write(&state, format!("device state {fill}")).unwrap();
    // xorshift64: no MiB of it repeats another
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..3u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&disk, &noise).unwrap();
    let f = File::create(&ram).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&noise, 1 << 20).unwrap();
    f.write_all_at(&vec![fill; 1 << 20], 4 << 20).unwrap();
    (state, ram, disk)
}

fn checkpoint(d: &Dir, tag: &str, fill: u8, store: Option<&Store>) -> (PathBuf, file::Written) {
    let (state, ram, disk) = parts(d, tag, fill);
    let out = d.p(&format!("{tag}.smolcheckpoint"));
    let parts = Parts {
        state: &state,
        ram: &ram,
        disk: &disk,
    };
    let mut m = manifest();
    if let Some(s) = store {
        s.add_ref(&out).unwrap();
    }
    let w = file::write(&out, &parts, &mut m, store).unwrap();
    (out, w)
}

fn unpack(v: &file::Verified, d: &Dir, tag: &str) -> Vec<Vec<u8>> {
    let (s, r, k) = (
        d.p(&format!("{tag}.out.state")),
        d.p(&format!("{tag}.out.ram")),
        d.p(&format!("{tag}.out.disk")),
    );
    v.extract("state", &s).unwrap();
    v.extract_ram(&r).unwrap();
    v.extract("disk", &k).unwrap();
    [s, r, k]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn refused(path: &Path) -> String {
    match file::verify(path) {
        Err(Error::InvalidCheckpoint { reason, .. }) => reason,
        Err(e) => panic!("another error: {e:?}"),
        Ok(_) => panic!("a damaged checkpoint was accepted"),
    }
}

#[test]
fn a_stored_checkpoint_holds_its_manifest_only_and_restores_the_same_bytes() {
    let d = Dir::new();
    let (plain, _) = checkpoint(&d, "plain", 9, None);
    let store = Store::open(&d.p("store"), true, false).unwrap();
    let (stored, w) = checkpoint(&d, "stored", 9, Some(&store));
    let (pv, sv) = (
        file::verify(&plain).unwrap(),
        file::verify(&stored).unwrap(),
    );
    assert_eq!(sv.manifest.format, file::FORMAT_CHUNKED);
    assert_eq!(pv.manifest.format, file::FORMAT);
    let plain_len = std::fs::metadata(&plain).unwrap().len();
    assert!(plain_len > 7 << 20, "{plain_len}");
    assert!(w.bytes < 64 << 10, "manifest only: {}", w.bytes);
    assert_eq!(w.bytes, std::fs::metadata(&stored).unwrap().len());
    assert_eq!(w.reused, 0, "a new store has nothing to reuse");
    // the same section checksums either way, and the same bytes back
    for (a, b) in pv.manifest.sections.iter().zip(&sv.manifest.sections) {
        assert_eq!((a.length, &a.sha256), (b.length, &b.sha256), "{}", a.name);
    }
    assert_eq!(unpack(&pv, &d, "p"), unpack(&sv, &d, "s"));
}

#[test]
fn a_second_checkpoint_reuses_what_did_not_change() {
    let d = Dir::new();
    let store = Store::open(&d.p("store"), true, false).unwrap();
    let (_a, first) = checkpoint(&d, "a", 1, Some(&store));
    let (b, second) = checkpoint(&d, "b", 2, Some(&store));
    // b differs from a in its state and in one MiB of RAM: the rest (3 MiB of RAM, the
    // disk) is the same chunks
    assert_eq!(first.reused, 0);
    assert!(
        second.reused >= 6 << 20,
        "reused {} of about 7 MiB",
        second.reused
    );
    let v = file::verify(&b).unwrap();
    let out = unpack(&v, &d, "b");
    assert!(out[1][(4 << 20)..(5 << 20)].iter().all(|&x| x == 2));
    assert!(out[0].ends_with(b"state 2"));
}

#[test]
fn an_altered_or_missing_chunk_is_refused() {
    let d = Dir::new();
    let store = Store::open(&d.p("store"), true, false).unwrap();
    let (c, _) = checkpoint(&d, "c", 3, Some(&store));
    let v = file::verify(&c).unwrap();
    let hashes = v.manifest.chunks.as_ref().unwrap().sections.concat();
    let victim = Store::chunk_path(store.root(), &hashes[hashes.len() / 2]);
    let bytes = std::fs::read(&victim).unwrap();
    let mut altered = bytes.clone();
    altered[bytes.len() / 2] ^= 1;
    std::fs::write(&victim, &altered).unwrap();
    assert!(refused(&c).contains("altered"), "{}", refused(&c));
    // a restore that checked first and then meets the altered chunk is refused too
    let e = v
        .extract_ram(&d.p("r"))
        .and_then(|()| v.extract("disk", &d.p("k")));
    assert!(matches!(e, Err(Error::InvalidCheckpoint { .. })), "{e:?}");
    std::fs::remove_file(&victim).unwrap();
    assert!(refused(&c).contains("pruned"), "{}", refused(&c));
}

#[test]
fn export_makes_a_standalone_file_and_refuses_to_overwrite() {
    let d = Dir::new();
    let store = Store::open(&d.p("store"), true, false).unwrap();
    let (c, _) = checkpoint(&d, "e", 4, Some(&store));
    drop(store);
    let out = d.p("export.smolcheckpoint");
    let n = export_checkpoint(&c, &out).unwrap();
    assert_eq!(n, std::fs::metadata(&out).unwrap().len());
    // standalone: it verifies with the store gone
    std::fs::rename(d.p("store"), d.p("store-moved")).unwrap();
    let v = file::verify(&out).unwrap();
    assert_eq!(v.manifest.format, file::FORMAT);
    assert!(v.manifest.chunks.is_none());
    let got = unpack(&v, &d, "x");
    std::fs::rename(d.p("store-moved"), d.p("store")).unwrap();
    assert_eq!(got, unpack(&file::verify(&c).unwrap(), &d, "y"));
    let e = export_checkpoint(&c, &out).unwrap_err();
    assert_eq!(e.code(), "INVALID_CONFIG", "{e}");
    let e = export_checkpoint(&d.p("none.smolcheckpoint"), &d.p("o2")).unwrap_err();
    assert_eq!(e.code(), "NOT_FOUND", "{e}");
    assert!(!d.p("o2").exists());
}

#[test]
fn prune_frees_only_chunks_no_checkpoint_names() {
    let d = Dir::new();
    let root = d.p("store");
    let store = Store::open(&root, true, false).unwrap();
    let (a, _) = checkpoint(&d, "a", 5, Some(&store));
    let (b, _) = checkpoint(&d, "b", 6, Some(&store));
    drop(store);
    let store = Store::open(&root, false, true).unwrap();
    assert_eq!(store.prune().unwrap(), 0, "both checkpoints are there");
    // a is deleted: its own state and RAM MiB go, what b shares stays
    std::fs::remove_file(&a).unwrap();
    let freed = store.prune().unwrap();
    assert!(freed > 1 << 20 && freed < 2 << 20, "freed {freed}");
    file::verify(&b).unwrap();
    std::fs::remove_file(&b).unwrap();
    store.remove_ref(&b);
    assert!(store.prune().unwrap() > 6 << 20);
    let left = std::fs::read_dir(root.join("chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    assert_eq!(left, 0);
    assert_eq!(std::fs::read_dir(root.join("refs")).unwrap().count(), 0);
    drop(store);
    let e = Store::open(&d.p("nothing"), false, true).err().unwrap();
    assert_eq!(e.code(), "NOT_FOUND", "{e}");
}
