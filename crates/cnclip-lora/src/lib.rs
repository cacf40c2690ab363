//! LoRA for Chinese-CLIP: low-rank adapters on both towers, including the fused `in_proj` of the
//! vision attention, so LoRA fine-tunes of Chinese-CLIP run without a Python `peft` dependency.
//!
//! Owns: adapter injection into a `cnclip-model` model, the trainable/frozen split, merging adapters
//! into the base weights (so a LoRA run can enter a soup), adapter files, and their export in
//! PEFT's layout for Hugging Face's `ChineseCLIPModel`.
//!
//! Depends on `cnclip-model` only. Must not depend on training, data, retrieval, eval or soup: the
//! training loop uses this crate, not the other way round.
//!
//! # How adapters act
//!
//! `cnclip-model` gives every linear map an adapter may target (a *site*, named by cn_clip's module
//! path) an optional delta slot: its output becomes `x Wᵀ + b + Δ(x)`. This crate fills the slots
//! with `Δ(x) = (alpha / r) · B A dropout(x)`, PEFT's LoRA: `A` `[r, in]` kaiming-uniform
//! (`a = √5`, i.e. `U(±1/√in)`), `B` `[out, r]` zero, dropout on the adapter's input in training.
//! The ViT's fused `attn.in_proj` (`in_proj_weight` `[3w, w]`) gets up to three independent
//! adapters `attn.in_proj.q|k|v`, each over its row block; a part not selected contributes zeros.
//! The adapter tensors are variables of the model's own `VarStore`, and [`inject`] freezes every
//! base weight except `logit_scale` / the LayerNorms when the config asks, so the optimizer, DDP
//! and gradient checkpointing (which recomputes blocks with the same dropout seeds) need no LoRA
//! code.
//!
//! | site (cn_clip) | adapter names | HF `ChineseCLIPModel` module (PEFT export) |
//! |---|---|---|
//! | `visual.transformer.resblocks.{i}.attn.in_proj` | `….attn.in_proj.q`, `.k`, `.v` | `vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj` |
//! | `….attn.out_proj` | same | `….self_attn.out_proj` |
//! | `….mlp.c_fc`, `….mlp.c_proj` | same | `….mlp.fc1`, `….mlp.fc2` |
//! | `visual.proj` (`[in, out]`) | same | `visual_projection` |
//! | `bert.encoder.layer.{j}.attention.self.{query,key,value}` | same | `text_model.encoder.layer.{j}.attention.self.…` |
//! | `….attention.output.dense`, `….intermediate.dense`, `….output.dense` | same | `text_model.…` |
//! | `text_projection` (`[in, out]`) | same | `text_projection` |
//!
//! Targets are patterns matched as PEFT matches `target_modules` (the name or a dot-suffix of it;
//! `*` within a segment) or the presets `qv`, `attn`, `all`, `all+proj` ([`config::PRESETS`]).
//!
//! # Adapter file layout (format `cnclip-lora`, version 1)
//!
//! One safetensors file, written atomically:
//! * tensors `{adapter}.lora_A.weight` `[r, in]` and `{adapter}.lora_B.weight` `[out, r]` for each
//!   adapter (names as above, e.g. `visual.transformer.resblocks.0.attn.in_proj.q.lora_A.weight`,
//!   `bert.encoder.layer.3.attention.self.query.lora_B.weight`), in the dtype they trained in;
//! * the base weights the config trains, under their cn_clip keys (`logit_scale`,
//!   `visual.ln_post.weight`, `bert.encoder.layer.0.output.LayerNorm.bias`, …);
//! * `__metadata__`: `cnclip.format = "cnclip-lora"`, `cnclip.format_version = "1"`,
//!   `cnclip.lora` = the [`LoraConfig`] as JSON (`{"rank":8,"alpha":16.0,"dropout":0.0,
//!   "targets":["qv"],"train_logit_scale":false,"train_layer_norms":false}`), `cnclip.config` =
//!   the base model's config (cn_clip's JSON schema), `format = "pt"`; training checkpoints add
//!   their `cnclip.checkpoint_id`.
//!
//! The file is loadable onto any base whose sites have the same shapes ([`load_adapter`]), merged
//! into a base state dict without building a model ([`merged_state_dict`]), and exported for
//! Python's `peft` ([`export_peft`]).

pub mod adapter;
pub mod config;
pub mod count;
pub mod file;
pub mod peft;

pub use adapter::{
    InjectReport, LoraDelta, adapter_state_dict, attached, config_of, inject, merge, unload,
    unmerge,
};
pub use config::LoraConfig;
pub use file::{
    AdapterFile, is_adapter_file, load_adapter, merged_state_dict, read_adapter, save_adapter,
    save_adapter_with,
};
pub use peft::{export_peft, export_peft_for};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA config: {0}")]
    Config(String),
    #[error("LoRA target {pattern:?} matches no linear map of the model")]
    NoMatch { pattern: String },
    #[error("the model already carries LoRA adapters; unload them first")]
    AlreadyAttached,
    #[error("the model carries no LoRA adapters")]
    NotAttached,
    #[error("the model's variable store lock is poisoned (a thread panicked while holding it)")]
    Poisoned,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: {key}: {reason}")]
    Mismatch {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("PEFT export: {0}")]
    Peft(String),
    #[error(transparent)]
    Model(#[from] cnclip_model::model::ModelError),
    #[error(transparent)]
    Weights(#[from] cnclip_model::weights::WeightsError),
}
