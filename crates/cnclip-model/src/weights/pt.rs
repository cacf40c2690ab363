//! `torch.save` zip archives: reading any of them, writing cn_clip's checkpoint layout.

use super::pickle::{self, TensorRef, Torch, Value};
use super::{StateDict, WeightsError, element_size, io_err, tensor_bytes, write_atomic};
use cnclip_pickle::{PickleError, Writer as PickleWriter};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

/// What a `.pt` file holds.
#[derive(Debug)]
pub struct PtCheckpoint {
    /// Keys exactly as stored (official checkpoints: `module.`-prefixed, with `bert.pooler` keys);
    /// see [`normalize_cn_clip_keys`].
    pub state_dict: StateDict,
    pub epoch: Option<i64>,
    pub step: Option<i64>,
    pub name: Option<String>,
    /// The file has an `optimizer` entry (its tensors are not read).
    pub has_optimizer: bool,
    /// The file is a bare state dict rather than cn_clip's `{"epoch", …, "state_dict"}` dict.
    pub bare_state_dict: bool,
}

impl PtCheckpoint {
    /// The state dict with cn_clip's loader normalisation applied ([`normalize_cn_clip_keys`]).
    pub fn into_cn_clip_state_dict(self) -> StateDict {
        normalize_cn_clip_keys(self.state_dict)
    }
}

/// The header fields of cn_clip's checkpoint dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtHeader {
    /// 1-based epoch number, as cn_clip writes it.
    pub epoch: i64,
    /// Global optimizer step.
    pub step: i64,
    /// The experiment name (`--name`).
    pub name: String,
}

/// cn_clip's key normalisation (`create_model`, `extract_features.py`, `zeroshot_evaluation.py`):
/// when the **first** key starts with `module`, drop every key containing `bert.pooler` and cut 7
/// characters (`module.`) off every other key. Otherwise the dict is returned unchanged, pooler keys
/// included, exactly as cn_clip does.
pub fn normalize_cn_clip_keys(state_dict: StateDict) -> StateDict {
    let prefixed = state_dict
        .keys()
        .next()
        .is_some_and(|k| k.starts_with("module"));
    if !prefixed {
        return state_dict;
    }
    state_dict
        .into_iter()
        .filter(|(k, _)| !k.contains("bert.pooler"))
        .map(|(k, t)| (k.chars().skip(7).collect::<String>(), t))
        .collect()
}

/// One zip entry's location in the file.
#[derive(Debug, Clone)]
struct Entry {
    data_start: u64,
    size: u64,
    crc32: u32,
    compression: CompressionMethod,
}

struct Archive {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
    /// Name of the pickle entry, e.g. `archive/data.pkl`.
    pickle: String,
    /// `archive/`
    prefix: String,
}

