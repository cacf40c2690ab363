//! Adapters attached to a live model: the low-rank delta each site computes, injection (adapter
//! variables registered in the model's `VarStore` under `{adapter}.lora_{A,B}.weight`, base
//! weights frozen), merging into and out of the base weights, and unloading.
//!
//! Keeping the adapter tensors in the model's own `VarStore` means everything that walks a model's
//! named tensors — the optimizer's parameter groups, gradient clipping, DDP's gradient all-reduce,
//! precision casts — sees exactly the adapters (and the base weights the config lets train) as
//! trainable, with no LoRA-specific code in the training loop.

use crate::LoraError;
use crate::config::{LoraConfig, adapters_of_site, site_of_adapter};
use cnclip_model::Clip;
use cnclip_model::model::{LinearDelta, LinearSite, WeightLayout};
use cnclip_model::weights::StateDict;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Kind, Tensor};

/// Key of adapter `name`'s down projection `A` `[rank, in]`.
pub fn a_key(name: &str) -> String {
    format!("{name}.lora_A.weight")
}

/// Key of adapter `name`'s up projection `B` `[out, rank]`.
pub fn b_key(name: &str) -> String {
    format!("{name}.lora_B.weight")
}

/// The adapter name of an `A`/`B` key, and whether it is `A`.
pub fn parse_key(key: &str) -> Option<(&str, bool)> {
    if let Some(name) = key.strip_suffix(".lora_A.weight") {
        Some((name, true))
    } else {
        key.strip_suffix(".lora_B.weight").map(|name| (name, false))
    }
}

/// Output rows `[offset, offset + len)` of `site` that adapter part `part` covers.
pub(crate) fn rows(site: &LinearSite, part: Option<usize>) -> (i64, i64) {
    match part {
        Some(i) => {
            let w = site.output / 3;
            (i as i64 * w, w)
        }
        None => (0, site.output),
    }
}

/// `scaling · B · A` in fp32, shaped like the covered block of the weight (`[len, in]`, or
/// transposed for an `[in, out]` projection).
pub(crate) fn delta_weight(a: &Tensor, b: &Tensor, scaling: f64, layout: WeightLayout) -> Tensor {
    let dw = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * scaling;
    match layout {
        WeightLayout::OutIn => dw,
        WeightLayout::InOut => dw.tr(),
    }
}

/// The block of `weight` that a part covers (a view sharing storage).
pub(crate) fn covered(weight: &Tensor, layout: WeightLayout, offset: i64, len: i64) -> Tensor {
    match layout {
        WeightLayout::OutIn => weight.narrow(0, offset, len),
        WeightLayout::InOut => weight.narrow(1, offset, len),
    }
}

#[derive(Debug)]
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    offset: i64,
    len: i64,
}

/// One site's adapters: a single low-rank pair, or up to three on the fused `in_proj` (q, k, v
/// each its own pair, with zeros where a part is not adapted).
#[derive(Debug)]
pub struct LoraDelta {
    pub(crate) site: LinearSite,
    pub(crate) parts: Vec<Part>,
    pub(crate) config: Arc<LoraConfig>,
    merged: AtomicBool,
}

