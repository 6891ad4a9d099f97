//! Guest assets: which kernel and initramfs to boot, and with which machine flavour.
//!
//! Default: smol's own kernel (`vmlinux`) and initramfs (`initramfs.cpio`) of the first of
//!
//! 1. `SMOL_ASSETS` (a directory), when set;
//! 2. the assets packaged with this engine: an `assets/` directory holding a `manifest.json`
//!    next to the native module or binary the engine is running in (the Python wheel's
//!    `smol/_native.abi3.so`, the npm package's `smol.node`, the release tarball's `smol`), or
//!    `../share/smol/assets` from it;
//! 3. `$SMOL_HOME/assets`, where `scripts/setup.sh` installs what it built.
//!
//! booted with `-M microvm,acpi=off` and virtio-mmio devices on the command line.
//! `SMOL_KERNEL=cloud` selects Debian's prebuilt cloud kernel (ACPI on, modules loaded by the
//! agent); `SMOL_KERNEL=<path>` and `SMOL_INITRD=<path>` point at other files.
//!
//! A directory with a `manifest.json` (what `make dist` packages) names the smol version that
//! built it and the protocol generations its agent speaks; assets whose agent shares no
//! generation with this host are refused before a boot ([`Error::AgentIncompatible`]).
//! [`origin`] says which directory is in use and why (`smol doctor`, the bindings'
//! `local_availability()`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How the kernel expects to be booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFlavor {
    /// smol's kernel: no ACPI, no PCI, devices on the command line, fast timer options.
    Smol,
    /// Debian's cloud kernel: ACPI discovers the virtio-mmio devices; modules in the initramfs.
    DebianCloud,
}

/// Resolved asset paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// Uncompressed (PVH) kernel.
    pub kernel: PathBuf,
    /// Initramfs (newc cpio) holding the agent.
    pub initrd: PathBuf,
    /// Boot flavour.
    pub flavor: KernelFlavor,
}

/// The engine's home: `$SMOL_HOME`, else `$XDG_DATA_HOME/smol`, else `~/.local/share/smol`.
pub fn smol_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SMOL_HOME") {
        return PathBuf::from(h);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share")
        });
    data.join("smol")
}

/// The file of a packaged assets directory that marks it as one (written by `make dist`).
pub const MANIFEST: &str = "manifest.json";

/// Where the assets directory in use was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `SMOL_ASSETS`.
    Env,
    /// Packaged with this engine (next to its native module or binary).
    Packaged,
    /// `$SMOL_HOME/assets` (installed by `scripts/setup.sh`).
    Home,
}

impl Source {
    /// `env`, `packaged` or `home`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Env => "env",
            Source::Packaged => "packaged",
            Source::Home => "home",
        }
    }
}

/// `manifest.json` of a packaged assets directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Manifest {
    /// The smol version that packaged the assets.
    pub version: String,
    /// The protocol generations the agent inside the initramfs speaks.
    pub protocol: Protocol,
}

/// `min..=max` protocol generations (`manifest.json`'s `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Protocol {
    /// Oldest generation spoken.
    pub min: u16,
    /// Newest generation spoken.
    pub max: u16,
}

/// Which assets directory is in use, where it came from, and (packaged) what its manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Why this directory.
    pub source: Source,
    /// The directory.
    pub dir: PathBuf,
    /// Its `manifest.json`, when it has one.
    pub manifest: Option<Manifest>,
    /// `SMOL_KERNEL` / `SMOL_INITRD`, when they override files of the directory.
    pub overrides: Vec<String>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source {
            Source::Env => write!(f, "SMOL_ASSETS ({})", self.dir.display())?,
            Source::Packaged => write!(f, "packaged ({})", self.dir.display())?,
            Source::Home => write!(f, "installed by the set-up ({})", self.dir.display())?,
        }
        if let Some(m) = &self.manifest {
            write!(
                f,
                ", smol {}, agent protocol {}",
                m.version,
                smol_protocol::Generations::new(m.protocol.min, m.protocol.max)
            )?;
        }
        for o in &self.overrides {
            write!(f, "; {o}")?;
        }
        Ok(())
    }
}

/// The file (shared object or executable) the engine is running in.
fn this_object() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let exe = std::env::current_exe().ok();
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    let addr = this_object as *const () as *const libc::c_void;
    // SAFETY: `addr` is the address of a function of this object, mapped for the life of the
    // process; `dladdr` only writes `info`, which is zeroed and as large as it expects.
    let found = unsafe { libc::dladdr(addr, info.as_mut_ptr()) } != 0;
    // SAFETY: `dladdr` returned non-zero, so it filled `info` (or it is still all zero).
    let info = unsafe { info.assume_init() };
    let object = (found && !info.dli_fname.is_null())
        // SAFETY: a non-null `dli_fname` is a NUL-terminated string owned by the dynamic linker
        // that lives as long as the object is loaded (which it is: this code runs in it).
        .then(|| unsafe { std::ffi::CStr::from_ptr(info.dli_fname) })
        .map(|c| PathBuf::from(std::ffi::OsStr::from_bytes(c.to_bytes())))
        // the main executable's name is argv[0] (maybe relative): current_exe says it better
        .filter(|p| p.is_absolute());
    object.or(exe).and_then(|p| p.canonicalize().ok())
}