fn not_zip(path: &Path, reason: impl std::fmt::Display) -> WeightsError {
    WeightsError::NotZip {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl Archive {
    fn open(path: &Path) -> Result<Self, WeightsError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).map_err(io_err(path))?;
        if n >= 1 && magic[0] == 0x80 {
            return Err(WeightsError::LegacyFormat {
                path: path.to_path_buf(),
            });
        }
        if n < 4 || &magic[..2] != b"PK" {
            return Err(not_zip(path, format!("starts with {:02x?}", &magic[..n])));
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| not_zip(path, e))?;
        let mut entries = HashMap::with_capacity(archive.len());
        for i in 0..archive.len() {
            let f = archive
                .by_index_raw(i)
                .map_err(|e| not_zip(path, format!("entry {i}: {e}")))?;
            let name = f
                .name()
                .map_err(|e| not_zip(path, format!("entry {i}: {e}")))?
                .into_owned();
            let data_start = f
                .data_start()
                .ok_or_else(|| not_zip(path, format!("entry {name} has no data offset")))?;
            entries.insert(
                name,
                Entry {
                    data_start,
                    size: f.compressed_size(),
                    crc32: f.crc32(),
                    compression: f.compression(),
                },
            );
        }
        let file = archive.into_inner();
        let pickle = entries
            .keys()
            .filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl"))
            .min_by_key(|n| (n.matches('/').count(), n.len()))
            .cloned()
            .ok_or_else(|| WeightsError::MissingDataPkl {
                path: path.to_path_buf(),
            })?;
        let prefix = pickle[..pickle.len() - "data.pkl".len()].to_string();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
            pickle,
            prefix,
        })
    }

    /// Reads `len` bytes of an entry (all of it when `None`), checking the CRC when reading it whole.
    fn read(&mut self, name: &str, entry: &Entry, len: u64) -> Result<Vec<u8>, WeightsError> {
        if entry.compression != CompressionMethod::Stored {
            return Err(WeightsError::CompressedEntry {
                path: self.path.clone(),
                entry: name.to_string(),
                method: format!("{:?}", entry.compression),
            });
        }
        let n = usize::try_from(len).map_err(|_| WeightsError::Format {
            path: self.path.clone(),
            reason: format!("entry {name} of {len} bytes does not fit in memory"),
        })?;
        // `len` never exceeds the entry's size, which the zip reader checked against the file's.
        // (`vec![0; n]` is a zeroed allocation: fast even in unoptimised builds.)
        let mut buf = vec![0u8; n];
        self.file
            .seek(SeekFrom::Start(entry.data_start))
            .map_err(io_err(&self.path))?;
        let got = read_up_to(&mut self.file, &mut buf).map_err(io_err(&self.path))?;
        if got < n {
            return Err(WeightsError::TruncatedStorage {
                path: self.path.clone(),
                key: name.rsplit('/').next().unwrap_or(name).to_string(),
                entry: name.to_string(),
                expected: len,
                found: got as u64,
            });
        }
        if len == entry.size && entry.crc32 != 0 {
            let computed = crc32fast::hash(&buf);
            if computed != entry.crc32 {
                return Err(WeightsError::Crc {
                    path: self.path.clone(),
                    entry: name.to_string(),
                    stored: entry.crc32,
                    computed,
                });
            }
        }
        Ok(buf)
    }

    fn entry(&self, name: &str) -> Option<Entry> {
        self.entries.get(name).cloned()
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn pickle_error(path: &Path, entry: &str, e: PickleError) -> WeightsError {
    let (path, entry) = (path.to_path_buf(), entry.to_string());
    let pickle = |offset, reason| WeightsError::Pickle {
        path: path.clone(),
        entry: entry.clone(),
        offset,
        reason,
    };
    match e {
        PickleError::Opcode { name, code, offset } => WeightsError::UnsupportedOpcode {
            path,
            entry,
            name,
            code,
            offset,
        },
        PickleError::Truncated {
            offset,
            wanted,
            remaining,
            ..
        } => pickle(
            offset,
            format!("needs {wanted} bytes but only {remaining} remain"),
        ),
        PickleError::Protocol {
            offset, protocol, ..
        } => pickle(
            offset,
            format!("pickle protocol {protocol} is newer than 5"),
        ),
        PickleError::Malformed { offset, reason } => pickle(offset, reason),
        PickleError::Global { module, name, .. } => {
            WeightsError::UnknownGlobal { path, module, name }
        }
    }
}

/// Reads a `torch.save` checkpoint (zip format, torch ≥ 1.6): cn_clip's
/// `{"epoch", "step", "name", "state_dict", ["optimizer"]}` dict or a bare state dict (e.g. a Hugging
/// Face `pytorch_model.bin`). Only the state dict's storages are read, each once; tensors that share
/// a storage share it in the result, and non-contiguous tensors keep their strides.
pub fn read_pt(path: impl AsRef<Path>) -> Result<PtCheckpoint, WeightsError> {
    let path = path.as_ref();
    let mut archive = Archive::open(path)?;
    let format = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };

    if let Some(entry) = archive.entry(&format!("{}byteorder", archive.prefix)) {
        let name = format!("{}byteorder", archive.prefix);
        let order = archive.read(&name, &entry, entry.size.min(64))?;
        if order.trim_ascii() != b"little" {
            return Err(format(format!(
                "byte order {:?} is not supported (only little-endian checkpoints)",
                String::from_utf8_lossy(&order)
            )));
        }
    }

    let pickle_name = archive.pickle.clone();
    let pickle_entry = archive
        .entry(&pickle_name)
        .ok_or_else(|| WeightsError::MissingDataPkl {
            path: path.to_path_buf(),
        })?;
    let data = archive.read(&pickle_name, &pickle_entry, pickle_entry.size)?;
    let root = pickle::load(&data).map_err(|e| pickle_error(path, &pickle_name, e))?;
    drop(data);

    let Value::Dict(root) = root else {
        return Err(format(format!(
            "{pickle_name} holds a {}, not a dict (a checkpoint or a state dict)",
            root.type_name()
        )));
    };
    let root = root.borrow().clone();
    let lookup = |key: &str| {
        root.iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v.clone())
    };

    let (entries, bare) = match lookup("state_dict") {
        Some(Value::Dict(sd)) => (sd.borrow().clone(), false),
        Some(_) => return Err(format("the \"state_dict\" entry is not a dict".into())),
        None if !root.is_empty()
            && root
                .iter()
                .all(|(_, v)| matches!(v, Value::Object(Torch::Tensor(_)))) =>
        {
            (root.clone(), true)
        }
        None => {
            let keys: Vec<String> = root
                .iter()
                .take(10)
                .map(|(k, _)| format!("{k:?}"))
                .collect();
            return Err(format(format!(
                "neither a \"state_dict\" entry nor a dict of tensors (top-level keys: {})",
                keys.join(", ")
            )));
        }
    };

    let header_int = |key: &str| -> Result<Option<i64>, WeightsError> {
        if bare {
            return Ok(None);
        }
        match lookup(key) {
            None | Some(Value::None) => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .ok_or_else(|| format(format!("\"{key}\" is not an int"))),
        }
    };
    let epoch = header_int("epoch")?;
    let step = header_int("step")?;
    let name = if bare {
        None
    } else {
        lookup("name").and_then(|v| v.as_str().map(str::to_string))
    };
    let has_optimizer = !bare && lookup("optimizer").is_some();

    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut state_dict = StateDict::with_capacity(entries.len());
    for (k, v) in &entries {
        let key = k
            .as_str()
            .ok_or_else(|| format(format!("state dict key {k:?} is not a string")))?
            .to_string();
        let Value::Object(Torch::Tensor(t)) = v else {
            return Err(format(format!("state dict entry {key} is not a tensor")));
        };
        let tensor = materialize(&mut archive, &mut storages, &key, t)?;
        state_dict.insert(key, tensor);
    }
    Ok(PtCheckpoint {
        state_dict,
        epoch,
        step,
        name,
        has_optimizer,
        bare_state_dict: bare,
    })
}

