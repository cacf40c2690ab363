//! Export in PEFT's adapter layout for Hugging Face's `ChineseCLIPModel`, so Python users load our
//! adapters with `PeftModel.from_pretrained(ChineseCLIPModel.from_pretrained(base), dir)`.
//!
//! HF's vision attention has separate `q_proj`/`k_proj`/`v_proj`, so our per-part adapters on the
//! fused `in_proj` map one to one; module names come from `cnclip-model`'s HF mapping
//! ([`cnclip_model::weights::hf_module_name`]). `target_modules` lists the full module names,
//! which PEFT matches exactly (no suffix ambiguity such as `output.dense`).

use crate::LoraError;
use crate::file::{AdapterFile, apply_file};
use cnclip_model::Clip;
use cnclip_model::weights::{self, StateDict, hf_module_name};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tch::Device;

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (keys
/// `base_model.model.{hf module}.lora_{A,B}.weight`). Base weights trained alongside the adapters
/// (`logit_scale`, LayerNorms) have no place in a PEFT LoRA adapter, so a file that carries them is
/// refused rather than exported without them: merge it with [`crate::merged_state_dict`] instead.
pub fn export_peft(file: &AdapterFile, dir: impl AsRef<Path>) -> Result<(), LoraError> {
    let dir = dir.as_ref();
    let base = file.base_weights();
    if let Some((key, _)) = base.first() {
        return Err(LoraError::Peft(format!(
            "{} also holds {} trained base weights (LayerNorms / logit_scale: {key}, …), which a \
             PEFT LoRA adapter cannot carry; export the merged model instead",
            file.path.display(),
            base.len()
        )));
    }
    let mut tensors = StateDict::new();
    let mut modules = Vec::new();
    for pair in file.adapters() {
        let hf = hf_module_name(pair.name).ok_or_else(|| {
            LoraError::Peft(format!(
                "{}: {} has no Hugging Face ChineseCLIPModel module",
                file.path.display(),
                pair.name
            ))
        })?;
        tensors.insert(
            format!("base_model.model.{hf}.lora_A.weight"),
            pair.a.to_device(Device::Cpu).contiguous(),
        );
        tensors.insert(
            format!("base_model.model.{hf}.lora_B.weight"),
            pair.b.to_device(Device::Cpu).contiguous(),
        );
        modules.push(hf);
    }
    modules.sort();
    let c = &file.config;
    // PEFT's `lora_alpha` is an int in its dataclass; whole numbers are written as such.
    let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 {
        json!(c.alpha as i64)
    } else {
        json!(c.alpha)
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": c.rank,
        "lora_alpha": alpha,
        "lora_dropout": c.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    std::fs::create_dir_all(dir).map_err(|e| LoraError::File {
        path: dir.to_path_buf(),
        reason: format!("cannot create the export directory: {e}"),
    })?;
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| LoraError::Peft(format!("cannot encode adapter_config.json: {e}")))?;
    let config_path = dir.join("adapter_config.json");
    std::fs::write(&config_path, text + "\n").map_err(|e| LoraError::File {
        path: config_path,
        reason: format!("cannot write: {e}"),
    })?;
    weights::save_safetensors(
        dir.join("adapter_model.safetensors"),
        &tensors,
        HashMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    Ok(())
}

/// [`export_peft`] for a known base: checks first that the base has a Hugging Face export for
/// PEFT to apply the adapter to (a ViT model) and that the adapter fits it (applying it to `base`,
/// which then carries the adapter).
pub fn export_peft_for(
    base: &mut Clip,
    file: &AdapterFile,
    dir: impl AsRef<Path>,
) -> Result<(), LoraError> {
    weights::clip_to_hf_config(base.config(), 0.0, "float32", dir.as_ref())?;
    apply_file(base, file)?;
    export_peft(file, dir)
}
