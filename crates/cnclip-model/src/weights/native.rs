//! The native format: safetensors with cn_clip's key names, whose `__metadata__` records the format,
//! its version and the model config (`ClipConfig::to_json()`), so a file alone says what it holds.
//!
//! The workspace's only reader and writer of safetensors files:
//!
//! * [`SafetensorsReader`] opens any safetensors file: the header is parsed and checked against the
//!   file's length, the data is memory-mapped, and a tensor is read only when asked for.
//!   [`NativeReader`] is one that also checked the native metadata (format, version, config):
//!   what loading, training resumes and the soup open.
//! * [`NativeWriter`] streams a file: the header first, then each tensor's bytes at its offset,
//!   from any thread, into a temporary file next to the target that is fsynced and renamed over it
//!   at the end ([`NativeWriter::finish`]); dropped unfinished, the temporary file is removed and
//!   the target untouched.
//!
//! Tensors are laid out by decreasing element size (so every tensor is aligned, as safetensors'
//! own writer guarantees) and, within one element size, in the order given; reading returns them
//! in file order.

use super::{AtomicFile, StateDict, WeightsError, io_err, tensor_bytes, tensor_from_bytes};
use crate::config::ClipConfig;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Kind, Tensor};

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

/// The `__metadata__` of a native model file of `config_json` (plus what Hugging Face tooling
/// looks for to know the tensors are PyTorch's); callers add their own entries to it.
pub fn native_metadata(config_json: &str) -> HashMap<String, String> {
    HashMap::from([
        (NATIVE_FORMAT_KEY.to_string(), NATIVE_FORMAT.to_string()),
        (NATIVE_VERSION_KEY.to_string(), NATIVE_VERSION.to_string()),
        (NATIVE_CONFIG_KEY.to_string(), config_json.to_string()),
        ("format".to_string(), "pt".to_string()),
    ])
}