fn materialize(
    archive: &mut Archive,
    storages: &mut HashMap<String, Tensor>,
    key: &str,
    t: &TensorRef,
) -> Result<Tensor, WeightsError> {
    let path = archive.path.clone();
    let format = |reason: String| WeightsError::Format {
        path: path.clone(),
        reason,
    };
    let storage = &t.storage;
    let kind = storage.kind.ok_or_else(|| WeightsError::UnsupportedDtype {
        path: path.clone(),
        what: format!("tensor {key} (storage {})", storage.key),
        dtype: storage.type_name.clone(),
    })?;

    // Bounds of the view inside its storage.
    if t.offset < 0 || t.size.iter().any(|&s| s < 0) || t.stride.iter().any(|&s| s < 0) {
        return Err(format(format!(
            "tensor {key}: negative offset, size or stride (offset {}, size {:?}, stride {:?})",
            t.offset, t.size, t.stride
        )));
    }
    let empty = t.size.contains(&0);
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&s, &st)| {
            if s == 0 {
                Some(acc)
            } else {
                (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
            }
        });
    match last {
        Some(last) if empty || (last as u64) < storage.numel => {}
        _ => {
            return Err(format(format!(
                "tensor {key} (offset {}, size {:?}, stride {:?}) reaches outside its storage {} of {} elements",
                t.offset, t.size, t.stride, storage.key, storage.numel
            )));
        }
    }

    if !storages.contains_key(&storage.key) {
        let name = format!("{}data/{}", archive.prefix, storage.key);
        let entry = archive
            .entry(&name)
            .ok_or_else(|| WeightsError::MissingStorage {
                path: path.clone(),
                key: storage.key.clone(),
                entry: name.clone(),
            })?;
        let elt = element_size(kind).unwrap_or(1) as u64;
        let expected = storage
            .numel
            .checked_mul(elt)
            .ok_or_else(|| format(format!("storage {} is too large", storage.key)))?;
        if entry.size < expected {
            return Err(WeightsError::TruncatedStorage {
                path: path.clone(),
                key: storage.key.clone(),
                entry: name,
                expected,
                found: entry.size,
            });
        }
        let bytes = archive.read(&name, &entry, expected).map_err(|e| match e {
            WeightsError::TruncatedStorage {
                path,
                entry,
                expected,
                found,
                ..
            } => WeightsError::TruncatedStorage {
                path,
                key: storage.key.clone(),
                entry,
                expected,
                found,
            },
            other => other,
        })?;
        let numel = i64::try_from(storage.numel)
            .map_err(|_| format(format!("storage {} is too large", storage.key)))?;
        let tensor = super::tensor_from_bytes(&path, key, &bytes, &[numel], kind)?;
        storages.insert(storage.key.clone(), tensor);
    }
    let base = storages
        .get(&storage.key)
        .ok_or_else(|| format(format!("storage {} vanished", storage.key)))?;
    base.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)
        .map_err(|source| WeightsError::Torch {
            path: path.clone(),
            key: key.to_string(),
            source,
        })
}

