//! One optimizer step of cn_clip's loop (`train.py:train`: loss `train.py:21-126`, accumulation
//! `train.py:206-253`, clamp `train.py:261-262`): the rate assigned
//! from the schedule, forward in training mode, the contrastive loss, backward, AdamW, and the
//! `logit_scale` clamp — with `--accum-freq` handled as cn_clip does (features of every micro-batch
//! cached without gradient, then each micro-batch re-run with gradient against the cached others).
//!
//! Data loading and checkpoints feed into this from outside; DDP plugs in through two hooks: the
//! [`FeatureGather`] that assembles the loss's rows, and a [`GradientSync`] told before every
//! backward pass whether it reduces (torch's reducer averages inside the backward pass).

use crate::amp::GradScaler;
use crate::distill::{Teacher, cosine_similarity_loss};
use crate::freeze::Freeze;
use crate::loss::{ContrastiveOutput, FeatureGather, LocalOnly, contrastive_loss_in};
use crate::optim::{AdamW, AdamWConfig, clamp_logit_scale};
use crate::schedule::CosineSchedule;
use cnclip_model::Clip;
use tch::Tensor;

/// What a run is configured with.
#[derive(Debug, Clone, Copy)]
pub struct TrainerConfig {
    pub schedule: CosineSchedule,
    pub adamw: AdamWConfig,
    /// cn_clip's `--accum-freq`: micro-batches per optimizer step.
    pub accum_freq: usize,
    /// Frozen weights (cn_clip's `--freeze-vision`, the text tower, or all but the last layers):
    /// they get no gradient and no optimizer state.
    pub freeze: Freeze,
    /// When set, torch's global generator is re-seeded from `(seed, step, micro-batch)` before every
    /// forward, so dropout masks depend only on the position in the run and a resumed run draws
    /// the same masks as an uninterrupted one. (cn_clip never seeds dropout, so its runs are not
    /// reproducible; `None` keeps that behaviour.)
    pub dropout_seed: Option<u64>,
    /// cn_clip's `--grad-checkpointing`: keep only block inputs and recompute each block in the
    /// backward pass (same gradients, less activation memory).
    pub grad_checkpointing: bool,
    /// Numerics of the forward, backward and update; master weights stay fp32 in every mode
    /// except `Fp16`.
    pub precision: TrainPrecision,
    /// cn_clip's `--mask-ratio` (FLIP): the share of ViT patch tokens dropped in every training
    /// forward with gradient (not in the gradient-free caching pass of `--accum-freq`, not in
    /// validation), from noise drawn after the dropout re-seed, so reproducible. 0 drops nothing;
    /// ignored by a ResNet tower, as in cn_clip.
    pub mask_ratio: f64,
}

pub use cnclip_train_config::TrainPrecision;

/// What one optimizer step did, as cn_clip logs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken so far (cn_clip's "Global Steps").
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub image_to_text_accuracy: f64,
    pub text_to_image_accuracy: f64,
    /// The `logit_scale` parameter after the clamp (not its exponential).
    pub logit_scale: f64,
    /// AMP found inf/NaN gradients and skipped the optimizer update (the step still counts, as in
    /// cn_clip, whose schedule advances regardless).
    pub skipped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "loss is {value} at optimizer step {step} (micro-batch {micro_batch}); stopping before the weights are corrupted"
    )]
    NonFiniteLoss {
        step: u64,
        micro_batch: usize,
        value: f64,
    },
    #[error("training already reached its {max_steps} steps")]
    Finished { max_steps: u64 },
    #[error("an accumulation group completed with no micro-batch in it")]
    EmptyAccumulationGroup,
    #[error(transparent)]
    Autocast(#[from] torch_ext::AutocastError),
    #[error(transparent)]
    Optimizer(#[from] crate::optim::OptimError),
    #[error(
        "the backward pass failed (under DDP, possibly the gradient all-reduce inside it): {0}"
    )]
    Backward(tch::TchError),
    /// A collective failed: a peer died, or it did not answer within the process group's timeout.
    #[error(transparent)]
    Dist(#[from] torch_ext::dist::DistError),
}

/// DDP's gradient averaging ([`crate::ddp::Ddp::gradient_sync`]), which happens inside the backward
/// passes (torch's reducer all-reduces from autograd hooks), so the trainer only tells it when
/// a backward pass is coming and when the step's last one is done.
pub trait GradientSync {
    /// Right before each backward pass that produces parameter gradients. `sync`: this pass
    /// averages the gradients over the ranks (the step's last micro-batch); otherwise they only
    /// accumulate locally (torch's `no_sync`). `outputs`: the tensors the pass starts from, or
    /// `None` for a staged (gradient-checkpointed) backward whose graph is not all there yet.
    fn before_backward(
        &self,
        sync: bool,
        outputs: Option<&[&Tensor]>,
    ) -> Result<(), torch_ext::dist::DistError>;
    /// After the step's last backward pass, before AMP unscales the gradients: fails unless
    /// they were all averaged.
    fn after_backward(&self) -> Result<(), torch_ext::dist::DistError>;
}

