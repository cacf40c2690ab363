//! Weight files: official cn_clip `.pt` checkpoints, Hugging Face `ChineseCLIPModel` directories and
//! the native safetensors format, all read into a [`StateDict`] keyed by cn_clip's names.
//!
//! * [`read_pt`] reads any `torch.save` zip archive (torch ≥ 1.6) in pure Rust: the workspace's
//!   pickle machine (`cnclip-pickle`) with an allow-list of only plain containers, numbers, strings and tensors (what
//!   `torch.load(weights_only=True)` accepts), and reads each referenced storage once, straight from
//!   the file. Tensors outside the state dict (an optimizer's moments) are never read.
//!   [`normalize_cn_clip_keys`] then strips `module.` as cn_clip's loaders do.
//! * [`write_pt`] writes the official layout (`{"epoch","step","name","state_dict"}` with `module.`
//!   keys) that `torch.load` (also with `weights_only=True`) and cn_clip read.
//! * [`import_hf`] maps a `ChineseCLIPModel` directory (config.json + safetensors or
//!   `pytorch_model.bin`) onto cn_clip's names and config; [`export_hf`] writes one (with
//!   tokenizer and image-processor files) through the same key mapping.
//! * [`NativeReader`] / [`NativeWriter`] (and [`save_native`] / [`load_native`] over them):
//!   safetensors with cn_clip names whose metadata records the model config, so the file alone
//!   describes the model; memory-mapped reads, tensor by tensor, and streamed atomic writes. The
//!   workspace's only safetensors reader and writer ([`SafetensorsReader`] for files of any
//!   metadata: training state, adapters, Hugging Face weights).

mod error;
mod hf;
mod infer;
mod native;
mod pickle;
mod pt;
mod state_dict;

pub use error::WeightsError;
pub(crate) use hf::read_hf_weights;
pub use hf::{
    HF_TRANSFORMERS_VERSION, clip_to_hf_config, export_hf, hf_config_to_clip, hf_module_name,
    hf_state_dict, import_hf,
};
pub use infer::{ArchShapes, TextShapes, VisionShapes};
pub use native::{
    NATIVE_CONFIG_KEY, NATIVE_FORMAT, NATIVE_FORMAT_KEY, NATIVE_VERSION, NATIVE_VERSION_KEY,
    NativeReader, NativeWriter, SafetensorsReader, TensorEntry, dtype_of, is_native_metadata,
    kind_of, load_native, native_metadata, read_safetensors, read_safetensors_metadata,
    save_native, save_safetensors,
};
pub use pt::{
    PtCheckpoint, PtHeader, normalize_cn_clip_keys, read_pt, write_pt, write_pt_state_dict,
};
pub use state_dict::{KeyReport, StateDict};

use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Kind;

/// Bytes per element of the dtypes weight files may hold, or `None` for kinds we do not store.
fn element_size(kind: Kind) -> Option<usize> {
    Some(match kind {
        Kind::Bool | Kind::Uint8 | Kind::Int8 => 1,
        Kind::Int16 | Kind::Half | Kind::BFloat16 => 2,
        Kind::Int | Kind::Float => 4,
        Kind::Int64 | Kind::Double => 8,
        _ => return None,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies a tensor's elements (row-major, on the CPU) into a byte vector.
fn tensor_bytes(path: &Path, key: &str, tensor: &tch::Tensor) -> Result<Vec<u8>, WeightsError> {
    let kind = tensor.f_kind().map_err(|source| WeightsError::Torch {
        path: path.to_path_buf(),
        key: key.to_string(),
        source,
    })?;
    let elt = element_size(kind).ok_or_else(|| WeightsError::UnsupportedDtype {
        path: path.to_path_buf(),
        what: format!("tensor {key}"),
        dtype: format!("{kind:?}"),
    })?;
    let numel = tensor.numel();
    let mut buf = vec![0u8; numel * elt];
    if numel > 0 {
        tensor
            .f_copy_data_u8(&mut buf, numel)
            .map_err(|source| WeightsError::Torch {
                path: path.to_path_buf(),
                key: key.to_string(),
                source,
            })?;
    }
    Ok(buf)
}

/// Builds a 1-D or shaped tensor from little-endian bytes; `bytes` must hold exactly the elements.
fn tensor_from_bytes(
    path: &Path,
    key: &str,
    bytes: &[u8],
    shape: &[i64],
    kind: Kind,
) -> Result<tch::Tensor, WeightsError> {
    let elt = element_size(kind).ok_or_else(|| WeightsError::UnsupportedDtype {
        path: path.to_path_buf(),
        what: format!("tensor {key}"),
        dtype: format!("{kind:?}"),
    })?;
    let numel = shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    });
    if numel.and_then(|n| n.checked_mul(elt)) != Some(bytes.len()) {
        return Err(WeightsError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "tensor {key}: shape {shape:?} of {kind:?} does not match {} bytes of data",
                bytes.len()
            ),
        });
    }
    tch::Tensor::f_from_data_size(bytes, shape, kind).map_err(|source| WeightsError::Torch {
        path: path.to_path_buf(),
        key: key.to_string(),
        source,
    })
}

/// A file written under a temporary name next to its target and renamed over it at the end
/// ([`AtomicFile::commit`]); dropped uncommitted, the temporary file is removed and the target is
/// untouched. The temporary name is `.NAME.tmp-PID-N` (what a run directory's clean-up removes).
#[derive(Debug)]
struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once committed.
    file: Option<std::fs::File>,
}

impl AtomicFile {
    fn create(path: &Path) -> Result<Self, WeightsError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or_else(|| WeightsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?;
        // Unique per process and call, so concurrent writers never share a temporary file.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{n}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// The open temporary file (`None` after commit).
    fn file(&self) -> Option<&std::fs::File> {
        self.file.as_ref()
    }

    fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Fsyncs (when `durable`) and renames the file over the target, then syncs the directory
    /// (failure to sync a directory is not worth failing over).
    fn commit(&mut self, durable: bool) -> Result<(), WeightsError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let done = (|| {
            if durable {
                file.sync_all().map_err(io_err(&self.tmp))?;
            }
            drop(file);
            std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
            return done;
        }
        if durable
            && let Some(dir) = self.tmp.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Still open: the write failed or was abandoned part-way.
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a file atomically ([`AtomicFile`]): `write` fills the temporary file through a buffer,
/// which is flushed, fsynced and renamed over `path`.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> Result<(), WeightsError>,
) -> Result<(), WeightsError> {
    let mut atomic = AtomicFile::create(path)?;
    if let Some(file) = atomic.file() {
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut writer)?;
        writer.flush().map_err(io_err(atomic.tmp()))?;
    }
    atomic.commit(true)
}
