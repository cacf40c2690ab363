//! The native format: safetensors with cn_clip's key names, whose `__metadata__` records the format,
//! its version and the model config (`ClipConfig::to_json()`), so a file alone says what it holds.
//!
//! Tensors are laid out by decreasing element size (so every tensor is aligned, as safetensors'
//! own writer guarantees) and, within one element size, in state-dict order; loading returns them in
//! file order. Files are read tensor by tensor, never whole.

use super::{StateDict, WeightsError, io_err, tensor_bytes, tensor_from_bytes, write_atomic};
use crate::config::ClipConfig;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use tch::Kind;

/// Metadata key naming the format; its value is [`NATIVE_FORMAT`].
pub const NATIVE_FORMAT_KEY: &str = "cnclip.format";
pub const NATIVE_FORMAT: &str = "cnclip-chinese-clip";
/// Metadata key of the format version; its value is [`NATIVE_VERSION`].
pub const NATIVE_VERSION_KEY: &str = "cnclip.format_version";
pub const NATIVE_VERSION: &str = "1";
/// Metadata key of the model config, cn_clip's merged JSON schema.
pub const NATIVE_CONFIG_KEY: &str = "cnclip.config";

/// Largest header we accept (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The safetensors dtype of a tch kind (the ones a checkpoint may hold).
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// The tch kind of a safetensors dtype (the ones a checkpoint may hold).
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes `state_dict` (cn_clip key names) and `config` as a native safetensors file, atomically.
pub fn save_native(
    path: impl AsRef<Path>,
    config: &ClipConfig,
    state_dict: &StateDict,
) -> Result<(), WeightsError> {
    let metadata = HashMap::from([
        (NATIVE_FORMAT_KEY.to_string(), NATIVE_FORMAT.to_string()),
        (NATIVE_VERSION_KEY.to_string(), NATIVE_VERSION.to_string()),
        (NATIVE_CONFIG_KEY.to_string(), config.to_json()),
        // What Hugging Face tooling looks for to know the tensors are PyTorch's.
        ("format".to_string(), "pt".to_string()),
    ]);
    save_safetensors(path, state_dict, metadata)
}