pub struct Trainer {
    model: Clip,
    optimizer: AdamW,
    config: TrainerConfig,
    step: u64,
    gather: Box<dyn FeatureGather>,
    sync: Option<Box<dyn GradientSync>>,
    scaler: Option<GradScaler>,
    /// Micro-batches of the current accumulation group: inputs and their gradient-free features.
    pending: Vec<(Tensor, Tensor, Tensor, Tensor)>,
    /// `--distillation`: the teacher and `--kd_loss_weight`.
    distillation: Option<(Teacher, f64)>,
    /// The teacher's features of the pending micro-batches.
    pending_teacher: Vec<Tensor>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("config", &self.config)
            .finish()
    }
}

impl Trainer {
    /// A single-process trainer (the loss sees the local batch only).
    pub fn new(model: Clip, config: TrainerConfig) -> Self {
        Self::with_gather(model, config, Box::new(LocalOnly))
    }

    /// A trainer whose loss sees the rows `gather` assembles (DDP plugs in here).
    pub fn with_gather(
        mut model: Clip,
        config: TrainerConfig,
        gather: Box<dyn FeatureGather>,
    ) -> Self {
        if config.precision == TrainPrecision::Fp16 {
            // Before the optimizer exists: its moments are zeros like the (converted) parameters.
            model.set_precision(cnclip_model::Precision::Fp16);
        }
        config.freeze.apply(&model);
        let optimizer = AdamW::for_model(&model, config.adamw);
        let scaler =
            (config.precision == TrainPrecision::Amp).then(|| GradScaler::new(model.device()));
        Self {
            scaler,
            model,
            optimizer,
            config,
            step: 0,
            gather,
            sync: None,
            pending: Vec::new(),
            distillation: None,
            pending_teacher: Vec::new(),
        }
    }

    /// cn_clip's `--distillation`: every step's loss gains `weight ×` the cosine loss between
    /// `teacher`'s image features and the student's ([`cosine_similarity_loss`]).
    pub fn set_distillation(&mut self, teacher: Teacher, weight: f64) {
        self.distillation = Some((teacher, weight));
    }

    /// The distillation teacher, when set.
    pub fn teacher(&self) -> Option<&Teacher> {
        self.distillation.as_ref().map(|(t, _)| t)
    }

    pub fn model(&self) -> &Clip {
        &self.model
    }

    /// Installs DDP's gradient averaging (build it from [`Trainer::model`], after this trainer
    /// applied the freeze and precision).
    pub fn set_gradient_sync(&mut self, sync: Box<dyn GradientSync>) {
        self.sync = Some(sync);
    }

