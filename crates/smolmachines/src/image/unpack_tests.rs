//! Unit tests of the layer unpacker: path checks, whiteouts, opaque directories, links,
//! refused escapes.

use super::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn entry_paths_are_normalised_or_refused() {
    let n = |s: &str| normalise_entry_path(s.as_bytes());
    assert_eq!(n("./etc/passwd").unwrap(), PathBuf::from("etc/passwd"));
    assert_eq!(n("/etc//x/").unwrap(), PathBuf::from("etc/x"));
    assert_eq!(n("a/../b").unwrap(), PathBuf::from("b"));
    assert_eq!(n("./").unwrap(), PathBuf::new());
    assert!(n("../etc/passwd").is_err());
    assert!(n("a/../../b").is_err());
    assert!(n("./../x").is_err());
}

/// Builds an uncompressed tar from (path, kind) specs.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1_000_000);
        let (path, data): (&str, &[u8]) = match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                (p, b"")
            }
            E::File(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (p, d)
            }
            E::Sym(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
        };
        h.set_size(data.len() as u64);
        // Raw names: the builder's checked setters refuse `..`, which these tests need.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn apply(root: &Path, layers: &[Vec<u8>]) -> ImageResult<()> {
    let mut u = Unpacker::new(root);
    for (i, l) in layers.iter().enumerate() {
        u.apply_layer(&format!("layer{i}"), &l[..])?;
    }
    Ok(())
}

#[test]
fn whiteouts_opaque_dirs_and_links() {
    let d = tempfile::tempdir().unwrap();
    let l0 = tar_of(&[
        E::Dir("etc/"),
        E::File("etc/a", b"a"),
        E::File("etc/b", b"b"),
        E::Dir("opq/"),
        E::File("opq/lower", b"x"),
        E::Dir("opq/sub/"),
        E::File("opq/sub/lower", b"x"),
        E::File("bin/tool", b"tool"),
        E::Hard("bin/tool2", "bin/tool"),
        E::Sym("lib", "bin"),
    ]);
    let l1 = tar_of(&[
        E::File("etc/.wh.a", b""),
        E::File("opq/sub/upper", b"u"),
        E::File("opq/.wh..wh..opq", b""),
        E::File("opq/new", b"n"),
        E::File("lib/viasymlink", b"s"),
    ]);
    apply(d.path(), &[l0, l1]).unwrap();
    let r = d.path();
    assert!(!r.join("etc/a").exists());
    assert!(r.join("etc/b").exists());
    assert!(!r.join("opq/lower").exists());
    assert!(!r.join("opq/sub/lower").exists());
    assert!(r.join("opq/sub/upper").exists() && r.join("opq/new").exists());
    let (a, b) = (
        fs::metadata(r.join("bin/tool")).unwrap(),
        fs::metadata(r.join("bin/tool2")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(fs::read_link(r.join("lib")).unwrap(), PathBuf::from("bin"));
    assert_eq!(fs::read(r.join("bin/viasymlink")).unwrap(), b"s");
    assert_eq!(fs::metadata(r.join("etc/b")).unwrap().mode() & 0o777, 0o644);
}

#[test]
fn escapes_are_refused() {
    // The root is nested deep inside the test's own directory, with a sentinel next to it: an
    // escape, should the checks ever regress, lands in (and is detected in) that directory and
    // can never reach the rest of the host.
    let base = tempfile::tempdir().unwrap();
    let nest = base.path().join("n1/n2/n3/n4/n5/n6/n7/n8");
    let root = nest.join("root");
    fs::create_dir_all(&root).unwrap();
    let sentinel = nest.join("sentinel");
    fs::write(&sentinel, "keep").unwrap();
    let outside = base.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    for layer in [
        tar_of(&[E::File("../escape", b"x")]),
        tar_of(&[E::File("a/../../escape", b"x")]),
        tar_of(&[
            E::Sym("up", "../../../../../../../../../outside"),
            E::File("up/victim", b"x"),
        ]),
        tar_of(&[E::Sym("up", ".."), E::File("up/victim", b"x")]),
        tar_of(&[E::File("f", b"x"), E::Hard("h", "../sentinel")]),
        tar_of(&[E::File(".wh...", b"")]),
        tar_of(&[E::Dir("a/"), E::File("a/.wh..", b"")]),
    ] {
        let e = apply(&root, &[layer]).unwrap_err();
        assert!(matches!(e, ImageError::UnsafePath { .. }), "{e}");
        assert!(!victim.exists() && !nest.join("escape").exists());
        assert_eq!(fs::read(&sentinel).unwrap(), b"keep");
        assert!(root.is_dir());
    }
    // An absolute symlink is followed inside the root, never on the host.
    let root = tempfile::tempdir().unwrap();
    let abs = outside.display().to_string();
    apply(
        root.path(),
        &[tar_of(&[E::Sym("abs", &abs), E::File("abs/victim", b"x")])],
    )
    .unwrap();
    assert!(!victim.exists());
    assert!(root
        .path()
        .join(abs.trim_start_matches('/'))
        .join("victim")
        .exists());
    // A file replaces a symlink instead of writing through it.
    let root = tempfile::tempdir().unwrap();
    apply(
        root.path(),
        &[tar_of(&[
            E::Sym("link", &victim.display().to_string()),
            E::File("link", b"x"),
        ])],
    )
    .unwrap();
    assert!(!victim.exists());
    assert!(fs::symlink_metadata(root.path().join("link"))
        .unwrap()
        .is_file());
}

#[test]
fn deferred_directory_metadata_never_follows_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let outside = tempfile::tempdir().unwrap();
    fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let d = tempfile::tempdir().unwrap();
    let target = outside.path().display().to_string();
    apply(d.path(), &[tar_of(&[E::Dir("d/"), E::Sym("d", &target)])]).unwrap();
    let mode = fs::metadata(outside.path()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn later_layers_replace_types() {
    let d = tempfile::tempdir().unwrap();
    let l0 = tar_of(&[E::Dir("x/"), E::File("x/f", b"1"), E::File("y", b"1")]);
    let l1 = tar_of(&[
        E::File("x", b"now a file"),
        E::Dir("y/"),
        E::File("y/z", b"z"),
    ]);
    apply(d.path(), &[l0, l1]).unwrap();
    assert_eq!(fs::read(d.path().join("x")).unwrap(), b"now a file");
    assert_eq!(fs::read(d.path().join("y/z")).unwrap(), b"z");
}
