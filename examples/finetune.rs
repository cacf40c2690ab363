//! Fine-tunes Chinese-CLIP on a cn_clip LMDB, with cn_clip's training flag names.
//!
//! ```text
//! cargo run --release --example finetune -- --train-data LMDB/train --resume clip_cn_vit-b-16.pt \
//!     --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese --batch-size 128 \
//!     --lr 5e-5 --wd 0.001 --warmup 100 --max-epochs 3 --use-augment --text-prompt --name muge
//! ```
//! `--resume` gives the initial weights (official `.pt`, HF directory or native file), as cn_clip's
//! finetune scripts use it with `--reset-data-offset --reset-optimizer`. When
//! `{logs}/{name}/checkpoints/epoch_latest` exists the run continues from it instead, as cn_clip's
//! `main.py` does, mid-epoch included.

use anyhow::{Context, Result};
use clap::Parser;
use cnclip::model::config::{TextConfig, VisionConfig};
use cnclip::model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use cnclip::train::freeze::{Freeze, TowerFreeze};
use cnclip::train::optim::{AdamWConfig, cn_clip_defaults};
use cnclip::train::run::{RunConfig, train};
use cnclip::train::schedule::CosineSchedule;
use cnclip::train::trainer::{TrainPrecision, TrainerConfig};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Fine-tune Chinese-CLIP like cn_clip's training/main.py")]
struct Args {
    #[arg(long = "train-data")]
    train_data: PathBuf,
    /// Validation LMDB split: loss, accuracy and MUGE Recall@1/5/10.
    #[arg(long = "val-data")]
    val_data: Option<PathBuf>,
    #[arg(long = "valid-epoch-interval", default_value_t = 1)]
    valid_epoch_interval: u64,
    #[arg(long = "valid-step-interval")]
    valid_step_interval: Option<u64>,
    /// Initial weights: official .pt, HF directory or native .safetensors (random init if absent).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long = "vision-model", default_value = "ViT-B-16")]
    vision_model: String,
    #[arg(long = "text-model", default_value = "RoBERTa-wwm-ext-base-chinese")]
    text_model: String,
    #[arg(long = "batch-size", default_value_t = 64)]
    batch_size: usize,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.2)]
    wd: f64,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    eps: Option<f64>,
    #[arg(long, default_value_t = 500)]
    warmup: u64,
    #[arg(long = "max-epochs", default_value_t = 32)]
    max_epochs: u64,
    #[arg(long = "max-steps")]
    max_steps: Option<u64>,
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: usize,
    #[arg(long = "use-augment")]
    use_augment: bool,
    #[arg(long = "grad-checkpointing")]
    grad_checkpointing: bool,
    #[arg(long = "accum-freq", default_value_t = 1)]
    accum_freq: usize,
    #[arg(long = "freeze-vision")]
    freeze_vision: bool,
    /// Beyond cn_clip: freeze the whole text tower.
    #[arg(long = "freeze-text", conflicts_with = "train_last_text_layers")]
    freeze_text: bool,
    /// Beyond cn_clip: freeze the vision tower except its last N blocks (ResNet: stages) and head.
    #[arg(long = "train-last-vision-layers", conflicts_with = "freeze_vision")]
    train_last_vision_layers: Option<usize>,
    /// Beyond cn_clip: freeze the text tower except its last N layers and `text_projection`.
    #[arg(long = "train-last-text-layers")]
    train_last_text_layers: Option<usize>,
    #[arg(long, default_value = "amp", value_parser = ["amp", "fp32", "bf16"])]
    precision: String,
    #[arg(long, default_value = "./logs")]
    logs: PathBuf,
    #[arg(long, default_value = "finetune")]
    name: String,
    #[arg(long = "save-step-frequency", default_value_t = -1)]
    save_step_frequency: i64,
    #[arg(long = "save-epoch-frequency", default_value_t = 1)]
    save_epoch_frequency: u64,
    #[arg(long, default_value_t = 123)]
    seed: u64,
    #[arg(long = "num-workers", default_value_t = 4)]
    num_workers: usize,
    /// Prefix every query with `这是一张图片，里面存在商品：` (the seed's recipe).
    #[arg(long = "text-prompt")]
    text_prompt: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn tower<T>(
    value: &str,
    file: impl Fn(&Path) -> Result<T, cnclip::model::config::ConfigError>,
    name: impl Fn(&str) -> Result<T, cnclip::model::config::ConfigError>,
) -> Result<T> {
    Ok(if Path::new(value).is_file() {
        file(Path::new(value))?
    } else {
        name(value)?
    })
}

