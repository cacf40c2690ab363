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
//!
//! Data-parallel (cn_clip's DDP over libtorch's c10d): `--nproc-per-node N` spawns and supervises
//! N local workers (add `--nnodes/--node-rank/--master-addr/--master-port` on every node for
//! several machines), or launch under `torchrun --no-python --nproc_per_node=N` or Slurm's `srun`,
//! whose environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
//! `SLURM_*`) is read. `--gather-with-grad`, `--skip-aggregate` as in cn_clip; `--dist-backend`
//! defaults to nccl on CUDA (a build with `--features nccl`) and gloo on CPUs.

use anyhow::{Context, Result};
use clap::Parser;
use cnclip::model::config::{TextConfig, VisionConfig};
use cnclip::model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use cnclip::train::freeze::{Freeze, TowerFreeze};
use cnclip::train::optim::{AdamWConfig, cn_clip_defaults};
use cnclip::train::run::{RunConfig, train, train_distributed};
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
    /// Beyond cn_clip: LoRA adapters of this rank on `--lora-targets`; the base weights stay
    /// frozen and checkpoints hold only the adapters (resuming needs `--resume` for the base).
    #[arg(long = "lora-rank")]
    lora_rank: Option<i64>,
    /// LoRA alpha: the adapters' update is scaled by alpha / rank.
    #[arg(long = "lora-alpha", default_value_t = 16.0, requires = "lora_rank")]
    lora_alpha: f64,
    /// Dropout on the adapters' input while training.
    #[arg(long = "lora-dropout", default_value_t = 0.0, requires = "lora_rank")]
    lora_dropout: f64,
    /// Comma-separated patterns over cn_clip module names (PEFT's suffix rule, `*` within a
    /// segment; `attn.in_proj.q|k|v` for the ViT's fused projection) or presets
    /// `qv`, `attn`, `all`, `all+proj`.
    #[arg(
        long = "lora-targets",
        default_value = "qv",
        value_delimiter = ',',
        requires = "lora_rank"
    )]
    lora_targets: Vec<String>,
    /// Also train `logit_scale` in a LoRA run.
    #[arg(long = "lora-train-logit-scale", requires = "lora_rank")]
    lora_train_logit_scale: bool,
    /// Also train the LayerNorms in a LoRA run.
    #[arg(long = "lora-train-layer-norms", requires = "lora_rank")]
    lora_train_layer_norms: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Spawn and supervise this many local workers (one per GPU); one failing stops all.
    #[arg(long = "nproc-per-node")]
    nproc_per_node: Option<usize>,
    /// With --nproc-per-node: machines in the run, and this one's index.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    #[arg(long = "node-rank", default_value_t = 0)]
    node_rank: usize,
    /// With --nproc-per-node: the rendezvous host (rank 0's machine) and port (default: a free
    /// local port for single-node runs, 29500 for several nodes).
    #[arg(long = "master-addr", default_value = "127.0.0.1")]
    master_addr: String,
    #[arg(long = "master-port")]
    master_port: Option<u16>,
    /// cn_clip's `--gather-with-grad`: the global features are differentiable on every rank.
    #[arg(long = "gather-with-grad")]
    gather_with_grad: bool,
    /// cn_clip's `--skip-aggregate`: each rank's loss over its own batch only.
    #[arg(long = "skip-aggregate")]
    skip_aggregate: bool,
    /// Process-group backend (default: nccl when training on CUDA, else gloo).
    #[arg(long = "dist-backend", value_parser = ["gloo", "nccl"])]
    dist_backend: Option<String>,
    /// Seconds a rank waits for the others (rendezvous and each collective) before failing.
    #[arg(long = "dist-timeout", default_value_t = 1800)]
    dist_timeout: u64,
}

