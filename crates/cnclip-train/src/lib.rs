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

pub mod amp;
pub mod checkpoint;
pub mod ddp;
pub mod freeze;
pub mod loss;
pub mod metrics;
pub mod observe;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod session;
pub mod trainer;
pub mod validate;

pub use cnclip_train_config as config;
pub use cnclip_train_config::RunConfig;
pub use observe::{Control, Observer};
pub use session::Session;
