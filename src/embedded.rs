//! kubemoe-tiny-chat, the model `kubemoe up` serves by default: a small DeepSeek-V3-architecture
//! model trained by `scripts/train-tiny-chat/` and kept in `models/kubemoe-tiny-chat`, built
//! into this binary so that a fresh clone (or a copied binary) serves text with no download.
//! Processes read models from directories, so it is unpacked once into the user's cache
//! directory, under a name holding a hash of its bytes: a binary with another build of the
//! model never reads this one's files, and an unpacking cut short is never taken for done
//! (it is written aside, then renamed into place).

use anyhow::{Context, Result};
use std::path::PathBuf;

pub const NAME: &str = "kubemoe-tiny-chat";

/// The checkpoint's files, as `scripts/train-tiny-chat/train.py` wrote them.
const FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../models/kubemoe-tiny-chat/config.json")),
    ("generation_config.json", include_bytes!("../models/kubemoe-tiny-chat/generation_config.json")),
    ("model.safetensors", include_bytes!("../models/kubemoe-tiny-chat/model.safetensors")),
    ("tokenizer.json", include_bytes!("../models/kubemoe-tiny-chat/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../models/kubemoe-tiny-chat/tokenizer_config.json")),
];

/// The model's directory, unpacked first if it is not there yet.
pub fn unpack() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kubemoe");
    let dir = cache.join(format!("{NAME}-{:016x}", fnv1a(FILES.iter().flat_map(|(_, b)| b.iter()))));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let aside = cache.join(format!(".{NAME}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for (name, bytes) in FILES {
        let path = aside.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    // Another process may have unpacked it meanwhile: then its copy stands.
    if std::fs::rename(&aside, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&aside);
        anyhow::ensure!(dir.join("config.json").exists(), "could not unpack {NAME} into {}", dir.display());
    }
    Ok(dir)
}

/// FNV-1a, 64 bits: names the unpacked copy after its bytes.
fn fnv1a<'a>(bytes: impl Iterator<Item = &'a u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unpacks_once_into_a_directory_named_after_its_bytes() {
        let home = std::env::temp_dir().join(format!("kubemoe-embedded-test-{}", std::process::id()));
        std::env::set_var("XDG_CACHE_HOME", &home);
        let dir = unpack().unwrap();
        assert!(dir.starts_with(home.join("kubemoe")));
        for (name, bytes) in FILES {
            assert_eq!(std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        // Found again, not rewritten.
        let written = std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap();
        assert_eq!(unpack().unwrap(), dir);
        assert_eq!(std::fs::metadata(dir.join("model.safetensors")).unwrap().modified().unwrap(), written);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
