//! Test support for images: a registry on 127.0.0.1 started by `scripts/test-registry.sh`
//! (Debian's docker-registry, fixtures pushed with skopeo), and small builders of OCI layouts,
//! `docker save` archives and layer tars for the cases the fixtures do not cover.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// A running registry.
pub struct Registry {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its state directory (config, storage under `data/`, log).
    pub dir: PathBuf,
    /// `user:password` when it requires basic authentication.
    pub creds: Option<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

static SHARED: OnceLock<Registry> = OnceLock::new();

/// The registry shared by the tests of this process, with the fixtures pushed (started on
/// first use; it stops when this process exits).
pub fn shared() -> &'static Registry {
    SHARED.get_or_init(|| Registry::start(true))
}

impl Registry {
    /// Starts a registry (stopped when this process exits).
    pub fn start(fixtures: bool) -> Registry {
        Self::start_with(fixtures, None)
    }

    /// Starts a registry that requires basic authentication with `user:password`.
    pub fn start_with_auth(creds: &str) -> Registry {
        Self::start_with(false, Some(creds))
    }

    fn start_with(fixtures: bool, creds: Option<&str>) -> Registry {
        let mut c = Command::new("bash");
        c.arg(repo_root().join("scripts/test-registry.sh"))
            .arg("start")
            .arg("--watch")
            .arg(std::process::id().to_string());
        if !fixtures {
            c.arg("--no-fixtures");
        }
        if let Some(a) = creds {
            c.args(["--auth", a]);
        }
        let out = c
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/test-registry.sh (bash)");
        assert!(
            out.status.success(),
            "scripts/test-registry.sh start failed ({}); is docker-registry installed? \
             (apt-get install docker-registry skopeo erofs-utils debootstrap zstd jq)",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {text}"))
                .to_string()
        };
        Registry {
            port: get("PORT=").parse().expect("port"),
            dir: PathBuf::from(get("DIR=")),
            creds: creds.map(str::to_string),
        }
    }

    /// `127.0.0.1:<port>/<repo_tag>`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Pushes an OCI layout's `tag` to `repo_tag` on this registry.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false", "--all"]);
        if let Some(creds) = &self.creds {
            c.arg(format!("--dest-creds={creds}"));
        }
        let st = c
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)))
            .status()
            .expect("skopeo");
        assert!(st.success(), "skopeo copy to {repo_tag}");
    }

    /// Where the registry stores a blob's bytes.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir.join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

/// `sha256:<hex>`.
pub fn digest(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// An entry of a test layer.
pub enum Entry<'a> {
    /// A directory.
    Dir(&'a str),
    /// A regular file (mode 0644).
    File(&'a str, &'a [u8]),
    /// A symlink and its target.
    Symlink(&'a str, &'a str),
    /// A hard link and its target.
    Hardlink(&'a str, &'a str),
}

/// An uncompressed layer tar. Names are written raw (no sanitising), so `../x` can be tested.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        let (path, data): (&str, &[u8]) = match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                (p, b"")
            }
            Entry::File(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (p, d)
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name_literal(t).unwrap();
                (p, b"")
            }
        };
        h.set_size(data.len() as u64);
        let name = path.as_bytes();
        assert!(name.len() < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Digests of an image written by [`oci_layout`].
pub struct Written {
    /// The manifest.
    pub manifest: String,
    /// The config.
    pub config: String,
    /// The (gzip) layer blobs.
    pub layers: Vec<String>,
}

fn config_json(diff_ids: &[String], cmd: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "FROM_TEST=1"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// Writes an OCI layout at `dir` holding one image tagged `tag` with these (uncompressed)
/// layer tars, gzip-compressed.
pub fn oci_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> Written {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> (String, usize) {
        let d = digest(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        (d, b.len())
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
    let mut descs = Vec::new();
    let mut layer_digests = Vec::new();
    for l in layers {
        let (d, n) = put(&gzip(l));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}));
        layer_digests.push(d);
    }
    let (cd, cn) = put(&config_json(&diff_ids, &["/bin/sh"]));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs,
    }))
    .unwrap();
    let (md, mn) = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md, "size": mn,
                "annotations": {"org.opencontainers.image.ref.name": tag}}],
        }))
        .unwrap(),
    )
    .unwrap();
    Written {
        manifest: md,
        config: cd,
        layers: layer_digests,
    }
}

/// Writes a `docker save` archive (legacy layout: `<id>/layer.tar`, `<config hex>.json`,
/// `manifest.json`) of one image tagged `repo_tag`.
pub fn docker_archive(path: &Path, repo_tag: &str, layers: &[Vec<u8>]) {
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
    let config = config_json(&diff_ids, &["/bin/echo", "from-docker-archive"]);
    let config_name = format!("{}.json", digest(&config).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut layer_names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("{:064x}/layer.tar", i + 1);
        add(&name, l);
        layer_names.push(name);
    }
    add(&config_name, &config);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]))
    .unwrap();
    add("manifest.json", &manifest);
    b.finish().unwrap();
}

/// Standard base64 (for Docker config `auth` values).
pub fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
