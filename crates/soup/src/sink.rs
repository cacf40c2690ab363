//! Destinations of an average: a native file written as the tensors arrive, a model's variables
//! (to score a merge without writing it), or an in-memory state dict; and [`average_files`], the
//! whole average from checkpoint paths to a file.

use crate::average::{ChunkSink, Plan, PlannedTensor, Sink, average, plan};
use crate::checkpoint::NativeCheckpoint;
use crate::error::{SoupError, io_err};
use cnclip_model::Clip;
use cnclip_model::weights::{
    NATIVE_CONFIG_KEY, NATIVE_FORMAT, NATIVE_FORMAT_KEY, NATIVE_VERSION, NATIVE_VERSION_KEY,
    StateDict,
};
use safetensors::tensor::{Metadata, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub(crate) fn to_tensor(t: &PlannedTensor, bytes: &[u8]) -> Result<Tensor, SoupError> {
    let kind = cnclip_model::weights::kind_of(t.dtype)
        .ok_or_else(|| SoupError::Invalid(format!("{:?}", t.dtype)))?;
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(bytes, &shape, kind).map_err(|source| SoupError::Torch {
        key: t.key.clone(),
        source,
    })
}

/// Streams a native checkpoint (the layout and metadata of `save_native`, plus any extra metadata
/// such as the soup's recipe) into a temporary file next to `path`, fsynced and renamed over it at
/// the end; on error the temporary file is removed and `path` is untouched. Float tensors arrive
/// in pieces from several threads and are written at their offsets (`pwrite`).
pub struct FileSink {
    path: PathBuf,
    tmp: PathBuf,
    extra: Vec<(String, String)>,
    file: Option<std::fs::File>,
    data_start: u64,
    durable: bool,
}

impl FileSink {
    pub fn new(path: impl AsRef<Path>, extra_metadata: Vec<(String, String)>) -> Self {
        let path = path.as_ref().to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        FileSink {
            path,
            tmp,
            extra: extra_metadata,
            file: None,
            data_start: 0,
            durable: true,
        }
    }

    /// Skip the fsync before the rename (the file may be lost on a power cut, never torn). For
    /// measurements; the tool always syncs.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    fn header(&self, plan: &Plan) -> Result<Vec<u8>, SoupError> {
        let mut metadata: HashMap<String, String> = HashMap::from([
            (NATIVE_FORMAT_KEY.to_string(), NATIVE_FORMAT.to_string()),
            (NATIVE_VERSION_KEY.to_string(), NATIVE_VERSION.to_string()),
            (NATIVE_CONFIG_KEY.to_string(), plan.config_json.clone()),
            ("format".to_string(), "pt".to_string()),
        ]);
        metadata.extend(self.extra.iter().cloned());
        let infos = plan
            .tensors
            .iter()
            .map(|t| {
                (
                    t.key.clone(),
                    TensorInfo {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        data_offsets: (t.offset, t.offset + t.nbytes()),
                    },
                )
            })
            .collect();
        let bad = |reason: String| SoupError::Safetensors {
            path: self.path.clone(),
            reason,
        };
        let header = Metadata::new(Some(metadata), infos).map_err(|e| bad(e.to_string()))?;
        let mut header = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
        header.resize(header.len().next_multiple_of(8), b' ');
        Ok(header)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), SoupError> {
        let Some(file) = &self.file else {
            return Err(SoupError::Invalid("FileSink written before begin".into()));
        };
        write_all_at(file, bytes, offset).map_err(io_err(&self.tmp))
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

impl Sink for FileSink {
    fn begin(&mut self, plan: &Plan) -> Result<(), SoupError> {
        let header = self.header(plan)?;
        let mut file = std::fs::File::create(&self.tmp).map_err(io_err(&self.tmp))?;
        let data: usize = plan.tensors.iter().map(|t| t.nbytes()).sum();
        self.data_start = 8 + header.len() as u64;
        file.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| file.write_all(&header))
            .and_then(|()| file.set_len(self.data_start + data as u64))
            .map_err(io_err(&self.tmp))?;
        self.file = Some(file);
        Ok(())
    }

    fn tensor(&mut self, t: &PlannedTensor, bytes: &[u8]) -> Result<(), SoupError> {
        self.write_chunk(t, 0, bytes)
    }

    fn chunks(&self) -> Option<&dyn ChunkSink> {
        Some(self)
    }

    fn finish(&mut self, _: &Plan) -> Result<(), SoupError> {
        let Some(file) = self.file.take() else {
            return Err(SoupError::Invalid("FileSink::finish before begin".into()));
        };
        let done = (|| {
            if self.durable {
                file.sync_all()?;
            }
            drop(file);
            std::fs::rename(&self.tmp, &self.path)
        })();
        if let Err(source) = done {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(SoupError::Io {
                path: self.path.clone(),
                source,
            });
        }
        Ok(())
    }
}

impl ChunkSink for FileSink {
    fn write_chunk(&self, t: &PlannedTensor, offset: usize, bytes: &[u8]) -> Result<(), SoupError> {
        self.write_at(self.data_start + (t.offset + offset) as u64, bytes)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // Still open: the average failed part-way.
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Copies each averaged tensor straight into a model's variable (cast to the variable's dtype,
/// moved to its device), so scoring a merge holds one model and one tensor, never a second copy.
pub struct ModelSink {
    model: Clip,
    vars: BTreeMap<String, Tensor>,
    path: PathBuf,
    /// libtorch's thread count while averaging, restored after.
    threads: Option<TorchThreads>,
}

/// One libtorch thread while rayon computes the average: torch's OpenMP workers spin after each
/// parallel copy and would fight rayon's for the cores (3× slower measured on 2 cores).
struct TorchThreads(i32);

impl TorchThreads {
    fn one() -> Self {
        let previous = tch::get_num_threads();
        tch::set_num_threads(1);
        TorchThreads(previous)
    }
}

impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

impl ModelSink {
    /// A model of `plan`'s config on `device`; `name` labels errors.
    pub fn new(plan: &Plan, device: tch::Device, name: &Path) -> Self {
        let model = Clip::new(&plan.config, device);
        let vars = model.named_tensors();
        ModelSink {
            model,
            vars,
            path: name.to_path_buf(),
            threads: None,
        }
    }

    pub fn into_model(mut self) -> Clip {
        self.threads = None;
        self.model
    }
}

impl Sink for ModelSink {
    fn begin(&mut self, plan: &Plan) -> Result<(), SoupError> {
        let planned: BTreeMap<&str, ()> =
            plan.tensors.iter().map(|t| (t.key.as_str(), ())).collect();
        let missing: Vec<String> = self
            .vars
            .keys()
            .filter(|k| !planned.contains_key(k.as_str()))
            .cloned()
            .collect();
        let unexpected: Vec<String> = planned
            .keys()
            .filter(|k| !self.vars.contains_key(**k))
            .map(|k| k.to_string())
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(SoupError::Model {
                path: self.path.clone(),
                source: cnclip_model::model::ModelError::KeyMismatch {
                    missing,
                    unexpected,
                },
            });
        }
        self.threads = Some(TorchThreads::one());
        Ok(())
    }

    fn tensor(&mut self, t: &PlannedTensor, bytes: &[u8]) -> Result<(), SoupError> {
        let src = to_tensor(t, bytes)?;
        let Some(var) = self.vars.get(&t.key) else {
            return Err(SoupError::Invalid(format!("no variable {}", t.key)));
        };
        if src.size() != var.size() {
            return Err(SoupError::Model {
                path: self.path.clone(),
                source: cnclip_model::model::ModelError::ShapeMismatch {
                    key: t.key.clone(),
                    expected: var.size(),
                    found: src.size(),
                },
            });
        }
        let mut var = var.shallow_clone();
        tch::no_grad(|| var.f_copy_(&src)).map_err(|source| SoupError::Torch {
            key: t.key.clone(),
            source,
        })
    }

    fn finish(&mut self, _: &Plan) -> Result<(), SoupError> {
        self.threads = None;
        Ok(())
    }
}

/// Collects the average as a state dict (CPU tensors in the output dtypes).
#[derive(Default)]
pub struct StateDictSink {
    pub state_dict: StateDict,
}

impl Sink for StateDictSink {
    fn begin(&mut self, _: &Plan) -> Result<(), SoupError> {
        Ok(())
    }

    fn tensor(&mut self, t: &PlannedTensor, bytes: &[u8]) -> Result<(), SoupError> {
        self.state_dict.insert(t.key.clone(), to_tensor(t, bytes)?);
        Ok(())
    }

    fn finish(&mut self, _: &Plan) -> Result<(), SoupError> {
        Ok(())
    }
}

/// The in-memory average of whole state dicts with torch ops (`x₀·w₀ + x₁·w₁ + …` in fp32, then
/// the members' dtype): the reference the streamed average is tested against, and the way to
/// average weights that already live in memory. Same rules as [`crate::average::plan`] for keys,
/// shapes and non-float tensors.
pub fn average_state_dicts(members: &[(&StateDict, f64)]) -> Result<StateDict, SoupError> {
    let Some(&(first, _)) = members.first() else {
        return Err(SoupError::Invalid(
            "a soup needs at least one member".into(),
        ));
    };
    let mut out = StateDict::with_capacity(first.len());
    for (m, (sd, _)) in members.iter().enumerate().skip(1) {
        if let Some((key, _)) = sd.iter().find(|(k, _)| first.get(k).is_none()) {
            return Err(SoupError::UnexpectedKey {
                first: PathBuf::from("member 0"),
                path: PathBuf::from(format!("member {m}")),
                key: key.to_string(),
            });
        }
    }
    for (key, t0) in first.iter() {
        let torch = |source| SoupError::Torch {
            key: key.to_string(),
            source,
        };
        let mut tensors = vec![t0];
        for (m, (sd, _)) in members.iter().enumerate().skip(1) {
            let t = sd.get(key).ok_or_else(|| SoupError::MissingKey {
                first: PathBuf::from("member 0"),
                path: PathBuf::from(format!("member {m}")),
                key: key.to_string(),
            })?;
            if t.size() != t0.size() {
                return Err(SoupError::ShapeMismatch {
                    first: PathBuf::from("member 0"),
                    path: PathBuf::from(format!("member {m}")),
                    key: key.to_string(),
                    expected: t0.size().iter().map(|&d| d as usize).collect(),
                    found: t.size().iter().map(|&d| d as usize).collect(),
                });
            }
            tensors.push(t);
        }
        let kind0 = t0.f_kind().map_err(torch)?;
        let merged = if t0.is_floating_point() {
            let wide = tensors.iter().any(|t| t.kind() == Kind::Double);
            let acc_kind = if wide { Kind::Double } else { Kind::Float };
            let out_kind = if tensors.iter().all(|t| t.kind() == kind0) {
                kind0
            } else {
                acc_kind
            };
            let mut acc: Option<Tensor> = None;
            for (t, &(_, w)) in tensors.iter().zip(members) {
                let term = t
                    .f_to_kind(acc_kind)
                    .map_err(torch)?
                    .f_mul_scalar(w)
                    .map_err(torch)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => a.f_add(&term).map_err(torch)?,
                });
            }
            match acc {
                Some(a) => a.f_to_kind(out_kind).map_err(torch)?,
                None => return Err(SoupError::Invalid("no members".into())),
            }
        } else if key.ends_with("num_batches_tracked") {
            let mut m = t0.shallow_clone();
            for t in &tensors[1..] {
                m = m.f_maximum(t).map_err(torch)?;
            }
            m
        } else {
            for (i, t) in tensors.iter().enumerate().skip(1) {
                if t.kind() != kind0 || !t.equal(t0) {
                    return Err(SoupError::NonFloatDiffers {
                        first: PathBuf::from("member 0"),
                        path: PathBuf::from(format!("member {i}")),
                        key: key.to_string(),
                        dtype: format!("{kind0:?}"),
                    });
                }
            }
            t0.shallow_clone()
        };
        out.insert(key.to_string(), merged);
    }
    Ok(out)
}

/// Opens `paths` and averages them with `weights` into a native file at `out` (atomically).
pub fn average_files(
    paths: &[&Path],
    weights: &[f64],
    out: &Path,
    extra_metadata: &[(String, String)],
) -> Result<(), SoupError> {
    if paths.len() != weights.len() {
        return Err(SoupError::Invalid(format!(
            "{} checkpoints but {} weights",
            paths.len(),
            weights.len()
        )));
    }
    let opened = paths
        .iter()
        .map(NativeCheckpoint::open)
        .collect::<Result<Vec<_>, _>>()?;
    let members: Vec<(&NativeCheckpoint, f64)> =
        opened.iter().zip(weights).map(|(c, &w)| (c, w)).collect();
    let plan = plan(&members)?;
    let mut sink = FileSink::new(out, extra_metadata.to_vec());
    average(&members, &plan, &mut sink, &mut |_| {})
}
