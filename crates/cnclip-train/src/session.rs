//! Everything between a [`RunConfig`] and the first step, decided in one place: the device, the
//! data-parallel group (from torchrun's or Slurm's environment), the model configs (cn_clip names
//! or JSON files), cn_clip's per-model optimizer defaults, which checkpoint the run continues
//! (resume policy below), the initial weights, LoRA injection and freezing. Then [`Session::run`]
//! trains, reporting to an [`Observer`].
//!
//! Resume policy (cn_clip's `main.py`, plus crash-safe continuation):
//! 1. A complete checkpoint of this run (`{logs}/{name}/checkpoints/epoch_latest`, or the newest
//!    complete one when a crash tore it) takes precedence: the run continues it mid-epoch, with
//!    step, optimizer and scaler. `--reset-data-offset` / `--reset-optimizer` apply to it only
//!    when `--resume` is not given (as cn_clip applies them to the `epoch_latest` it picks);
//!    with `--resume`, they belong to that file, and restarting the same command continues.
//! 2. Otherwise `--resume` naming a checkpoint of a run (`X.safetensors` next to
//!    `X.state.safetensors`) restores its weights and, unless reset, its position (epoch, step,
//!    data offset) and optimizer state.
//! 3. Otherwise `--resume` names initial weights (official `.pt`, HF directory, native file): a
//!    `.pt`'s `epoch`/`step`/`optimizer` entries are not read (they hold pretraining's position,
//!    which cn_clip's finetune scripts reset anyway with both flags).
//! 4. Nothing: random initial weights drawn from `--seed`, then cn_clip's `load()`: the weights
//!    `convert_weights` touches rounded to fp16 and, with `--clip-weight-path` /
//!    `--bert-weight-path`, `restore_model`'s initialisation from those files
//!    ([`cnclip_model::init`]). In cn_clip the resume loads after them and replaces every weight,
//!    so with 1–3 they are not used (only checked to exist, as cn_clip asserts).
//!
//! With `--distillation` the teacher (`--teacher-model-name`, a local checkpoint) is loaded here
//! too, so a wrong path or architecture fails before any data is read.
//!
//! A LoRA run trains adapters on top of `--resume`, which is then always its base weights.
//!
//! ```no_run
//! use cnclip_train::{RunConfig, Session};
//! use cnclip_train::observe::{CnClipLog, Observers};
//! let config = RunConfig {
//!     train_data: "lmdb/train".into(),
//!     resume: Some("clip_cn_vit-b-16.pt".into()),
//!     reset_data_offset: true,
//!     reset_optimizer: true,
//!     lr: Some(5e-5),
//!     max_epochs: 3,
//!     ..RunConfig::default()
//! };
//! let session = Session::prepare(config)?;
//! let mut log = Observers::new().with(CnClipLog::new(std::io::stdout(), 10, true));
//! let summary = session.run(&mut log)?;
//! println!("{} steps", summary.steps);
//! # Ok::<(), cnclip_train::run::RunError>(())
//! ```

use crate::checkpoint;
use crate::ddp::{Ddp, DistEnv, GatherMode};
use crate::distill::Teacher;
use crate::observe::Observer;
use crate::run::{Resume, RunConfig, RunError, RunSummary, check_model};
use cnclip_model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use std::path::{Path, PathBuf};
use std::time::Duration;
use torch_ext::reducer::CommHook;

/// A run ready to train: model on its device, process group joined, resume decided.
pub struct Session {
    config: RunConfig,
    model: Clip,
    resume: Option<Resume>,
    ddp: Option<Ddp>,
    teacher: Option<Teacher>,
    notes: Vec<String>,
    /// The run directory's lock (main process of a run that saves), held until the run ends.
    _lock: Option<crate::run_lock::RunDirLock>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.config.name)
            .field("resume", &self.resume)
            .field("notes", &self.notes)
            .finish()
    }
}

fn setup(e: impl std::fmt::Display) -> RunError {
    RunError::Setup(e.to_string())
}

impl Session {
    /// Prepares `config`, joining a data-parallel run when torchrun's or Slurm's variables say so.
    pub fn prepare(config: RunConfig) -> Result<Self, RunError> {
        let dist = DistEnv::from_env().map_err(setup)?;
        Self::prepare_in(config, dist.as_ref())
    }

