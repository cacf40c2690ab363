//! cn_clip's pretraining initialisation (`clip/utils.py:load` → `model.py:restore_model`), behind
//! `finetune --clip-weight-path / --bert-weight-path`:
//!
//! * the vision tower and `logit_scale` from an OpenAI-CLIP state dict: every key that starts with
//!   `visual` or is `logit_scale` (OpenAI's and cn_clip's vision towers share their key names; the
//!   OpenAI text tower is not read);
//! * the text tower from a BERT/RoBERTa checkpoint in Hugging Face's layout: every key that starts
//!   with `bert` except `bert.pooler.*` (`cls.*` and the like are not read);
//! * before loading, `convert_weights` rounds the whole model's converted weights (every Conv,
//!   Linear and attention projection, the whole BERT, both projections) to fp16, the randomly
//!   initialised ones included; the loaded values land in those fp16 weights, so they are rounded
//!   to fp16 too. The vision LayerNorms, class and positional embeddings, BatchNorms and
//!   `logit_scale` keep the file's values exactly. (main.py then makes everything fp32 again.)
//! * a positional embedding of another grid is resized (`resize_pos_embed`, bicubic);
//! * the load is non-strict: model keys the files do not have keep their initialisation, and keys
//!   taken from a file that the model does not have are ignored (both reported in [`InitReport`]).
//!   A shape mismatch is an error naming the file and the key, as torch's `load_state_dict`.
//!
//! Beyond cn_clip, a file that initialises nothing is refused rather than silently ignored (a
//! cn_clip training checkpoint given as the CLIP state dict, a bare `BertModel` save whose keys
//! lack `bert.`), and besides `torch.save` files (`pytorch_model.bin`, any `.pt`/`.bin`), a
//! `.safetensors` file or a Hugging Face directory (`model.safetensors`, `pytorch_model.bin` or
//! their sharded indexes) is read.

use crate::model::{
    Clip, ModelError, Precision, converted_by_cn_clip, resize_positional_embedding,
};
use crate::weights::{self, StateDict, WeightsError};
use std::path::{Path, PathBuf};
use tch::Kind;

/// Which tower a pretraining file initialises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSource {
    /// `--clip-weight-path`: an OpenAI-CLIP state dict (`visual*`, `logit_scale`).
    Clip,
    /// `--bert-weight-path`: a BERT/RoBERTa checkpoint (`bert*` except `bert.pooler`).
    Bert,
}

impl InitSource {
    /// The `finetune` flag that names such a file.
    pub fn flag(self) -> &'static str {
        match self {
            InitSource::Clip => "clip-weight-path",
            InitSource::Bert => "bert-weight-path",
        }
    }

    /// Whether cn_clip's `restore_model` takes `key` from a file of this kind.
    pub fn takes(self, key: &str) -> bool {
        match self {
            InitSource::Clip => key.starts_with("visual") || key == "logit_scale",
            InitSource::Bert => key.starts_with("bert") && !key.contains("bert.pooler"),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            InitSource::Clip => {
                "a bare state dict of OpenAI CLIP (keys `visual.*` and `logit_scale`, e.g. \
                 torch.save(clip_model.state_dict(), f))"
            }
            InitSource::Bert => {
                "a BERT/RoBERTa checkpoint with `bert.*` keys (a Hugging Face BertForPreTraining or \
                 BertForMaskedLM save: pytorch_model.bin or model.safetensors)"
            }
        }
    }
}

