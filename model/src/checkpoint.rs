//! Tensors by Hugging Face name, from safetensors files on disk or from memory.
//!
//! A checkpoint directory holds `model.safetensors`, or shards listed in
//! `model.safetensors.index.json` (`weight_map`: tensor name → file). Shards are memory-mapped
//! when the first tensor in them is asked for, and only the asked-for byte ranges are touched,
//! so a worker loading its own experts never reads the others' bytes (nor opens shards that
//! hold only other experts).
//!
//! Matrices load as [`Weight`]s in the precision [`Precision`] asks for: by default the
//! checkpoint's own (BF16/F16 stay 16-bit, `F8_E4M3` stays one byte a value with its
//! `<name>_scale_inv` blocks, DeepSeek-V3's layout). Vectors (norms, the gate's bias) load as
//! f32. Files are untrusted: shards named by the index stay inside the directory, and NaN or
//! infinite weights are refused at load.

use crate::{Error, Result};
use kubemoe_kernels::dtype;
use kubemoe_kernels::weight::{Dtype as WeightDtype, Weight};
use safetensors::tensor::{Dtype, Metadata, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A tensor's bytes as stored, before conversion.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Where a model's tensors come from.
pub trait TensorSource: Sync {
    /// The tensor called `name`, if present.
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>>;
    /// Names this source in error messages.
    fn describe(&self) -> String;
    /// Every tensor's name.
    fn names(&self) -> Vec<&str>;
    /// The bytes of `name` shared rather than copied (a slice of a memory-mapped file that
    /// stays mapped while the slice lives), where the source can.
    fn shared(&self, _name: &str) -> Option<bytes::Bytes> {
        None
    }
    /// Says that `name` was converted into memory of its own: its stored bytes will not be
    /// read again, and a mapped source may drop their pages.
    fn release(&self, _name: &str) {}
}

/// Loads `name` as f32 and checks its shape. `fp8_block` is the checkpoint's FP8 block size.
pub fn load_f32(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    fp8_block: Option<[usize; 2]>,
) -> Result<Vec<f32>> {
    let t = checked(src, name, shape)?;
    crate::progress::load().advance(t.data.len() as u64);
    let unsupported = || unsupported(src, name, t.dtype);
    let values = match t.dtype {
        Dtype::F32 => dtype::f32_from_le(t.data),
        Dtype::BF16 => dtype::bf16_from_le(t.data),
        Dtype::F16 => dtype::f16_from_le(t.data),
        Dtype::F8_E4M3 => {
            let [rows, cols] = shape else { return Err(unsupported()) };
            let block = fp8_block.unwrap_or([128, 128]);
            let scale_shape = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
            let scale_name = format!("{name}_scale_inv");
            let scales = load_f32(src, &scale_name, &scale_shape, None)?;
            dtype::dequant_fp8_blocks(t.data, *rows, *cols, &scales, block)?
        }
        _ => return Err(unsupported()),
    };
    // A NaN or infinity would poison every activation it touches: refuse it here, named.
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: name.into(),
            checkpoint: src.describe(),
            index,
            value: values[index],
        });
    }
    Ok(values)
}

/// The precision weight matrices are held in (`--dtype`, `spec.model.dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// The checkpoint's own.
    #[default]
    Auto,
    /// 16-bit: f32 matrices round to bf16 (nearest even); BF16 and F16 ones stay as stored.
    Bf16,
    /// FP8 as DeepSeek-V3's FP8 checkpoints store it (and the shared fixture): every
    /// `*_proj.weight` in e4m3 with 128×128 block scales (quantised at load when stored
    /// wider); the other matrices (router gate, `kv_a_proj_with_mqa`, embeddings, LM head)
    /// 16-bit as for `Bf16`.
    Fp8,
    /// Every matrix widened to f32 (exact).
    F32,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            "f32" => Ok(Self::F32),
            other => Err(format!("unknown dtype `{other}`: use auto, bf16, fp8 or f32")),
        }
    }
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::F32 => "f32",
        }
    }

    /// What a matrix `name` stored as `stored` is held in; refuses widening FP8 to 16 bits
    /// (that would round the checkpoint's values).
    fn target(self, name: &str, stored: WeightDtype) -> Result<WeightDtype> {
        let sixteen = if stored == WeightDtype::F32 { WeightDtype::Bf16 } else { stored };
        Ok(match self {
            Self::Auto => stored,
            Self::F32 => WeightDtype::F32,
            Self::Bf16 if stored == WeightDtype::Fp8 => {
                return Err(Error::Checkpoint(format!(
                    "dtype bf16 (--dtype, spec.model.dtype): `{name}` is stored in FP8, and holding \
                     it in bf16 would round its values; use dtype auto (FP8 kept) or f32"
                )))
            }
            Self::Bf16 => sixteen,
            Self::Fp8 if stored == WeightDtype::Fp8 || name.ends_with("_proj.weight") => WeightDtype::Fp8,
            Self::Fp8 => sixteen,
        })
    }
}