/// Whether a file's metadata names the native format (the header alone decides).
pub fn is_native_metadata(metadata: &HashMap<String, String>) -> bool {
    metadata.get(NATIVE_FORMAT_KEY).map(String::as_str) == Some(NATIVE_FORMAT)
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// A safetensors file opened for reading: header parsed and checked, data memory-mapped.
pub struct SafetensorsReader {
    path: PathBuf,
    metadata: HashMap<String, String>,
    /// In file (offset) order.
    entries: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    mmap: Mmap,
    data_start: usize,
}

impl std::fmt::Debug for SafetensorsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsReader")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl SafetensorsReader {
    /// Opens `path` and checks its header: valid safetensors JSON, every tensor's bytes inside the
    /// file. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let bad = |reason: String| WeightsError::Safetensors {
            path: path.clone(),
            reason,
        };
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        if file_len < 8 {
            return Err(bad(format!(
                "file of {file_len} bytes is too short for a header"
            )));
        }
        // SAFETY: the map is read-only; a file rewritten under us while we read it yields wrong
        // numbers, never undefined behaviour in our code (bytes are only copied out).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&mmap[..8]);
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || n.saturating_add(8) > file_len {
            return Err(bad(format!(
                "header length {n} is impossible for a file of {file_len} bytes"
            )));
        }
        let data_start = 8 + n as usize;
        let header: Metadata = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("header is not valid safetensors JSON: {e}")))?;
        let data_end = (data_start as u64).saturating_add(header.data_len() as u64);
        if data_end > file_len {
            return Err(bad(format!(
                "truncated: the header describes {data_end} bytes but the file has {file_len}"
            )));
        }
        let mut entries = Vec::new();
        for key in header.offset_keys() {
            let Some(info) = header.info(&key) else {
                continue;
            };
            entries.push(TensorEntry {
                key,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: info.data_offsets.0,
                end: info.data_offsets.1,
            });
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.clone(), i))
            .collect();
        Ok(SafetensorsReader {
            metadata: header.metadata().clone().unwrap_or_default(),
            path,
            entries,
            index,
            mmap,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` (empty if the file has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Every tensor, in file order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    pub fn entry(&self, key: &str) -> Option<&TensorEntry> {
        self.index.get(key).map(|&i| &self.entries[i])
    }

    /// The raw little-endian bytes of a tensor of this file (offsets were checked against the
    /// file when the header was parsed).
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + entry.start..self.data_start + entry.end]
    }

    /// One tensor, copied out of the map into a CPU tensor.
    pub fn tensor(&self, entry: &TensorEntry) -> Result<Tensor, WeightsError> {
        let kind = kind_of(entry.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
            path: self.path.clone(),
            what: format!("tensor {}", entry.key),
            dtype: format!("{:?}", entry.dtype),
        })?;
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        tensor_from_bytes(&self.path, &entry.key, self.bytes(entry), &shape, kind)
    }

    /// Every tensor, in file order.
    pub fn state_dict(&self) -> Result<StateDict, WeightsError> {
        self.advise_sequential();
        let mut state_dict = StateDict::with_capacity(self.entries.len());
        for entry in &self.entries {
            state_dict.insert(entry.key.clone(), self.tensor(entry)?);
        }
        Ok(state_dict)
    }

    /// Tells the kernel the whole data section will be read front to back.
    pub fn advise_sequential(&self) {
        #[cfg(unix)]
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }
}

/// A native model file opened for reading: a [`SafetensorsReader`] whose metadata was checked
/// (format, version, a valid config). Dereferences to the reader for the tensors.
#[derive(Debug)]
pub struct NativeReader {
    file: SafetensorsReader,
    config: ClipConfig,
    config_json: String,
}

impl std::ops::Deref for NativeReader {
    type Target = SafetensorsReader;

    fn deref(&self) -> &SafetensorsReader {
        &self.file
    }
}

impl NativeReader {
    /// Opens `path` and checks the header and the native metadata; no tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let file = SafetensorsReader::open(path)?;
        let path = file.path();
        let metadata = file.metadata();
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
        let config_json = metadata
            .get(NATIVE_CONFIG_KEY)
            .ok_or_else(|| missing(NATIVE_CONFIG_KEY))?
            .clone();
        let config =
            ClipConfig::from_json_str(&config_json, &format!("{} metadata", path.display()))
                .map_err(|source| WeightsError::Config {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(NativeReader {
            file,
            config,
            config_json,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The config exactly as stored (what a soup of this file records).
    pub fn config_json(&self) -> &str {
        &self.config_json
    }
}

/// The `__metadata__` of a safetensors file (empty if it has none); reads the header only.
pub fn read_safetensors_metadata(
    path: impl AsRef<Path>,
) -> Result<HashMap<String, String>, WeightsError> {
    Ok(SafetensorsReader::open(path)?.metadata)
}

/// Reads every tensor of a safetensors file (in file order) and its `__metadata__`.
pub fn read_safetensors(
    path: impl AsRef<Path>,
) -> Result<(StateDict, HashMap<String, String>), WeightsError> {
    let file = SafetensorsReader::open(path)?;
    Ok((file.state_dict()?, file.metadata))
}

/// Reads a native file: its model config and its state dict (cn_clip key names).
pub fn load_native(path: impl AsRef<Path>) -> Result<(ClipConfig, StateDict), WeightsError> {
    let file = NativeReader::open(path)?;
    let state_dict = file.state_dict()?;
    Ok((file.config, state_dict))
}

/// Writes `state_dict` (cn_clip key names) and `config` as a native safetensors file, atomically.
pub fn save_native(
    path: impl AsRef<Path>,
    config: &ClipConfig,
    state_dict: &StateDict,
) -> Result<(), WeightsError> {
    save_safetensors(path, state_dict, native_metadata(&config.to_json()))
}

/// Writes any state dict as safetensors with the given `__metadata__`, atomically (a plain file
/// that Hugging Face's `safetensors` reads; no cnclip metadata is added).
pub fn save_safetensors(
    path: impl AsRef<Path>,
    state_dict: &StateDict,
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let mut layout = Vec::with_capacity(state_dict.len());
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
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        layout.push((key.to_string(), dtype, shape));
    }
    let writer = NativeWriter::create(path, metadata, layout)?;
    for (i, entry) in writer.entries().iter().enumerate() {
        let Some(tensor) = state_dict.get(&entry.key) else {
            continue;
        };
        writer.write_tensor(i, tensor)?;
    }
    writer.finish()
}

/// A safetensors file written as its tensors arrive (see the module doc): the layout and header
/// are fixed at [`NativeWriter::create`]; [`NativeWriter::write`] puts bytes of one tensor at
/// their place (`pwrite`, so from several threads at once); [`NativeWriter::finish`] checks every
/// byte was written, fsyncs and renames the file into place.
#[derive(Debug)]
pub struct NativeWriter {
    path: PathBuf,
    file: AtomicFile,
    entries: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    data_start: u64,
    data_len: u64,
    written: AtomicU64,
    durable: bool,
}

impl NativeWriter {
    /// Creates the temporary file of `path` with the header of `tensors` (`(key, dtype, shape)`)
    /// and `metadata` (for a model: [`native_metadata`] plus any extra entries). The tensors are
    /// laid out by decreasing element size, the given order kept within one size.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: HashMap<String, String>,
        mut tensors: Vec<(String, Dtype, Vec<usize>)>,
    ) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        tensors.sort_by_key(|(_, dtype, _)| std::cmp::Reverse(dtype.bitsize()));
        let mut entries = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (key, dtype, shape) in tensors {
            let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            entries.push(TensorEntry {
                key,
                dtype,
                shape,
                start: offset,
                end: offset + n,
            });
            offset += n;
        }
        let bad = |reason: String| WeightsError::Safetensors {
            path: path.clone(),
            reason,
        };
        let infos = entries
            .iter()
            .map(|e| {
                let info = TensorInfo {
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data_offsets: (e.start, e.end),
                };
                (e.key.clone(), info)
            })
            .collect();
        let header = Metadata::new(Some(metadata), infos).map_err(|e| bad(e.to_string()))?;
        let mut header = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
        header.resize(header.len().next_multiple_of(8), b' ');

        let data_start = 8 + header.len() as u64;
        let data_len = offset as u64;
        let file = AtomicFile::create(&path)?;
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.clone(), i))
            .collect();
        // From here on, Drop removes the temporary file on any error.
        let writer = NativeWriter {
            path,
            file,
            entries,
            index,
            data_start,
            data_len,
            written: AtomicU64::new(0),
            durable: true,
        };
        let mut head = (header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&header);
        writer.write_at(0, &head)?;
        if let Some(file) = writer.file.file() {
            file.set_len(data_start + data_len)
                .map_err(io_err(&writer.path))?;
        }
        Ok(writer)
    }

    /// Skip the fsync before the rename (the file may be lost on a power cut, never torn). For
    /// measurements; the tools always sync.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// The layout, in file order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    /// Writes `bytes` (little-endian, row-major) at byte `offset` of tensor `index`'s data; any
    /// thread, any order, each byte once.
    pub fn write(&self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), WeightsError> {
        let entry = self
            .entries
            .get(index)
            .ok_or_else(|| WeightsError::Format {
                path: self.path.clone(),
                reason: format!("no tensor {index} in a file of {}", self.entries.len()),
            })?;
        if offset.saturating_add(bytes.len()) > entry.nbytes() {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                reason: format!(
                    "tensor {}: {} bytes at offset {offset} overrun its {} bytes",
                    entry.key,
                    bytes.len(),
                    entry.nbytes()
                ),
            });
        }
        self.write_at(self.data_start + (entry.start + offset) as u64, bytes)?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a whole tensor, whose dtype and shape must be the entry's.
    pub fn write_tensor(&self, index: usize, tensor: &Tensor) -> Result<(), WeightsError> {
        let Some(entry) = self.entries.get(index) else {
            return self.write(index, 0, &[]);
        };
        let dtype = tensor.f_kind().ok().and_then(dtype_of);
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        if dtype != Some(entry.dtype) || shape != entry.shape {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                reason: format!(
                    "tensor {}: got {dtype:?} {shape:?}, the header says {:?} {:?}",
                    entry.key, entry.dtype, entry.shape
                ),
            });
        }
        self.write(index, 0, &tensor_bytes(&self.path, &entry.key, tensor)?)
    }

    fn write_at(&self, at: u64, bytes: &[u8]) -> Result<(), WeightsError> {
        let Some(file) = self.file.file() else {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                reason: "written after finish".into(),
            });
        };
        // Errors name the file the caller asked for, not its temporary name.
        write_all_at(file, bytes, at).map_err(io_err(&self.path))
    }

    /// Checks that every tensor byte was written, then fsyncs (unless not [`Self::durable`]) and
    /// renames the file over the target.
    pub fn finish(mut self) -> Result<(), WeightsError> {
        let written = self.written.load(Ordering::Relaxed);
        if written != self.data_len {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                reason: format!(
                    "incomplete write: {written} of {} tensor bytes",
                    self.data_len
                ),
            });
        }
        self.file.commit(self.durable)
    }
}

#[cfg(unix)]
fn write_all_at(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
fn write_all_at(file: &std::fs::File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cnclip-native-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn layout() -> Vec<(String, Dtype, Vec<usize>)> {
        vec![
            ("half".into(), Dtype::F16, vec![4]),
            ("w".into(), Dtype::F32, vec![2, 3]),
            ("ids".into(), Dtype::I64, vec![2]),
        ]
    }

    /// Pieces written out of order (as the soup's workers do) land at their offsets; the layout is
    /// by decreasing element size, the given order kept within one size.
    #[test]
    fn chunks_in_any_order_read_back_exactly() {
        let dir = temp("chunks");
        let path = dir.join("m.safetensors");
        let meta = native_metadata("{}");
        let writer = NativeWriter::create(&path, meta, layout()).unwrap();
        let keys: Vec<&str> = writer.entries().iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["ids", "w", "half"]);
        let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let w_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wi = writer.index_of("w").unwrap();
        writer.write(wi, 12, &w_bytes[12..]).unwrap();
        writer.write(wi, 0, &w_bytes[..12]).unwrap();
        let half = Tensor::from_slice(&[1.0f32, -2.0, 0.25, 3.0]).to_kind(Kind::Half);
        writer
            .write_tensor(writer.index_of("half").unwrap(), &half)
            .unwrap();
        let ids = Tensor::from_slice(&[7i64, -3]);
        writer
            .write_tensor(writer.index_of("ids").unwrap(), &ids)
            .unwrap();
        writer.finish().unwrap();
        assert_eq!(files(&dir), ["m.safetensors"]);

        let file = SafetensorsReader::open(&path).unwrap();
        assert_eq!(file.metadata()[NATIVE_FORMAT_KEY], NATIVE_FORMAT);
        let sd = file.state_dict().unwrap();
        let keys: Vec<&str> = sd.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["ids", "w", "half"]);
        let expected_w = Tensor::from_slice(&w).reshape([2, 3]);
        assert!(sd.get("w").unwrap().equal(&expected_w));
        assert!(sd.get("half").unwrap().equal(&half));
        assert!(sd.get("ids").unwrap().equal(&ids));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A write that misses bytes, overruns a tensor, or is dropped part-way leaves neither the
    /// target nor a temporary file; an existing target is untouched.
    #[test]
    fn incomplete_and_abandoned_writes_leave_nothing() {
        let dir = temp("abandoned");
        let path = dir.join("m.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let writer = NativeWriter::create(&path, HashMap::new(), layout()).unwrap();
        let wi = writer.index_of("w").unwrap();
        let e = writer.write(wi, 20, &[0u8; 8]).unwrap_err().to_string();
        assert!(
            e.contains("tensor w: 8 bytes at offset 20 overrun its 24 bytes"),
            "{e}"
        );
        let e = writer
            .write_tensor(wi, &Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor w") && e.contains("[3, 2]"), "{e}");
        writer.write(wi, 0, &[0u8; 24]).unwrap();
        let e = writer.finish().unwrap_err().to_string();
        assert!(e.contains("incomplete write: 24 of 48 tensor bytes"), "{e}");
        assert_eq!(files(&dir), ["m.safetensors"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");

        let writer = NativeWriter::create(&path, HashMap::new(), layout()).unwrap();
        writer.write(wi, 0, &[0u8; 24]).unwrap();
        assert_eq!(
            files(&dir).len(),
            2,
            "the temporary file exists while writing"
        );
        drop(writer);
        assert_eq!(files(&dir), ["m.safetensors"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
