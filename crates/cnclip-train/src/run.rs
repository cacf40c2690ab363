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
use crate::distill::Teacher;
use crate::freeze::{Freeze, TowerFreeze};
use crate::metrics::MetricsError;
use crate::observe::{
    CheckpointEvent, Control, JsonlMetrics, Observer, ObserverError, Observers, RunStart,
    StepEvent, ValidationEvent,
};
use crate::optim::AdamWConfig;
use crate::schedule::{CosineSchedule, run_length};
use crate::trainer::{TrainError, Trainer, TrainerConfig};
use cnclip_model::Clip;
use cnclip_model::model::BatchNormMode;
use cnclip_model::preprocess::Preprocessor;
use muge_data::augment::TrainTransform;
use muge_data::sampler::{DistributedSampler, pad_dataset_len};
use muge_data::{ImageTransform, LmdbSplit, Loader, LoaderConfig, TextPipeline};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub use cnclip_train_config::{LoraSettings, RunConfig, SettingError, TrainPrecision};

/// Which checkpoint a run continues, and what it takes from it besides the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The checkpoint directory and stem (`{dir}/{stem}.safetensors` + `.state.safetensors`).
    pub dir: PathBuf,
    pub stem: String,
    /// Continue at the checkpoint's epoch, step and data offset (cn_clip's `--reset-data-offset`
    /// turns this off: epoch 1, step 0 and the schedule from its start).
    pub position: bool,
    /// Restore the optimizer moments and AMP scaler (`--reset-optimizer` turns this off).
    pub optimizer: bool,
}

