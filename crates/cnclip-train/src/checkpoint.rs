//! Checkpoints that survive crashes and resume exactly.
//!
//! A checkpoint is two files written atomically (temporary file, fsync, rename): `STEM.safetensors`
//! — the model in the native format, loadable on its own by [`Clip::load`] — and
//! `STEM.state.safetensors` — optimizer moments, the AMP scaler and the run position. Both carry the same random
//! checkpoint id in their metadata and the state file is written second, so a crash between the two
//! renames leaves a pair whose ids differ, which [`load`] refuses instead of resuming from a model
//! and an optimizer of different steps. File stems follow cn_clip: `epoch_latest`, `epoch{E}`,
//! `epoch_{E}_{step}`.
//!
//! A LoRA run (a model carrying `cnclip-lora` adapters) stores only what trains: `STEM.safetensors`
//! is then a `cnclip-lora` adapter file (adapters plus any base weights the LoRA config trains),
//! and resuming puts it back onto the run's base model ([`load_onto`]).

use crate::trainer::Trainer;
use cnclip_model::weights::{self, StateDict, WeightsError};
use cnclip_model::{Clip, LoadOptions};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

const CHECKPOINT_ID_KEY: &str = "cnclip.checkpoint_id";
const TRAINING_STATE_KEY: &str = "cnclip.training_state";

/// Where a run stands, enough to continue it mid-epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPosition {
    /// 0-based epoch in progress.
    pub epoch: u64,
    /// Optimizer steps taken in the whole run.
    pub step: u64,
    /// Micro-batches of `epoch` already consumed (the loader skips them on resume).
    pub batches_into_epoch: u64,
    /// The run's name (cn_clip's `--name`).
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Load(#[from] cnclip_model::LoadError),
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error(
        "{model} and {state} belong to different checkpoints (ids {model_id} and {state_id}): the \
         write of this checkpoint was interrupted; resume from an older one"
    )]
    Torn {
        model: PathBuf,
        state: PathBuf,
        model_id: String,
        state_id: String,
    },
    #[error("{path}: optimizer state does not fit the model: {source}")]
    Optimizer {
        path: PathBuf,
        source: crate::optim::OptimError,
    },
    #[error(transparent)]
    Lora(#[from] cnclip_lora::LoraError),
    #[error(
        "not writing checkpoint {stem} of step {step}: weight {key} is not finite (the run \
         diverged; lower --lr or resume from an earlier checkpoint — every checkpoint on disk was \
         written with finite weights)"
    )]
    NonFiniteWeights {
        stem: String,
        step: u64,
        key: String,
    },
}

/// The two files of checkpoint `stem` in `dir`.
pub fn paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.safetensors")),
        dir.join(format!("{stem}.state.safetensors")),
    )
}

fn checkpoint_id(step: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{step}-{nanos}-{}", std::process::id())
}

/// Writes checkpoint `stem` of `trainer` at `position` into `dir` (created if needed).
pub fn save(
    dir: &Path,
    stem: &str,
    trainer: &Trainer,
    position: &RunPosition,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::Invalid {
        path: dir.to_path_buf(),
        what: format!("cannot create the checkpoint directory: {e}"),
    })?;
    let (model_path, state_path) = paths(dir, stem);
    let id = checkpoint_id(position.step);
    let model = trainer.model();
    // A diverged step can leave NaN/inf weights with a finite loss logged for it; such weights
    // must never replace a good checkpoint, or every resume would start from them.
    if let Some(key) = first_non_finite(model) {
        return Err(CheckpointError::NonFiniteWeights {
            stem: stem.to_string(),
            step: position.step,
            key,
        });
    }
    if cnclip_lora::attached(model).is_empty() {
        let mut model_meta = weights::native_metadata(&model.config().to_json());
        model_meta.insert(CHECKPOINT_ID_KEY.to_string(), id.clone());
        weights::save_safetensors(&model_path, &model.state_dict(), model_meta)?;
    } else {
        let meta = HashMap::from([(CHECKPOINT_ID_KEY.to_string(), id.clone())]);
        cnclip_lora::save_adapter_with(model, &model_path, meta)?;
    }

    let mut state = StateDict::new();
    let scaler_state = trainer.scaler().map(|s| s.state()).unwrap_or_default();
    for (key, tensor) in trainer.optimizer().state().into_iter().chain(scaler_state) {
        state.insert(key, tensor.detach().to_device(Device::Cpu));
    }
    let position_json = serde_json::to_string(position).map_err(|e| CheckpointError::Invalid {
        path: state_path.clone(),
        what: format!("cannot encode the run position: {e}"),
    })?;
    let state_meta = HashMap::from([
        (CHECKPOINT_ID_KEY.to_string(), id),
        (TRAINING_STATE_KEY.to_string(), position_json),
    ]);
    weights::save_safetensors(&state_path, &state, state_meta)?;
    Ok(())
}