/// Our `--nproc-per-node` launcher: re-runs this command line as N workers with torchrun's
/// environment (the workers see CNCLIP_LAUNCHED and train instead of launching again).
fn launch_workers(args: &Args, nproc: usize) -> Result<()> {
    use cnclip::train::ddp::launch::{LaunchConfig, free_port, launch};
    let master_port = match (args.master_port, args.nnodes) {
        (Some(port), _) => port,
        (None, 1) => free_port().context("cannot find a free local port for the rendezvous")?,
        (None, _) => cnclip::train::ddp::env::DEFAULT_MASTER_PORT,
    };
    let config = LaunchConfig {
        program: std::env::current_exe().context("cannot find this program to launch workers")?,
        args: std::env::args_os().skip(1).collect(),
        nproc_per_node: nproc,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port,
    };
    launch(&config)?;
    Ok(())
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
    let launched = std::env::var_os(cnclip::train::ddp::launch::LAUNCHED_VAR).is_some();
    let dist = cnclip::train::ddp::DistEnv::from_env()?;
    if let (Some(nproc), false) = (args.nproc_per_node, launched) {
        anyhow::ensure!(
            dist.is_none(),
            "--nproc-per-node launches workers itself; it cannot run under torchrun or srun, \
             which already set RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS)"
        );
        return launch_workers(&args, nproc);
    }
    let mut device = cnclip::torch_ext::parse_device(&args.device)?;
    if let (Some(env), tch::Device::Cuda(_)) = (&dist, device) {
        // One GPU per local rank, as torchrun's convention.
        device = tch::Device::Cuda(env.local_rank);
    }
    let ddp = match &dist {
        Some(env) => {
            let backend = match args.dist_backend.as_deref() {
                Some(name) => name.parse()?,
                None if device.is_cuda() => cnclip::torch_ext::dist::Backend::Nccl,
                None => cnclip::torch_ext::dist::Backend::Gloo,
            };
            let mode = cnclip::train::ddp::GatherMode::from_flags(
                args.gather_with_grad,
                args.skip_aggregate,
            );
            let timeout = std::time::Duration::from_secs(args.dist_timeout);
            let ddp =
                cnclip::train::ddp::Ddp::init(env, backend, timeout, mode).with_context(|| {
                    format!(
                        "rank {} of {} could not join the run at {}:{}",
                        env.rank, env.world_size, env.master_addr, env.master_port
                    )
                })?;
            if ddp.is_main() {
                println!(
                    "distributed: {} ranks over {}, gather mode {:?}, device {:?}",
                    env.world_size,
                    backend.name(),
                    mode,
                    device
                );
            }
            Some(ddp)
        }
        None => None,
    };
    let main_rank = ddp.as_ref().is_none_or(|d| d.is_main());
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
    // The newest complete checkpoint: a pair torn by a crash mid-write is passed over.
    let resume_from = cnclip::train::checkpoint::latest_complete(&run.checkpoint_dir())?;
    if let Some((stem, position)) = &resume_from
        && stem != "epoch_latest"
    {
        eprintln!(
            "note: epoch_latest is missing or was torn by a crash; continuing from the newest \
             complete checkpoint, {stem} (step {})",
            position.step
        );
    }
    let resume_run = resume_from.as_ref().map(|(stem, _)| stem.as_str());
    let lora = args.lora_rank.map(|rank| cnclip::lora::LoraConfig {
        rank,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_targets.clone(),
        train_logit_scale: args.lora_train_logit_scale,
        train_layer_norms: args.lora_train_layer_norms,
    });
    let latest_model = run.checkpoint_dir().join(format!(
        "{}.safetensors",
        resume_run.unwrap_or("epoch_latest")
    ));
    if resume_run.is_some() && lora.is_none() && cnclip::lora::is_adapter_file(&latest_model)? {
        anyhow::bail!(
            "{} holds LoRA adapters: continue the run with its --lora-* flags and --resume naming \
             its base weights",
            latest_model.display()
        );
    }
    // Random initial weights (no --resume) follow --seed, so a run from scratch is reproducible.
    tch::manual_seed(args.seed as i64);
    let model = match (&args.resume, resume_run) {
        // Replaced by the checkpoint's weights (a LoRA checkpoint holds only adapters).
        (_, Some(_)) if lora.is_none() => Clip::new(&config, device),
        (None, Some(_)) => {
            anyhow::bail!("a LoRA run resumes onto its base weights: pass them with --resume")
        }
        (Some(path), _) => {
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
    let mut model = model;
    if let Some(lora) = &lora {
        let report = cnclip::lora::inject(&mut model, lora)?;
        if main_rank {
            println!(
                "LoRA: {} adapters, {} trainable numbers ({} in adapters)",
                report.adapters.len(),
                report.adapter_parameters + report.base_parameters,
                report.adapter_parameters
            );
        }
    }
    if let (Some(stem), true) = (resume_run, main_rank) {
        println!(
            "resuming from {}",
            run.checkpoint_dir().join(stem).display()
        );
    }
    let summary = match &ddp {
        Some(ddp) => train_distributed(model, &run, resume_run, ddp)?,
        None => train(model, &run, resume_run)?,
    };
    if !main_rank {
        return Ok(());
    }
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
