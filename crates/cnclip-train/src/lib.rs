//! The fine-tuning loop of cn_clip, faithful and resumable, single process and distributed.
//!
//! Owns: the symmetric contrastive loss with DDP gather hooks, AdamW with cn_clip's two parameter
//! groups, the cosine schedule with warmup, precision (fp32, AMP fp16 with a GradScaler, bf16),
//! gradient checkpointing and accumulation, validation (loss, accuracy and MUGE recall through
//! `eval`), atomic checkpoints with mid-epoch resume, logging, and DDP over libtorch's c10d via
//! `torch-ext`.
//!
//! Data flows in one direction: `muge-data` → this crate ← `cnclip-model`/`cnclip-lora`. Nothing but
//! examples and binaries may depend on this crate.
//!
//! Modules: the schedule ([`schedule`]), the optimizer with cn_clip's parameter groups
//! ([`optim`]), the loss ([`loss`]), frozen towers/layers ([`freeze`]), the optimizer step with
//! accumulation and precision ([`trainer`]), crash-safe checkpoints with exact resume
//! ([`checkpoint`]), validation ([`validate`]), logging ([`metrics`]), the whole run ([`run`]) and
//! data-parallel training with its launcher ([`ddp`]).
//!
//! ## Training from library code
//!
//! A run is a [`RunConfig`] (every cn_clip training flag, with cn_clip's defaults, serde and clap;
//! from `cnclip-train-config`), prepared by a [`Session`] (device, process group, resume policy,
//! cn_clip's per-model defaults, weights, LoRA, freezing) and run with an [`Observer`] that
//! receives every step, validation and checkpoint and can stop the run. The library never prints:
//! [`observe`] has cn_clip's log line, the JSONL/PNG writers and progress bars as observers.
//!
//! A tiny model trained for three steps on a synthetic LMDB (mini-MUGE):
//!
//! ```
//! use cnclip_train::observe::{Control, Observer, ObserverError, StepEvent};
//! use cnclip_train::{RunConfig, Session};
//!
//! let dir = std::env::temp_dir().join(format!("cnclip-train-doc-{}", std::process::id()));
//! let synth = muge_data::synth::MiniMugeConfig {
//!     train_queries: 8, valid_queries: 1, test_queries: 1,
//!     train_images_per_query: 2, eval_images_per_query: 1, image_size: 32,
//!     ..Default::default()
//! };
//! muge_data::synth::write_mini_muge(&dir.join("data"), &synth)?;
//! muge_data::build_split(&dir.join("data"), "train", &dir.join("lmdb"),
//!     muge_data::BadRecordPolicy::Fail, &mut |_| {})?;
//! // A tiny ViT and BERT in cn_clip's config schema (a file named like a cn_clip model gets
//! // that model's optimizer defaults).
//! std::fs::write(dir.join("ViT-B-16.json"), r#"{"embed_dim":16,"image_resolution":32,
//!     "vision_layers":1,"vision_width":32,"vision_head_width":16,"vision_patch_size":16}"#)?;
//! std::fs::write(dir.join("text.json"), r#"{"vocab_size":21128,"text_hidden_size":16,
//!     "text_attention_probs_dropout_prob":0.0,"text_hidden_act":"gelu",
//!     "text_hidden_dropout_prob":0.0,"text_initializer_range":0.02,
//!     "text_intermediate_size":32,"text_max_position_embeddings":64,
//!     "text_num_attention_heads":2,"text_num_hidden_layers":1,"text_type_vocab_size":2}"#)?;
//!
//! let config = RunConfig {
//!     train_data: dir.join("lmdb/train"),
//!     vision_model: dir.join("ViT-B-16.json").display().to_string(),
//!     text_model: dir.join("text.json").display().to_string(),
//!     batch_size: 4,
//!     num_workers: 1,
//!     max_steps: Some(10),
//!     warmup: 1,
//!     lr: Some(1e-3),
//!     device: "cpu".into(),
//!     logs: dir.join("logs"),
//!     ..RunConfig::default()
//! };
//!
//! /// Collects the losses and stops after three steps.
//! struct FirstSteps(Vec<f64>);
//! impl Observer for FirstSteps {
//!     fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
//!         self.0.push(s.report.loss);
//!         Ok(if s.report.step == 3 { Control::Stop } else { Control::Continue })
//!     }
//! }
//! let mut losses = FirstSteps(Vec::new());
//! let summary = Session::prepare(config)?.run(&mut losses)?;
//! assert_eq!((summary.steps, summary.stopped), (3, true));
//! assert!(losses.0.iter().all(|l| l.is_finite()));
//! // A stopped run leaves `epoch_latest` behind: preparing the same config again continues it.
//! assert!(summary.checkpoint_dir.unwrap().join("epoch_latest.safetensors").is_file());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod amp;
pub mod checkpoint;
pub mod ddp;
pub mod distill;
pub mod freeze;
pub mod loss;
pub mod metrics;
pub mod observe;
pub mod optim;
#[cfg(feature = "plot")]
pub mod plot;
pub mod run;
pub mod run_lock;
pub mod schedule;
pub mod session;
pub mod trainer;
pub mod validate;

pub use cnclip_train_config as config;
pub use cnclip_train_config::RunConfig;
pub use observe::{Control, Observer};
pub use session::Session;
