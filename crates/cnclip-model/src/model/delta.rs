//! The hook through which adapters act inside the towers: every linear map an adapter may target
//! (a *site*) has an optional [`LinearDelta`] slot, and its output becomes `x Wᵀ + b + Δ(x)`.
//!
//! The model knows nothing of what a delta computes (LoRA lives in `cnclip-lora`); it only names
//! the sites by cn_clip's module paths and calls the slot. An empty slot costs one branch.

use crate::config::{ClipConfig, VisionLayers};
use tch::Tensor;

/// An extra term on a linear map's output, filled in by an adapter crate.
pub trait LinearDelta: std::fmt::Debug + Send {
    /// `x` is the map's input `[…, in]`; the result `[…, out]` is added to its output. `None` adds
    /// nothing (e.g. an adapter already merged into the weight). `train` is the forward's training
    /// flag (dropout and the like).
    fn forward(&self, x: &Tensor, train: bool) -> Option<Tensor>;

    /// Lets the crate that attached a delta find its own type again.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A site's slot.
pub type DeltaSlot = Option<Box<dyn LinearDelta>>;

/// `y + Δ(x)` when the slot holds a delta, `y` otherwise.
pub(crate) fn apply(slot: &DeltaSlot, x: &Tensor, y: Tensor, train: bool) -> Tensor {
    match slot.as_ref().and_then(|d| d.forward(x, train)) {
        Some(delta) => y + delta,
        None => y,
    }
}

/// How a site's weight is stored in the state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `nn.Linear` / MHA `in_proj_weight`: `[out, in]`, `y = x Wᵀ`.
    OutIn,
    /// cn_clip's projection matrices (`visual.proj`, `text_projection`): `[in, out]`, `y = x P`.
    InOut,
}

/// A linear map that can carry a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// cn_clip's module path (`visual.transformer.resblocks.0.attn.in_proj`,
    /// `bert.encoder.layer.3.attention.self.query`, `visual.proj`, `text_projection`).
    pub name: String,
    /// The state-dict key of its weight (`….attn.in_proj_weight`, `….query.weight`, `visual.proj`).
    pub weight_key: String,
    pub layout: WeightLayout,
    pub input: i64,
    /// For the ViT's fused `in_proj` this is `3 · width` (q, k, v stacked in that order).
    pub output: i64,
}

/// Every site of a model built from `config`, in state-dict order: ViT blocks (`attn.in_proj`,
/// `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`), `visual.proj`, BERT layers (`attention.self.query`,
/// `…key`, `…value`, `attention.output.dense`, `intermediate.dense`, `output.dense`),
/// `text_projection`. The ModifiedResNet tower has none.
pub fn linear_sites(config: &ClipConfig) -> Vec<LinearSite> {
    let mut out = Vec::new();
    let mut add = |name: String, weight_key: String, layout, input, output| {
        out.push(LinearSite {
            name,
            weight_key,
            layout,
            input,
            output,
        })
    };
    if let VisionLayers::Transformer(layers) = config.vision.vision_layers {
        let w = config.vision.vision_width;
        for i in 0..layers {
            let b = format!("visual.transformer.resblocks.{i}");
            let attn_in = format!("{b}.attn.in_proj_weight");
            add(
                format!("{b}.attn.in_proj"),
                attn_in,
                WeightLayout::OutIn,
                w,
                3 * w,
            );
            for (m, input, output) in [
                ("attn.out_proj", w, w),
                ("mlp.c_fc", w, 4 * w),
                ("mlp.c_proj", 4 * w, w),
            ] {
                add(
                    format!("{b}.{m}"),
                    format!("{b}.{m}.weight"),
                    WeightLayout::OutIn,
                    input,
                    output,
                );
            }
        }
        add(
            "visual.proj".into(),
            "visual.proj".into(),
            WeightLayout::InOut,
            w,
            config.vision.embed_dim,
        );
    }
    let (h, i) = (
        config.text.text_hidden_size,
        config.text.text_intermediate_size,
    );
    for j in 0..config.text.text_num_hidden_layers {
        let b = format!("bert.encoder.layer.{j}");
        for (m, input, output) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, i),
            ("output.dense", i, h),
        ] {
            add(
                format!("{b}.{m}"),
                format!("{b}.{m}.weight"),
                WeightLayout::OutIn,
                input,
                output,
            );
        }
    }
    add(
        "text_projection".into(),
        "text_projection".into(),
        WeightLayout::InOut,
        h,
        config.vision.embed_dim,
    );
    out
}

/// Splits `prefix.{index}.rest` into `(index, rest)`.
pub(crate) fn indexed<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (index, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    Some((index.parse().ok()?, rest))
}