/// The first floating-point weight (in key order) holding a NaN or an infinity.
fn first_non_finite(model: &Clip) -> Option<String> {
    model.named_tensors().into_iter().find_map(|(key, t)| {
        let bad = t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0;
        bad.then_some(key)
    })
}

/// The newest checkpoint in `dir` whose two files are both complete and belong together: its
/// stem and position. A pair torn by a crash between its two renames (ids differ) or a file cut
/// short is passed over, so a run killed while writing `epoch_latest` resumes from the newest
/// step or epoch checkpoint before it instead of stopping (the steps after it are trained again,
/// with the same result). Ties prefer `epoch_latest`. `None` when there is no complete checkpoint.
pub fn latest_complete(dir: &Path) -> Result<Option<(String, RunPosition)>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CheckpointError::Invalid {
                path: dir.to_path_buf(),
                what: format!("cannot list the checkpoint directory: {e}"),
            });
        }
    };
    let mut best: Option<(String, RunPosition)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::Invalid {
            path: dir.to_path_buf(),
            what: format!("cannot list the checkpoint directory: {e}"),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".state.safetensors") else {
            continue;
        };
        let (model_path, state_path) = paths(dir, stem);
        let (Ok(model_meta), Ok(state_meta)) = (
            weights::read_safetensors_metadata(&model_path),
            weights::read_safetensors_metadata(&state_path),
        ) else {
            continue;
        };
        let (Some(model_id), Some(state_id)) = (
            model_meta.get(CHECKPOINT_ID_KEY),
            state_meta.get(CHECKPOINT_ID_KEY),
        ) else {
            continue;
        };
        let Some(position) = state_meta
            .get(TRAINING_STATE_KEY)
            .and_then(|json| serde_json::from_str::<RunPosition>(json).ok())
        else {
            continue;
        };
        if model_id != state_id {
            continue;
        }
        let better = match &best {
            None => true,
            Some((best_stem, p)) => {
                position.step > p.step
                    || (position.step == p.step
                        && stem == "epoch_latest"
                        && best_stem != "epoch_latest")
            }
        };
        if better {
            best = Some((stem.to_string(), position));
        }
    }
    Ok(best)
}

/// A checkpoint read back: the model (fp32, on `device`), the optimizer state and the position.
pub struct Loaded {
    pub model: Clip,
    pub optimizer_state: StateDict,
    pub position: RunPosition,
}

/// Reads checkpoint `stem` from `dir`, refusing torn pairs. A LoRA checkpoint holds no base
/// weights: read it with [`load_onto`].
pub fn load(dir: &Path, stem: &str, device: Device) -> Result<Loaded, CheckpointError> {
    load_with(dir, stem, None, device)
}

/// [`load`] for a run that starts from `base`: a LoRA checkpoint's adapters go onto `base` (which
/// may already carry fresh adapters of the same config); a full checkpoint replaces `base`, which
/// must then carry no adapters (a LoRA run cannot resume from a full fine-tune's checkpoint).
pub fn load_onto(dir: &Path, stem: &str, base: Clip) -> Result<Loaded, CheckpointError> {
    let device = base.device();
    load_with(dir, stem, Some(base), device)
}