/// Where packaged assets would be for an engine running in `object`: `assets/` next to it,
/// then `../share/smol/assets`.
pub fn packaged_candidates(object: &Path) -> Vec<PathBuf> {
    let dir = object.parent().unwrap_or(Path::new("/"));
    vec![dir.join("assets"), dir.join("../share/smol/assets")]
}

/// The packaged assets directory of this engine (one holding a [`MANIFEST`]), if any.
pub fn packaged_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = this_object().and_then(|o| {
            packaged_candidates(&o)
                .into_iter()
                .find(|d| d.join(MANIFEST).is_file())
        });
        tracing::debug!(?dir, "packaged assets");
        dir
    })
    .clone()
}

/// Reads `dir`'s manifest (`None` when it has none); a manifest that cannot be read is an
/// error naming it.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::invalid(format!("{}: {e}", path.display()))),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::invalid(format!(
            "{} is not a smol assets manifest: {e}",
            path.display()
        ))
    })
}

/// The assets directory and its source: `SMOL_ASSETS`, else `packaged`, else `home`.
pub fn origin_from(
    env: Option<PathBuf>,
    packaged: Option<PathBuf>,
    home: PathBuf,
    overrides: Vec<String>,
) -> Result<Origin> {
    let (source, dir) = match (env, packaged) {
        (Some(d), _) => (Source::Env, d),
        (None, Some(d)) => (Source::Packaged, d),
        (None, None) => (Source::Home, home),
    };
    let manifest = read_manifest(&dir)?;
    Ok(Origin {
        source,
        dir,
        manifest,
        overrides,
    })
}

