//! One entry point from "a path the user gave" to a ready model: an official cn_clip `.pt`
//! checkpoint, a Hugging Face `ChineseCLIPModel` directory, or a native safetensors file.

use crate::config::ClipConfig;
use crate::model::{Clip, ModelError};
use crate::weights::{self, ArchShapes, PtHeader, StateDict, WeightsError};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// `error` is in the message and deliberately not the error's `source()`: reporters that
    /// print the chain (anyhow's `Caused by:`) would print a list of missing keys twice.
    #[error("{path}: {error}")]
    Model { path: PathBuf, error: ModelError },
    #[error(
        "{path} is an official .pt checkpoint, which does not record its architecture, and {found}: \
         {hint}"
    )]
    ConfigRequired {
        path: PathBuf,
        found: String,
        hint: String,
    },
    #[error(
        "{path}'s tensor shapes do not fit the requested model:\n  {}\n{hint}",
        differences.join("\n  ")
    )]
    ShapeMismatch {
        path: PathBuf,
        differences: Vec<String>,
        hint: String,
    },
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
}

/// The kind of weight file at a path, decided by what is there rather than by name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `torch.save` zip archive: official checkpoints and cn_clip training checkpoints.
    Pt,
    /// A directory with `config.json` (Hugging Face `ChineseCLIPModel`).
    HuggingFace,
    /// Our safetensors file with the config in its metadata.
    Native,
}

