//! What a fine-tuning run is told, without libtorch: every flag of cn_clip's
//! `cn_clip/training/params.py` with cn_clip's name, default and meaning, plus ours (LoRA, partial
//! freezing, the product prompt, bf16, the device). One struct serves three callers:
//!
//! - the `finetune` example parses it from the command line (it derives [`clap::Args`]; `=` syntax
//!   and cn_clip's `None` for optional values through [`normalize_none`]);
//! - `cargo xtask sweep` deserialises it from TOML (kebab-case keys, the flag names without dashes);
//! - library callers build it in code from [`RunConfig::default`] (cn_clip's defaults).
//!
//! [`RunConfig::check`] refuses settings that cannot train, naming the flag, before any work.
//! The learning rate and warmup live only here (`lr`, `warmup`); the schedule is derived from them
//! and the data size by the run.
//!
//! ```
//! use cnclip_train_config::RunConfig;
//! let config: RunConfig = toml::from_str(r#"
//!     train-data = "lmdb/train"
//!     lr = 5e-5
//!     use-augment = true
//! "#).unwrap();
//! assert_eq!(config.batch_size, 64); // cn_clip's default
//! assert!(config.check().is_ok());
//! ```

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Numerics of a training step: cn_clip's `--precision` choices and our bf16 (the flag's value
/// and what `cnclip-train`'s trainer takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// `--precision amp` (cn_clip's default): fp32 master weights, fp16 autocast (CUDA) with a
    /// GradScaler; steps whose gradients overflow are skipped, as torch's scaler does. On a CPU
    /// only the scaler acts.
    #[default]
    Amp,
    /// cn_clip's `--precision fp16` (pure fp16, `main.py:106-107,140-141`): the trainer converts the
    /// model with `convert_weights`' choice of tensors (`cnclip_model::Precision::Fp16`: every
    /// linear/conv/attention projection, all of BERT and both projections to fp16; the vision
    /// LayerNorms, class and positional embeddings and `logit_scale` stay fp32). No autocast, no
    /// scaler, and no fp32 master copy: cn_clip never calls `convert_models_to_fp32` in this mode,
    /// so its AdamW steps the fp16 parameters with fp16 moments (and fp16 gradients), as here. The
    /// loss is taken in fp16 too (`nn.CrossEntropyLoss` on fp16 logits).
    Fp16,
    /// Plain fp32 (`--precision fp32`).
    Fp32,
    /// bf16 autocast on the model's device (GPU, or a CPU with bf16 kernels), fp32 master
    /// weights; bf16 keeps fp32's range, so no scaler. Not in cn_clip; its `--precision bf16`
    /// does not exist.
    Bf16,
}

/// The DDP communication hook (`--ddp-comm-hook`; torch's `register_comm_hook`, not in cn_clip).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DdpCommHook {
    /// All-reduce the gradient buckets in their own dtype (DDP without a hook).
    #[default]
    None,
    /// torch's built-in `FP16_COMPRESS`: each bucket cast to fp16 and divided by the world size
    /// before the all-reduce, cast back after (half the bytes on the wire).
    Fp16,
    /// The same with bf16 (torch's `bf16_compress_hook`): fp32's range, fewer mantissa bits.
    Bf16,
}

/// LoRA adapters instead of full fine-tuning (not in cn_clip).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoraSettings {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub train_logit_scale: bool,
    pub train_layer_norms: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["qv".into()],
            train_logit_scale: false,
            train_layer_norms: false,
        }
    }
}

/// The `--lora-*` flags of `finetune` (beyond cn_clip): LoRA adapters on top of the `--resume`
/// weights, which stay frozen; checkpoints hold only the adapters.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LoraArgs {
    /// LoRA adapters of this rank on --lora-targets [default: none, full fine-tuning].
    #[arg(long = "lora-rank")]
    pub lora_rank: Option<i64>,
    /// LoRA alpha: the adapters' update is scaled by alpha / rank.
    #[arg(long = "lora-alpha", default_value_t = 16.0, requires = "lora_rank")]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training.
    #[arg(long = "lora-dropout", default_value_t = 0.0, requires = "lora_rank")]
    pub lora_dropout: f64,
    /// Comma-separated patterns over cn_clip module names (PEFT's suffix rule, `*` within a
    /// segment) or presets `qv`, `attn`, `all`, `all+proj`.
    #[arg(
        long = "lora-targets",
        default_value = "qv",
        value_delimiter = ',',
        requires = "lora_rank"
    )]
    pub lora_targets: Vec<String>,
    /// Also train `logit_scale` in a LoRA run [default: off].
    #[arg(long = "lora-train-logit-scale", requires = "lora_rank")]
    pub lora_train_logit_scale: bool,
    /// Also train the LayerNorms in a LoRA run [default: off].
    #[arg(long = "lora-train-layer-norms", requires = "lora_rank")]
    pub lora_train_layer_norms: bool,
}