    pub fn into_model(self) -> Clip {
        self.model
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Continues a resumed run at optimizer step `step` (the optimizer's own state is restored
    /// separately through [`AdamW::load_state`]).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    pub fn is_finished(&self) -> bool {
        self.step >= self.config.schedule.total_steps
    }

    /// Feeds one micro-batch (`[B,3,R,R]` images, `[B,L]` token ids). Returns the step's report
    /// when this micro-batch completed an optimizer step, `None` while an accumulation group is
    /// still filling.
    pub fn train_batch(
        &mut self,
        images: &Tensor,
        texts: &Tensor,
    ) -> Result<Option<StepReport>, TrainError> {
        if self.is_finished() {
            return Err(TrainError::Finished {
                max_steps: self.config.schedule.total_steps,
            });
        }
        let lr = self.config.schedule.lr(self.step);
        let accum = self.config.accum_freq.max(1);
        let last = if accum == 1 {
            self.reseed(0);
            self.optimizer.zero_grad();
            // cn_clip's get_loss runs the teacher under the step's autocast.
            let teacher = match &self.distillation {
                Some((t, _)) => Some(self.autocast(|| t.features(images))?),
                None => None,
            };
            self.forward_backward(images, texts, 0, true, teacher.as_ref(), |img, txt| {
                (img.shallow_clone(), txt.shallow_clone())
            })?
        } else {
            self.reseed(self.pending.len());
            let (img, txt, _) =
                tch::no_grad(|| self.autocast(|| self.model.forward_t(images, texts, true)))?;
            // cn_clip's caching pass runs the teacher outside autocast; its cached features then
            // serve every micro-batch (cn_clip recomputes micro-batch j's under autocast: the same
            // features up to fp16 rounding, for one more teacher forward per micro-batch).
            if let Some((t, _)) = &self.distillation {
                self.pending_teacher.push(t.features(images));
            }
            self.pending
                .push((images.shallow_clone(), texts.shallow_clone(), img, txt));
            if self.pending.len() < accum {
                return Ok(None);
            }
            self.accumulated_backward()?
        };
        if let Some(sync) = &self.sync {
            sync.after_backward()?;
        }
        let skipped = match &self.scaler {
            Some(scaler) => scaler.unscale(&self.optimizer.grads()),
            None => false,
        };
        if !skipped {
            self.optimizer.step(lr)?;
        }
        clamp_logit_scale(&self.model);
        self.step += 1;
        let logit_scale = self
            .model
            .named_tensors()
            .get("logit_scale")
            .map(|t| t.double_value(&[]))
            .unwrap_or(f64::NAN);
        Ok(Some(StepReport {
            step: self.step,
            lr,
            loss: last.loss.double_value(&[]),
            image_to_text_accuracy: last.image_to_text_accuracy,
            text_to_image_accuracy: last.text_to_image_accuracy,
            logit_scale,
            skipped,
        }))
    }

    /// The AMP gradient scaler, when `amp` is on (its state belongs in checkpoints).
    pub fn scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    pub fn scaler_mut(&mut self) -> Option<&mut GradScaler> {
        self.scaler.as_mut()
    }

    fn reseed(&self, micro_batch: usize) {
        if let Some(seed) = self.config.dropout_seed {
            let position = self
                .step
                .wrapping_mul(1 << 20)
                .wrapping_add(micro_batch as u64);
            tch::manual_seed(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(position) as i64,
            );
        }
    }

    /// Forward in training mode (checkpointed or recorded), the loss over the rows `rows` builds
    /// from this micro-batch's features, the finiteness check, and the backward pass (`sync`: the
    /// one that averages the gradients over the ranks under DDP).
    fn forward_backward(
        &self,
        images: &Tensor,
        texts: &Tensor,
        micro_batch: usize,
        sync: bool,
        teacher: Option<&Tensor>,
        rows: impl Fn(&Tensor, &Tensor) -> (Tensor, Tensor),
    ) -> Result<ContrastiveOutput, TrainError> {
        let check = |out: &ContrastiveOutput| {
            let value = out.loss.double_value(&[]);
            // Under AMP an overflow is the scaler's business (the step is skipped), as in cn_clip.
            if value.is_finite() || self.scaler.is_some() {
                Ok(())
            } else {
                Err(TrainError::NonFiniteLoss {
                    step: self.step + 1,
                    micro_batch,
                    value,
                })
            }
        };
        let scaled = |loss: &Tensor| match &self.scaler {
            Some(scaler) => scaler.scale(loss),
            None => loss.shallow_clone(),
        };
        // FLIP: drawn here, after the re-seed, from torch's generator (cn_clip draws it in the
        // forward); `None` at ratio 0 and for a ResNet.
        let keep = self
            .model
            .flip_keep(images.size()[0], self.config.mask_ratio);
        // The backward recomputation of checkpointed blocks must run under the same autocast as
        // their forward, so both sit inside it.
        self.autocast(|| {
            if self.config.grad_checkpointing {
                let fwd =
                    self.model
                        .forward_checkpointed_masked(images, texts, true, keep.as_ref());
                let (img, txt) = rows(&fwd.image_features, &fwd.text_features);
                let (out, seed) =
                    self.loss_and_seed(&img, &txt, &fwd.logit_scale, teacher, &scaled)?;
                check(&out)?;
                if let Some(s) = &self.sync {
                    s.before_backward(sync, None)?;
                }
                fwd.try_backward(&self.model, &seed)
                    .map_err(TrainError::Backward)?;
                Ok(out)
            } else {
                let (img, txt, scale) =
                    self.model
                        .forward_masked(images, texts, true, keep.as_ref());
                let (img, txt) = rows(&img, &txt);
                let (out, seed) = self.loss_and_seed(&img, &txt, &scale, teacher, &scaled)?;
                check(&out)?;
                if let Some(s) = &self.sync {
                    s.before_backward(sync, Some(&[&seed]))?;
                }
                // Under DDP the reducer's all-reduce runs inside backward: a dead or stalled
                // peer surfaces here, as an error rather than a panic.
                seed.f_backward().map_err(TrainError::Backward)?;
                Ok(out)
            }
        })?
    }

    /// The loss over the gathered rows, and the scalar whose backward pass fills the parameter
    /// gradients. Usually that is the (scaled) loss itself. With a differentiable gather
    /// (`--gather-with-grad`) backward is staged, since tch has no custom autograd functions: the
    /// loss is first differentiated w.r.t. leaf copies of the gathered rows and of the scale,
    /// the rows' gradient is summed over ranks ([`FeatureGather::local_gradient`]), and the backward seed
    /// `sum(local · g) + sum(scale · g_scale)` carries exactly those gradients into the model.
    fn loss_and_seed(
        &self,
        image: &Tensor,
        text: &Tensor,
        scale: &Tensor,
        teacher: Option<&Tensor>,
        scaled: &dyn Fn(&Tensor) -> Tensor,
    ) -> Result<(ContrastiveOutput, Tensor), TrainError> {
        let gather = self.gather.as_ref();
        // Pure fp16 takes the loss in fp16 as cn_clip does; the other modes in fp32.
        let fp32_loss = self.config.precision != TrainPrecision::Fp16;
        // cn_clip: total_loss += kd_loss * kd_loss_weight, over the gathered rows of both.
        let distilled = |mut out: ContrastiveOutput,
                         rows_image: &Tensor|
         -> Result<ContrastiveOutput, TrainError> {
            if let (Some(teacher), Some((_, weight))) = (teacher, &self.distillation) {
                let rows_teacher = gather.gather(&teacher.detach())?;
                // Out of place (the loss is part of the graph); addition commutes exactly.
                let kd = cosine_similarity_loss(&rows_teacher, rows_image) * *weight;
                out.loss = kd + &out.loss;
            }
            Ok(out)
        };
        if !gather.differentiable() {
            let rows_image = gather.gather(image)?;
            let rows_text = gather.gather(text)?;
            let out = contrastive_loss_in(&rows_image, &rows_text, scale, &LocalOnly, fp32_loss)?;
            let out = distilled(out, &rows_image)?;
            let seed = scaled(&out.loss);
            return Ok((out, seed));
        }
        let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
        let (rows_image, rows_text) = (
            leaf(&gather.gather(&image.detach())?),
            leaf(&gather.gather(&text.detach())?),
        );
        let scale_leaf = leaf(scale);
        let out = contrastive_loss_in(&rows_image, &rows_text, &scale_leaf, &LocalOnly, fp32_loss)?;
        let out = distilled(out, &rows_image)?;
        scaled(&out.loss).backward();
        let grad_image = gather.local_gradient(&rows_image.grad())?;
        let grad_text = gather.local_gradient(&rows_text.grad())?;
        let dot = |x: &Tensor, g: &Tensor| (x * g.to_kind(x.kind())).sum(tch::Kind::Float);
        let seed = dot(image, &grad_image) + dot(text, &grad_text) + dot(scale, &scale_leaf.grad());
        Ok((out, seed))
    }

    /// Runs `f` under the autocast of the configured precision.
    fn autocast<T>(&self, f: impl FnOnce() -> T) -> Result<T, TrainError> {
        match self.config.precision {
            TrainPrecision::Fp32 | TrainPrecision::Fp16 => Ok(f()),
            TrainPrecision::Amp => Ok(tch::autocast(true, f)),
            TrainPrecision::Bf16 => {
                torch_ext::autocast(self.model.device(), tch::Kind::BFloat16, true, f)
                    .map_err(TrainError::Autocast)
            }
        }
    }

    /// cn_clip's accumulation: for each cached micro-batch j, recompute its features with gradient
    /// and take the loss over all cached rows with j's replaced; gradients add up over j. The
    /// report is the last j's, as cn_clip logs.
    fn accumulated_backward(&mut self) -> Result<ContrastiveOutput, TrainError> {
        let pending = std::mem::take(&mut self.pending);
        let pending_teacher = std::mem::take(&mut self.pending_teacher);
        // All micro-batches' teacher rows, in the order of the student's.
        let teacher = (!pending_teacher.is_empty()).then(|| Tensor::cat(&pending_teacher, 0));
        self.optimizer.zero_grad();
        let mut last = None;
        for j in 0..pending.len() {
            // The same masks as the caching pass drew for this micro-batch.
            self.reseed(j);
            let (images, texts, _, _) = &pending[j];
            let rows = |fresh: &Tensor, pick: fn(&(Tensor, Tensor, Tensor, Tensor)) -> &Tensor| {
                let parts: Vec<Tensor> = pending
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        if i == j {
                            fresh.shallow_clone()
                        } else {
                            pick(p).shallow_clone()
                        }
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            };
            // Only the last micro-batch's backward reduces (torch's `no_sync` on the others).
            let sync = j + 1 == pending.len();
            let out =
                self.forward_backward(images, texts, j, sync, teacher.as_ref(), |img, txt| {
                    (rows(img, |p| &p.2), rows(txt, |p| &p.3))
                })?;
            last = Some(out);
        }
        last.ok_or(TrainError::EmptyAccumulationGroup)
    }
}
