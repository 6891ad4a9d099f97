//! Image store tests against a real registry on 127.0.0.1 (Debian's docker-registry, started by
//! `scripts/test-registry.sh`), with real files: pulls, OCI layer semantics, typed errors,
//! corruption, concurrency between processes, a full disk, and local sources.
//!
//! Needs the Debian packages docker-registry, skopeo, erofs-utils, e2fsprogs, debootstrap,
//! zstd, jq, busybox-static; the first run builds the python test image (a few minutes, then
//! cached in ~/.cache/smol/test-images).

mod common_registry;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common_registry::{docker_archive, layer_tar, oci_layout, shared, Entry};
use smolmachines::image::{
    ImageError, ImageStore, LayerStatus, Progress, PullEvent, PullOptions, RootfsFormat, Scratch,
};

fn store(home: &Path) -> ImageStore {
    ImageStore::open(home).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Every blob in the cache holds what its name says, and nothing is left in tmp/.
fn assert_cache_consistent(cache: &Path) {
    for p in files_under(&cache.join("blobs/sha256")) {
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            common_registry::digest(&bytes),
            format!("sha256:{name}"),
            "blob {} does not match its name",
            p.display()
        );
    }
    let tmp = files_under(&cache.join("tmp"));
    assert!(tmp.is_empty(), "leftovers in tmp/: {tmp:?}");
}

fn recorder() -> (Progress, Arc<Mutex<Vec<PullEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    (
        Arc::new(move |ev: &PullEvent| e2.lock().unwrap().push(ev.clone())),
        events,
    )
}