impl LoraArgs {
    /// The settings, when `--lora-rank` is given.
    pub fn settings(&self) -> Option<LoraSettings> {
        self.lora_rank.map(|rank| LoraSettings {
            rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
            train_logit_scale: self.lora_train_logit_scale,
            train_layer_norms: self.lora_train_layer_norms,
        })
    }
}

/// The launcher flags of `finetune` and `extract_features` (torchrun's names): `--nproc-per-node N`
/// spawns and supervises N local workers with torchrun's environment.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LaunchArgs {
    /// Spawn and supervise this many local workers (one per GPU); one failing stops all
    /// [default: none, a single process unless launched by torchrun/srun].
    #[arg(long = "nproc-per-node")]
    pub nproc_per_node: Option<usize>,
    /// With --nproc-per-node: machines in the run.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// With --nproc-per-node: this machine's index.
    #[arg(long = "node-rank", default_value_t = 0)]
    pub node_rank: usize,
    /// With --nproc-per-node: the rendezvous host (rank 0's machine).
    #[arg(long = "master-addr", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// With --nproc-per-node: the rendezvous port [default: a free port on one node, else 29500].
    #[arg(long = "master-port")]
    pub master_port: Option<u16>,
}

/// One fine-tuning run. Field names are cn_clip's flags (`--batch-size` is `batch_size`, and
/// `batch-size` in TOML/JSON). `Default` is cn_clip's defaults (`params.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunConfig {
    /// Training LMDB split (a directory with `pairs/` and `imgs/`) [required; no default].
    #[arg(long = "train-data", default_value = "", hide_default_value = true, value_parser = any_path)]
    pub train_data: PathBuf,
    /// Validation LMDB split: loss, accuracy and MUGE Recall@1/5/10 [default: none, no validation].
    #[arg(long = "val-data")]
    pub val_data: Option<PathBuf>,
    /// Loader threads for training.
    #[arg(long = "num-workers", default_value_t = 4)]
    pub num_workers: usize,
    /// Loader threads for validation.
    #[arg(long = "valid-num-workers", default_value_t = 1)]
    pub valid_num_workers: usize,
    /// Where runs go: `{logs}/{name}/` holds checkpoints, params, metrics and curves. `None` or
    /// empty: nothing is saved (as cn_clip), so the run cannot be resumed.
    #[arg(long, default_value = "./logs/", value_parser = any_path)]
    pub logs: PathBuf,
    /// The run's directory under --logs.
    #[arg(long, default_value = "train_clip")]
    pub name: String,
    /// Log cn_clip's training line every N optimizer steps (the JSONL metrics get every step).
    #[arg(long = "log-interval", default_value_t = 10)]
    pub log_interval: u64,
    /// Add the in-batch Image2Text/Text2Image accuracy to the training line [default: off].
    #[arg(long = "report-training-batch-acc")]
    pub report_training_batch_acc: bool,
    /// Training batch size per process.
    #[arg(long = "batch-size", default_value_t = 64)]
    pub batch_size: usize,
    /// Validation batch size per process.
    #[arg(long = "valid-batch-size", default_value_t = 64)]
    pub valid_batch_size: usize,
    /// Optimizer steps of the run; overrides --max-epochs [default: none, from --max-epochs].
    #[arg(long = "max-steps")]
    pub max_steps: Option<u64>,
    /// Epochs of the run.
    #[arg(long = "max-epochs", default_value_t = 32)]
    pub max_epochs: u64,
    /// Also validate every N optimizer steps [default: none, only at epoch ends].
    #[arg(long = "valid-step-interval")]
    pub valid_step_interval: Option<u64>,
    /// Validate after every N epochs (`None`: never).
    #[arg(long = "valid-epoch-interval", default_value_t = 1)]
    pub valid_epoch_interval: u64,
    /// Tokens per text, [CLS] and [SEP] included; at most the text model's position table.
    #[arg(long = "context-length", default_value_t = 52)]
    pub context_length: usize,
    /// Peak learning rate [default: cn_clip's per-model rate: 5e-4, 4e-4 for ViT-L-14(-336)].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW beta1 [default: cn_clip's per-model value, 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW beta2 [default: cn_clip's per-model value: 0.98 for ViTs, 0.999 for ResNets].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdamW epsilon [default: cn_clip's per-model value: 1e-6 for ViTs, 1e-8 for ResNets].
    #[arg(long)]
    pub eps: Option<f64>,
    /// Weight decay (not on biases, norms and logit_scale, as cn_clip).
    #[arg(long, default_value_t = 0.2)]
    pub wd: f64,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 500)]
    pub warmup: u64,
    /// cn_clip's SyncBatchNorm for ResNet towers: on several processes their training forwards
    /// normalise with the statistics of the global batch. ViTs have no BatchNorm and one process
    /// has no other ranks, so it changes nothing there (as in cn_clip) [default: off].
    #[arg(long = "use-bn-sync")]
    pub use_bn_sync: bool,
    /// cn_clip's training augmentation (RandomResizedCrop + AutoAugment) [default: off].
    #[arg(long = "use-augment")]
    pub use_augment: bool,
    /// Accepted and unused, as in cn_clip (the cosine schedule always runs) [default: off].
    #[arg(long = "skip-scheduler")]
    pub skip_scheduler: bool,
    /// Write `epoch{E}` every N epochs (the last epoch always).
    #[arg(long = "save-epoch-frequency", default_value_t = 1)]
    pub save_epoch_frequency: u64,
    /// Write `epoch_{E}_{step}` and `epoch_latest` every N steps (≤ 0: off).
    #[arg(long = "save-step-frequency", default_value_t = -1, allow_negative_numbers = true)]
    pub save_step_frequency: i64,
    /// Initial weights: official `.pt`, HF directory or native `.safetensors`, or a checkpoint of
    /// a run (which also restores epoch, step and optimizer unless reset). A complete
    /// `{logs}/{name}/checkpoints/epoch_latest` takes precedence (crash-safe continuation)
    /// [default: none, random init or epoch_latest].
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// With --resume: do not restore the optimizer state of the checkpoint [default: off].
    #[arg(long = "reset-optimizer")]
    pub reset_optimizer: bool,
    /// With --resume: start at epoch 1, step 0 instead of the checkpoint's position [default: off].
    #[arg(long = "reset-data-offset")]
    pub reset_data_offset: bool,
    /// amp (fp16 autocast + GradScaler), fp16 (cn_clip's pure fp16: fp16 weights as its
    /// convert_weights, AdamW on them, no scaler; not with LoRA), fp32, bf16 (ours).
    #[arg(long, value_enum, default_value_t = TrainPrecision::Amp)]
    pub precision: TrainPrecision,
    /// cn_clip vision model name, or a path to a vision config JSON (a file named like a cn_clip
    /// model, e.g. `my/ViT-B-16.json`, gets that model's optimizer defaults).
    #[arg(long = "vision-model", default_value = "ViT-B-16")]
    pub vision_model: String,
    /// FLIP: share of ViT patch tokens dropped at random in each training forward (not in
    /// validation), in [0, 1); ignored by ResNet towers, as in cn_clip.
    #[arg(long = "mask-ratio", default_value_t = 0.0)]
    pub mask_ratio: f64,
    /// Initialise the vision tower and logit_scale from an OpenAI-CLIP state dict (`visual.*`,
    /// `logit_scale`; a .pt of `model.state_dict()`, or .safetensors), as cn_clip's
    /// `restore_model`. A --resume or a run's epoch_latest replaces these weights, as in cn_clip
    /// [default: none, random init].
    #[arg(long = "clip-weight-path")]
    pub clip_weight_path: Option<PathBuf>,
    /// Freeze the whole vision tower [default: off].
    #[arg(long = "freeze-vision")]
    pub freeze_vision: bool,
    /// cn_clip text model name, or a path to a text config JSON.
    #[arg(long = "text-model", default_value = "RoBERTa-wwm-ext-base-chinese")]
    pub text_model: String,
    /// Initialise the text tower from a BERT/RoBERTa checkpoint (`bert.*` keys but the pooler):
    /// pytorch_model.bin, model.safetensors or a Hugging Face directory, as cn_clip's
    /// `restore_model`. A --resume or a run's epoch_latest replaces these weights, as in cn_clip
    /// [default: none, random init].
    #[arg(long = "bert-weight-path")]
    pub bert_weight_path: Option<PathBuf>,
    /// Recompute each block in backward (less memory, same gradients) [default: off].
    #[arg(long = "grad-checkpointing")]
    pub grad_checkpointing: bool,
    /// Accepted: attention here always runs libtorch's fused scaled-dot-product kernels
    /// (flash/memory-efficient where the device has them), same weights and key names
    /// [default: off].
    #[arg(long = "use-flash-attention")]
    pub use_flash_attention: bool,
    /// Micro-batches per optimizer step (cn_clip's feature-cache accumulation).
    #[arg(long = "accum-freq", default_value_t = 1)]
    pub accum_freq: usize,
    /// The global features keep their gradient on every process [default: off].
    #[arg(long = "gather-with-grad")]
    pub gather_with_grad: bool,
    /// Each process's loss over its own batch only [default: off].
    #[arg(long = "skip-aggregate")]
    pub skip_aggregate: bool,
    /// cn_clip's DEBUG log level; accepted: this program logs no debug messages [default: off].
    #[arg(long)]
    pub debug: bool,
    /// Sampler seed; here also the augmentation, dropout and random-init seed.
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
    /// Knowledge distillation: adds kd_loss_weight × (1 − cosine similarity) between the teacher's
    /// image features and the student's (bilinearly resized to the teacher's width), as cn_clip
    /// [default: off].
    #[arg(long)]
    pub distillation: bool,
    /// The distillation teacher: a local checkpoint (official .pt with --teacher-model, Hugging
    /// Face ChineseCLIPModel directory, or native .safetensors) whose image resolution is the
    /// student's. cn_clip's ModelScope hub names cannot be downloaded here: download the model
    /// and pass its path [default: none; required with --distillation].
    #[arg(long = "teacher-model-name")]
    pub teacher_model_name: Option<String>,
    /// Weight of the distillation loss (used only with --distillation).
    #[arg(long = "kd_loss_weight", default_value_t = 0.5)]
    #[serde(rename = "kd_loss_weight")]
    pub kd_loss_weight: f64,
    // ----- beyond cn_clip -----
    /// Prefix every query with `这是一张图片，里面存在商品：` (a MUGE recipe: the same prefix in
    /// training and evaluation) [default: off].
    #[arg(long = "text-prompt")]
    pub text_prompt: bool,
    /// Freeze the whole text tower [default: off].
    #[arg(long = "freeze-text", conflicts_with = "train_last_text_layers")]
    pub freeze_text: bool,
    /// Freeze the vision tower except its last N blocks (ResNet: stages) and head [default: none].
    #[arg(long = "train-last-vision-layers", conflicts_with = "freeze_vision")]
    pub train_last_vision_layers: Option<usize>,
    /// Freeze the text tower except its last N layers and text_projection [default: none].
    #[arg(long = "train-last-text-layers")]
    pub train_last_text_layers: Option<usize>,
    /// Architecture of an official-.pt teacher (which does not record it): a cn_clip model name
    /// (e.g. ViT-H-14, or VISION@TEXT) [default: none; HF and native teachers carry theirs].
    #[arg(long = "teacher-model")]
    pub teacher_model: Option<String>,
    /// LoRA adapters instead of full fine-tuning (flags `--lora-*` of `finetune`).
    #[arg(skip)]
    pub lora: Option<LoraSettings>,
    /// `auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`, `mps`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Dropout masks are drawn from this seed and the position in the run, so a resumed run is
    /// bit-identical to an uninterrupted one [default: --seed].
    #[arg(long = "dropout-seed")]
    pub dropout_seed: Option<u64>,
    /// Process-group backend of a data-parallel run, gloo or nccl [default: nccl on CUDA, else gloo].
    #[arg(long = "dist-backend", value_parser = ["gloo", "nccl"])]
    pub dist_backend: Option<String>,
    /// Seconds a process waits for the others (rendezvous and each collective) before failing.
    #[arg(long = "dist-timeout", default_value_t = 1800)]
    pub dist_timeout: u64,
    /// How DDP's reducer communicates the gradient buckets: none, fp16 or bf16 (compressed to that
    /// dtype for the all-reduce, as torch's fp16/bf16 compress hooks) [default: none].
    #[arg(long = "ddp-comm-hook", value_enum, default_value_t = DdpCommHook::None)]
    pub ddp_comm_hook: DdpCommHook,
    /// DDP's `find_unused_parameters`: each step searches the loss's graph for trainable weights
    /// that get no gradient and reduces them as zeros. Frozen weights (`--freeze-vision`, LoRA's
    /// base) are never in DDP's reducer and need no search; not with `--grad-checkpointing`, whose
    /// staged backward hides the checkpointed blocks from the search [default: off, as cn_clip].
    #[arg(long = "ddp-find-unused-parameters")]
    pub ddp_find_unused_parameters: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            train_data: PathBuf::new(),
            val_data: None,
            num_workers: 4,
            valid_num_workers: 1,
            logs: PathBuf::from("./logs/"),
            name: "train_clip".into(),
            log_interval: 10,
            report_training_batch_acc: false,
            batch_size: 64,
            valid_batch_size: 64,
            max_steps: None,
            max_epochs: 32,
            valid_step_interval: None,
            valid_epoch_interval: 1,
            context_length: 52,
            lr: None,
            beta1: None,
            beta2: None,
            eps: None,
            wd: 0.2,
            warmup: 500,
            use_bn_sync: false,
            use_augment: false,
            skip_scheduler: false,
            save_epoch_frequency: 1,
            save_step_frequency: -1,
            resume: None,
            reset_optimizer: false,
            reset_data_offset: false,
            precision: TrainPrecision::Amp,
            vision_model: "ViT-B-16".into(),
            mask_ratio: 0.0,
            clip_weight_path: None,
            freeze_vision: false,
            text_model: "RoBERTa-wwm-ext-base-chinese".into(),
            bert_weight_path: None,
            grad_checkpointing: false,
            use_flash_attention: false,
            accum_freq: 1,
            gather_with_grad: false,
            skip_aggregate: false,
            debug: false,
            seed: 123,
            distillation: false,
            teacher_model_name: None,
            kd_loss_weight: 0.5,
            text_prompt: false,
            freeze_text: false,
            train_last_vision_layers: None,
            train_last_text_layers: None,
            teacher_model: None,
            lora: None,
            device: "auto".into(),
            dropout_seed: None,
            dist_backend: None,
            dist_timeout: 1800,
            ddp_comm_hook: DdpCommHook::None,
            ddp_find_unused_parameters: false,
        }
    }
}

