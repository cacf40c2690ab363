//! What the user hands in, turned into native files the averaging can stream.
//!
//! * a native safetensors file (ours, a training run's `epochN.safetensors`, an earlier soup) is
//!   used as it is;
//! * an official cn_clip `.pt` (needs the model config) or a Hugging Face directory is loaded into
//!   a model once (strict key and shape check) and written as a native fp32 file in the cache;
//! * a LoRA adapter file is merged into its base (`cnclip_lora`) and written the same way, so a
//!   LoRA run is averaged as the full model it stands for.
//!
//! Materialised files are keyed by their sources' identities, so each is made once.

use crate::cache::fnv1a64;
use crate::error::{SoupError, io_err};
use crate::score::file_identity;
use cnclip_model::weights::{is_native_metadata, read_safetensors_metadata};
use cnclip_model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A native file.
    Native(PathBuf),
    /// An official `.pt` or a Hugging Face directory.
    Foreign(PathBuf),
    /// A LoRA adapter file and the weights it was trained on.
    Lora { adapter: PathBuf, base: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Candidate {
    /// Short unique name for reports.
    pub name: String,
    /// The path as given (for reports).
    pub given: String,
    pub source: Source,
    /// Identity of the source files (cache keys).
    pub identity: String,
}

fn is_native(path: &Path) -> Result<bool, SoupError> {
    Ok(is_native_metadata(&read_safetensors_metadata(path)?))
}

/// Decides what each path is. Safetensors files that are not native models are taken as LoRA
/// adapters of `lora_base` (an error without one).
pub fn resolve(paths: &[PathBuf], lora_base: Option<&Path>) -> Result<Vec<Candidate>, SoupError> {
    let names = unique_names(paths);
    let mut out = Vec::with_capacity(paths.len());
    for (path, name) in paths.iter().zip(names) {
        let source = match WeightFormat::detect(path)? {
            WeightFormat::HuggingFace | WeightFormat::Pt => Source::Foreign(path.clone()),
            WeightFormat::Native if is_native(path)? => Source::Native(path.clone()),
            WeightFormat::Native => {
                if !crate::lora::is_adapter(path)? {
                    return Err(SoupError::NotNative {
                        path: path.clone(),
                        reason: "neither a native model nor a LoRA adapter (a training run's \
                                 .state.safetensors holds optimizer state; pass the model file)"
                            .into(),
                    });
                }
                let base = lora_base.ok_or_else(|| {
                    SoupError::Invalid(format!(
                        "{} is a LoRA adapter: pass the weights it was trained on with --lora-base",
                        path.display()
                    ))
                })?;
                Source::Lora {
                    adapter: path.clone(),
                    base: base.to_path_buf(),
                }
            }
        };
        let identity = match &source {
            Source::Native(p) => format!("native:{}", file_identity(p)?),
            Source::Foreign(p) if p.is_dir() => format!("hf:{}", dir_identity(p)?),
            Source::Foreign(p) => format!("pt:{}", file_identity(p)?),
            Source::Lora { adapter, base } => {
                let base_id = if base.is_dir() {
                    dir_identity(base)?
                } else {
                    file_identity(base)?
                };
                format!("lora:{}+base:{base_id}", file_identity(adapter)?)
            }
        };
        out.push(Candidate {
            name,
            given: path.display().to_string(),
            source,
            identity,
        });
    }
    Ok(out)
}

fn dir_identity(dir: &Path) -> Result<String, SoupError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    entries
        .iter()
        .map(|p| file_identity(p))
        .collect::<Result<Vec<_>, _>>()
        .map(|ids| ids.join(";"))
}

/// File stems, with parent directories prepended where two would collide (`run1/epoch3`).
pub fn unique_names(paths: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let mut parts: Vec<String> = p
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if let Some(last) = parts.last_mut() {
                *last = Path::new(last.as_str())
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| last.clone());
            }
            parts
        })
        .collect();
    let name = |i: usize, depth: usize| {
        let p = &parts[i];
        p[p.len().saturating_sub(depth)..].join("/")
    };
    let mut depth = vec![1usize; paths.len()];
    loop {
        let names: Vec<String> = (0..paths.len()).map(|i| name(i, depth[i])).collect();
        let mut changed = false;
        for i in 0..paths.len() {
            let clash = (0..paths.len()).any(|j| j != i && names[j] == names[i]);
            if clash && depth[i] < parts[i].len() {
                depth[i] += 1;
                changed = true;
            }
        }
        if !changed {
            // Identical paths given twice keep a counter.
            let mut out = names;
            for i in 0..out.len() {
                let n = (0..i).filter(|&j| out[j] == out[i]).count();
                if n > 0 {
                    out[i] = format!("{}#{}", out[i], n + 1);
                }
            }
            return out;
        }
    }
}

impl Candidate {
    /// The native file to stream: the source itself, or its materialisation under `work_dir`.
    /// `config` is required for an official `.pt` (it does not record its architecture).
    pub fn native_path(
        &self,
        work_dir: &Path,
        config: Option<&ClipConfig>,
    ) -> Result<PathBuf, SoupError> {
        let source_path = match &self.source {
            Source::Native(p) => return Ok(p.clone()),
            Source::Foreign(p) => p,
            Source::Lora { adapter, .. } => adapter,
        };
        let out = work_dir.join(format!(
            "{:016x}.safetensors",
            fnv1a64(self.identity.as_bytes())
        ));
        if out.is_file() {
            return Ok(out);
        }
        std::fs::create_dir_all(work_dir).map_err(io_err(work_dir))?;
        // An official .pt takes the flags' config, checked against its shapes, or without them
        // the shipped config its shapes match; the other formats carry their own.
        let options = LoadOptions {
            config: config.cloned(),
            ..Default::default()
        };
        match &self.source {
            Source::Native(_) => {}
            Source::Foreign(p) => {
                let model = Clip::load(p, &options, tch::Device::Cpu)?;
                model.save_native(&out)?;
            }
            Source::Lora { adapter, base } => {
                // An official .pt base without a config takes the one the adapter records.
                let (config, merged) = crate::lora::merged(base, &options, adapter)?;
                // Strict load: the merge must be exactly a model of the base's config.
                let mut model = Clip::new(&config, tch::Device::Cpu);
                model
                    .load_named(merged.iter(), false)
                    .map_err(|source| SoupError::Model {
                        path: source_path.clone(),
                        source,
                    })?;
                model.save_native(&out)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_unique() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            unique_names(&[
                p("a/run1/epoch3.safetensors"),
                p("a/run2/epoch3.safetensors"),
                p("b/x.pt")
            ]),
            vec!["run1/epoch3", "run2/epoch3", "x"]
        );
        assert_eq!(unique_names(&[p("x.pt"), p("x.pt")]), vec!["x", "x#2"]);
    }
}
