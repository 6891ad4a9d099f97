//! Entry points of the fuzz targets (`fuzz/`, docs/FUZZING.md) into the image code's
//! crate-private parsers. Not an API: hidden from the docs, and only the fuzz targets and the
//! corpus test call it.

use std::path::{Path, PathBuf};

use super::error::ImageResult;

/// Applies `layers` (uncompressed tar streams), in order, to `root` (an existing, empty
/// directory) as a pull does; returns the unpacker's warnings.
pub fn unpack_layers(root: &Path, layers: &[&[u8]]) -> ImageResult<Vec<String>> {
    let mut u = super::unpack::Unpacker::new(root);
    for (i, layer) in layers.iter().enumerate() {
        u.apply_layer(&format!("layer {i}"), *layer)?;
    }
    Ok(u.warnings)
}

/// A tar entry path relative to the root, or why it is refused (it climbs above the root).
pub fn normalise_entry_path(raw: &[u8]) -> Result<PathBuf, String> {
    super::unpack::normalise_entry_path(raw)
}