impl LinearDelta for LoraDelta {
    fn forward(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        if self.merged.load(Ordering::Relaxed) {
            return None;
        }
        let scaling = self.config.scaling();
        let p = self.config.dropout;
        let mut pieces: Vec<Tensor> = Vec::with_capacity(2 * self.parts.len() + 1);
        let mut at = 0;
        let gap = |from: i64, to: i64, like: &Tensor| {
            let mut shape = like.size();
            if let Some(last) = shape.last_mut() {
                *last = to - from;
            }
            Tensor::zeros(shape, (like.kind(), like.device()))
        };
        // `scaling · A x` per part (r wide, so the scaling costs nothing). Without dropout the
        // parts of a fused in_proj share one matmul over the input; with it, each part draws its
        // own mask, as PEFT's separate q/k/v modules would.
        let hidden: Vec<Tensor> = if self.parts.len() > 1 && !(train && p > 0.0) {
            let a: Vec<&Tensor> = self.parts.iter().map(|part| &part.a).collect();
            (x.linear::<Tensor>(&Tensor::cat(&a, 0), None) * scaling).split(self.config.rank, -1)
        } else {
            self.parts
                .iter()
                .map(|part| {
                    let input = if train && p > 0.0 {
                        x.dropout(p, true)
                    } else {
                        x.shallow_clone()
                    };
                    input.linear::<Tensor>(&part.a, None) * scaling
                })
                .collect()
        };
        for (part, h) in self.parts.iter().zip(hidden) {
            let d = h.linear::<Tensor>(&part.b, None);
            if part.offset > at {
                pieces.push(gap(at, part.offset, &d));
            }
            at = part.offset + part.len;
            pieces.push(d);
        }
        if at < self.site.output
            && let Some(last) = pieces.last()
        {
            let tail = gap(at, self.site.output, last);
            pieces.push(tail);
        }
        if pieces.len() == 1 {
            pieces.pop()
        } else {
            Some(Tensor::cat(&pieces, -1))
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl LoraDelta {
    pub fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }
}

/// The LoRA deltas attached to `model`, in site order.
pub fn attached(model: &Clip) -> Vec<&LoraDelta> {
    model
        .linear_sites()
        .iter()
        .filter_map(|s| model.linear_delta(&s.name))
        .filter_map(|d| d.as_any().downcast_ref::<LoraDelta>())
        .collect()
}

/// The configuration of the adapters attached to `model`, if any.
pub fn config_of(model: &Clip) -> Option<LoraConfig> {
    attached(model).first().map(|d| (*d.config).clone())
}

/// What [`inject`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectReport {
    /// Adapter names (q, k, v of a fused `in_proj` count separately).
    pub adapters: Vec<String>,
    /// Numbers in the adapters.
    pub adapter_parameters: i64,
    /// Numbers in the base weights that still train (`logit_scale`, LayerNorms when asked).
    pub base_parameters: i64,
}

/// Attaches fresh adapters to `model` as `config` selects: `A ~ U(±1/√in)` (PEFT's
/// `kaiming_uniform_(a=√5)`), `B = 0`, so the model's outputs are unchanged until training moves
/// `B`. Every base weight is frozen except those `config` lets train. Adapters are created in the
/// dtype and on the device of the weight they adapt.
pub fn inject(model: &mut Clip, config: &LoraConfig) -> Result<InjectReport, LoraError> {
    if !attached(model).is_empty() {
        return Err(LoraError::AlreadyAttached);
    }
    let sites = model.linear_sites();
    let names = config.adapter_names(&sites)?;
    let base = model.named_tensors();
    let shared = Arc::new(config.clone());
    let r = config.rank;
    let mut deltas: BTreeMap<String, LoraDelta> = BTreeMap::new();
    let mut new_vars: Vec<(String, Tensor)> = Vec::new();
    let site_by_name: BTreeMap<&str, &LinearSite> =
        sites.iter().map(|s| (s.name.as_str(), s)).collect();
    for name in &names {
        let (site_name, part) = site_of_adapter(name);
        let site = site_by_name
            .get(site_name)
            .ok_or_else(|| LoraError::Config(format!("{name}: no such site in the model")))?;
        let weight = base
            .get(&site.weight_key)
            .ok_or_else(|| LoraError::Config(format!("the model has no {}", site.weight_key)))?;
        let (kind, device) = (weight.kind(), weight.device());
        let (offset, len) = rows(site, part);
        let bound = 1.0 / (site.input as f64).sqrt();
        let a = tch::no_grad(|| {
            Tensor::empty([r, site.input], (Kind::Float, device))
                .uniform_(-bound, bound)
                .to_kind(kind)
        })
        .set_requires_grad(true);
        let b = Tensor::zeros([len, r], (kind, device)).set_requires_grad(true);
        new_vars.push((a_key(name), a.shallow_clone()));
        new_vars.push((b_key(name), b.shallow_clone()));
        deltas
            .entry(site.name.clone())
            .or_insert_with(|| LoraDelta {
                site: (*site).clone(),
                parts: Vec::new(),
                config: shared.clone(),
                merged: AtomicBool::new(false),
            })
            .parts
            .push(Part {
                name: name.clone(),
                a,
                b,
                offset,
                len,
            });
    }
    let mut base_parameters = 0;
    for (key, tensor) in &base {
        if !tensor.is_floating_point() {
            continue;
        }
        let trains = config.trains_base_key(key);
        let _ = tensor.set_requires_grad(trains);
        if trains {
            base_parameters += tensor.numel() as i64;
        }
    }
    let adapter_parameters = new_vars.iter().map(|(_, t)| t.numel() as i64).sum();
    let root = model.var_store().root();
    for (key, tensor) in new_vars {
        // Key segments never contain '.', which is all tch's paths require.
        let mut segments: Vec<&str> = key.split('.').collect();
        let leaf = segments.pop().unwrap_or_default();
        let path = segments.iter().fold(root.clone(), |p, s| p.sub(*s));
        let _ = path.add(leaf, tensor, true);
    }
    for (site, delta) in deltas {
        model.set_linear_delta(&site, Some(Box::new(delta)))?;
    }
    Ok(InjectReport {
        adapters: names,
        adapter_parameters,
        base_parameters,
    })
}

/// The adapters' tensors (`{adapter}.lora_A.weight` / `.lora_B.weight`) and the base weights the
/// config lets train, under their model keys (detached, sharing storage).
pub fn adapter_state_dict(model: &Clip) -> Result<(LoraConfig, StateDict), LoraError> {
    let deltas = attached(model);
    let config = deltas
        .first()
        .map(|d| (*d.config).clone())
        .ok_or(LoraError::NotAttached)?;
    let mut sd = StateDict::new();
    for delta in &deltas {
        for part in &delta.parts {
            sd.insert(a_key(&part.name), part.a.detach());
            sd.insert(b_key(&part.name), part.b.detach());
        }
    }
    for (key, tensor) in model.named_tensors() {
        if config.trains_base_key(&key) {
            sd.insert(key, tensor.detach());
        }
    }
    Ok((config, sd))
}

fn shift(model: &Clip, sign: f64, want_merged: bool) -> Result<usize, LoraError> {
    let weights = model.named_tensors();
    let mut changed = 0;
    for delta in attached(model) {
        if delta.is_merged() == want_merged {
            continue;
        }
        let site = &delta.site;
        let weight = weights
            .get(&site.weight_key)
            .ok_or_else(|| LoraError::Config(format!("the model has no {}", site.weight_key)))?;
        let scaling = delta.config.scaling() * sign;
        tch::no_grad(|| {
            for part in &delta.parts {
                let dw = delta_weight(&part.a, &part.b, scaling, site.layout);
                let mut block = covered(weight, site.layout, part.offset, part.len);
                let _ = block.g_add_(&dw.to_kind(block.kind()));
            }
        });
        delta.merged.store(want_merged, Ordering::Relaxed);
        changed += 1;
    }
    Ok(changed)
}

/// Adds `scaling · B · A` into every adapted weight, after which the adapters compute nothing:
/// the forward is the base model's speed with the adapted model's outputs. Returns the number
/// of sites merged (already merged ones are left alone).
pub fn merge(model: &Clip) -> Result<usize, LoraError> {
    shift(model, 1.0, true)
}

/// Undoes [`merge`] (subtracts the same products), so training or another adapter can go on.
pub fn unmerge(model: &Clip) -> Result<usize, LoraError> {
    shift(model, -1.0, false)
}

/// Detaches the adapters from `model` and removes their variables, leaving a plain model whose
/// state dict has exactly the base keys. With `merge`, their update is merged in first; without
/// it, a merged model is unmerged first (the base weights come back). Every base weight is
/// trainable again afterwards, as in a fresh model. Returns the adapters' config.
pub fn unload(model: &mut Clip, merge_first: bool) -> Result<LoraConfig, LoraError> {
    let config = config_of(model).ok_or(LoraError::NotAttached)?;
    if merge_first {
        merge(model)?;
    } else {
        unmerge(model)?;
    }
    let mut keys = Vec::new();
    for site in model.linear_sites() {
        let is_lora = model
            .linear_delta(&site.name)
            .is_some_and(|d| d.as_any().is::<LoraDelta>());
        if is_lora {
            for name in adapters_of_site(&site.name) {
                keys.push(a_key(&name));
                keys.push(b_key(&name));
            }
            model.set_linear_delta(&site.name, None)?;
        }
    }
    {
        let mut vars = model
            .var_store()
            .variables_
            .lock()
            .map_err(|_| LoraError::Poisoned)?;
        for key in keys {
            if let Some(t) = vars.named_variables.remove(&key) {
                vars.trainable_variables.retain(|v| !v.tensor.is_set_to(&t));
            }
        }
    }
    // The VarStore's own list: buffers (BatchNorm statistics) stay without gradient.
    for tensor in model.var_store().trainable_variables() {
        let _ = tensor.set_requires_grad(true);
    }
    Ok(config)
}
