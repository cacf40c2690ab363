//! A whole fine-tuning run over a cn_clip LMDB: epochs of muge-data's sampler and loader feeding
//! the [`Trainer`], cn_clip's log line and our JSONL metrics, checkpoints with cn_clip's names
//! (`epoch{E}`, `epoch_{E}_{step}`, `epoch_latest`) and mid-epoch resume, and the curves at the end.
//!
//! Single process ([`train`]) or one rank of a data-parallel run ([`train_distributed`]): then
//! each rank reads its shard of the sampler, the trainer gathers features and all-reduces
//! gradients through [`Ddp`], and only rank 0 validates, logs and writes checkpoints (the other
//! ranks wait for it in their next collective, bounded by the process group's timeout).

use crate::checkpoint::{self, CheckpointError, RunPosition};
use crate::ddp::{Ddp, DdpError};
use crate::metrics::{self, MetricsError, MetricsLog, Record};
use crate::schedule::{CosineSchedule, run_length};
use crate::trainer::{TrainError, Trainer, TrainerConfig};
use cnclip_model::Clip;
use cnclip_model::preprocess::Preprocessor;
use muge_data::augment::TrainTransform;
use muge_data::sampler::{DistributedSampler, pad_dataset_len};
use muge_data::{ImageTransform, LmdbSplit, Loader, LoaderConfig, TextPipeline};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a run is told, named after cn_clip's training flags where they exist.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `--train-data`: an LMDB split directory (`pairs/` + `imgs/`).
    pub train_data: PathBuf,
    /// `--val-data`: validated after every `valid_epoch_interval` epochs and, when set, every
    /// `valid_step_interval` steps (loss, accuracy and MUGE recall).
    pub val_data: Option<PathBuf>,
    pub valid_epoch_interval: u64,
    pub valid_step_interval: Option<u64>,
    pub batch_size: usize,
    /// `--num-workers`: loader threads.
    pub workers: usize,
    /// `--seed`: the sampler's (and the augmentation stream's).
    pub seed: u64,
    pub context_length: usize,
    pub use_augment: bool,
    /// Prefix every query with the product prompt (the seed's recipe; not in cn_clip).
    pub text_prompt: bool,
    pub max_epochs: u64,
    pub max_steps: Option<u64>,
    pub base_lr: f64,
    pub warmup: u64,
    /// `--logs/--name`: checkpoints go to `{logs}/{name}/checkpoints`, metrics and curves next to them.
    pub logs: PathBuf,
    pub name: String,
    /// `--save-step-frequency` (0: off) and `--save-epoch-frequency`.
    pub save_step_frequency: u64,
    pub save_epoch_frequency: u64,
    /// The optimizer step's settings (its schedule is derived here from the data size).
    pub trainer: TrainerConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] muge_data::LmdbError),
    #[error(transparent)]
    Loader(#[from] muge_data::LoaderError),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Validation(#[from] crate::validate::ValidationError),
    #[error(transparent)]
    Distributed(#[from] DdpError),
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: u64,
    /// Epochs begun (the last may be partial when `max_steps` ends the run).
    pub epochs: u64,
    pub last_loss: f64,
    /// The last validation, when `val_data` was given.
    pub last_validation: Option<crate::validate::Validation>,
    pub checkpoint_dir: PathBuf,
    pub metrics: PathBuf,
    pub curves: PathBuf,
}

impl RunConfig {
    pub fn run_dir(&self) -> PathBuf {
        self.logs.join(&self.name)
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.run_dir().join("checkpoints")
    }
}

/// Trains `model` as configured. With `resume`, continues from that checkpoint stem in the run's
/// checkpoint directory (e.g. `epoch_latest`): weights, optimizer, step and data position.
pub fn train(
    model: Clip,
    config: &RunConfig,
    resume: Option<&str>,
) -> Result<RunSummary, RunError> {
    train_inner(model, config, resume, None)
}

/// [`train`] as one rank of the data-parallel run `ddp`. Every rank passes the same `config` and
/// `resume` (the checkpoint directory must be shared, or identical, on all nodes: each rank reads
/// the checkpoint itself; the ranks then check they agree on its step and take rank 0's weights).
pub fn train_distributed(
    model: Clip,
    config: &RunConfig,
    resume: Option<&str>,
    ddp: &Ddp,
) -> Result<RunSummary, RunError> {
    train_inner(model, config, resume, Some(ddp))
}

fn train_inner(
    model: Clip,
    config: &RunConfig,
    resume: Option<&str>,
    ddp: Option<&Ddp>,
) -> Result<RunSummary, RunError> {
    let split = Arc::new(LmdbSplit::open(&config.train_data)?);
    let size = u32::try_from(model.config().vision.image_resolution)
        .map_err(|_| RunError::Setup("image_resolution does not fit u32".into()))?;
    let mut text =
        TextPipeline::new(config.context_length).map_err(|e| RunError::Setup(e.to_string()))?;
    if config.text_prompt {
        text = text.with_product_prompt();
    }
    if config.use_augment {
        let transform = TrainTransform::new(size, 0).map_err(|e| RunError::Setup(e.to_string()))?;
        train_with(model, config, resume, split, Arc::new(transform), text, ddp)
    } else {
        let transform = Preprocessor::new(size).map_err(|e| RunError::Setup(e.to_string()))?;
        train_with(model, config, resume, split, Arc::new(transform), text, ddp)
    }
}

fn train_with<T: ImageTransform + 'static>(
    model: Clip,
    config: &RunConfig,
    resume: Option<&str>,
    split: Arc<LmdbSplit>,
    transform: Arc<T>,
    text: TextPipeline,
    ddp: Option<&Ddp>,
) -> Result<RunSummary, RunError> {
    let (world, rank) = ddp.map_or((1, 0), |d| (d.world_size() as u64, d.rank() as u64));
    let main = rank == 0;
    let batch = config.batch_size.max(1) as u64;
    // cn_clip pads the data set to whole global batches; each rank reads perm[rank::world].
    let padded = pad_dataset_len(split.num_samples(), batch * world)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let sampler = DistributedSampler::new(padded, world, rank, config.seed)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let batches_per_epoch = padded / (batch * world);
    let accum = config.trainer.accum_freq.max(1) as u64;
    let (total_steps, max_epochs) = run_length(
        batches_per_epoch,
        accum,
        config.max_epochs,
        config.max_steps,
    );
    let trainer_config = TrainerConfig {
        schedule: CosineSchedule {
            base_lr: config.base_lr,
            warmup: config.warmup,
            total_steps,
        },
        // Different dropout masks on different ranks, as different torch generators would draw.
        dropout_seed: config
            .trainer
            .dropout_seed
            .map(|s| s.wrapping_add(rank.wrapping_mul(0x0100_0000_01B3))),
        ..config.trainer
    };
    let make_trainer = |model: Clip| match ddp {
        Some(d) => {
            let mut t = Trainer::with_gather(model, trainer_config, d.gather());
            t.set_gradient_sync(d.gradient_sync());
            t
        }
        None => Trainer::new(model, trainer_config),
    };
    if let Some(d) = ddp {
        let resuming = u64::from(resume.is_some());
        if d.broadcast_u64(resuming)? != resuming {
            return Err(RunError::Setup(format!(
                "rank {rank} and rank 0 disagree on resuming (this rank: {resume:?}): every rank \
                 must see the same checkpoint directory {}",
                config.checkpoint_dir().display()
            )));
        }
    }
    let checkpoints = config.checkpoint_dir();
    let (mut trainer, mut position) = match resume {
        Some(stem) => {
            let loaded = checkpoint::load_onto(&checkpoints, stem, model)?;
            let mut trainer = make_trainer(loaded.model);
            checkpoint::restore(
                &mut trainer,
                &loaded.optimizer_state,
                &loaded.position,
                &checkpoints,
            )?;
            (trainer, loaded.position)
        }
        None => (
            make_trainer(model),
            RunPosition {
                epoch: 0,
                step: 0,
                batches_into_epoch: 0,
                name: config.name.clone(),
            },
        ),
    };
    if let Some(d) = ddp {
        // DDP's constructor: every rank starts from rank 0's weights; resumed ranks must agree.
        d.broadcast_model(trainer.model())?;
        d.agree("the step of the resumed checkpoint", position.step)?;
        d.agree(
            "the data offset of the resumed checkpoint",
            position.batches_into_epoch,
        )?;
    }
    let metrics_path = config.run_dir().join("metrics.jsonl");
    // Only rank 0 writes files.
    let mut log = if main {
        Some(MetricsLog::open(&metrics_path)?)
    } else {
        None
    };
    let device = trainer.model().device();
    let mut last_loss = f64::NAN;
    let validation = match &config.val_data {
        Some(path) => {
            let size = u32::try_from(trainer.model().config().vision.image_resolution)
                .map_err(|_| RunError::Setup("image_resolution does not fit u32".into()))?;
            let eval_transform =
                Preprocessor::new(size).map_err(|e| RunError::Setup(e.to_string()))?;
            Some((Arc::new(LmdbSplit::open(path)?), Arc::new(eval_transform)))
        }
        None => None,
    };
    let mut last_validation = None;
    let mut validate_now = |trainer: &Trainer,
                            position: &RunPosition,
                            log: &mut Option<MetricsLog>|
     -> Result<(), RunError> {
        let (Some((split, transform)), Some(log)) = (&validation, log) else {
            return Ok(());
        };
        let v = crate::validate::validate(
            trainer.model(),
            split.clone(),
            transform.clone(),
            text.clone(),
            config.batch_size.max(1),
            config.workers,
        )?;
        println!(
            "Validation Result (epoch {} @ {} steps) | Valid Loss: {:.6} | Image2Text Acc: {:.2} | Text2Image Acc: {:.2} | Recall@1/5/10: {:.2}/{:.2}/{:.2} | Mean Recall: {:.2}",
            position.epoch + 1,
            position.step,
            v.loss,
            v.image_to_text_accuracy * 100.0,
            v.text_to_image_accuracy * 100.0,
            v.score.r1,
            v.score.r5,
            v.score.r10,
            v.score.mean_recall
        );
        log.write(&Record::Valid {
            step: position.step,
            epoch: position.epoch,
            loss: v.loss,
            r1: Some(v.score.r1),
            r5: Some(v.score.r5),
            r10: Some(v.score.r10),
            mean_recall: Some(v.score.mean_recall),
        })?;
        last_validation = Some(v);
        Ok(())
    };

    'epochs: while position.epoch < max_epochs && !trainer.is_finished() {
        let offset = position.batches_into_epoch * batch;
        let plan = sampler
            .plan(position.epoch, offset)
            .map_err(|e| RunError::Setup(e.to_string()))?;
        let loader_config = LoaderConfig {
            batch_size: config.batch_size.max(1),
            workers: config.workers,
            prefetch: 2,
            drop_last: false,
            seed: config.seed,
        };
        let loader = Loader::new(
            split.clone(),
            transform.clone(),
            text.clone(),
            &plan,
            loader_config,
        )?;
        for batch_result in loader {
            let batch_data = batch_result?;
            let images = batch_data.images.to_device(device);
            let texts = batch_data.texts.to_device(device);
            position.batches_into_epoch += 1;
            let Some(report) = trainer.train_batch(&images, &texts)? else {
                continue;
            };
            position.step = report.step;
            last_loss = report.loss;
            if let Some(log) = &mut log {
                log.write(&Record::train(&report, position.epoch))?;
                println!(
                    "{}",
                    metrics::cn_clip_train_line(
                        &report,
                        total_steps,
                        position.epoch,
                        batch * accum * world
                    )
                );
            }
            if config
                .valid_step_interval
                .is_some_and(|n| n > 0 && report.step.is_multiple_of(n))
            {
                validate_now(&trainer, &position, &mut log)?;
            }
            if main
                && config.save_step_frequency > 0
                && report.step.is_multiple_of(config.save_step_frequency)
            {
                let stem = format!("epoch_{}_{}", position.epoch + 1, report.step);
                checkpoint::save(&checkpoints, &stem, &trainer, &position)?;
                checkpoint::save(&checkpoints, "epoch_latest", &trainer, &position)?;
            }
            if trainer.is_finished() {
                break;
            }
        }
        let finished = trainer.is_finished();
        if config.valid_epoch_interval > 0
            && (position.epoch + 1).is_multiple_of(config.valid_epoch_interval)
        {
            validate_now(&trainer, &position, &mut log)?;
        }
        if main {
            end_of_epoch(config, &trainer, &position, max_epochs, &checkpoints)?;
        }
        if finished {
            break 'epochs;
        }
        position.epoch += 1;
        position.batches_into_epoch = 0;
    }
    let curves = config.run_dir().join("curves.png");
    if main {
        // The latest checkpoint records where the next run starts.
        checkpoint::save(&checkpoints, "epoch_latest", &trainer, &position)?;
        let records = metrics::read_records(&metrics_path)?;
        if !records.is_empty() {
            metrics::plot_curves(&records, &curves)?;
        }
    }
    if let Some(d) = ddp {
        // No rank returns (and tears its group down) before rank 0's files are complete.
        d.barrier()?;
    }
    Ok(RunSummary {
        steps: trainer.step(),
        epochs: position.epoch + u64::from(position.batches_into_epoch > 0),
        last_loss,
        last_validation,
        checkpoint_dir: checkpoints,
        metrics: metrics_path,
        curves,
    })
}

/// cn_clip writes `epoch{E}` (1-based) at the last epoch and every `save_epoch_frequency` epochs.
fn end_of_epoch(
    config: &RunConfig,
    trainer: &Trainer,
    position: &RunPosition,
    max_epochs: u64,
    dir: &Path,
) -> Result<(), RunError> {
    let e = position.epoch + 1;
    if e == max_epochs
        || (config.save_epoch_frequency > 0 && e.is_multiple_of(config.save_epoch_frequency))
    {
        checkpoint::save(dir, &format!("epoch{e}"), trainer, position)?;
    }
    Ok(())
}