/// Loads the matrix `name` [rows, cols] in the precision `precision` asks for, borrowing
/// nothing from `src` (the caller may drop it). `fp8_block` is the checkpoint's FP8 block.
pub fn load_weight(
    src: &dyn TensorSource,
    name: &str,
    [rows, cols]: [usize; 2],
    fp8_block: Option<[usize; 2]>,
    precision: Precision,
) -> Result<Weight> {
    let t = checked(src, name, &[rows, cols])?;
    crate::progress::load().advance(t.data.len() as u64);
    let block = fp8_block.unwrap_or([128, 128]);
    let stored_dtype = match t.dtype {
        Dtype::F32 => WeightDtype::F32,
        Dtype::BF16 => WeightDtype::Bf16,
        Dtype::F16 => WeightDtype::F16,
        Dtype::F8_E4M3 => WeightDtype::Fp8,
        _ => return Err(unsupported(src, name, t.dtype)),
    };
    let scales = if stored_dtype == WeightDtype::Fp8 {
        let scale_shape = [rows.div_ceil(block[0].max(1)), cols.div_ceil(block[1].max(1))];
        Some((load_f32(src, &format!("{name}_scale_inv"), &scale_shape, None)?, block))
    } else {
        None
    };
    let target = precision.target(name, stored_dtype)?;
    if target == WeightDtype::F32 && stored_dtype == WeightDtype::Fp8 {
        // Dequantised as before FP8 could be held: any finite scale will do in f32.
        return Weight::from_f32(load_f32(src, name, &[rows, cols], fp8_block)?, rows, cols)
            .map_err(Error::from);
    }
    // Kept in place when held as stored (a memory map then backs the weight: no copy, and a
    // restarted process maps the page cache instead of reading the file).
    let shared = src.shared(name);
    let in_place = shared.is_some() && target == stored_dtype;
    let bytes = shared.unwrap_or_else(|| bytes::Bytes::copy_from_slice(t.data));
    let named = |e: kubemoe_kernels::Error| match e {
        kubemoe_kernels::Error::NonFinite { index, value, .. } => {
            Error::NonFinite { name: name.into(), checkpoint: src.describe(), index, value }
        }
        other => Error::Checkpoint(format!(
            "tensor `{name}` in {}: {other}{}",
            src.describe(),
            if target == WeightDtype::Fp8 { "; hold it in f32 instead with --dtype f32" } else { "" }
        )),
    };
    let stored = Weight::stored(stored_dtype, bytes, rows, cols, scales).map_err(named)?;
    let held = stored.to(target, block).map_err(named)?;
    if !in_place {
        drop(stored);
        src.release(name);
    }
    Ok(held)
}

fn checked<'a>(src: &'a dyn TensorSource, name: &str, shape: &[usize]) -> Result<RawTensor<'a>> {
    let t = src
        .raw(name)?
        .ok_or_else(|| Error::MissingTensor { name: name.into(), checkpoint: src.describe() })?;
    if t.shape != shape {
        return Err(Error::Shape {
            name: name.into(),
            checkpoint: src.describe(),
            actual: t.shape.to_vec(),
            expected: shape.to_vec(),
        });
    }
    Ok(t)
}

fn unsupported(src: &dyn TensorSource, name: &str, dtype: Dtype) -> Error {
    Error::UnsupportedDtype { name: name.into(), checkpoint: src.describe(), dtype: format!("{dtype:?}") }
}

struct Shard {
    path: PathBuf,
    mapped: OnceLock<Mapped>,
}

struct Mapped {
    mmap: std::sync::Arc<memmap2::Mmap>,
    /// The same map, for slices that keep it alive.
    bytes: bytes::Bytes,
    data_start: usize,
    meta: Metadata,
}