/// What one pretraining file did to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub source: InitSource,
    /// The file the weights were read from (inside a directory: the file found there).
    pub path: PathBuf,
    /// Model keys set from the file.
    pub loaded: Vec<String>,
    /// Keys cn_clip takes from such a file that the model does not have: ignored, as cn_clip's
    /// non-strict `load_state_dict` ignores them.
    pub ignored: Vec<String>,
    /// The positional embedding was resized from another grid.
    pub resized_positional_embedding: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--{flag}: {} does not exist", path.display())]
    NotFound { flag: &'static str, path: PathBuf },
    #[error("--{flag}: {source}")]
    Weights {
        flag: &'static str,
        source: Box<WeightsError>,
    },
    #[error("--{flag}: {}: {reason}", path.display())]
    Nothing {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--{flag}: {}: {source}", path.display())]
    Model {
        flag: &'static str,
        path: PathBuf,
        source: Box<ModelError>,
    },
}

/// Reads a pretraining file as `torch.load` would give it to cn_clip: a `torch.save` file, a
/// `.safetensors` file, or a Hugging Face directory. Returns the file read and its state dict
/// (keys as stored). A `torch.save` file holding a checkpoint dict (`{"state_dict": …}`) rather
/// than a bare state dict gives nothing to cn_clip, whose `restore_model` iterates the top level.
pub fn read_init_file(source: InitSource, path: &Path) -> Result<(PathBuf, StateDict), InitError> {
    let flag = source.flag();
    let weights = |source| InitError::Weights {
        flag,
        source: Box::new(source),
    };
    if path.is_dir() {
        return weights::read_hf_weights(path).map_err(weights);
    }
    if !path.exists() {
        return Err(InitError::NotFound {
            flag,
            path: path.to_path_buf(),
        });
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        let (sd, _) = weights::read_safetensors(path).map_err(weights)?;
        return Ok((path.to_path_buf(), sd));
    }
    let pt = weights::read_pt(path).map_err(|e| match e {
        // torch.load gives cn_clip a ScriptModule here, which restore_model cannot iterate.
        WeightsError::UnknownGlobal { ref module, .. } if module.starts_with("__torch__") => {
            InitError::Nothing {
                flag,
                path: path.to_path_buf(),
                reason: format!(
                    "a TorchScript archive (as OpenAI's released .pt files are), not a state \
                     dict; extract its weights first: torch.save(torch.jit.load(f, \
                     map_location=\"cpu\").state_dict(), \"state_dict.pt\"); expected {}",
                    source.expected()
                ),
            }
        }
        other => weights(other),
    })?;
    if !pt.bare_state_dict {
        return Err(InitError::Nothing {
            flag,
            path: path.to_path_buf(),
            reason: format!(
                "a checkpoint dict (with a \"state_dict\" entry), from which cn_clip takes nothing; \
                 expected {} (a cn_clip checkpoint goes to --resume)",
                source.expected()
            ),
        });
    }
    Ok((path.to_path_buf(), pt.state_dict))
}

impl Clip {
    /// cn_clip's initialisation from pretrained towers (see the module doc): `clip` and `bert` are
    /// the paths of `--clip-weight-path` and `--bert-weight-path`. Every file is read and checked
    /// before the model changes; on error the model is as it was. With neither, only
    /// `convert_weights`' fp16 rounding is applied: cn_clip's `main.py` calls `load()` for a
    /// model from scratch too.
    pub fn init_from_pretrained(
        &mut self,
        clip: Option<&Path>,
        bert: Option<&Path>,
    ) -> Result<Vec<InitReport>, InitError> {
        let vars = self.var_store().variables();
        let grid = self.config().vision.grid();
        let mut plan = Vec::new();
        let mut reports = Vec::new();
        for (source, path) in [(InitSource::Clip, clip), (InitSource::Bert, bert)] {
            let Some(path) = path else { continue };
            let flag = source.flag();
            let (file, sd) = read_init_file(source, path)?;
            let model_error = |source| InitError::Model {
                flag,
                path: file.clone(),
                source: Box::new(source),
            };
            let mut report = InitReport {
                source,
                path: file.clone(),
                loaded: Vec::new(),
                ignored: Vec::new(),
                resized_positional_embedding: false,
            };
            for (key, tensor) in sd.iter() {
                if !source.takes(key) {
                    continue;
                }
                let Some(var) = vars.get(key) else {
                    report.ignored.push(key.to_string());
                    continue;
                };
                let mut src = tensor.shallow_clone();
                if key == "visual.positional_embedding"
                    && src.size() != var.size()
                    && let Some(resized) = resize_positional_embedding(&src, grid)
                {
                    src = resized;
                    report.resized_positional_embedding = true;
                }
                if src.size() != var.size() {
                    return Err(model_error(ModelError::ShapeMismatch {
                        key: key.to_string(),
                        expected: var.size(),
                        found: src.size(),
                    }));
                }
                if src.is_floating_point() != var.is_floating_point() {
                    return Err(model_error(ModelError::DtypeMismatch {
                        key: key.to_string(),
                        expected: var.kind(),
                        found: src.kind(),
                    }));
                }
                report.loaded.push(key.to_string());
                plan.push((
                    flag,
                    file.clone(),
                    key.to_string(),
                    var.shallow_clone(),
                    src,
                ));
            }
            if report.loaded.is_empty() {
                let found: Vec<&str> = sd.keys().take(8).collect();
                return Err(InitError::Nothing {
                    flag,
                    path: file.clone(),
                    reason: format!(
                        "no key of it initialises this model (cn_clip would silently load \
                         nothing); expected {}; the file's first keys: {}",
                        source.expected(),
                        if found.is_empty() {
                            "none".to_string()
                        } else {
                            found.join(", ")
                        }
                    ),
                });
            }
            reports.push(report);
        }
        // convert_weights: the whole model's converted weights become fp16 (and fp32 again).
        self.set_precision(Precision::Fp32Fp16Rounded);
        tch::no_grad(|| {
            for (flag, path, key, mut var, src) in plan {
                // The value lands in an fp16 weight where cn_clip converted it: one rounding from
                // the file's dtype, as torch's copy_ into a half tensor.
                let value = if converted_by_cn_clip(&key) {
                    src.to_kind(Kind::Half)
                } else {
                    src
                };
                var.f_copy_(&value).map_err(|source| InitError::Model {
                    flag,
                    path,
                    source: Box::new(ModelError::Copy { key, source }),
                })?;
            }
            Ok(())
        })?;
        Ok(reports)
    }
}
