//! The file format on real files: a round trip, and every kind of damage refused.

use super::*;

struct Made {
    _dir: tempfile::TempDir,
    file: PathBuf,
    out: PathBuf,
}

/// A manifest of machine `m` with no sections yet.
pub(crate) fn manifest() -> Manifest {
    let asset = AssetId {
        path: "/k".into(),
        size: 1,
        sha256: "00".into(),
    };
    Manifest {
        format: FORMAT,
        smol_version: "test".into(),
        protocol_generation: 4,
        qemu_version: "QEMU 7.2".into(),
        arch: std::env::consts::ARCH.into(),
        created_unix: 1,
        machine: Record::for_test("m"),
        kernel: asset.clone(),
        initrd: asset,
        ram_bytes: 0,
        sections: Vec::new(),
        chunks: None,
    }
}

/// A checkpoint of a 4 MiB sparse RAM file with two data extents, a state and a disk file.
fn make() -> Made {
    let dir = tempfile::tempdir().unwrap();
    let (state, ram, disk) = (
        dir.path().join("s"),
        dir.path().join("r"),
        dir.path().join("d"),
    );
    std::fs::write(&state, b"device state").unwrap();
    std::fs::write(&disk, vec![7u8; 100_000]).unwrap();
    let f = File::create(&ram).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[1u8; 8192], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 3 << 20).unwrap();
    let file = dir.path().join("c.smolcheckpoint");
    let mut m = manifest();
    let parts = Parts {
        state: &state,
        ram: &ram,
        disk: &disk,
    };
    let n = write(&file, &parts, &mut m, None).unwrap();
    assert_eq!(n.bytes, std::fs::metadata(&file).unwrap().len());
    assert_eq!(m.ram_bytes, 4 << 20);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    Made {
        _dir: dir,
        file,
        out,
    }
}

#[test]
fn a_checkpoint_round_trips_its_sections_and_keeps_holes() {
    let m = make();
    let v = verify(&m.file).unwrap();
    assert_eq!(v.manifest.machine.name, "m");
    // only data extents are stored: far less than the 4 MiB RAM
    let ram = v.section("ram").length;
    assert!(ram < 16_384 && ram > 12_288, "{ram}");
    v.extract("state", &m.out.join("s")).unwrap();
    v.extract("disk", &m.out.join("d")).unwrap();
    v.extract_ram(&m.out.join("r")).unwrap();
    assert_eq!(std::fs::read(m.out.join("s")).unwrap(), b"device state");
    assert_eq!(std::fs::read(m.out.join("d")).unwrap(), vec![7u8; 100_000]);
    let r = std::fs::read(m.out.join("r")).unwrap();
    assert_eq!(r.len(), 4 << 20);
    assert!(r[..8192].iter().all(|&b| b == 1));
    assert!(r[8192..3 << 20].iter().all(|&b| b == 0));
    assert!(r[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 2));
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(m.out.join("r")).unwrap().blocks();
    assert!(
        blocks * 512 < 1 << 20,
        "the restored RAM file is sparse: {blocks}"
    );
}

fn refused(path: &Path) -> String {
    match verify(path) {
        Err(Error::InvalidCheckpoint { path: p, reason }) => {
            assert_eq!(p, path);
            reason
        }
        Err(e) => panic!("another error: {e:?}"),
        Ok(_) => panic!("a damaged file was accepted"),
    }
}

#[test]
fn a_flipped_byte_in_any_section_or_the_manifest_is_refused() {
    let m = make();
    let v = verify(&m.file).unwrap();
    let len = std::fs::metadata(&m.file).unwrap().len();
    let mstart = v.section("disk").offset + v.section("disk").length;
    let mut at: Vec<(&str, u64)> = v
        .manifest
        .sections
        .iter()
        .map(|s| (s.name.as_str(), s.offset + s.length / 2))
        .collect();
    at.push(("manifest", mstart + 10));
    at.push(("trailer", len - 20));
    at.push(("header", 9));
    for (what, off) in at {
        let bytes = std::fs::read(&m.file).unwrap();
        let mut b = bytes.clone();
        b[off as usize] ^= 0x40;
        let p = m.out.join(format!("{what}.smolcheckpoint"));
        std::fs::write(&p, &b).unwrap();
        let reason = refused(&p);
        if SECTIONS.contains(&what) {
            assert!(reason.contains(what), "{what}: {reason}");
        }
    }
}

#[test]
fn truncated_empty_and_foreign_files_are_refused_and_a_missing_one_is_not_found() {
    let m = make();
    let bytes = std::fs::read(&m.file).unwrap();
    for cut in [0, 10, 100, bytes.len() / 2, bytes.len() - 1] {
        let p = m.out.join(format!("cut{cut}"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        refused(&p);
    }
    let p = m.out.join("foreign");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    assert!(refused(&p).contains("SMOLCKPT"));
    let e = verify(&m.out.join("none")).err().unwrap();
    assert_eq!(e.code(), "NOT_FOUND", "{e}");
}