/// Writes any state dict as safetensors with the given `__metadata__`, atomically (a plain file
/// that Hugging Face's `safetensors` reads; no cnclip metadata is added).
pub fn save_safetensors(
    path: impl AsRef<Path>,
    state_dict: &StateDict,
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let mut order: Vec<(&str, &tch::Tensor, Dtype)> = Vec::with_capacity(state_dict.len());
    for (key, tensor) in state_dict {
        let kind = tensor.f_kind().map_err(|source| WeightsError::Torch {
            path: path.to_path_buf(),
            key: key.to_string(),
            source,
        })?;
        let dtype = dtype_of(kind).ok_or_else(|| WeightsError::UnsupportedDtype {
            path: path.to_path_buf(),
            what: format!("tensor {key}"),
            dtype: format!("{kind:?}"),
        })?;
        order.push((key, tensor, dtype));
    }
    order.sort_by_key(|(_, _, dtype)| std::cmp::Reverse(dtype.bitsize()));

    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (key, tensor, dtype) in &order {
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        let n = tensor.numel() * dtype.bitsize() / 8;
        infos.push((
            key.to_string(),
            TensorInfo {
                dtype: *dtype,
                shape,
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let bad = |reason: String| WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let header = Metadata::new(Some(metadata), infos).map_err(|e| bad(e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomic(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io_err(path))?;
        w.write_all(&header).map_err(io_err(path))?;
        for (key, tensor, _) in &order {
            let bytes = tensor_bytes(path, key, tensor)?;
            w.write_all(&bytes).map_err(io_err(path))?;
        }
        Ok(())
    })
}

struct Header {
    metadata: Metadata,
    /// File offset of the data section.
    data_start: u64,
    file: File,
}

fn read_header(path: &Path) -> Result<Header, WeightsError> {
    let bad = |reason: String| WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| {
        bad(format!(
            "file of {file_len} bytes is too short for a header"
        ))
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n.saturating_add(8) > file_len {
        return Err(bad(format!(
            "header length {n} is impossible for a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io_err(path))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not valid safetensors JSON: {e}")))?;
    let data_start = 8 + n;
    let data_end = data_start.saturating_add(metadata.data_len() as u64);
    if data_end > file_len {
        return Err(bad(format!(
            "truncated: the header describes {data_end} bytes but the file has {file_len}"
        )));
    }
    Ok(Header {
        metadata,
        data_start,
        file,
    })
}

/// The `__metadata__` of a safetensors file (empty if it has none); reads the header only.
pub fn read_safetensors_metadata(
    path: impl AsRef<Path>,
) -> Result<HashMap<String, String>, WeightsError> {
    let header = read_header(path.as_ref())?;
    Ok(header.metadata.metadata().clone().unwrap_or_default())
}

/// Reads every tensor of a safetensors file (in file order) and its `__metadata__`.
pub fn read_safetensors(
    path: impl AsRef<Path>,
) -> Result<(StateDict, HashMap<String, String>), WeightsError> {
    let path = path.as_ref();
    let Header {
        metadata,
        data_start,
        file,
    } = read_header(path)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader
        .seek(SeekFrom::Start(data_start))
        .map_err(io_err(path))?;
    let names = metadata.offset_keys();
    let mut state_dict = StateDict::with_capacity(names.len());
    for name in names {
        let Some(info) = metadata.info(&name) else {
            continue;
        };
        let kind = kind_of(info.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
            path: path.to_path_buf(),
            what: format!("tensor {name}"),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        // The header was checked against the file length, so this is at most the file's size.
        let mut buf = vec![0u8; end - start];
        reader.read_exact(&mut buf).map_err(io_err(path))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let tensor = tensor_from_bytes(path, &name, &buf, &shape, kind)?;
        state_dict.insert(name, tensor);
    }
    Ok((state_dict, metadata.metadata().clone().unwrap_or_default()))
}

/// Reads a native file: its model config and its state dict (cn_clip key names).
pub fn load_native(path: impl AsRef<Path>) -> Result<(ClipConfig, StateDict), WeightsError> {
    let path = path.as_ref();
    let metadata = read_safetensors_metadata(path)?;
    let missing = |key: &'static str| {
        let mut found: Vec<&str> = metadata.keys().map(String::as_str).collect();
        found.sort_unstable();
        WeightsError::MissingNativeConfig {
            path: path.to_path_buf(),
            key,
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        }
    };
    match metadata.get(NATIVE_FORMAT_KEY) {
        Some(f) if f == NATIVE_FORMAT => {}
        Some(f) => {
            return Err(WeightsError::Format {
                path: path.to_path_buf(),
                reason: format!("{NATIVE_FORMAT_KEY} is {f:?}, expected {NATIVE_FORMAT:?}"),
            });
        }
        None => return Err(missing(NATIVE_FORMAT_KEY)),
    }
    match metadata.get(NATIVE_VERSION_KEY).map(String::as_str) {
        Some(NATIVE_VERSION) => {}
        Some(v) => {
            return Err(WeightsError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "native format version {v} is not supported (this build reads version {NATIVE_VERSION})"
                ),
            });
        }
        None => return Err(missing(NATIVE_VERSION_KEY)),
    }
    let json = metadata
        .get(NATIVE_CONFIG_KEY)
        .ok_or_else(|| missing(NATIVE_CONFIG_KEY))?;
    let config = ClipConfig::from_json_str(json, &format!("{} metadata", path.display())).map_err(
        |source| WeightsError::Config {
            path: path.to_path_buf(),
            source,
        },
    )?;
    let (state_dict, _) = read_safetensors(path)?;
    Ok((config, state_dict))
}
