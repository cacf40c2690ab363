//! Destinations of an average: a native file written as the tensors arrive, a model's variables
//! (to score a merge without writing it), or an in-memory state dict; and [`average_files`], the
//! whole average from checkpoint paths to a file.

use crate::average::{ChunkSink, Plan, PlannedTensor, Sink, average, plan};
use crate::error::SoupError;
use cnclip_model::Clip;
use cnclip_model::weights::{NativeReader, NativeWriter, StateDict, native_metadata};
use std::collections::BTreeMap;
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

/// Streams the average into a native file through `cnclip_model::weights::NativeWriter` (the
/// layout and metadata of `save_native`, plus any extra metadata such as the soup's recipe):
/// float tensors arrive in pieces from several threads and are written at their offsets; the
/// file appears at `path` only when complete.
pub struct FileSink {
    path: PathBuf,
    extra: Vec<(String, String)>,
    writer: Option<NativeWriter>,
    durable: bool,
}

impl FileSink {
    pub fn new(path: impl AsRef<Path>, extra_metadata: Vec<(String, String)>) -> Self {
        FileSink {
            path: path.as_ref().to_path_buf(),
            extra: extra_metadata,
            writer: None,
            durable: true,
        }
    }

    /// Skip the fsync before the rename (the file may be lost on a power cut, never torn). For
    /// measurements; the tool always syncs.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

impl Sink for FileSink {
    fn begin(&mut self, plan: &Plan) -> Result<(), SoupError> {
        let mut metadata = native_metadata(&plan.config_json);
        metadata.extend(self.extra.iter().cloned());
        let layout = plan
            .tensors
            .iter()
            .map(|t| (t.key.clone(), t.dtype, t.shape.clone()))
            .collect();
        let writer = NativeWriter::create(&self.path, metadata, layout)?.durable(self.durable);
        // The plan lays tensors out as the writer does; a difference would misplace bytes.
        for t in &plan.tensors {
            let at = writer.index_of(&t.key).map(|i| writer.entries()[i].start);
            if at != Some(t.offset) {
                return Err(SoupError::Invalid(format!(
                    "tensor {}: planned at byte {}, laid out at {at:?}",
                    t.key, t.offset
                )));
            }
        }
        self.writer = Some(writer);
        Ok(())
    }

    fn tensor(&mut self, t: &PlannedTensor, bytes: &[u8]) -> Result<(), SoupError> {
        self.write_chunk(t, 0, bytes)
    }

    fn chunks(&self) -> Option<&dyn ChunkSink> {
        Some(self)
    }

    fn finish(&mut self, _: &Plan) -> Result<(), SoupError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| SoupError::Invalid("FileSink::finish before begin".into()))?;
        Ok(writer.finish()?)
    }
}

impl ChunkSink for FileSink {
    fn write_chunk(&self, t: &PlannedTensor, offset: usize, bytes: &[u8]) -> Result<(), SoupError> {
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| SoupError::Invalid("FileSink written before begin".into()))?;
        let index = writer
            .index_of(&t.key)
            .ok_or_else(|| SoupError::Invalid(format!("no tensor {} in the file", t.key)))?;
        Ok(writer.write(index, offset, bytes)?)
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
        .map(NativeReader::open)
        .collect::<Result<Vec<_>, _>>()?;
    let members: Vec<(&NativeReader, f64)> =
        opened.iter().zip(weights).map(|(c, &w)| (c, w)).collect();
    let plan = plan(&members)?;
    let mut sink = FileSink::new(out, extra_metadata.to_vec());
    average(&members, &plan, &mut sink, &mut |_| {})
}