    /// Prepares `config` as the process `dist` describes (`None`: a single process).
    pub fn prepare_in(config: RunConfig, dist: Option<&DistEnv>) -> Result<Self, RunError> {
        config.check()?;
        let mut notes = Vec::new();
        let device =
            torch_ext::parse_device(&config.device).map_err(|e| setup(format!("--device: {e}")))?;
        let device = DistEnv::rank_device(dist, device);
        let clip_config = ClipConfig::from_tower_args(&config.vision_model, &config.text_model)
            .map_err(|e| setup(format!("--vision-model/--text-model: {e}")))?;
        let positions = clip_config.text.text_max_position_embeddings;
        if config.context_length as i64 > positions {
            return Err(RunError::Setting(crate::run::SettingError {
                flag: "context-length",
                message: format!(
                    "{} exceeds the text model's {positions} positions ({})",
                    config.context_length, config.text_model
                ),
            }));
        }
        check_init_files(&config)?;
        crate::run::check_data(&config, dist.map_or(1, |d| d.world_size as u64))?;
        // After the checks that refuse settings (a refused run writes nothing), before anything
        // in the run directory is read or written (the resume decision reads `epoch_latest`):
        // another run on the same --logs/--name is refused, naming its pid.
        let (lock, removed) = crate::run::lock_run_dir(&config, dist.is_none_or(|d| d.rank == 0))?;
        if !removed.is_empty() {
            notes.push(format!(
                "removed {} temporary file(s) of a run killed while writing: {}",
                removed.len(),
                removed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if config.mask_ratio > 0.0 && clip_config.vision.is_resnet() {
            notes.push(format!(
                "--mask-ratio {} is ignored: FLIP drops ViT patches and {} is a ResNet (as in \
                 cn_clip)",
                config.mask_ratio, config.vision_model
            ));
        }
        let ddp = match dist {
            Some(env) => {
                let backend = match config.dist_backend.as_deref() {
                    Some(name) => name.parse().map_err(setup)?,
                    None if device.is_cuda() => torch_ext::dist::Backend::Nccl,
                    None => torch_ext::dist::Backend::Gloo,
                };
                let mode = GatherMode::from_flags(config.gather_with_grad, config.skip_aggregate);
                let timeout = Duration::from_secs(config.dist_timeout);
                let hook = match config.ddp_comm_hook {
                    cnclip_train_config::DdpCommHook::None => CommHook::None,
                    cnclip_train_config::DdpCommHook::Fp16 => CommHook::Fp16,
                    cnclip_train_config::DdpCommHook::Bf16 => CommHook::Bf16,
                };
                let ddp = Ddp::init(env, backend, timeout, mode)
                    .map_err(|e| {
                        setup(format!(
                            "rank {} of {} could not join the run at {}:{}: {e}",
                            env.rank, env.world_size, env.master_addr, env.master_port
                        ))
                    })?
                    .with_comm_hook(hook)
                    .with_find_unused_parameters(config.ddp_find_unused_parameters);
                notes.push(format!(
                    "distributed: {} ranks over {}, gather mode {mode:?}, device {device:?}, \
                     torch's reducer (comm hook {}, find_unused_parameters {})",
                    env.world_size,
                    backend.name(),
                    hook.name(),
                    config.ddp_find_unused_parameters
                ));
                Some(ddp)
            }
            None => None,
        };
        let lora = config.lora.as_ref().map(lora_config);
        let resume = decide_resume(&config, lora.is_some(), &mut notes)?;
        // Random initial weights (no --resume) follow --seed, so a run from scratch is reproducible.
        tch::manual_seed(config.seed as i64);
        let mut model = match (&config.resume, &resume) {
            // Replaced by the checkpoint's weights (a LoRA checkpoint holds only adapters).
            (_, Some(_)) if lora.is_none() => Clip::new(&clip_config, device),
            (None, Some(_)) => {
                return Err(setting(
                    "resume",
                    "a LoRA run resumes onto its base weights: pass them with --resume",
                ));
            }
            (Some(path), _) => {
                let pt = WeightFormat::detect(path).map_err(setup)? == WeightFormat::Pt;
                if pt && !(config.reset_data_offset && config.reset_optimizer) {
                    notes.push(format!(
                        "{}: only the weights of a .pt are used (its epoch, step and optimizer \
                         are not restored)",
                        path.display()
                    ));
                }
                // The flags' config applies to a .pt; the other formats carry their own.
                let options = LoadOptions {
                    config: Some(clip_config.clone()),
                    resize_pos_embed: true,
                };
                Clip::load(path, &options, device).map_err(setup)?
            }
            (None, None) => Clip::new(&clip_config, device),
        };
        pretrained_init(&config, resume.as_ref(), &mut model, &mut notes)?;
        let teacher = if config.distillation {
            let teacher = Teacher::load(
                config.teacher_model_name.as_deref(),
                config.teacher_model.as_deref(),
                &clip_config,
                device,
            )?;
            let vision = &teacher.model().config().vision;
            notes.push(format!(
                "distillation: teacher {} ({}-wide image features, student {}), kd_loss_weight {}",
                config.teacher_model_name.as_deref().unwrap_or_default(),
                vision.embed_dim,
                clip_config.vision.embed_dim,
                config.kd_loss_weight
            ));
            Some(teacher)
        } else {
            None
        };
        if let Some(lora) = &lora {
            let report = cnclip_lora::inject(&mut model, lora).map_err(setup)?;
            notes.push(format!(
                "LoRA: {} adapters, {} trainable numbers ({} in adapters)",
                report.adapters.len(),
                report.adapter_parameters + report.base_parameters,
                report.adapter_parameters
            ));
        }
        check_model(&config, &model)?;
        Ok(Self {
            config,
            model,
            resume,
            ddp,
            teacher,
            notes,
            _lock: lock,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn model(&self) -> &Clip {
        &self.model
    }

    /// The checkpoint the run continues, if any.
    pub fn resume(&self) -> Option<&Resume> {
        self.resume.as_ref()
    }

    /// What was decided that a user should hear (resume source, LoRA size, process group).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Rank 0, or a single process: the one that logs and saves.
    pub fn is_main(&self) -> bool {
        self.ddp.as_ref().is_none_or(|d| d.is_main())
    }

    /// Trains, reporting to `observer` (rank 0 only).
    pub fn run(self, observer: &mut dyn Observer) -> Result<RunSummary, RunError> {
        // `self._lock` lives until this returns.
        crate::run::run_with_teacher(
            self.model,
            self.teacher,
            &self.config,
            self.resume.as_ref(),
            self.ddp.as_ref(),
            observer,
        )
    }
}

/// `--clip-weight-path` / `--bert-weight-path`: applied to a model of random weights (with
/// neither, the random weights are still rounded to fp16 where cn_clip's `convert_weights` rounds
/// them, since main.py calls `load()` for a model from scratch too); with a resume (explicit or a
/// run's own checkpoint) they are only checked to exist, as in cn_clip, whose resume then replaces
/// every weight.
fn pretrained_init(
    config: &RunConfig,
    resume: Option<&Resume>,
    model: &mut Clip,
    notes: &mut Vec<String>,
) -> Result<(), RunError> {
    let clip = config.clip_weight_path.as_deref();
    let bert = config.bert_weight_path.as_deref();
    let replaced_by = match (resume, &config.resume) {
        (Some(r), _) => Some(r.dir.join(&r.stem).display().to_string()),
        (None, Some(path)) => Some(path.display().to_string()),
        (None, None) => None,
    };
    if let Some(source) = replaced_by {
        if clip.is_none() && bert.is_none() {
            return Ok(());
        }
        notes.push(format!(
            "--clip-weight-path/--bert-weight-path are not used: the weights of {source} replace              them (cn_clip loads the resume after them)"
        ));
        return Ok(());
    }
    let reports = model.init_from_pretrained(clip, bert).map_err(setup)?;
    for r in reports {
        let ignored = if r.ignored.is_empty() {
            String::new()
        } else {
            format!(
                "; {} key(s) of it not in the model and ignored, as cn_clip: {}",
                r.ignored.len(),
                r.ignored.join(", ")
            )
        };
        notes.push(format!(
            "--{}: {} weights initialised from {}{}{}",
            r.source.flag(),
            r.loaded.len(),
            r.path.display(),
            if r.resized_positional_embedding {
                " (positional embedding resized to this model's grid)"
            } else {
                ""
            },
            ignored
        ));
    }
    Ok(())
}

/// cn_clip asserts the init files exist, whatever replaces them later: checked before any work.
fn check_init_files(config: &RunConfig) -> Result<(), RunError> {
    for (flag, path) in [
        ("clip-weight-path", &config.clip_weight_path),
        ("bert-weight-path", &config.bert_weight_path),
    ] {
        if let Some(path) = path
            && !path.exists()
        {
            return Err(RunError::Setting(crate::run::SettingError {
                flag,
                message: format!("{} does not exist", path.display()),
            }));
        }
    }
    Ok(())
}

fn setting(flag: &'static str, message: &str) -> RunError {
    RunError::Setting(crate::run::SettingError {
        flag,
        message: message.into(),
    })
}

/// A run checkpoint given as `--resume`: `X.safetensors` with `X.state.safetensors` beside it.
fn run_checkpoint(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".safetensors")?;
    if stem.ends_with(".state") {
        return None;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!("{stem}.state.safetensors"))
        .is_file()
        .then(|| (dir.to_path_buf(), stem.to_string()))
}

fn decide_resume(
    config: &RunConfig,
    lora: bool,
    notes: &mut Vec<String>,
) -> Result<Option<Resume>, RunError> {
    if let Some(dir) = config.checkpoint_dir() {
        // The newest complete checkpoint: a pair torn by a crash mid-write is passed over.
        if let Some((stem, position)) = checkpoint::latest_complete(&dir)? {
            if stem != "epoch_latest" {
                notes.push(format!(
                    "epoch_latest is missing or was torn by a crash; continuing from the newest \
                     complete checkpoint, {stem} (step {})",
                    position.step
                ));
            }
            let (model_file, _) = checkpoint::paths(&dir, &stem);
            if !lora && cnclip_lora::is_adapter_file(&model_file).map_err(setup)? {
                return Err(setup(format!(
                    "{} holds LoRA adapters: continue the run with its --lora-* flags and \
                     --resume naming its base weights",
                    model_file.display()
                )));
            }
            // The reset flags go with the file they were given for (see the module doc).
            let explicit = config.resume.is_some();
            let resume = Resume {
                position: explicit || !config.reset_data_offset,
                optimizer: explicit || !config.reset_optimizer,
                dir: dir.clone(),
                stem: stem.clone(),
            };
            notes.push(format!(
                "resuming from {} (step {}){}",
                dir.join(&stem).display(),
                position.step,
                match (&config.resume, lora) {
                    (Some(p), false) => format!("; --resume {} is not used", p.display()),
                    _ => String::new(),
                }
            ));
            return Ok(Some(resume));
        }
    }
    if lora {
        return Ok(None);
    }
    let Some((dir, stem)) = config.resume.as_deref().and_then(run_checkpoint) else {
        return Ok(None);
    };
    notes.push(format!(
        "resuming from the run checkpoint {}: {}, {}",
        dir.join(&stem).display(),
        if config.reset_data_offset {
            "position reset"
        } else {
            "epoch, step and data offset restored"
        },
        if config.reset_optimizer {
            "optimizer reset"
        } else {
            "optimizer restored"
        }
    ));
    Ok(Some(Resume {
        dir,
        stem,
        position: !config.reset_data_offset,
        optimizer: !config.reset_optimizer,
    }))
}

/// The adapter configuration of the `--lora-*` settings. The two types hold the same fields in two
/// layers — the flags (`cnclip-train-config`, no libtorch) and the adapter files (`cnclip-lora`) —
/// and so the same defaults: the test below keeps them equal.
fn lora_config(l: &cnclip_train_config::LoraSettings) -> cnclip_lora::LoraConfig {
    cnclip_lora::LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        targets: l.targets.clone(),
        train_logit_scale: l.train_logit_scale,
        train_layer_norms: l.train_layer_norms,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lora_flag_defaults_are_the_adapter_defaults() {
        assert_eq!(
            super::lora_config(&cnclip_train_config::LoraSettings::default()),
            cnclip_lora::LoraConfig::default()
        );
    }
}
