//! Read-only memory maps of checkpoint files: the one place this crate uses `unsafe`.
#![allow(unsafe_code)]

use crate::{Error, Result};
use std::path::Path;

/// Maps `path` read-only. Pages are read from disk only when a tensor in them is used.
pub fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only and private to this process; kubemoe never writes a
    // checkpoint it has open, and model directories are treated as immutable while served
    // (a file truncated underneath a server would fault, as with every mmap-based loader).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.into(), source })
}
