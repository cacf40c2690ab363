//! A native checkpoint opened for streaming: the header parsed once, the data memory-mapped, so a
//! tensor is read only when the averaging reaches it and never copied whole into memory.

use crate::error::{SoupError, io_err};
use cnclip_model::ClipConfig;
use cnclip_model::weights::{
    NATIVE_CONFIG_KEY, NATIVE_FORMAT, NATIVE_FORMAT_KEY, NATIVE_VERSION, NATIVE_VERSION_KEY,
};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub start: usize,
    pub end: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A native file (`cnclip_model::weights::save_native`, a training run's model file, or a soup).
pub struct NativeCheckpoint {
    path: PathBuf,
    config: ClipConfig,
    config_json: String,
    /// In file (offset) order, which is the order the file's writer gave them.
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    mmap: Mmap,
    data_start: usize,
}

impl std::fmt::Debug for NativeCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl NativeCheckpoint {
    /// Opens and checks the header: format, version and config in the metadata, offsets inside the
    /// file. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SoupError> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the map is read-only; a checkpoint rewritten under us while we read it yields
        // wrong numbers, never undefined behaviour in our code (bytes are only copied out).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| SoupError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let not_native = |reason: String| SoupError::NotNative {
            path: path.clone(),
            reason,
        };
        let meta = metadata.metadata().clone().unwrap_or_default();
        match meta.get(NATIVE_FORMAT_KEY) {
            Some(f) if f == NATIVE_FORMAT => {}
            Some(f) => {
                return Err(not_native(format!(
                    "{NATIVE_FORMAT_KEY} is {f:?}, expected {NATIVE_FORMAT:?}"
                )));
            }
            None => {
                return Err(not_native(format!(
                    "its metadata has no {NATIVE_FORMAT_KEY} (a training run's .state.safetensors \
                     or a LoRA adapter is not a model; pass the model file, or the adapter with \
                     its base)"
                )));
            }
        }
        match meta.get(NATIVE_VERSION_KEY).map(String::as_str) {
            Some(NATIVE_VERSION) => {}
            other => {
                return Err(not_native(format!(
                    "format version {other:?}, this build reads {NATIVE_VERSION:?}"
                )));
            }
        }
        let config_json = meta
            .get(NATIVE_CONFIG_KEY)
            .ok_or_else(|| not_native(format!("its metadata has no {NATIVE_CONFIG_KEY}")))?
            .clone();
        let config =
            ClipConfig::from_json_str(&config_json, &format!("{} metadata", path.display()))
                .map_err(|e| not_native(e.to_string()))?;
        let mut entries = Vec::new();
        for key in metadata.offset_keys() {
            let Some(info) = metadata.info(&key) else {
                continue;
            };
            entries.push(Entry {
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
        Ok(NativeCheckpoint {
            path,
            config,
            config_json,
            entries,
            index,
            mmap,
            data_start: 8 + header_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The config exactly as stored (what a soup of this file records).
    pub fn config_json(&self) -> &str {
        &self.config_json
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.index.get(key).map(|&i| &self.entries[i])
    }

    /// The raw little-endian bytes of a tensor (offsets were checked against the file when the
    /// header was parsed).
    pub fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.mmap[self.data_start + entry.start..self.data_start + entry.end]
    }

    /// Tells the kernel the whole data section will be read front to back.
    pub fn advise_sequential(&self) {
        #[cfg(unix)]
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }
}