fn tower_freeze(all: bool, train_last: Option<usize>) -> TowerFreeze {
    match (all, train_last) {
        (true, _) => TowerFreeze::All,
        (false, Some(n)) => TowerFreeze::AllButLast(n),
        (false, None) => TowerFreeze::None,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    let config = ClipConfig {
        vision: tower(
            &args.vision_model,
            VisionConfig::from_json_file,
            VisionConfig::from_name,
        )?,
        text: tower(
            &args.text_model,
            TextConfig::from_json_file,
            TextConfig::from_name,
        )?,
    };
    // cn_clip's per-model defaults where the flags are not given (custom configs need the flags).
    let defaults = cn_clip_defaults(&args.vision_model);
    let pick = |flag: Option<f64>, default: Option<f64>, what: &str| {
        flag.or(default).with_context(|| {
            format!(
                "--{what} is required for vision model {}",
                args.vision_model
            )
        })
    };
    let adamw = AdamWConfig {
        beta1: pick(args.beta1, defaults.map(|d| d.1.beta1), "beta1")?,
        beta2: pick(args.beta2, defaults.map(|d| d.1.beta2), "beta2")?,
        eps: pick(args.eps, defaults.map(|d| d.1.eps), "eps")?,
        weight_decay: args.wd,
    };
    let base_lr = pick(args.lr, defaults.map(|d| d.0), "lr")?;
    let run = RunConfig {
        train_data: args.train_data.clone(),
        val_data: args.val_data.clone(),
        valid_epoch_interval: args.valid_epoch_interval,
        valid_step_interval: args.valid_step_interval,
        batch_size: args.batch_size,
        workers: args.num_workers,
        seed: args.seed,
        context_length: args.context_length,
        use_augment: args.use_augment,
        text_prompt: args.text_prompt,
        max_epochs: args.max_epochs,
        max_steps: args.max_steps,
        base_lr,
        warmup: args.warmup,
        logs: args.logs.clone(),
        name: args.name.clone(),
        save_step_frequency: u64::try_from(args.save_step_frequency).unwrap_or(0),
        save_epoch_frequency: args.save_epoch_frequency,
        trainer: TrainerConfig {
            schedule: CosineSchedule {
                base_lr,
                warmup: args.warmup,
                total_steps: 0,
            },
            adamw,
            accum_freq: args.accum_freq,
            freeze: Freeze {
                vision: tower_freeze(args.freeze_vision, args.train_last_vision_layers),
                text: tower_freeze(args.freeze_text, args.train_last_text_layers),
            },
            dropout_seed: Some(args.seed),
            grad_checkpointing: args.grad_checkpointing,
            precision: match args.precision.as_str() {
                "amp" => TrainPrecision::Amp,
                "bf16" => TrainPrecision::Bf16,
                _ => TrainPrecision::Fp32,
            },
        },
    };
    let latest = run.checkpoint_dir().join("epoch_latest.state.safetensors");
    let resume_run = latest.is_file().then_some("epoch_latest");
    let model = match (&args.resume, resume_run) {
        (_, Some(_)) => Clip::new(&config, device), // replaced by the checkpoint's weights
        (Some(path), None) => {
            let options = match WeightFormat::detect(path)? {
                WeightFormat::Pt => LoadOptions {
                    config: Some(config),
                    resize_pos_embed: true,
                },
                _ => LoadOptions::default(),
            };
            Clip::load(path, &options, device)?
        }
        (None, None) => Clip::new(&config, device),
    };
    if resume_run.is_some() {
        println!("resuming from {}", latest.display());
    }
    let summary = train(model, &run, resume_run)?;
    if let Some(v) = summary.last_validation {
        println!(
            "last validation: loss {:.6}, Recall@1/5/10 {:.2}/{:.2}/{:.2}, mean recall {:.2}",
            v.loss, v.score.r1, v.score.r5, v.score.r10, v.score.mean_recall
        );
    }
    println!(
        "trained {} steps ({} epochs), last loss {:.6}\ncheckpoints: {}\nmetrics: {}\ncurves: {}",
        summary.steps,
        summary.epochs,
        summary.last_loss,
        summary.checkpoint_dir.display(),
        summary.metrics.display(),
        summary.curves.display()
    );
    Ok(())
}