/// The assets directory this process uses (environment, packaged, home), with its manifest.
pub fn origin() -> Result<Origin> {
    let overrides = ["SMOL_KERNEL", "SMOL_INITRD"]
        .iter()
        .filter_map(|v| {
            let value = std::env::var_os(v)?;
            (!value.is_empty()).then(|| format!("{v}={}", value.to_string_lossy()))
        })
        .collect();
    origin_from(
        std::env::var_os("SMOL_ASSETS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        packaged_dir(),
        smol_home().join("assets"),
        overrides,
    )
}

/// Refuses a manifest whose agent shares no protocol generation with this host.
pub fn check_protocol(origin: &Origin) -> Result<()> {
    let Some(m) = &origin.manifest else {
        return Ok(());
    };
    let host = smol_protocol::Generations::CURRENT;
    let agent = smol_protocol::Generations::new(m.protocol.min, m.protocol.max);
    let reason = if agent.max < host.min {
        "older than the oldest this host speaks"
    } else if agent.min > host.max {
        "newer than the newest this host speaks"
    } else {
        return Ok(());
    };
    Err(Error::AgentIncompatible {
        name: "-".into(),
        agent: agent.to_string(),
        host: host.to_string(),
        reason: format!(
            "the agent of the assets in {} (smol {}) speaks protocol generation {agent}, {reason} \
             ({host}): install the smol package of this version, or unset SMOL_ASSETS",
            origin.dir.display(),
            m.version
        ),
    })
}

/// Resolves assets from `SMOL_KERNEL` / `SMOL_INITRD` and the directory of [`origin`]
/// (`SMOL_ASSETS`, packaged, `$SMOL_HOME/assets`); packaged assets of an agent this host cannot
/// speak to are refused.
pub fn resolve() -> Result<Assets> {
    let origin = origin()?;
    check_protocol(&origin)?;
    let kernel_env = std::env::var("SMOL_KERNEL").ok();
    let initrd_env = std::env::var_os("SMOL_INITRD").map(PathBuf::from);
    resolve_from(&origin.dir, kernel_env.as_deref(), initrd_env)
}

/// Resolution with explicit inputs (for tests).
pub fn resolve_from(dir: &Path, kernel: Option<&str>, initrd: Option<PathBuf>) -> Result<Assets> {
    let (kernel, default_initrd, flavor) = match kernel.unwrap_or("smol") {
        "smol" | "" => (
            dir.join("vmlinux"),
            dir.join("initramfs.cpio"),
            KernelFlavor::Smol,
        ),
        "cloud" => (
            dir.join("cloud/vmlinux"),
            dir.join("cloud/initramfs.cpio"),
            KernelFlavor::DebianCloud,
        ),
        path => (
            PathBuf::from(path),
            dir.join("initramfs.cpio"),
            KernelFlavor::Smol,
        ),
    };
    let initrd = initrd.unwrap_or(default_initrd);
    for (what, p) in [("guest kernel", &kernel), ("guest initramfs", &initrd)] {
        if !p.is_file() {
            return Err(Error::AssetMissing {
                what,
                path: p.clone(),
            });
        }
    }
    Ok(Assets {
        kernel,
        initrd,
        flavor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kernel_is_a_typed_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let e = resolve_from(d.path(), None, None).unwrap_err();
        assert!(
            matches!(&e, Error::AssetMissing { what: "guest kernel", path } if path == &d.path().join("vmlinux"))
        );
        assert!(e.hint().is_some());
    }

    #[test]
    fn flavours() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("cloud")).unwrap();
        for f in [
            "vmlinux",
            "initramfs.cpio",
            "cloud/vmlinux",
            "cloud/initramfs.cpio",
        ] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        assert_eq!(
            resolve_from(d.path(), None, None).unwrap().flavor,
            KernelFlavor::Smol
        );
        let c = resolve_from(d.path(), Some("cloud"), None).unwrap();
        assert_eq!(c.flavor, KernelFlavor::DebianCloud);
        assert_eq!(c.initrd, d.path().join("cloud/initramfs.cpio"));
        let k = d.path().join("vmlinux");
        let custom = resolve_from(d.path(), Some(k.to_str().unwrap()), None).unwrap();
        assert_eq!(custom.kernel, k);
        let e = resolve_from(d.path(), Some("/no/such/kernel"), None).unwrap_err();
        assert!(matches!(e, Error::AssetMissing { .. }));
    }

    fn manifest(dir: &Path, min: u16, max: u16) {
        std::fs::write(
            dir.join(MANIFEST),
            format!(
                r#"{{"package":"smolmachines","version":"9.9.9","protocol":{{"min":{min},"max":{max}}},"files":{{}}}}"#
            ),
        )
        .unwrap();
    }

    #[test]
    fn smol_assets_wins_then_packaged_then_home() {
        let (env, pkg, home) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        manifest(pkg.path(), 1, smol_protocol::PROTOCOL_VERSION);
        let o = |e: Option<&Path>, p: Option<&Path>| {
            origin_from(
                e.map(Into::into),
                p.map(Into::into),
                home.path().into(),
                vec![],
            )
            .unwrap()
        };
        let a = o(Some(env.path()), Some(pkg.path()));
        assert_eq!(
            (a.source, a.dir.as_path(), a.manifest),
            (Source::Env, env.path(), None)
        );
        let b = o(None, Some(pkg.path()));
        assert_eq!((b.source, b.dir.as_path()), (Source::Packaged, pkg.path()));
        assert_eq!(b.manifest.as_ref().unwrap().version, "9.9.9");
        assert!(
            b.to_string().contains("smol 9.9.9, agent protocol 1 to"),
            "{b}"
        );
        let c = o(None, None);
        assert_eq!((c.source, c.dir.as_path()), (Source::Home, home.path()));
    }

    #[test]
    fn an_agent_of_no_common_generation_is_refused_before_a_boot() {
        let d = tempfile::tempdir().unwrap();
        let origin = |min, max| {
            manifest(d.path(), min, max);
            origin_from(Some(d.path().into()), None, "/nonexistent".into(), vec![]).unwrap()
        };
        let host = smol_protocol::Generations::CURRENT;
        assert!(check_protocol(&origin(host.max, host.max)).is_ok());
        assert!(check_protocol(&origin(0, host.min)).is_ok());
        let too_new = check_protocol(&origin(host.max + 1, host.max + 2)).unwrap_err();
        assert!(
            matches!(&too_new, Error::AgentIncompatible { reason, .. } if reason.contains("newer")),
            "{too_new}"
        );
        if host.min > 0 {
            let too_old = check_protocol(&origin(0, host.min - 1)).unwrap_err();
            assert!(
                matches!(&too_old, Error::AgentIncompatible { reason, .. } if reason.contains("older")),
                "{too_old}"
            );
        }
        // a directory without a manifest (the set-up's) is not checked
        std::fs::remove_file(d.path().join(MANIFEST)).unwrap();
        let plain = origin_from(Some(d.path().into()), None, "/x".into(), vec![]).unwrap();
        assert!(plain.manifest.is_none() && check_protocol(&plain).is_ok());
    }

    #[test]
    fn a_broken_manifest_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MANIFEST), "{\"version\": 1").unwrap();
        let e = origin_from(None, Some(d.path().into()), "/x".into(), vec![]).unwrap_err();
        assert!(e.to_string().contains(MANIFEST), "{e}");
    }

    #[test]
    fn packaged_assets_are_looked_for_next_to_the_object() {
        assert_eq!(
            packaged_candidates(Path::new("/opt/smol/bin/smol")),
            [
                PathBuf::from("/opt/smol/bin/assets"),
                PathBuf::from("/opt/smol/bin/../share/smol/assets")
            ]
        );
        // in a test binary, the object the engine runs in is the executable itself
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert_eq!(this_object().unwrap(), exe);
    }
}
