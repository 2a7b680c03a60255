//! Read-only memory maps of checkpoint files: the one place this crate uses `unsafe`.
#![allow(unsafe_code)]

use crate::{Error, Result};
use std::path::Path;

/// Drops this process's pages of `map[offset..offset + len]` (the whole pages inside it): a
/// hint once a tensor has been converted into memory of its own, so that its file pages stop
/// counting as resident. Pages read again later are read from the file.
pub fn release(map: &memmap2::Mmap, offset: usize, len: usize) {
    // Whole 64 KiB regions inside the range: a multiple of every page size Linux uses on
    // x86-64 and arm64 (4, 16 and 64 KiB), so no page of a neighbouring tensor is dropped.
    const REGION: usize = 64 << 10;
    let start = offset.div_ceil(REGION) * REGION;
    let end = (offset + len) / REGION * REGION;
    if end > start {
        // SAFETY: the map is read-only (`map` below) and nothing in this process writes the
        // file: dropping this process's pages of it only unmaps them, the page cache keeps the
        // bytes, and the next access (through any `Bytes` slice still alive) maps the same
        // bytes again. The range is inside the map. The result is ignored: this is a hint.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Maps `path` read-only. Pages are read from disk only when a tensor in them is used.
pub fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only and private to this process; kubemoe never writes a
    // checkpoint it has open, and model directories are treated as immutable while served
    // (a file truncated underneath a server would fault, as with every mmap-based loader).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.into(), source })
}