/// A shared map as the owner of [`bytes::Bytes`].
struct SharedMap(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

/// A checkpoint directory in the Hugging Face layout.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    names: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir`: reads the shard index (or finds the single file); maps nothing yet.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut names = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| Error::Io { path: index_path.clone(), source })?;
            let index: Index = serde_json::from_str(&text)
                .map_err(|source| Error::Json { path: index_path.clone(), source })?;
            let mut files: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in index.weight_map {
                // The index is data: a shard outside the directory (`../x`, `/etc/…`) is refused.
                let inside = !file.is_empty()
                    && Path::new(&file).components().all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor `{name}` is in shard `{file}`, which is not a file inside the model \
                         directory; shard names must be relative paths without `..`",
                        index_path.display()
                    )));
                }
                let next = files.len();
                let i = *files.entry(file.clone()).or_insert(next);
                if i == shards.len() {
                    shards.push(Shard { path: dir.join(&file), mapped: OnceLock::new() });
                }
                names.insert(name, i);
            }
        } else if single.exists() {
            let shard = Shard { path: single, mapped: OnceLock::new() };
            for name in shard.get()?.meta.tensors().into_keys() {
                names.insert(name, 0);
            }
            shards.push(shard);
        } else {
            return Err(Error::Checkpoint(format!(
                "{} holds neither model.safetensors.index.json nor model.safetensors",
                dir.display()
            )));
        }
        Ok(Self { dir: dir.to_owned(), shards, names })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Shard {
    fn get(&self) -> Result<&Mapped> {
        if let Some(m) = self.mapped.get() {
            return Ok(m);
        }
        let mmap = std::sync::Arc::new(crate::mmap::map(&self.path)?);
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap[..])
            .map_err(|source| Error::Safetensors { path: self.path.clone(), source })?;
        let bytes = bytes::Bytes::from_owner(SharedMap(mmap.clone()));
        Ok(self.mapped.get_or_init(|| Mapped { mmap, bytes, data_start: 8 + n, meta }))
    }
}

impl Checkpoint {
    /// The shard map of `name` and the byte range of its data there (checked by `raw`).
    fn located(&self, name: &str) -> Option<(&Mapped, std::ops::Range<usize>)> {
        let m = self.shards[*self.names.get(name)?].mapped.get()?;
        let (a, b) = m.meta.info(name)?.data_offsets;
        Some((m, m.data_start + a..m.data_start + b))
    }
}

impl TensorSource for Checkpoint {
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(&i) = self.names.get(name) else { return Ok(None) };
        let shard = &self.shards[i];
        let m = shard.get()?;
        let Some(info) = m.meta.info(name) else {
            return Err(Error::Checkpoint(format!(
                "the index lists `{name}` in {}, which does not hold it",
                shard.path.display()
            )));
        };
        let (a, b) = info.data_offsets;
        // `read_metadata` checked that every tensor's offsets lie inside the file.
        Ok(Some(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data: &m.bytes[m.data_start + a..m.data_start + b],
        }))
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn names(&self) -> Vec<&str> {
        self.names.keys().map(String::as_str).collect()
    }

    fn shared(&self, name: &str) -> Option<bytes::Bytes> {
        self.located(name).map(|(m, range)| m.bytes.slice(range))
    }

    fn release(&self, name: &str) {
        if let Some((m, range)) = self.located(name) {
            crate::mmap::release(&m.mmap, range.start, range.len());
        }
    }
}

/// An owned tensor: dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Tensors held in memory by name (a generated `builtin:` model, or one about to be saved).
#[derive(Default)]
pub struct TensorMap {
    pub label: String,
    pub tensors: BTreeMap<String, OwnedTensor>,
}

impl TensorSource for TensorMap {
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        Ok(self.tensors.get(name).map(|t| RawTensor { dtype: t.dtype, shape: &t.shape, data: &t.data }))
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
}

impl TensorMap {
    /// Writes every tensor into one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_file(self.tensors.iter(), path)
    }

    /// Writes the tensors as safetensors shards of about `shard_bytes` each, plus
    /// `model.safetensors.index.json`, into `dir`.
    pub fn save_sharded(&self, dir: &Path, shard_bytes: usize) -> Result<()> {
        let mut groups: Vec<Vec<(&String, &OwnedTensor)>> = vec![vec![]];
        let mut size = 0;
        for (name, t) in &self.tensors {
            if size > 0 && size + t.data.len() > shard_bytes {
                groups.push(vec![]);
                size = 0;
            }
            size += t.data.len();
            if let Some(g) = groups.last_mut() {
                g.push((name, t));
            }
        }
        let total_size: usize = self.tensors.values().map(|t| t.data.len()).sum();
        let mut weight_map = BTreeMap::new();
        for (i, group) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
            save_file(group.iter().copied(), &dir.join(&file))?;
            for (name, _) in group {
                weight_map.insert((*name).clone(), file.clone());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap_or_default())
            .map_err(|source| Error::Io { path, source })
    }
}

fn save_file<'a>(tensors: impl Iterator<Item = (&'a String, &'a OwnedTensor)>, path: &Path) -> Result<()> {
    let views = tensors
        .map(|(name, t)| Ok((name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|source| Error::Safetensors { path: path.into(), source })?;
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &meta, path)
        .map_err(|source| Error::Safetensors { path: path.into(), source })
}