/// A setting that cannot train, with the flag it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct SettingError {
    pub flag: &'static str,
    pub message: String,
}

fn bad(flag: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        flag,
        message: message.into(),
    }
}

/// `--logs` takes any string, the empty one included (cn_clip's "do not save").
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// cn_clip's per-vision-model defaults (`params.py:get_default_params`): `(lr, beta1, beta2, eps)`;
/// `None` for models it has none for (the flags are then required).
pub fn cn_clip_defaults(vision_model: &str) -> Option<(f64, f64, f64, f64)> {
    match vision_model {
        "RN50" | "RN101" | "RN50x4" => Some((5.0e-4, 0.9, 0.999, 1.0e-8)),
        "ViT-B-32" | "ViT-B-16" | "ViT-H-14" => Some((5.0e-4, 0.9, 0.98, 1.0e-6)),
        "ViT-L-14" | "ViT-L-14-336" => Some((4.0e-4, 0.9, 0.98, 1.0e-6)),
        _ => None,
    }
}

/// The resolved optimizer numbers of a run: `(lr, beta1, beta2, eps, wd)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub wd: f64,
}

impl RunConfig {
    /// Whether the run writes anything (cn_clip: `--logs` not empty and not `none`).
    pub fn saves(&self) -> bool {
        let logs = self.logs.to_string_lossy();
        !(logs.is_empty() || logs.eq_ignore_ascii_case("none"))
    }

