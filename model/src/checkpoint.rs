//! Tensors by Hugging Face name, from safetensors files on disk or from memory.
//!
//! A checkpoint directory holds `model.safetensors`, or shards listed in
//! `model.safetensors.index.json` (`weight_map`: tensor name → file). Shards are memory-mapped
//! when the first tensor in them is asked for, and only the asked-for byte ranges are touched,
//! so a worker loading its own experts never reads the others' bytes (nor opens shards that
//! hold only other experts).
//!
//! Weights come out as f32: BF16/F16 widen exactly; `F8_E4M3` weights are dequantised with
//! their `<name>_scale_inv` blocks (DeepSeek-V3's layout). Files are untrusted: shards named
//! by the index stay inside the directory, and NaN or infinite weights are refused at load.

use crate::{Error, Result};
use kubemoe_kernels::dtype;
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
}

/// Loads `name` as f32 and checks its shape. `fp8_block` is the checkpoint's FP8 block size.
pub fn load_f32(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    fp8_block: Option<[usize; 2]>,
) -> Result<Vec<f32>> {
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
    let unsupported = || Error::UnsupportedDtype {
        name: name.into(),
        checkpoint: src.describe(),
        dtype: format!("{:?}", t.dtype),
    };
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

struct Shard {
    path: PathBuf,
    mapped: OnceLock<Mapped>,
}

struct Mapped {
    mmap: memmap2::Mmap,
    data_start: usize,
    meta: Metadata,
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
        let mmap = crate::mmap::map(&self.path)?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|source| Error::Safetensors { path: self.path.clone(), source })?;
        Ok(self.mapped.get_or_init(|| Mapped { mmap, data_start: 8 + n, meta }))
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
        Ok(Some(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data: &m.mmap[m.data_start + a..m.data_start + b],
        }))
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
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