impl WeightFormat {
    pub fn detect(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            return Ok(WeightFormat::HuggingFace);
        }
        if !path.exists() {
            return Err(LoadError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        Ok(if is_safetensors {
            WeightFormat::Native
        } else {
            WeightFormat::Pt
        })
    }
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The architecture, used when the file carries none (an official `.pt`): checked against
    /// the tensor shapes, and inferred from them when `None` (see [`pt_config`]). A file that
    /// records its config (native, Hugging Face) is loaded with its own, whatever is given here,
    /// so a caller passes the user's `--vision-model`/`--text-model` without asking the format.
    pub config: Option<ClipConfig>,
    /// Resize a ViT positional embedding whose grid differs from the config's (fine-tuning at
    /// another resolution), as cn_clip's training resume does. Off: a mismatch is an error.
    pub resize_pos_embed: bool,
}

/// The config of an official `.pt` state dict, which records none, and the shipped pair it is
/// (`VISION@TEXT`) if it is one.
///
/// With `requested` (the user's `--vision-model`/`--text-model`): that config, if its sizes fit the
/// tensor shapes; otherwise [`LoadError::ShapeMismatch`] naming each tensor whose shape differs
/// (the key, the shape the config implies and the file's) and the flags that would fit. With
/// `resize_pos_embed`, a ViT positional embedding of another grid is no mismatch (it is resized).
///
/// Without: the shipped tower pair the shapes match (see [`ArchShapes`] for why that fixes the
/// attention heads, which the shapes do not hold). Shapes that match no shipped pair, or several,
/// are [`LoadError::ConfigRequired`], which says what the shapes are, which towers they do match
/// and which flags to pass.
pub fn pt_config(
    path: &Path,
    state_dict: &StateDict,
    requested: Option<&ClipConfig>,
    resize_pos_embed: bool,
) -> Result<(ClipConfig, Option<String>), LoadError> {
    let shapes = ArchShapes::from_state_dict(state_dict);
    let matches = shapes
        .as_ref()
        .map(|s| s.shipped_matches())
        .unwrap_or_default();
    let named = |(v, t, _): &(&str, &str, ClipConfig)| format!("{v}@{t}");
    let single = match matches.as_slice() {
        [one] => Some(one),
        _ => None,
    };
    let several = || matches.iter().map(named).collect::<Vec<_>>().join(", ");
    match (requested, &shapes) {
        (Some(config), Ok(found)) => {
            let differences = found.differences(config, resize_pos_embed);
            if differences.is_empty() {
                let name = single.filter(|m| &m.2 == config).map(named);
                return Ok((config.clone(), name));
            }
            let hint = match single {
                // finetune requires the flags; the other tools infer the config without them.
                Some((v, t, _)) => format!(
                    "the weights are {v}@{t}: pass --vision-model {v} --text-model {t}, or leave \
                     both out where they are optional"
                ),
                None if matches.len() > 1 => format!(
                    "the weights fit several shipped models ({}): pass the flags of one",
                    several()
                ),
                None => format!("the weights hold {found}: {}", flags_for(found)),
            };
            Err(LoadError::ShapeMismatch {
                path: path.to_path_buf(),
                differences,
                hint,
            })
        }
        // Not a cn_clip state dict as far as the shapes go: let loading name the keys.
        (Some(config), Err(_)) => Ok((config.clone(), None)),
        (None, Ok(found)) => match (single, matches.len()) {
            (Some(m), _) => Ok((m.2.clone(), Some(named(m)))),
            (None, 0) => Err(LoadError::ConfigRequired {
                path: path.to_path_buf(),
                found: format!("its shapes ({found}) match no model cn_clip ships"),
                hint: flags_for(found),
            }),
            (None, _) => Err(LoadError::ConfigRequired {
                path: path.to_path_buf(),
                found: format!(
                    "its shapes ({found}) fit several shipped models ({}), which differ in what \
                     the shapes do not hold",
                    several()
                ),
                hint: "pass --vision-model and --text-model naming one of them".to_string(),
            }),
        },
        (None, Err(reason)) => Err(LoadError::ConfigRequired {
            path: path.to_path_buf(),
            found: format!("its architecture cannot be read from its tensors ({reason})"),
            hint: "pass --vision-model and --text-model (a shipped name or a JSON file in \
                   cn_clip's schema each)"
                .to_string(),
        }),
    }
}

/// The flags for shapes that match no shipped pair: a tower that matches a shipped config by
/// name, the other as a JSON file (whose head count the user must know: the shapes do not say).
fn flags_for(found: &ArchShapes) -> String {
    let pick = |names: Vec<&str>| match names.as_slice() {
        [one] => one.to_string(),
        [] => "<a JSON file in cn_clip's schema>".to_string(),
        many => many.join("|"),
    };
    format!(
        "pass --vision-model {} --text-model {} (attention head counts are not in the weights)",
        pick(found.shipped_vision_matches()),
        pick(found.shipped_text_matches())
    )
}

/// Reads the weights at `path` and returns the model's config (the file's own, or for an official
/// `.pt` the one [`LoadOptions::config`] gives or its shapes imply) and cn_clip-keyed state dict.
pub fn read_weights(
    path: &Path,
    options: &LoadOptions,
) -> Result<(ClipConfig, StateDict), LoadError> {
    Ok(match WeightFormat::detect(path)? {
        WeightFormat::Pt => {
            let state_dict = weights::read_pt(path)?.into_cn_clip_state_dict();
            let (config, _) = pt_config(
                path,
                &state_dict,
                options.config.as_ref(),
                options.resize_pos_embed,
            )?;
            (config, state_dict)
        }
        WeightFormat::HuggingFace => weights::import_hf(path)?,
        WeightFormat::Native => weights::load_native(path)?,
    })
}

impl Clip {
    /// Loads a model from any supported weight file onto `device` (fp32, see
    /// [`Clip::set_precision`] for the other modes).
    pub fn load(
        path: impl AsRef<Path>,
        options: &LoadOptions,
        device: Device,
    ) -> Result<Clip, LoadError> {
        let path = path.as_ref();
        let (config, state_dict) = read_weights(path, options)?;
        let mut model = Clip::new(&config, device);
        model
            .load_named(state_dict.iter(), options.resize_pos_embed)
            .map_err(|error| LoadError::Model {
                path: path.to_path_buf(),
                error,
            })?;
        Ok(model)
    }

    /// The model's weights as a state dict keyed by cn_clip's names, in a stable (sorted) order.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (key, tensor) in self.named_tensors() {
            sd.insert(key, tensor.detach());
        }
        sd
    }

    /// Saves in the native format (safetensors + config metadata, written atomically).
    pub fn save_native(&self, path: impl AsRef<Path>) -> Result<(), WeightsError> {
        weights::save_native(path, self.config(), &self.state_dict())
    }

    /// Exports an official-layout `.pt` checkpoint (`module.` keys, `{"epoch","step","name",
    /// "state_dict"}`) that cn_clip's loaders and its training `--resume` read.
    pub fn export_pt(&self, path: impl AsRef<Path>, header: &PtHeader) -> Result<(), WeightsError> {
        weights::write_pt(path, &self.state_dict(), header)
    }

    /// Exports a Hugging Face `ChineseCLIPModel` directory (config, weights, tokenizer and
    /// image-processor files) that `transformers` loads; see [`weights::export_hf`].
    pub fn export_hf(&self, dir: impl AsRef<Path>) -> Result<(), WeightsError> {
        weights::export_hf(dir, self.config(), &self.state_dict())
    }
}