fn storage_type_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        _ => return None,
    })
}

fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1].max(1);
    }
    strides
}

/// Writes cn_clip's checkpoint layout: `{"epoch", "step", "name", "state_dict": OrderedDict}` with
/// every key prefixed by `module.` (as cn_clip's DDP training saves, and as its loaders expect), one
/// contiguous CPU storage per tensor. `torch.load(path, map_location="cpu")` reads it, also with
/// `weights_only=True`. The write is atomic.
pub fn write_pt(
    path: impl AsRef<Path>,
    state_dict: &StateDict,
    header: &PtHeader,
) -> Result<(), WeightsError> {
    write_archive(path.as_ref(), state_dict, Some(header))
}

/// Writes a bare state dict (an `OrderedDict` of the keys as given) in `torch.save`'s format.
pub fn write_pt_state_dict(
    path: impl AsRef<Path>,
    state_dict: &StateDict,
) -> Result<(), WeightsError> {
    write_archive(path.as_ref(), state_dict, None)
}

struct Planned<'a> {
    key: String,
    tensor: &'a Tensor,
    kind: Kind,
    size: Vec<i64>,
    numel: usize,
}

fn write_archive(
    path: &Path,
    state_dict: &StateDict,
    header: Option<&PtHeader>,
) -> Result<(), WeightsError> {
    let prefix = if header.is_some() { "module." } else { "" };
    let mut planned = Vec::with_capacity(state_dict.len());
    for (key, tensor) in state_dict {
        let kind = tensor.f_kind().map_err(|source| WeightsError::Torch {
            path: path.to_path_buf(),
            key: key.to_string(),
            source,
        })?;
        if storage_type_name(kind).is_none() {
            return Err(WeightsError::UnsupportedDtype {
                path: path.to_path_buf(),
                what: format!("tensor {key}"),
                dtype: format!("{kind:?}"),
            });
        }
        planned.push(Planned {
            key: format!("{prefix}{key}"),
            tensor,
            kind,
            size: tensor.size(),
            numel: tensor.numel(),
        });
    }

    let mut w = PickleWriter::new(2);
    if let Some(h) = header {
        w.empty_dict();
        w.mark();
        w.str("epoch");
        w.int(h.epoch);
        w.str("step");
        w.int(h.step);
        w.str("name");
        w.str(&h.name);
        w.str("state_dict");
    }
    w.global("collections", "OrderedDict");
    w.empty_tuple();
    w.reduce();
    for (chunk_index, chunk) in planned.chunks(1000).enumerate() {
        w.mark();
        for (i, p) in chunk.iter().enumerate() {
            let storage_key = (chunk_index * 1000 + i).to_string();
            w.str(&p.key);
            w.global("torch._utils", "_rebuild_tensor_v2");
            w.mark();
            w.mark();
            w.str("storage");
            w.global("torch", storage_type_name(p.kind).unwrap_or("FloatStorage"));
            w.str(&storage_key);
            w.str("cpu");
            w.int(p.numel as i64);
            w.tuple_from_mark();
            w.binpersid();
            w.int(0);
            w.int_tuple(&p.size);
            w.int_tuple(&contiguous_strides(&p.size));
            w.bool(false);
            w.global("collections", "OrderedDict");
            w.empty_tuple();
            w.reduce();
            w.tuple_from_mark();
            w.reduce();
        }
        w.setitems();
    }
    if header.is_some() {
        w.setitems();
    }
    let pickle = w.finish();

    let stem: String = path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    let archive = if stem.is_empty() {
        "archive".to_string()
    } else {
        stem
    };

    write_atomic(path, |writer| {
        let zerr = |e: zip::result::ZipError| WeightsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        };
        let mut zip = zip::ZipWriter::new(writer);
        // torch.save: stored entries whose data start on 64-byte boundaries, padded with an extra
        // field whose id is "FB".
        let options = |len: u64| {
            SimpleFileOptions::default()
                .compression_method(CompressionMethod::Stored)
                .with_alignment_and_header_id(64, u16::from_le_bytes(*b"FB"))
                .large_file(len >= u64::from(u32::MAX))
        };
        let put =
            |zip: &mut zip::ZipWriter<_>, name: String, bytes: &[u8]| -> Result<(), WeightsError> {
                zip.start_file(name, options(bytes.len() as u64))
                    .map_err(zerr)?;
                zip.write_all(bytes).map_err(io_err(path))
            };
        put(&mut zip, format!("{archive}/data.pkl"), &pickle)?;
        put(&mut zip, format!("{archive}/.format_version"), b"1")?;
        put(&mut zip, format!("{archive}/.storage_alignment"), b"64")?;
        put(&mut zip, format!("{archive}/byteorder"), b"little")?;
        for (i, p) in planned.iter().enumerate() {
            let bytes = tensor_bytes(path, &p.key, p.tensor)?;
            debug_assert_eq!(bytes.len(), p.numel * element_size(p.kind).unwrap_or(0));
            put(&mut zip, format!("{archive}/data/{i}"), &bytes)?;
        }
        put(&mut zip, format!("{archive}/version"), b"3\n")?;
        zip.finish().map_err(zerr)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_strides_match_torch() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_strides(&[0, 3]), [3, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<i64>::new());
    }

    #[test]
    fn normalisation_follows_cn_clip() {
        let sd: StateDict = [
            "module.logit_scale",
            "module.bert.pooler.dense.weight",
            "module.visual.proj",
        ]
        .into_iter()
        .map(|k| (k.to_string(), Tensor::from(0f32)))
        .collect();
        let n = normalize_cn_clip_keys(sd);
        assert_eq!(n.keys().collect::<Vec<_>>(), ["logit_scale", "visual.proj"]);
        // No prefix on the first key: unchanged, pooler kept (cn_clip's strict load would then fail).
        let sd: StateDict = ["logit_scale", "bert.pooler.dense.weight"]
            .into_iter()
            .map(|k| (k.to_string(), Tensor::from(0f32)))
            .collect();
        assert_eq!(normalize_cn_clip_keys(sd).len(), 2);
    }
}