/// (done, total, status) of the last event of each layer.
fn last_layer_events(events: &[PullEvent]) -> BTreeMap<usize, (u64, u64, LayerStatus)> {
    let mut m = BTreeMap::new();
    for e in events {
        if let PullEvent::Layer {
            index,
            done,
            total,
            status,
            ..
        } = e
        {
            m.insert(*index, (*done, *total, *status));
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_and_layer_semantics() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let reference = reg.reference("test/busybox:latest");
    let (progress, events) = recorder();
    let info = s.pull(&reference, Some(progress)).await.unwrap();
    assert_eq!(info.reference, reference);
    assert_eq!(
        (info.architecture.as_str(), info.os.as_str()),
        ("amd64", "linux")
    );
    assert!(
        info.digest.starts_with("sha256:") && info.size > 1_000_000,
        "{info:?}"
    );
    // Progress: three layers, each complete with done == total.
    let evs = events.lock().unwrap().clone();
    assert!(matches!(&evs[0], PullEvent::Resolved { layers, .. } if layers.len() == 3));
    let last = last_layer_events(&evs);
    assert_eq!(last.len(), 3);
    for (done, total, status) in last.values() {
        assert_eq!((done, *status), (total, LayerStatus::Complete));
    }
    assert!(evs.iter().any(|e| matches!(e, PullEvent::Building { .. })));
    assert_eq!(s.list().unwrap(), vec![info.clone()]);

    // Config.
    let c = s.config(&reference).unwrap();
    assert!(c.env.contains(&"SMOL_FIXTURE=busybox".to_string()));
    assert_eq!(c.working_dir.as_deref(), Some("/data"));
    assert_eq!(c.user.as_deref(), Some("0:0"));
    assert_eq!(c.argv(None), vec!["/bin/sh", "-c", "cat /etc/motd"]);

    // The root file system.
    let root = home.path().join("rootfs");
    s.unpack_to(&reference, &root).await.unwrap();
    let r = |p: &str| root.join(p);
    assert!(!r("etc/remove-me").exists(), "whiteout did not remove");
    assert!(!r("dir/gone-dir").exists(), "whiteout of a directory");
    assert!(
        !r("dir/opaque/lower-a").exists(),
        "opaque dir shows a lower file"
    );
    assert!(
        !r("dir/opaque/sub").exists(),
        "opaque dir shows a lower dir"
    );
    assert_eq!(
        std::fs::read(r("dir/opaque/upper-c")).unwrap(),
        b"upper c\n"
    );
    assert_eq!(
        std::fs::read(r("etc/motd")).unwrap(),
        b"motd from layer 3\n"
    );
    let ino = |p: &str| std::fs::metadata(r(p)).unwrap().ino();
    assert_eq!(ino("data/original"), ino("data/hardlink"));
    assert_eq!(std::fs::metadata(r("data/original")).unwrap().nlink(), 2);
    assert_eq!(ino("data/pair-a"), ino("data/pair-b"));
    assert_eq!(
        std::fs::read_link(r("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(std::fs::read_link(r("lib")).unwrap(), Path::new("usr/lib"));
    assert_eq!(
        std::fs::read_link(r("etc/motd-link")).unwrap(),
        Path::new("/etc/motd")
    );
    assert_eq!(
        std::fs::read(r("usr/lib/via-symlink.txt")).unwrap(),
        b"written through the lib symlink\n"
    );
    let m = |p: &str| std::fs::symlink_metadata(r(p)).unwrap();
    assert_eq!(m("bin/suid-tool").mode() & 0o7777, 0o4755);
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(m("home/user/note").mode() & 0o7777, 0o600);
    assert!(m("dev/fifo").file_type().is_fifo());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(
            (m("home/user/note").uid(), m("home/user").gid()),
            (1000, 1000)
        );
        assert!(m("dev/null").file_type().is_char_device());
        assert_eq!(m("dev/null").rdev(), libc::makedev(1, 3));
    }
    let wh = Command::new("find")
        .arg(&root)
        .args(["-name", ".wh.*"])
        .output()
        .unwrap();
    assert!(wh.stdout.is_empty(), "whiteout files materialised");

    // The block image: erofs, with the same tree.
    let img = s.rootfs_image(&reference).await.unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        &bytes[1024..1028],
        &0xE0F5_E1E2u32.to_le_bytes(),
        "erofs magic"
    );
    let x = home.path().join("extracted");
    let st = Command::new("fsck.erofs")
        .arg(format!("--extract={}", x.display()))
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(x.join("etc/motd")).unwrap(),
        b"motd from layer 3\n"
    );
    assert!(!x.join("etc/remove-me").exists() && !x.join("dir/opaque/lower-a").exists());
    assert_eq!(
        std::fs::read_link(x.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );

    // A second pull downloads nothing and reuses the block image.
    let (progress, events) = recorder();
    let again = s.pull(&reference, Some(progress)).await.unwrap();
    assert_eq!(again, info);
    let evs = events.lock().unwrap().clone();
    assert!(last_layer_events(&evs)
        .values()
        .all(|(_, _, st)| *st == LayerStatus::Cached));
    assert!(!evs.iter().any(|e| matches!(e, PullEvent::Building { .. })));
    assert_eq!(s.rootfs_image(&reference).await.unwrap(), img);
    assert_cache_consistent(s.dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_v2_media_types_and_manifest_lists() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    // Docker v2 schema 2: check the registry really serves that media type.
    let docker = reg.reference("test/busybox:docker");
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{docker}"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("application/vnd.docker.distribution.manifest.v2+json"));
    s.pull(&docker, None).await.unwrap();
    let root = home.path().join("docker");
    s.unpack_to(&docker, &root).await.unwrap();
    assert!(root.join("bin/busybox").is_file() && !root.join("etc/remove-me").exists());

    // An index with arm64 first: the amd64 image is the one pulled.
    let multi = reg.reference("test/busybox:multi");
    let info = s.pull(&multi, None).await.unwrap();
    assert_eq!(info.architecture, "amd64");
    let root = home.path().join("multi");
    s.unpack_to(&multi, &root).await.unwrap();
    assert_eq!(std::fs::read(root.join("etc/arch")).unwrap(), b"amd64\n");
    assert_eq!(s.list().unwrap().len(), 2);
    assert_cache_consistent(s.dir());
}

#[tokio::test]
async fn unknown_image_or_tag_is_a_typed_error_naming_it() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    for r in [
        reg.reference("test/busybox:no-such-tag"),
        reg.reference("no/such-repo:latest"),
    ] {
        match s.pull(&r, None).await {
            Err(ImageError::NotFound { reference, .. }) => assert_eq!(reference, r),
            other => panic!("{r}: {other:?}"),
        }
        let e: smolmachines::Error = s.pull(&r, None).await.unwrap_err().into();
        assert_eq!(e.code(), "NOT_FOUND");
        assert!(e.to_string().contains(&r), "{e}");
    }
    assert!(matches!(
        s.rootfs_image("never/pulled:1").await,
        Err(ImageError::NotPulled { .. })
    ));
    assert!(s.list().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_registry_fails_typed_within_a_bounded_time() {
    let home = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        connect_timeout: Duration::from_secs(1),
        attempts: 3,
        retry_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    let s = store(home.path()).with_options(opts);
    // A closed port on loopback (refused at once) ...
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    match s.pull(&format!("127.0.0.1:{port}/x/y:z"), None).await {
        Err(ImageError::RegistryUnreachable {
            registry, attempts, ..
        }) => {
            assert_eq!(registry, format!("127.0.0.1:{port}"));
            assert_eq!(attempts, 3);
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // ... and a registry that never completes a connection (a listener whose accept queue is
    // full: the kernel drops further SYNs): bounded by the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    let s = store(home.path()).with_options(PullOptions {
        connect_timeout: Duration::from_secs(1),
        attempts: 2,
        retry_backoff: Duration::from_millis(100),
        ..Default::default()
    });
    let t = Instant::now();
    match s.pull(&format!("{addr}/x/y:z"), None).await {
        Err(ImageError::RegistryUnreachable { attempts, .. }) => assert_eq!(attempts, 2),
        other => panic!("{other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "{took:?}: not the connect timeout at work"
    );
    drop((listener, fillers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_refused_and_the_next_pull_succeeds() {
    let reg = shared();
    let w = tempfile::tempdir().unwrap();
    // Unique content, so no other test shares these blobs.
    let nonce = format!("{:?}{}", Instant::now(), std::process::id());
    let big: Vec<u8> = (0..3_000_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let layer = layer_tar(&[
        Entry::File("nonce", nonce.as_bytes()),
        Entry::File("big", &big),
    ]);
    let written = oci_layout(&w.path().join("l"), "v1", &[layer]);
    reg.push_layout(&w.path().join("l"), "v1", "test/corrupt:v1");
    let data = reg.blob_data(&written.layers[0]);
    let good = std::fs::read(&data).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&data, &bad).unwrap();

    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let r = reg.reference("test/corrupt:v1");
    match s.pull(&r, None).await {
        Err(ImageError::DigestMismatch { expected, .. }) => {
            assert_eq!(expected, written.layers[0])
        }
        other => panic!("{other:?}"),
    }
    let cache = s.dir().to_path_buf();
    assert!(!cache
        .join("blobs/sha256")
        .join(written.layers[0].trim_start_matches("sha256:"))
        .exists());
    assert_cache_consistent(&cache);
    assert!(s.list().unwrap().is_empty());

    std::fs::write(&data, &good).unwrap();
    let info = s.pull(&r, None).await.unwrap();
    assert_eq!(info.digest, written.manifest);
    assert_cache_consistent(&cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_escaping_the_root_is_refused() {
    let reg = shared();
    let w = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let cases = [
        (
            "dotdot",
            vec![layer_tar(&[Entry::File("../escaped", b"x")])],
        ),
        (
            "symlink",
            vec![
                layer_tar(&[Entry::Symlink("up", "../../../../../../..")]),
                layer_tar(&[Entry::File("up/escaped", b"x")]),
            ],
        ),
    ];
    for (name, layers) in cases {
        let dir = w.path().join(name);
        oci_layout(&dir, "v1", &layers);
        reg.push_layout(&dir, "v1", &format!("test/evil-{name}:v1"));
        let r = reg.reference(&format!("test/evil-{name}:v1"));
        match s.pull(&r, None).await {
            Err(ImageError::UnsafePath { path, .. }) => {
                assert!(path.contains("escaped") || path.contains("up"), "{path}")
            }
            other => panic!("{name}: {other:?}"),
        }
        let e: smolmachines::Error = s.pull(&r, None).await.unwrap_err().into();
        assert_eq!(e.code(), "INVALID_CONFIG");
    }
    assert!(s.list().unwrap().is_empty());
    assert!(!Path::new("/escaped").exists());
    assert!(!s.dir().join("tmp/escaped").exists() && !s.dir().join("escaped").exists());
    assert_cache_consistent(s.dir());
}

/// Run as a child process by `two_processes_pull_the_same_image`.
#[test]
#[ignore = "helper process of two_processes_pull_the_same_image"]
fn child_pull() {
    let (Ok(home), Ok(image), Ok(go)) = (
        std::env::var("SMOL_TEST_CHILD_HOME"),
        std::env::var("SMOL_TEST_CHILD_IMAGE"),
        std::env::var("SMOL_TEST_CHILD_GO"),
    ) else {
        return;
    };
    while !Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let info = rt
        .block_on(store(Path::new(&home)).pull(&image, None))
        .unwrap();
    println!("CHILD_OK {}", info.digest);
}

#[test]
fn two_processes_pull_the_same_image() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let go = home.path().join("go");
    let image = reg.reference("library/python:3.12");
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "child_pull",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("SMOL_TEST_CHILD_HOME", home.path())
                .env("SMOL_TEST_CHILD_IMAGE", &image)
                .env("SMOL_TEST_CHILD_GO", &go)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::fs::write(&go, "").unwrap();
    let mut digests = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("CHILD_OK ").map(|(_, d)| d.to_string()))
            .unwrap_or_else(|| panic!("child did not report: {text}"));
        digests.push(line);
    }
    assert_eq!(digests[0], digests[1]);
    let cache = home.path().join("images");
    // One copy: manifest + config + 3 layers, one block image.
    assert_eq!(files_under(&cache.join("blobs/sha256")).len(), 5);
    assert_eq!(files_under(&cache.join("rootfs")).len(), 1);
    assert_cache_consistent(&cache);
    assert_eq!(store(home.path()).list().unwrap().len(), 1);
}

struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_a_clear_error_and_the_cache_stays_consistent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let reg = shared();
    let python = reg.reference("library/python:3.12");
    let busybox = reg.reference("test/busybox:latest");
    // Full while downloading (16 MiB: less than the layers); while unpacking (the layers fit,
    // the tree does not); while making the block image (the tree is unpacked in /dev/shm).
    for (size, scratch, phase) in [
        ("16m", Scratch::Cache, "/tmp/blob-"),
        ("64m", Scratch::Cache, "/tmp/unpack-"),
        ("64m", Scratch::Auto, "/image.erofs"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        let _m = TmpfsMount(d.path().to_path_buf());
        let s = store(d.path()).with_options(PullOptions {
            scratch,
            ..Default::default()
        });
        let e = s.pull(&python, None).await.unwrap_err();
        match &e {
            ImageError::NoSpace { path } => {
                assert!(path.to_string_lossy().contains(phase), "{phase}: {e:?}")
            }
            other => panic!("{size}: {other:?}"),
        }
        let ce: smolmachines::Error = e.into();
        assert_eq!(ce.code(), "STORAGE_ERROR");
        assert!(s.list().unwrap().is_empty());
        assert_cache_consistent(s.dir());
        // Space comes back with prune; a smaller image then pulls fine.
        s.prune().await.unwrap();
        s.pull(&busybox, None).await.unwrap();
        assert_cache_consistent(s.dir());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sources_oci_layout_docker_archive_and_directory() {
    let w = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let layers = vec![
        layer_tar(&[
            Entry::Dir("etc/"),
            Entry::File("etc/hello", b"hello\n"),
            Entry::File("etc/gone", b"x"),
        ]),
        layer_tar(&[
            Entry::File("etc/.wh.gone", b""),
            Entry::Hardlink("etc/hello2", "etc/hello"),
        ]),
    ];

    // OCI layout, by path and with oci:PATH:TAG.
    let layout = w.path().join("layout");
    let written = oci_layout(&layout, "v1", &layers);
    let info = s.pull(layout.to_str().unwrap(), None).await.unwrap();
    assert_eq!(info.digest, written.manifest);
    assert_eq!(info.reference, format!("oci:{}", layout.display()));
    let tagged = format!("oci:{}:v1", layout.display());
    s.pull(&tagged, None).await.unwrap();
    assert!(matches!(
        s.pull(&format!("oci:{}:nope", layout.display()), None)
            .await,
        Err(ImageError::NotFound { .. })
    ));
    let root = w.path().join("r1");
    s.unpack_to(&tagged, &root).await.unwrap();
    assert!(!root.join("etc/gone").exists());
    assert_eq!(
        std::fs::metadata(root.join("etc/hello")).unwrap().ino(),
        std::fs::metadata(root.join("etc/hello2")).unwrap().ino()
    );

    // docker save archive.
    let archive = w.path().join("img.tar");
    docker_archive(&archive, "example/app:1.0", &layers);
    let info = s.pull(archive.to_str().unwrap(), None).await.unwrap();
    assert!(info.reference.starts_with("docker-archive:"));
    let by_tag = format!("docker-archive:{}:example/app:1.0", archive.display());
    s.pull(&by_tag, None).await.unwrap();
    assert_eq!(
        s.config(&by_tag).unwrap().cmd,
        vec!["/bin/echo", "from-docker-archive"]
    );
    let root = w.path().join("r2");
    s.unpack_to(&by_tag, &root).await.unwrap();
    assert_eq!(std::fs::read(root.join("etc/hello")).unwrap(), b"hello\n");
    assert!(!root.join("etc/gone").exists());
    // A tampered archive layer is refused (its diff_id no longer matches).
    let bad_archive = w.path().join("bad.tar");
    docker_archive(&bad_archive, "example/app:1.0", &layers);
    let mut bytes = std::fs::read(&bad_archive).unwrap();
    let pos = bytes
        .windows(6)
        .position(|x| x == b"hello\n")
        .expect("layer content in the archive");
    bytes[pos] = b'j';
    std::fs::write(&bad_archive, &bytes).unwrap();
    assert!(matches!(
        s.pull(bad_archive.to_str().unwrap(), None).await,
        Err(ImageError::DigestMismatch { .. })
    ));

    // A plain root file system directory.
    let dir = w.path().join("plain");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/tool"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("tool", dir.join("bin/alias")).unwrap();
    let info = s.pull(dir.to_str().unwrap(), None).await.unwrap();
    assert_eq!(info.reference, format!("dir:{}", dir.display()));
    let img = s.rootfs_image(&info.reference).await.unwrap();
    let x = w.path().join("x");
    assert!(Command::new("fsck.erofs")
        .arg(format!("--extract={}", x.display()))
        .arg(&img)
        .status()
        .unwrap()
        .success());
    assert_eq!(std::fs::read(x.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
    // A changed directory gives another image.
    std::fs::write(dir.join("bin/new"), "new").unwrap();
    let prepared = s.ensure(dir.to_str().unwrap(), None).await.unwrap();
    assert_ne!(prepared.rootfs, img);
    assert_eq!(prepared.format, RootfsFormat::Erofs);
    assert_eq!(s.list().unwrap().len(), 5);
    assert_cache_consistent(s.dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_and_prune_reclaim_space() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let busybox = reg.reference("test/busybox:latest");
    let docker = reg.reference("test/busybox:docker");
    s.pull(&busybox, None).await.unwrap();
    s.pull(&docker, None).await.unwrap();
    let blobs = |s: &ImageStore| files_under(&s.dir().join("blobs/sha256")).len();
    let before = blobs(&s);
    let rep = s.remove(&busybox).await.unwrap();
    assert_eq!(rep.refs_removed, vec![busybox.clone()]);
    assert!(
        rep.blobs_removed >= 3 && rep.rootfs_removed == 1 && rep.bytes_freed > 0,
        "{rep:?}"
    );
    assert_eq!(blobs(&s), before - rep.blobs_removed);
    assert!(matches!(
        s.remove(&busybox).await,
        Err(ImageError::NotPulled { .. })
    ));
    // Leftovers of a crashed pull go with prune; what a reference uses stays.
    std::fs::write(s.dir().join("tmp/blob-crashed"), vec![0u8; 4096]).unwrap();
    let rep = s.prune().await.unwrap();
    assert_eq!((rep.tmp_removed, rep.blobs_removed), (1, 0));
    assert!(s.rootfs_image(&docker).await.unwrap().is_file());
    s.remove(&docker).await.unwrap();
    assert_eq!(blobs(&s), 0);
    assert!(files_under(&s.dir().join("rootfs")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_world_python_image_runs_from_its_root() {
    let reg = shared();
    let home = tempfile::tempdir().unwrap();
    let s = store(home.path());
    let reference = reg.reference("library/python:3.12");
    let info = s.pull(&reference, None).await.unwrap();
    assert!(info.size > 20_000_000, "{info:?}");
    let c = s.config(&reference).unwrap();
    assert_eq!(c.argv(None), vec!["python3"]);
    assert!(c.env_map()["PATH"].contains("/usr/bin"));
    let root = home.path().join("root");
    s.unpack_to(&reference, &root).await.unwrap();
    assert!(root.join("usr/bin/python3").exists());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Owners, modes, symlinks and libraries are right if the interpreter runs.
        let out = Command::new("chroot")
            .arg(&root)
            .args([
                "/usr/bin/python3",
                "-c",
                "import os, sys; print(os.getuid(), sys.version_info[0])",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 3");
    }
    let img = s.rootfs_image(&reference).await.unwrap();
    assert!(std::fs::metadata(&img).unwrap().len() > 50_000_000);
    assert_cache_consistent(s.dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_a_docker_config_file() {
    let reg = common_registry::Registry::start_with_auth("smol:s3cret-pw");
    let w = tempfile::tempdir().unwrap();
    let layout = w.path().join("layout");
    oci_layout(
        &layout,
        "v1",
        &[layer_tar(&[Entry::File("hello", b"authenticated\n")])],
    );
    reg.push_layout(&layout, "v1", "private/app:v1");
    let r = reg.reference("private/app:v1");
    let home = tempfile::tempdir().unwrap();
    let config = w.path().join("config.json");
    let with = |file: &Path| {
        store(home.path()).with_options(PullOptions {
            auth_file: Some(file.to_path_buf()),
            ..Default::default()
        })
    };
    let auth_json = |key: &str, creds: &str| {
        let b64 = common_registry::base64(creds.as_bytes());
        format!(r#"{{"auths":{{"{key}":{{"auth":"{b64}"}}}}}}"#)
    };
    let host = format!("127.0.0.1:{}", reg.port);
    // No credentials, then wrong ones: refused, typed.
    for creds in [None, Some("smol:wrong")] {
        if let Some(c) = creds {
            std::fs::write(&config, auth_json(&host, c)).unwrap();
        }
        match with(&config).pull(&r, None).await {
            Err(ImageError::Unauthorized { reference, .. }) => assert_eq!(reference, r),
            other => panic!("{creds:?}: {other:?}"),
        }
    }
    // The right ones, under a URL key as `docker login` may write it.
    std::fs::write(
        &config,
        auth_json(&format!("http://{host}"), "smol:s3cret-pw"),
    )
    .unwrap();
    let s = with(&config);
    s.pull(&r, None).await.unwrap();
    let root = w.path().join("root");
    s.unpack_to(&r, &root).await.unwrap();
    assert_eq!(
        std::fs::read(root.join("hello")).unwrap(),
        b"authenticated\n"
    );
}
