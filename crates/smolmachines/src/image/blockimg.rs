//! The read-only block image the guest mounts as the lower layer of its root: erofs (default)
//! or ext4, made from an unpacked root file system directory by the distribution's tools.

use std::path::Path;
use std::process::Command;

use super::error::{ImageError, ImageResult};
use super::store::disk_usage;
use crate::cleanup::{remove_if_present, remove_quietly};

/// File system of the block image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootfsFormat {
    /// erofs, uncompressed (`mkfs.erofs`, Debian package erofs-utils). The default: built
    /// fastest, and read in the guest without decompression (which costs under TCG).
    #[default]
    Erofs,
    /// erofs with LZ4HC compression: about half the size, slower to build.
    ErofsLz4,
    /// ext4 without a journal (`mkfs.ext4 -d`, Debian package e2fsprogs).
    Ext4,
}

impl RootfsFormat {
    /// The extension of cached images (and the part of the cache key naming the format).
    pub fn extension(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::ErofsLz4 => "lz4.erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }

    /// The file system type to pass to `mount -t`.
    pub fn fstype(self) -> &'static str {
        match self {
            RootfsFormat::Erofs | RootfsFormat::ErofsLz4 => "erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }

    /// `SMOL_ROOTFS_FORMAT` = `erofs` | `erofs-lz4` | `ext4`, default erofs.
    pub fn from_env() -> ImageResult<Self> {
        match std::env::var("SMOL_ROOTFS_FORMAT").ok().as_deref() {
            None | Some("") | Some("erofs") => Ok(RootfsFormat::Erofs),
            Some("erofs-lz4") => Ok(RootfsFormat::ErofsLz4),
            Some("ext4") => Ok(RootfsFormat::Ext4),
            Some(other) => Err(ImageError::InvalidReference {
                reference: format!("SMOL_ROOTFS_FORMAT={other}"),
                reason: "expected erofs, erofs-lz4 or ext4".into(),
            }),
        }
    }
}

/// Makes `dest` (a new file path) from the directory `src`.
pub(crate) fn build(src: &Path, dest: &Path, format: RootfsFormat) -> ImageResult<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let privileged = unsafe { libc::geteuid() } == 0;
    match format {
        RootfsFormat::Erofs | RootfsFormat::ErofsLz4 => {
            let mut c = Command::new("mkfs.erofs");
            c.arg("--quiet");
            if format == RootfsFormat::ErofsLz4 {
                c.arg("-zlz4hc");
            }
            if !privileged {
                // Unprivileged unpacking could not chown; images are root-owned in practice.
                c.arg("--all-root");
            }
            c.arg(dest).arg(src);
            run("mkfs.erofs", "erofs-utils", c, dest)
        }
        RootfsFormat::Ext4 => {
            let (bytes, inodes) = tree_size(src);
            // Room for metadata (inode tables, directories, bitmaps) and some slack.
            let mut size = bytes + bytes / 5 + inodes * 512 + (16 << 20);
            for attempt in 0..3 {
                // What a previous attempt left (mkfs.ext4 -F would reuse a file it cannot
                // replace); a path that cannot be cleared is this build's error.
                remove_if_present(dest)
                    .map_err(|e| ImageError::io_at("clear the block image path", dest, e))?;
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
                    .args(["-b", "4096", "-L", "smol-rootfs"])
                    .arg("-N")
                    .arg((inodes + 1024).to_string())
                    .args(["-E", "root_owner=0:0"])
                    .arg("-d")
                    .arg(src)
                    .arg(dest)
                    .arg(format!("{}k", size.div_ceil(1024)));
                match run("mkfs.ext4", "e2fsprogs", c, dest) {
                    Err(ImageError::Tool { message, .. })
                        if attempt < 2 && message.contains("Could not allocate") =>
                    {
                        size *= 2;
                    }
                    other => return other,
                }
            }
            unreachable!("the last attempt returns")
        }
    }
}

fn tree_size(p: &Path) -> (u64, u64) {
    let mut inodes = 0;
    fn walk(p: &Path, inodes: &mut u64) {
        *inodes += 1;
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), inodes);
                } else {
                    *inodes += 1;
                }
            }
        }
    }
    walk(p, &mut inodes);
    (disk_usage(p), inodes)
}

fn run(tool: &str, package: &str, mut c: Command, dest: &Path) -> ImageResult<()> {
    let out = c.output().map_err(|e| ImageError::Tool {
        tool: tool.to_string(),
        message: if e.kind() == std::io::ErrorKind::NotFound {
            format!("not installed (Debian: apt-get install {package})")
        } else {
            e.to_string()
        },
    })?;
    if out.status.success() {
        return Ok(());
    }
    remove_quietly(dest, "a failed block image");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("No space left on device") {
        return Err(ImageError::NoSpace {
            path: dest.to_path_buf(),
        });
    }
    Err(ImageError::Tool {
        tool: tool.to_string(),
        message: format!("{} ({})", stderr, out.status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_cannot_be_cleared_is_an_error_before_mkfs_runs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("rootfs");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), b"hi").unwrap();
        // The destination is a directory with content: not removable as a file.
        let dest = d.path().join("image.ext4");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("keep"), b"x").unwrap();
        let e = build(&src, &dest, RootfsFormat::Ext4).unwrap_err();
        match &e {
            ImageError::Io { context, .. } => {
                assert!(context.contains("clear the block image path"), "{e}");
                assert!(context.contains("image.ext4"), "{e}");
            }
            other => panic!("expected an I/O error naming the path, got {other:?}"),
        }
        assert!(dest.join("keep").exists());
    }
}