    /// `{logs}/{name}`, when the run saves.
    pub fn run_dir(&self) -> Option<PathBuf> {
        self.saves().then(|| self.logs.join(&self.name))
    }

    /// `{logs}/{name}/checkpoints`, when the run saves.
    pub fn checkpoint_dir(&self) -> Option<PathBuf> {
        self.run_dir().map(|d| d.join("checkpoints"))
    }

    /// The seed of the dropout masks.
    pub fn dropout_seed(&self) -> u64 {
        self.dropout_seed.unwrap_or(self.seed)
    }

    /// `lr`, betas and eps given or cn_clip's per-model defaults; an error names the missing flag
    /// (custom configs have no defaults).
    pub fn optimizer(&self) -> Result<OptimizerSettings, SettingError> {
        // cn_clip looks a model up as `model_configs/{name}.json`: a config file named like one
        // of its models gets that model's defaults.
        let stem = Path::new(&self.vision_model)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let defaults = cn_clip_defaults(&self.vision_model).or_else(|| cn_clip_defaults(stem));
        let pick = |flag: &'static str, given: Option<f64>, default: Option<f64>| {
            given.or(default).ok_or_else(|| {
                bad(
                    flag,
                    format!(
                        "required: cn_clip has no default for vision model {}",
                        self.vision_model
                    ),
                )
            })
        };
        Ok(OptimizerSettings {
            lr: pick("lr", self.lr, defaults.map(|d| d.0))?,
            beta1: pick("beta1", self.beta1, defaults.map(|d| d.1))?,
            beta2: pick("beta2", self.beta2, defaults.map(|d| d.2))?,
            eps: pick("eps", self.eps, defaults.map(|d| d.3))?,
            wd: self.wd,
        })
    }

    /// Refuses settings that cannot train (checked before any data or weights are read). The
    /// checks that need the data or the model (a batch larger than the data set, the context length
    /// against the position table) are made by the run.
    pub fn check(&self) -> Result<(), SettingError> {
        if self.train_data.as_os_str().is_empty() {
            return Err(bad("train-data", "required: the training LMDB split"));
        }
        let positive = |flag: &'static str, n: u64| {
            if n == 0 {
                Err(bad(flag, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("batch-size", self.batch_size as u64)?;
        positive("valid-batch-size", self.valid_batch_size as u64)?;
        positive("accum-freq", self.accum_freq as u64)?;
        if self.ddp_find_unused_parameters && self.grad_checkpointing {
            return Err(bad(
                "ddp-find-unused-parameters",
                "cannot be combined with --grad-checkpointing: the checkpointed blocks run in \
                 later backward passes the search from the loss cannot see (torch fails the same \
                 way with reentrant checkpointing; cn_clip uses neither)",
            ));
        }
        positive("log-interval", self.log_interval)?;
        positive("context-length", self.context_length as u64)?;
        if self.context_length < 2 {
            return Err(bad(
                "context-length",
                "must be at least 2 ([CLS] and [SEP])",
            ));
        }
        if self.max_steps == Some(0) {
            return Err(bad("max-steps", "must be at least 1 (or None)"));
        }
        if self.max_steps.is_none() && self.max_epochs == 0 {
            return Err(bad("max-epochs", "must be at least 1"));
        }
        if self.valid_step_interval == Some(0) {
            return Err(bad("valid-step-interval", "must be at least 1 (or None)"));
        }
        let opt = self.optimizer()?;
        let rate = |flag: &'static str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(bad(flag, format!("must be finite and ≥ 0, got {x}")))
            }
        };
        rate("lr", opt.lr)?;
        rate("wd", opt.wd)?;
        for (flag, beta) in [("beta1", opt.beta1), ("beta2", opt.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(bad(flag, format!("must be in [0, 1), got {beta}")));
            }
        }
        if !(opt.eps.is_finite() && opt.eps > 0.0) {
            return Err(bad(
                "eps",
                format!("must be finite and > 0, got {}", opt.eps),
            ));
        }
        if !(0.0..1.0).contains(&self.mask_ratio) {
            return Err(bad(
                "mask-ratio",
                format!("must be in [0, 1), got {}", self.mask_ratio),
            ));
        }
        // cn_clip features this program does not have yet: refused, never silently ignored.
        let unsupported = |flag: &'static str, what: &str| {
            Err(bad(
                flag,
                format!("{what} is not supported yet by this implementation"),
            ))
        };
        if self.precision == TrainPrecision::Fp16 && self.lora.is_some() {
            return unsupported(
                "precision",
                "fp16 with LoRA adapters (cn_clip has no LoRA; use amp, fp32 or bf16)",
            );
        }
        if self.distillation {
            match self.teacher_model_name.as_deref() {
                None | Some("") => {
                    return Err(bad(
                        "teacher-model-name",
                        "required with --distillation: the path of a local teacher checkpoint",
                    ));
                }
                Some(name) if MODELSCOPE_TEACHERS.contains(&name) => {
                    return Err(bad(
                        "teacher-model-name",
                        format!(
                            "{name} is a ModelScope hub model, which this program cannot \
                             download: download it and pass the path of the local checkpoint \
                             (an official .pt with --teacher-model, a Hugging Face \
                             ChineseCLIPModel directory or a native .safetensors)"
                        ),
                    ));
                }
                Some(_) => {}
            }
            if !self.kd_loss_weight.is_finite() {
                return Err(bad(
                    "kd_loss_weight",
                    format!("must be finite, got {}", self.kd_loss_weight),
                ));
            }
        }
        if let Some(lora) = &self.lora {
            if lora.rank < 1 {
                return Err(bad("lora-rank", "must be at least 1"));
            }
            if !(0.0..1.0).contains(&lora.dropout) {
                return Err(bad("lora-dropout", "must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// The parameters as cn_clip writes them to `params_{time}.txt`: sorted `name: value` lines
    /// (Python's spelling of `None`, `True` and `False`).
    pub fn params_text(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut lines: Vec<String> = match value {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| {
                    let shown = match v {
                        serde_json::Value::Null => "None".to_string(),
                        serde_json::Value::Bool(true) => "True".to_string(),
                        serde_json::Value::Bool(false) => "False".to_string(),
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    format!("{}: {shown}\n", k.replace('-', "_"))
                })
                .collect(),
            _ => Vec::new(),
        };
        lines.sort();
        lines.concat()
    }
}

/// The teachers cn_clip's `main.py` accepts for `--distillation`: ModelScope hub models, which
/// this program cannot download (it takes a local checkpoint path instead).
pub const MODELSCOPE_TEACHERS: [&str; 4] = [
    "damo/multi-modal_team-vit-large-patch14_multi-modal-similarity",
    "damo/multi-modal_rleg-vit-large-patch14",
    "damo/multi-modal_clip-vit-huge-patch14_zh",
    "damo/multi-modal_clip-vit-large-patch14_zh",
];

/// Flags whose value cn_clip's scripts may spell `None` (Python's default for an absent value).
const NONE_MEANS_ABSENT: &[&str] = &[
    "--val-data",
    "--max-steps",
    "--valid-step-interval",
    "--lr",
    "--beta1",
    "--beta2",
    "--eps",
    "--resume",
    "--clip-weight-path",
    "--bert-weight-path",
    "--teacher-model-name",
    "--teacher-model",
    "--train-last-vision-layers",
    "--train-last-text-layers",
    "--dropout-seed",
];

/// Rewrites cn_clip's `None` values so that clap parses them: `--lr None` / `--lr=None` for an
/// optional value means the flag is absent; `--valid-epoch-interval None` means never (0).
/// (`--logs None` needs no rewrite: it is a path meaning "do not save".)
pub fn normalize_none<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_string_lossy().into_owned();
        let next_is_none = args.get(i + 1).is_some_and(|n| n == "None");
        let (flag, inline_none) = match arg.split_once('=') {
            Some((flag, "None")) => (flag.to_string(), true),
            _ => (arg.clone(), false),
        };
        let none = inline_none || (next_is_none && !arg.contains('='));
        if none && NONE_MEANS_ABSENT.contains(&flag.as_str()) {
            i += if inline_none { 1 } else { 2 };
            continue;
        }
        if none && flag == "--valid-epoch-interval" {
            out.push("--valid-epoch-interval=0".into());
            i += if inline_none { 1 } else { 2 };
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// `file` with the [`RunConfig`] flags given on the command line (`matches`) put over it.
pub fn override_with_flags(
    file: &RunConfig,
    cli: &RunConfig,
    matches: &clap::ArgMatches,
) -> Result<RunConfig, String> {
    let mut merged = serde_json::to_value(file).map_err(|e| e.to_string())?;
    let given = serde_json::to_value(cli).map_err(|e| e.to_string())?;
    for id in matches.ids() {
        if matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine) {
            let key = match id.as_str() {
                "kd_loss_weight" => "kd_loss_weight".to_string(),
                other => other.replace('_', "-"),
            };
            if let Some(value) = given.get(&key) {
                merged[key] = value.clone();
            }
        }
    }
    serde_json::from_value(merged).map_err(|e| e.to_string())
}

/// Reads a run's config from a TOML or JSON file (by extension; errors name the file).
pub fn from_file(path: &Path) -> Result<RunConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: RunConfig,
    }

    fn parse(args: &[&str]) -> RunConfig {
        let argv = std::iter::once("finetune").chain(args.iter().copied());
        Cli::parse_from(normalize_none(argv.map(OsString::from))).config
    }

    #[test]
    fn clap_defaults_are_the_default_config() {
        let parsed = parse(&["--train-data", "t"]);
        let expected = RunConfig {
            train_data: "t".into(),
            ..RunConfig::default()
        };
        assert_eq!(parsed, expected);
    }

    #[test]
    fn ddp_flags_parse_and_find_unused_refuses_checkpointing() {
        let c = parse(&["--train-data=t", "--ddp-comm-hook", "bf16"]);
        assert_eq!(c.ddp_comm_hook, DdpCommHook::Bf16);
        assert!(!c.ddp_find_unused_parameters);
        let c: RunConfig =
            toml::from_str("train-data = \"t\"\nddp-comm-hook = \"fp16\"\n").unwrap();
        assert_eq!(c.ddp_comm_hook, DdpCommHook::Fp16);
        let c = parse(&[
            "--train-data=t",
            "--ddp-find-unused-parameters",
            "--grad-checkpointing",
        ]);
        assert_eq!(
            c.check().map_err(|e| e.flag),
            Err("ddp-find-unused-parameters")
        );
    }

    #[test]
    fn a_config_file_alone_parses() {
        // `finetune --config FILE` gives no --train-data on the command line.
        let c = parse(&[]);
        assert_eq!(c, RunConfig::default());
        assert_eq!(c.check().map_err(|e| e.flag), Err("train-data"));
    }

    #[test]
    fn cn_clip_spellings_parse() {
        let c = parse(&[
            "--train-data=t",
            "--lr=None",
            "--max-steps",
            "None",
            "--valid-epoch-interval=None",
            "--kd_loss_weight=0.25",
            "--logs=None",
            "--save-step-frequency=-1",
            "--precision=fp32",
        ]);
        assert_eq!((c.lr, c.max_steps, c.valid_epoch_interval), (None, None, 0));
        assert_eq!(c.kd_loss_weight, 0.25);
        assert!(!c.saves() && c.run_dir().is_none());
        assert_eq!(c.precision, TrainPrecision::Fp32);
        assert!(parse(&["--train-data=t", "--logs="]).run_dir().is_none());
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let ok = RunConfig {
            train_data: "t".into(),
            ..RunConfig::default()
        };
        assert!(ok.check().is_ok());
        let flag_of = |c: RunConfig| c.check().map_err(|e| e.flag);
        assert_eq!(
            flag_of(RunConfig {
                batch_size: 0,
                ..ok.clone()
            }),
            Err("batch-size")
        );
        assert_eq!(
            flag_of(RunConfig {
                accum_freq: 0,
                ..ok.clone()
            }),
            Err("accum-freq")
        );
        assert_eq!(
            flag_of(RunConfig {
                lr: Some(-1.0),
                ..ok.clone()
            }),
            Err("lr")
        );
        assert_eq!(
            flag_of(RunConfig {
                lr: Some(f64::NAN),
                ..ok.clone()
            }),
            Err("lr")
        );
        assert_eq!(
            flag_of(RunConfig {
                wd: -0.1,
                ..ok.clone()
            }),
            Err("wd")
        );
        assert_eq!(
            flag_of(RunConfig {
                wd: f64::INFINITY,
                ..ok.clone()
            }),
            Err("wd")
        );
        // cn_clip's pure fp16 and FLIP are accepted; fp16 under LoRA (not in cn_clip) is not.
        for accepted in [
            RunConfig {
                precision: TrainPrecision::Fp16,
                ..ok.clone()
            },
            RunConfig {
                mask_ratio: 0.5,
                ..ok.clone()
            },
        ] {
            assert_eq!(flag_of(accepted), Ok(()));
        }
        assert_eq!(
            flag_of(RunConfig {
                precision: TrainPrecision::Fp16,
                lora: Some(LoraSettings::default()),
                ..ok.clone()
            }),
            Err("precision")
        );
        for bad_ratio in [1.0, -0.1, f64::NAN] {
            assert_eq!(
                flag_of(RunConfig {
                    mask_ratio: bad_ratio,
                    ..ok.clone()
                }),
                Err("mask-ratio")
            );
        }
        assert_eq!(
            flag_of(RunConfig {
                distillation: true,
                ..ok.clone()
            }),
            Err("teacher-model-name")
        );
        for hub in MODELSCOPE_TEACHERS {
            let e = RunConfig {
                distillation: true,
                teacher_model_name: Some(hub.into()),
                ..ok.clone()
            }
            .check()
            .unwrap_err();
            assert!(
                e.flag == "teacher-model-name" && e.message.contains("local"),
                "{e}"
            );
        }
        assert_eq!(
            flag_of(RunConfig {
                distillation: true,
                teacher_model_name: Some("teacher.safetensors".into()),
                kd_loss_weight: f64::NAN,
                ..ok.clone()
            }),
            Err("kd_loss_weight")
        );
        // Accepted now (checked against the files when the session prepares).
        let supported = RunConfig {
            distillation: true,
            teacher_model_name: Some("teacher.safetensors".into()),
            clip_weight_path: Some("ViT-B-16.pt".into()),
            bert_weight_path: Some("chinese-roberta".into()),
            ..ok.clone()
        };
        assert_eq!(flag_of(supported), Ok(()));
        let custom = RunConfig {
            vision_model: "my.json".into(),
            lr: Some(1e-4),
            ..ok.clone()
        };
        assert_eq!(flag_of(custom), Err("beta1"));
    }

    #[test]
    fn serde_round_trip_and_params_text() {
        let c = RunConfig {
            train_data: "t".into(),
            lr: Some(5e-6),
            ..RunConfig::default()
        };
        let toml_text = toml::to_string(&c).unwrap_or_default();
        let back: RunConfig = toml::from_str(&toml_text).unwrap_or_default();
        assert_eq!(back, c);
        assert!(toml::from_str::<RunConfig>("bogus-key = 1").is_err());
        let text = c.params_text();
        assert!(
            text.contains("lr: 5e-6\n") || text.contains("lr: 0.000005\n"),
            "{text}"
        );
        assert!(text.contains("val_data: None\n") && text.contains("use_augment: False\n"));
        assert!(text.contains("kd_loss_weight: 0.5\n"));
    }
}

#[cfg(test)]
mod toml_numbers {
    use super::*;

    #[test]
    fn integers_for_floats_and_lora_tables_round_trip() {
        let c: RunConfig =
            toml::from_str("train-data = \"t\"\nwd = 0\nlr = 1\n[lora]\nrank = 4\nalpha = 16\n")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.wd, c.lr), (0.0, Some(1.0)));
        assert_eq!(c.lora.as_ref().map(|l| (l.rank, l.alpha)), Some((4, 16.0)));
        let text = toml::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(toml::from_str::<RunConfig>(&text).ok(), Some(c));
    }
}
