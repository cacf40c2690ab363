//! One entry point from "a path the user gave" to a ready model: an official cn_clip `.pt`
//! checkpoint, a Hugging Face `ChineseCLIPModel` directory, or a native safetensors file.

use crate::config::ClipConfig;
use crate::model::{Clip, ModelError};
use crate::weights::{self, PtHeader, StateDict, WeightsError};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {source}")]
    Model { path: PathBuf, source: ModelError },
    #[error(
        "{path} is an official .pt checkpoint, which does not record its architecture: pass the model \
         name (e.g. ViT-B-16, or VISION@TEXT) or config files"
    )]
    ConfigRequired { path: PathBuf },
    #[error(
        "{path} describes a different model than the one requested:\n  file:      {found}\n  requested: {requested}"
    )]
    ConfigMismatch {
        path: PathBuf,
        found: String,
        requested: String,
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
    /// Required for `.pt` files; checked against the file's own config for the other formats.
    pub config: Option<ClipConfig>,
    /// Resize a ViT positional embedding whose grid differs from the config's (fine-tuning at
    /// another resolution), as cn_clip's training resume does. Off: a mismatch is an error.
    pub resize_pos_embed: bool,
}

/// Reads the weights at `path` and returns the model's config and cn_clip-keyed state dict.
pub fn read_weights(
    path: &Path,
    options: &LoadOptions,
) -> Result<(ClipConfig, StateDict), LoadError> {
    let (found, state_dict) = match WeightFormat::detect(path)? {
        WeightFormat::Pt => {
            let config = options
                .config
                .clone()
                .ok_or_else(|| LoadError::ConfigRequired {
                    path: path.to_path_buf(),
                })?;
            return Ok((config, weights::read_pt(path)?.into_cn_clip_state_dict()));
        }
        WeightFormat::HuggingFace => weights::import_hf(path)?,
        WeightFormat::Native => weights::load_native(path)?,
    };
    if let Some(requested) = &options.config
        && requested != &found
    {
        return Err(LoadError::ConfigMismatch {
            path: path.to_path_buf(),
            found: found.to_json(),
            requested: requested.to_json(),
        });
    }
    Ok((found, state_dict))
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
            .map_err(|source| LoadError::Model {
                path: path.to_path_buf(),
                source,
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