fn load_with(
    dir: &Path,
    stem: &str,
    base: Option<Clip>,
    device: Device,
) -> Result<Loaded, CheckpointError> {
    let (model_path, state_path) = paths(dir, stem);
    let model_meta = weights::read_safetensors_metadata(&model_path)?;
    let (optimizer_state, state_meta) = weights::read_safetensors(&state_path)?;
    let id = |meta: &HashMap<String, String>, path: &Path| {
        meta.get(CHECKPOINT_ID_KEY)
            .cloned()
            .ok_or_else(|| CheckpointError::Invalid {
                path: path.to_path_buf(),
                what: format!(
                    "no {CHECKPOINT_ID_KEY} in the metadata: not a cnclip training checkpoint"
                ),
            })
    };
    let (model_id, state_id) = (id(&model_meta, &model_path)?, id(&state_meta, &state_path)?);
    if model_id != state_id {
        return Err(CheckpointError::Torn {
            model: model_path,
            state: state_path,
            model_id,
            state_id,
        });
    }
    let position_json =
        state_meta
            .get(TRAINING_STATE_KEY)
            .ok_or_else(|| CheckpointError::Invalid {
                path: state_path.clone(),
                what: format!("no {TRAINING_STATE_KEY} in the metadata"),
            })?;
    let position: RunPosition =
        serde_json::from_str(position_json).map_err(|e| CheckpointError::Invalid {
            path: state_path.clone(),
            what: format!("run position is not valid: {e}"),
        })?;
    let model = if cnclip_lora::is_adapter_file(&model_path)? {
        let mut model = base.ok_or_else(|| CheckpointError::Invalid {
            path: model_path.clone(),
            what: "a LoRA checkpoint holds only adapters: resume it onto its base model \
                   (checkpoint::load_onto)"
                .into(),
        })?;
        cnclip_lora::load_adapter(&mut model, &model_path)?;
        model
    } else {
        if base
            .as_ref()
            .is_some_and(|b| !cnclip_lora::attached(b).is_empty())
        {
            return Err(CheckpointError::Invalid {
                path: model_path,
                what: "a full model checkpoint, but this run is a LoRA run".into(),
            });
        }
        drop(base);
        Clip::load(&model_path, &LoadOptions::default(), device)?
    };
    Ok(Loaded {
        model,
        optimizer_state,
        position,
    })
}

/// Puts a loaded checkpoint's optimizer state and step into `trainer` (built on the loaded model).
pub fn restore(
    trainer: &mut Trainer,
    loaded_state: &StateDict,
    position: &RunPosition,
    path: &Path,
) -> Result<(), CheckpointError> {
    let device = trainer.model().device();
    trainer
        .optimizer_mut()
        .load_state(|key| loaded_state.get(key).map(|t: &Tensor| t.to_device(device)))
        .map_err(|source| CheckpointError::Optimizer {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(scaler) = trainer.scaler_mut() {
        // A checkpoint of an fp32 run has no scaler state; the scaler then starts afresh, as
        // torch's does when switching a run to AMP.
        let _ = scaler.load_state(|key| loaded_state.get(key).map(|t: &Tensor| t.shallow_clone()));
    }
    trainer.set_step(position.step);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, stem: &str, model_id: &str, state_id: &str, step: u64) {
        let (model_path, state_path) = paths(dir, stem);
        let mut sd = StateDict::new();
        sd.insert("w", Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)));
        let position = RunPosition {
            epoch: 0,
            step,
            batches_into_epoch: step,
            name: "t".into(),
        };
        weights::save_safetensors(
            &model_path,
            &sd,
            HashMap::from([(CHECKPOINT_ID_KEY.to_string(), model_id.to_string())]),
        )
        .unwrap();
        weights::save_safetensors(
            &state_path,
            &sd,
            HashMap::from([
                (CHECKPOINT_ID_KEY.to_string(), state_id.to_string()),
                (
                    TRAINING_STATE_KEY.to_string(),
                    serde_json::to_string(&position).unwrap(),
                ),
            ]),
        )
        .unwrap();
    }

    /// A crash between the two renames of `epoch_latest` leaves a torn pair; the run goes on from
    /// the newest complete checkpoint instead. A truncated file is passed over the same way.
    #[test]
    fn the_newest_complete_pair_wins_over_a_torn_latest() {
        let dir = std::env::temp_dir().join(format!("ckpt-choice-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(latest_complete(&dir).unwrap().is_none());
        write(&dir, "epoch_1_2", "a", "a", 2);
        write(&dir, "epoch_1_3", "b", "b", 3);
        write(&dir, "epoch_latest", "c", "b", 4); // model renamed, state still the old one
        let (stem, position) = latest_complete(&dir).unwrap().unwrap();
        assert_eq!((stem.as_str(), position.step), ("epoch_1_3", 3));
        write(&dir, "epoch_latest", "b", "b", 3);
        assert_eq!(latest_complete(&dir).unwrap().unwrap().0, "epoch_latest");
        let (model, _) = paths(&dir, "epoch_latest");
        let bytes = std::fs::read(&model).unwrap();
        std::fs::write(&model, &bytes[..bytes.len() / 3]).unwrap();
        write(&dir, "epoch_1_3", "x", "y", 3);
        assert_eq!(latest_complete(&dir).unwrap().unwrap().0, "epoch_1_2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
