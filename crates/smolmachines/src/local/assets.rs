//! Guest assets: which kernel and initramfs to boot, and with which machine flavour.
//!
//! Default: smol's own kernel (`$SMOL_HOME/assets/vmlinux`, built by `scripts/setup.sh`), booted
//! with `-M microvm,acpi=off` and virtio-mmio devices on the command line. `SMOL_KERNEL=cloud`
//! selects Debian's prebuilt cloud kernel (ACPI on, modules loaded by the agent);
//! `SMOL_KERNEL=<path>` and `SMOL_INITRD=<path>` point at other files.

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

/// Resolves assets from `SMOL_KERNEL` / `SMOL_INITRD` / `SMOL_ASSETS` (or `$SMOL_HOME/assets`).
pub fn resolve() -> Result<Assets> {
    let dir = std::env::var_os("SMOL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| smol_home().join("assets"));
    let kernel_env = std::env::var("SMOL_KERNEL").ok();
    let initrd_env = std::env::var_os("SMOL_INITRD").map(PathBuf::from);
    resolve_from(&dir, kernel_env.as_deref(), initrd_env)
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
}
