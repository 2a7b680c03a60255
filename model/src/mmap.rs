//! Read-only memory maps of checkpoint files: the one place this crate uses `unsafe`.
#![allow(unsafe_code)]

use crate::{Error, Result};
use std::path::Path;

/// Drops this process's pages of `map[offset..offset + len]` (the whole pages inside it): a
/// hint once a tensor has been converted into memory of its own, so that its file pages stop
/// counting as resident. Pages read again later are read from the file.
pub fn release(map: &memmap2::Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: the map is read-only and private (`map` below): dropping its pages cannot
        // lose data, as the next access reads the same bytes from the file again; the range is
        // inside the map. The result is ignored: this is a hint.
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