impl Resume {
    /// Everything restored: the continuation of an interrupted run.
    pub fn full(dir: impl Into<PathBuf>, stem: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            stem: stem.into(),
            position: true,
            optimizer: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] muge_data::LmdbError),
    #[error(transparent)]
    Loader(#[from] muge_data::LoaderError),
    #[error("{0}")]
    Setup(String),
    /// A setting that cannot train, naming its flag (refused before any work).
    #[error(transparent)]
    Setting(#[from] SettingError),
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
    #[error(transparent)]
    Observer(#[from] ObserverError),
    #[error(transparent)]
    RunDir(#[from] crate::run_lock::RunLockError),
}

/// The refusals that need no training state, before the run directory is touched: a refused run
/// writes nothing.
fn refuse_early(config: &RunConfig, model: &Clip, world: u64) -> Result<(), RunError> {
    config.check()?;
    check_model(config, model)?;
    check_data(config, world)?;
    Ok(())
}

/// Takes the run directory's lock for the main process of a run that saves (before anything in it
/// is read or written: the resume decision reads `epoch_latest`), then removes the temporary files
/// that writers killed mid-write left there — with the lock held no live writer can own them.
/// Returns the lock to hold for the run's life and the temporaries removed.
pub fn lock_run_dir(
    config: &RunConfig,
    main: bool,
) -> Result<(Option<crate::run_lock::RunDirLock>, Vec<PathBuf>), RunError> {
    let Some(dir) = config.run_dir().filter(|_| main) else {
        return Ok((None, Vec::new()));
    };
    let lock = crate::run_lock::RunDirLock::acquire(&dir)?;
    let mut removed = crate::run_lock::remove_stale_temporaries(&lock, &dir)?;
    if let Some(checkpoints) = config.checkpoint_dir() {
        removed.extend(crate::run_lock::remove_stale_temporaries(
            &lock,
            &checkpoints,
        )?);
    }
    Ok((Some(lock), removed))
}

fn setting(flag: &'static str, message: String) -> RunError {
    RunError::Setting(SettingError { flag, message })
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: u64,
    /// Epochs begun (the last may be partial when `max_steps` ends the run).
    pub epochs: u64,
    /// The loss of the last step this run trained; `None` when it trained none (a finished run
    /// started again).
    pub last_loss: Option<f64>,
    /// The last validation, when `val_data` was given.
    pub last_validation: Option<crate::validate::Validation>,
    /// `None` when the run saves nothing (`--logs None`).
    pub checkpoint_dir: Option<PathBuf>,
    /// An observer asked the run to stop before its last step.
    pub stopped: bool,
}

/// The JSONL metrics and the PNG curves in the run's directory (`metrics.jsonl`, `curves.png`; the
/// curves with feature `plot` only): what [`train`] attaches. Nothing when the run saves nothing.
pub fn file_observers(config: &RunConfig) -> Result<Observers<'static>, RunError> {
    let mut observers = Observers::new();
    if let Some(dir) = config.run_dir() {
        let metrics = dir.join("metrics.jsonl");
        observers.push(JsonlMetrics::open(&metrics)?);
        #[cfg(feature = "plot")]
        observers.push(crate::observe::Curves {
            metrics,
            png: dir.join("curves.png"),
        });
    }
    Ok(observers)
}

/// Trains `model` as configured, with the JSONL/PNG writers of [`file_observers`]. With `resume`,
/// continues from that checkpoint stem in the run's checkpoint directory (e.g. `epoch_latest`):
/// weights, optimizer, step and data position.
pub fn train(
    model: Clip,
    config: &RunConfig,
    resume: Option<&str>,
) -> Result<RunSummary, RunError> {
    refuse_early(config, &model, 1)?;
    let (_lock, _) = lock_run_dir(config, true)?;
    let resume = own_checkpoint(config, resume)?;
    run(
        model,
        config,
        resume.as_ref(),
        None,
        &mut file_observers(config)?,
    )
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
    refuse_early(config, &model, ddp.world_size() as u64)?;
    let (_lock, _) = lock_run_dir(config, ddp.is_main())?;
    let resume = own_checkpoint(config, resume)?;
    let mut observers = if ddp.is_main() {
        file_observers(config)?
    } else {
        Observers::new()
    };
    run(model, config, resume.as_ref(), Some(ddp), &mut observers)
}

fn own_checkpoint(config: &RunConfig, stem: Option<&str>) -> Result<Option<Resume>, RunError> {
    match (stem, config.checkpoint_dir()) {
        (None, _) => Ok(None),
        (Some(stem), Some(dir)) => Ok(Some(Resume::full(dir, stem))),
        (Some(_), None) => Err(setting(
            "logs",
            "a run that saves nothing (--logs None) has no checkpoint to resume".into(),
        )),
    }
}

/// The whole run: `model` trained as `config` says, continuing `resume` when given, as one rank of
/// `ddp` when given, reporting to `observer` (rank 0 only). Refuses settings that cannot train
/// before reading any data. With `--distillation`, the teacher is loaded from the config.
pub fn run(
    model: Clip,
    config: &RunConfig,
    resume: Option<&Resume>,
    ddp: Option<&Ddp>,
    observer: &mut dyn Observer,
) -> Result<RunSummary, RunError> {
    config.check()?;
    let teacher = if config.distillation {
        Some(Teacher::load(
            config.teacher_model_name.as_deref(),
            config.teacher_model.as_deref(),
            model.config(),
            model.device(),
        )?)
    } else {
        None
    };
    run_with_teacher(model, teacher, config, resume, ddp, observer)
}

/// [`run`] with the distillation teacher already loaded (`Some` exactly when
/// `config.distillation`).
pub fn run_with_teacher(
    model: Clip,
    teacher: Option<Teacher>,
    config: &RunConfig,
    resume: Option<&Resume>,
    ddp: Option<&Ddp>,
    observer: &mut dyn Observer,
) -> Result<RunSummary, RunError> {
    config.check()?;
    if teacher.is_some() != config.distillation {
        return Err(setting(
            "distillation",
            "a teacher is given exactly when --distillation is on".into(),
        ));
    }
    check_model(config, &model)?;
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
        train_with(
            model,
            teacher,
            config,
            resume,
            split,
            Arc::new(transform),
            text,
            ddp,
            observer,
        )
    } else {
        let transform = Preprocessor::new(size).map_err(|e| RunError::Setup(e.to_string()))?;
        train_with(
            model,
            teacher,
            config,
            resume,
            split,
            Arc::new(transform),
            text,
            ddp,
            observer,
        )
    }
}

/// How a ResNet tower's BatchNorms train (ViTs have none): eval BatchNorms under
/// `--freeze-vision` (cn_clip's `freeze_vision_bn`), SyncBatchNorm over the run's process group
/// with `--use-bn-sync` on several processes, else the batch's own statistics (`model.train()`;
/// a SyncBatchNorm of one process is exactly that).
pub fn batch_norm_mode(config: &RunConfig, ddp: Option<&Ddp>) -> BatchNormMode {
    match ddp {
        _ if config.freeze_vision => BatchNormMode::Frozen,
        Some(d) if config.use_bn_sync && d.world_size() > 1 => {
            BatchNormMode::Synced(d.process_group())
        }
        _ => BatchNormMode::Batch,
    }
}

/// The settings that depend on the model: the context length against its position table.
pub fn check_model(config: &RunConfig, model: &Clip) -> Result<(), RunError> {
    let positions = model.config().text.text_max_position_embeddings;
    if config.context_length as i64 > positions {
        return Err(setting(
            "context-length",
            format!(
                "{} exceeds the text model's {positions} positions ({})",
                config.context_length, config.text_model
            ),
        ));
    }
    Ok(())
}

/// The pairs of the training split, refusing an empty split and a global batch larger than it
/// (cn_clip would repeat pairs to fill the batch, which for a mistyped size means memory for a
/// batch of that size).
pub fn check_data(config: &RunConfig, world: u64) -> Result<u64, RunError> {
    let split = LmdbSplit::open(&config.train_data)?;
    data_size(config, &split, world)
}

fn data_size(config: &RunConfig, split: &LmdbSplit, world: u64) -> Result<u64, RunError> {
    let batch = config.batch_size as u64;
    let pairs = split.num_samples();
    if pairs == 0 {
        return Err(setting(
            "train-data",
            format!(
                "{} holds 0 pairs: nothing to train on",
                config.train_data.display()
            ),
        ));
    }
    if batch * world > pairs {
        return Err(setting(
            "batch-size",
            format!(
                "{batch} per process × {world} process(es) = {} rows per batch, more than the {pairs} \
                 pairs of {} (cn_clip would repeat pairs to fill it)",
                batch * world,
                config.train_data.display()
            ),
        ));
    }
    Ok(pairs)
}

/// The optimizer step's settings for a run of `total_steps` on process `rank`.
pub fn trainer_config(
    config: &RunConfig,
    total_steps: u64,
    rank: u64,
) -> Result<TrainerConfig, RunError> {
    let opt = config.optimizer()?;
    let tower = |all: bool, last: Option<usize>| match (all, last) {
        (true, _) => TowerFreeze::All,
        (false, Some(n)) => TowerFreeze::AllButLast(n),
        (false, None) => TowerFreeze::None,
    };
    Ok(TrainerConfig {
        schedule: CosineSchedule {
            base_lr: opt.lr,
            warmup: config.warmup,
            total_steps,
        },
        adamw: AdamWConfig {
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.wd,
        },
        accum_freq: config.accum_freq,
        freeze: Freeze {
            vision: tower(config.freeze_vision, config.train_last_vision_layers),
            text: tower(config.freeze_text, config.train_last_text_layers),
        },
        // Different dropout masks on different ranks, as different torch generators would draw.
        dropout_seed: Some(
            config
                .dropout_seed()
                .wrapping_add(rank.wrapping_mul(0x0100_0000_01B3)),
        ),
        grad_checkpointing: config.grad_checkpointing,
        precision: config.precision,
        mask_ratio: config.mask_ratio,
    })
}

/// cn_clip's `params_{time}.txt` (sorted `name: value` lines) and a JSON copy, in the run directory.
fn write_params(config: &RunConfig, dir: &Path) -> Result<(), RunError> {
    // As cn_clip, the optimizer numbers are written resolved (per-model defaults filled in).
    let opt = config.optimizer()?;
    let config = &RunConfig {
        lr: Some(opt.lr),
        beta1: Some(opt.beta1),
        beta2: Some(opt.beta2),
        eps: Some(opt.eps),
        ..config.clone()
    };
    let time = crate::observe::utc_now("file");
    let io = |path: PathBuf| {
        move |e: std::io::Error| RunError::Setup(format!("cannot write {}: {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let txt = dir.join(format!("params_{time}.txt"));
    std::fs::write(&txt, config.params_text()).map_err(io(txt.clone()))?;
    let json = dir.join(format!("params_{time}.json"));
    let body = serde_json::to_string_pretty(config)
        .map_err(|e| RunError::Setup(format!("cannot encode the parameters: {e}")))?;
    std::fs::write(&json, body).map_err(io(json.clone()))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn train_with<T: ImageTransform + 'static>(
    model: Clip,
    teacher: Option<Teacher>,
    config: &RunConfig,
    resume: Option<&Resume>,
    split: Arc<LmdbSplit>,
    transform: Arc<T>,
    text: TextPipeline,
    ddp: Option<&Ddp>,
    observer: &mut dyn Observer,
) -> Result<RunSummary, RunError> {
    let (world, rank) = ddp.map_or((1, 0), |d| (d.world_size() as u64, d.rank() as u64));
    let main = rank == 0;
    let batch = config.batch_size as u64;
    let pairs = data_size(config, &split, world)?;
    // cn_clip pads the data set to whole global batches; each rank reads perm[rank::world].
    let padded =
        pad_dataset_len(pairs, batch * world).map_err(|e| RunError::Setup(e.to_string()))?;
    let sampler = DistributedSampler::new(padded, world, rank, config.seed)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let batches_per_epoch = padded / (batch * world);
    let accum = config.accum_freq as u64;
    let (total_steps, max_epochs) = run_length(
        batches_per_epoch,
        accum,
        config.max_epochs,
        config.max_steps,
    );
    if total_steps == 0 {
        return Err(setting(
            "accum-freq",
            format!(
                "{accum} micro-batches per step but an epoch has only {batches_per_epoch}: no \
                 optimizer step would run"
            ),
        ));
    }
    let trainer_config = trainer_config(config, total_steps, rank)?;
    let bn_mode = batch_norm_mode(config, ddp);
    let make_trainer = |mut model: Clip| -> Result<Trainer, RunError> {
        model.set_batch_norm_mode(bn_mode.clone());
        Ok(match ddp {
            Some(d) => {
                let mut t = Trainer::with_gather(model, trainer_config, d.gather());
                // After the trainer froze and converted the weights: the reducer holds the
                // trainable ones only.
                let sync = d.gradient_sync(t.model())?;
                t.set_gradient_sync(sync);
                t
            }
            None => Trainer::new(model, trainer_config),
        })
    };
    if let Some(d) = ddp {
        let resuming = u64::from(resume.is_some());
        if d.broadcast_u64(resuming)? != resuming {
            return Err(RunError::Setup(format!(
                "rank {rank} and rank 0 disagree on resuming (this rank: {:?}): every rank \
                 must see the same checkpoint directory",
                resume.map(|r| r.dir.join(&r.stem))
            )));
        }
    }
    let fresh = RunPosition {
        epoch: 0,
        step: 0,
        batches_into_epoch: 0,
        name: config.name.clone(),
    };
    let (mut trainer, mut position) = match resume {
        Some(r) => {
            let loaded = checkpoint::load_onto(&r.dir, &r.stem, model)?;
            let mut trainer = make_trainer(loaded.model)?;
            if r.optimizer {
                checkpoint::restore(
                    &mut trainer,
                    &loaded.optimizer_state,
                    &loaded.position,
                    &r.dir,
                )?;
            }
            let position = if r.position {
                RunPosition {
                    name: config.name.clone(),
                    ..loaded.position
                }
            } else {
                fresh
            };
            trainer.set_step(position.step);
            (trainer, position)
        }
        None => (make_trainer(model)?, fresh),
    };
    if let Some(teacher) = teacher {
        trainer.set_distillation(teacher, config.kd_loss_weight);
    }
    if let Some(d) = ddp {
        // DDP's constructor: every rank starts from rank 0's weights; resumed ranks must agree.
        d.broadcast_model(trainer.model())?;
        d.agree("the step of the resumed checkpoint", position.step)?;
        d.agree(
            "the data offset of the resumed checkpoint",
            position.batches_into_epoch,
        )?;
    }
    let checkpoints = config.checkpoint_dir();
    // Only rank 0 writes files and reports.
    let saves = main && config.saves();
    if let (true, Some(dir)) = (saves, config.run_dir()) {
        write_params(config, &dir)?;
    }
    let mut quiet = ();
    let observer: &mut dyn Observer = if main { observer } else { &mut quiet };
    let global_batch = batch * accum * world;
    observer.on_start(&RunStart {
        total_steps,
        max_epochs,
        batches_per_epoch,
        padded_len: padded,
        global_batch,
        world_size: world,
        position: position.clone(),
        run_dir: config.run_dir(),
    })?;
    let device = trainer.model().device();
    let mut last_loss = None;
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
    // Validation on every rank: each encodes its share of the images and texts, the features are
    // gathered, the recall computed on rank 0 and shared (`validate::validate_in`).
    let mut validate_now = |trainer: &Trainer,
                            position: &RunPosition,
                            observer: &mut dyn Observer|
     -> Result<Control, RunError> {
        let Some((split, transform)) = &validation else {
            return Ok(Control::Continue);
        };
        let batches = split.num_samples().div_ceil(config.valid_batch_size as u64);
        observer.on_validation_start(batches)?;
        let mut failed = None;
        let (v, _, last_batch_size) = crate::validate::validate_in(
            trainer.model(),
            split,
            &**transform,
            &text,
            config.valid_batch_size,
            config.valid_num_workers,
            ddp.map(|d| d.group()),
            &mut |done, _| {
                if let (Err(e), None) = (observer.on_validation_batch(done), &failed) {
                    failed = Some(e);
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        last_validation = Some(v);
        let logit_scale = trainer.model().named_tensors()["logit_scale"].double_value(&[]);
        Ok(observer.on_validation(&ValidationEvent {
            epoch: position.epoch,
            step: position.step,
            validation: v,
            logit_scale,
            last_batch_size,
        })?)
    };
    let save = |stem: &str,
                trainer: &Trainer,
                position: &RunPosition,
                observer: &mut dyn Observer|
     -> Result<(), RunError> {
        let (true, Some(dir)) = (saves, &checkpoints) else {
            return Ok(());
        };
        let started = Instant::now();
        checkpoint::save(dir, stem, trainer, position)?;
        observer.on_checkpoint(&CheckpointEvent {
            stem: stem.to_string(),
            path: checkpoint::paths(dir, stem).0,
            position: position.clone(),
            seconds: started.elapsed().as_secs_f64(),
        })?;
        Ok(())
    };
    // A stop asked by rank 0's observers reaches every rank.
    let agree_stop = |control: Control| -> Result<bool, RunError> {
        let stop = u64::from(control == Control::Stop);
        Ok(match ddp {
            Some(d) => d.broadcast_u64(stop)? == 1,
            None => stop == 1,
        })
    };
    let mut stopped = false;

    'epochs: while position.epoch < max_epochs && !trainer.is_finished() {
        let offset = position.batches_into_epoch * batch;
        let plan = sampler
            .plan(position.epoch, offset)
            .map_err(|e| RunError::Setup(e.to_string()))?;
        let loader_config = LoaderConfig {
            batch_size: config.batch_size,
            workers: config.num_workers,
            prefetch: 2,
            drop_last: false,
            seed: config.seed,
        };
        let mut loader = Loader::new(
            split.clone(),
            transform.clone(),
            text.clone(),
            &plan,
            loader_config,
        )?;
        let (mut step_started, mut data_time) = (Instant::now(), 0.0);
        loop {
            let waited = Instant::now();
            let Some(batch_result) = loader.next() else {
                break;
            };
            data_time += waited.elapsed().as_secs_f64();
            let batch_data = batch_result?;
            let images = batch_data.images.to_device(device);
            let texts = batch_data.texts.to_device(device);
            position.batches_into_epoch += 1;
            let Some(report) = trainer.train_batch(&images, &texts)? else {
                continue;
            };
            position.step = report.step;
            last_loss = Some(report.loss);
            let control = observer.on_step(&StepEvent {
                report,
                epoch: position.epoch,
                batches_into_epoch: position.batches_into_epoch,
                batches_per_epoch,
                accum_freq: accum,
                padded_len: padded,
                total_steps,
                global_batch,
                data_time,
                batch_time: step_started.elapsed().as_secs_f64(),
            })?;
            (step_started, data_time) = (Instant::now(), 0.0);
            let mut control = if main { control } else { Control::Continue };
            if config
                .valid_step_interval
                .is_some_and(|n| n > 0 && report.step.is_multiple_of(n))
                && validate_now(&trainer, &position, observer)? == Control::Stop
            {
                control = Control::Stop;
            }
            let step_save = i64::try_from(report.step).unwrap_or(i64::MAX);
            if config.save_step_frequency > 0 && step_save % config.save_step_frequency == 0 {
                let stem = format!("epoch_{}_{}", position.epoch + 1, report.step);
                save(&stem, &trainer, &position, observer)?;
                save("epoch_latest", &trainer, &position, observer)?;
            }
            if agree_stop(control)? {
                stopped = !trainer.is_finished();
                break 'epochs;
            }
            if trainer.is_finished() {
                break;
            }
        }
        let finished = trainer.is_finished();
        let mut control = Control::Continue;
        if config.valid_epoch_interval > 0
            && (position.epoch + 1).is_multiple_of(config.valid_epoch_interval)
        {
            control = validate_now(&trainer, &position, observer)?;
        }
        // cn_clip writes `epoch{E}` (1-based) at the last epoch and every
        // `save_epoch_frequency` epochs, and `epoch_latest` after every epoch.
        let e = position.epoch + 1;
        if e == max_epochs
            || (config.save_epoch_frequency > 0 && e.is_multiple_of(config.save_epoch_frequency))
        {
            save(&format!("epoch{e}"), &trainer, &position, observer)?;
        }
        if agree_stop(control)? {
            stopped = !finished;
            break 'epochs;
        }
        if finished {
            break 'epochs;
        }
        position.epoch += 1;
        position.batches_into_epoch = 0;
        save("epoch_latest", &trainer, &position, observer)?;
    }
    // The latest checkpoint records where the next run starts.
    save("epoch_latest", &trainer, &position, observer)?;
    observer.on_finish(&position)?;
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
        stopped,
    })
}
