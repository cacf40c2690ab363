//! AdamW as cn_clip configures it (`main.py:146-174`, `params.py`): two parameter groups chosen by
//! substring, per-model default betas/eps, the rate assigned before every step, and the
//! `logit_scale` clamp after it.
//!
//! Written here rather than through tch's optimizer so that the groups are decided by cn_clip's
//! names, the state can be saved and restored by name for exact resume, and the update is the
//! exact sequence of torch's single-tensor AdamW (decoupled decay, `lerp` first moment).

use cnclip_model::Clip;
use tch::Tensor;

/// cn_clip's exclusion rule: no weight decay when the name contains `bn`, `ln`, `bias` or
/// `logit_scale`. A plain substring test, quirks included: BERT's `LayerNorm.weight` *is* decayed
/// (no lowercase `ln`), and so is a ResNet `downsample.1.weight` BatchNorm scale.
pub fn excluded_from_weight_decay(name: &str) -> bool {
    ["bn", "ln", "bias", "logit_scale"]
        .iter()
        .any(|s| name.contains(s))
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// cn_clip's per-vision-model defaults (`params.py:get_default_params`): `(lr, beta1, beta2, eps)`.
/// `None` for models it has no defaults for (it then requires the flags).
pub fn cn_clip_defaults(vision_model: &str) -> Option<(f64, AdamWConfig)> {
    let (lr, beta2, eps) = match vision_model {
        "RN50" | "RN101" | "RN50x4" => (5.0e-4, 0.999, 1.0e-8),
        "ViT-B-32" | "ViT-B-16" | "ViT-H-14" => (5.0e-4, 0.98, 1.0e-6),
        "ViT-L-14" | "ViT-L-14-336" => (4.0e-4, 0.98, 1.0e-6),
        _ => return None,
    };
    // cn_clip's --wd default.
    Some((
        lr,
        AdamWConfig {
            beta1: 0.9,
            beta2,
            eps,
            weight_decay: 0.2,
        },
    ))
}

#[derive(Debug)]
struct ParamState {
    name: String,
    param: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer state has no entry {key}")]
    MissingState { key: String },
    #[error("optimizer state {key}: expected shape {expected:?}, found {found:?}")]
    StateShape {
        key: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("optimizer state: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Foreach(torch_ext::ForeachError),
}

/// AdamW over named parameters, in name order.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: i64,
}

impl AdamW {
    /// Every tensor that requires a gradient becomes a parameter; frozen ones (e.g. the vision
    /// tower under `--freeze-vision`) are left out, as cn_clip filters on `requires_grad`.
    pub fn new(named: impl IntoIterator<Item = (String, Tensor)>, config: AdamWConfig) -> Self {
        let mut named: Vec<(String, Tensor)> = named
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, param)| ParamState {
                decay: !excluded_from_weight_decay(&name),
                exp_avg: param.zeros_like().detach(),
                exp_avg_sq: param.zeros_like().detach(),
                name,
                param,
            })
            .collect();
        Self {
            config,
            params,
            step: 0,
        }
    }

    /// All trainable variables of a model.
    pub fn for_model(model: &Clip, config: AdamWConfig) -> Self {
        Self::new(model.named_tensors(), config)
    }

    /// `(no-decay, decay)` parameter counts, as cn_clip's two groups.
    pub fn group_sizes(&self) -> (usize, usize) {
        let decay = self.params.iter().filter(|p| p.decay).count();
        (self.params.len() - decay, decay)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// The parameters' gradients (undefined tensors for parameters without one).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.param.grad()).collect()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.param.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// One update with rate `lr`. Parameters without a gradient are skipped (torch skips
    /// `p.grad is None`), but the step counter is shared, as torch's per-parameter counters all
    /// advance together whenever every parameter has a gradient, which is the case in training.
    ///
    /// On the CPU this is torch's single-tensor AdamW (its CPU default); on CUDA its multi-tensor
    /// ("foreach") AdamW (its CUDA default), which launches a few fused kernels per group.
    pub fn step(&mut self, lr: f64) -> Result<(), OptimError> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        // Python's float ** int goes through C pow(); so does powf.
        let t = self.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        let on_gpu = self
            .params
            .first()
            .is_some_and(|p| p.param.device().is_cuda());
        if on_gpu {
            // torch's default for CUDA parameters: the multi-tensor path, one group at a time.
            let constants = torch_ext::AdamWStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay: 0.0,
                bias_correction1,
                bias_correction2_sqrt,
            };
            for decay in [false, true] {
                let group: Vec<&ParamState> = self
                    .params
                    .iter()
                    .filter(|p| p.decay == decay && p.param.grad().defined())
                    .collect();
                let list =
                    |f: fn(&ParamState) -> Tensor| group.iter().map(|p| f(p)).collect::<Vec<_>>();
                let step = torch_ext::AdamWStep {
                    weight_decay: if decay { weight_decay } else { 0.0 },
                    ..constants
                };
                tch::no_grad(|| {
                    torch_ext::adamw_foreach(
                        &list(|p| p.param.shallow_clone()),
                        &list(|p| p.param.grad()),
                        &list(|p| p.exp_avg.shallow_clone()),
                        &list(|p| p.exp_avg_sq.shallow_clone()),
                        step,
                    )
                })
                .map_err(OptimError::Foreach)?;
            }
            return Ok(());
        }
        // torch's default for CPU parameters: the single-tensor path, parameter by parameter (the
        // shim passes addcmul_/addcdiv_ their scalar, which matters for fp16 parameters).
        let constants = torch_ext::AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay: 0.0,
            bias_correction1,
            bias_correction2_sqrt,
        };
        tch::no_grad(|| {
            for p in &self.params {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                let step = torch_ext::AdamWStep {
                    weight_decay: if p.decay { weight_decay } else { 0.0 },
                    ..constants
                };
                torch_ext::adamw_single(&p.param, &grad, &p.exp_avg, &p.exp_avg_sq, step)
                    .map_err(OptimError::Foreach)?;
            }
            Ok(())
        })
    }

    /// The moments by `exp_avg.NAME` / `exp_avg_sq.NAME`, plus `step`, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// Restores what [`AdamW::state`] saved; every parameter's moments must be present.
    pub fn load_state(
        &mut self,
        lookup: impl Fn(&str) -> Option<Tensor>,
    ) -> Result<(), OptimError> {
        let get = |key: String| lookup(&key).ok_or(OptimError::MissingState { key });
        let step = get("step".to_string())?.f_int64_value(&[])?;
        for p in &mut self.params {
            for (prefix, slot) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", p.name);
                let value = get(key.clone())?;
                if value.size() != slot.size() {
                    return Err(OptimError::StateShape {
                        key,
                        expected: slot.size(),
                        found: value.size(),
                    });
                }
                tch::no_grad(|| slot.f_copy_(&value))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// cn_clip clamps `logit_scale` to `[0, 4.6052]` after every optimizer step (`train.py:261`).
/// 4.6052 is slightly above ln 100; its exp is 100.003, not 100.
pub fn clamp_logit_scale(model: &Clip) {
    if let Some(mut scale) = model.named_tensors().remove("logit_scale") {
        tch::no_grad(|| {
            let _ = scale.clamp_(0.0, 4.6052);
        });
    }
}
