//! The CLIP wrapper (`model.py:290-431`): `encode_image`, `encode_text` ([CLS] hidden state times
//! `text_projection`), normalised features and `logit_scale`, plus loading by state-dict name and
//! the precision modes of cn_clip's entry points.

use super::bert::Bert;
use super::delta::{self, DeltaSlot, LinearDelta, LinearSite};
use super::resnet::ModifiedResNet;
use super::vit::{VisionTransformer, resize_positional_embedding};
use crate::config::{ClipConfig, VisionLayers};
use std::collections::{BTreeMap, BTreeSet};
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "state dict does not match the model ({} missing, {} unexpected){}{}",
        missing.len(),
        unexpected.len(),
        list("\n  missing keys: ", missing),
        list("\n  unexpected keys: ", unexpected)
    )]
    KeyMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("shape mismatch for {key}: the model expects {expected:?}, the weights have {found:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error(
        "dtype mismatch for {key}: the model holds {expected:?} values, the weights are {found:?} \
         (a float weight stored as integers or booleans is a damaged or foreign file)"
    )]
    DtypeMismatch {
        key: String,
        expected: Kind,
        found: Kind,
    },
    #[error("cannot copy weights into {key}: {source}")]
    Copy { key: String, source: tch::TchError },
    #[error("{what}: {source}")]
    Torch { what: String, source: tch::TchError },
    #[error(
        "{name} is not a linear map that can carry an adapter (see Clip::linear_sites for the names)"
    )]
    UnknownSite { name: String },
}

fn list(prefix: &str, keys: &[String]) -> String {
    const SHOWN: usize = 20;
    if keys.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{prefix}{}",
        keys.iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if keys.len() > SHOWN {
        out.push_str(&format!(", … and {} more", keys.len() - SHOWN));
    }
    out
}

/// Numerics of inference, each named after the cn_clip entry point it reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Pure fp32 with the checkpoint's weights as stored: `extract_features.py` /
    /// `zeroshot_evaluation.py` with `--precision fp32` or the default `amp` (which, despite its
    /// name, builds an fp32 model there and never autocasts).
    Fp32,
    /// fp32 compute with the weights cn_clip's `convert_weights` touches rounded to fp16 and back:
    /// `cn_clip.clip.load_from_name(name, device="cpu")` and the fp32 ONNX export.
    Fp32Fp16Rounded,
    /// fp16 inference as `load_from_name(name, device="cuda")` and `extract_features.py
    /// --precision fp16`: converted weights in fp16, visual LayerNorms, embeddings of the vision
    /// tower and `logit_scale` in fp32. Meant for GPUs; CPU fp16 kernels are slow.
    Fp16,
    /// Our own fast path (no cn_clip equivalent): the tensors `convert_weights` touches in bf16,
    /// the rest as for `Fp16`. bf16 keeps fp32's range, so no overflow traps.
    Bf16,
}

impl Precision {
    /// cn_clip's `--precision` flag of `extract_features.py` and `zeroshot_evaluation.py`: `amp`
    /// and `fp32` are [`Precision::Fp32`] (the scripts never autocast), `fp16` is
    /// [`Precision::Fp16`]; `bf16` (ours) is [`Precision::Bf16`]; anything else `None`.
    pub fn from_cn_clip_flag(flag: &str) -> Option<Precision> {
        match flag {
            "amp" | "fp32" => Some(Precision::Fp32),
            "fp16" => Some(Precision::Fp16),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// The vision tower: a ViT for every released model except RN50.
#[derive(Debug)]
pub enum Visual {
    Transformer(VisionTransformer),
    ResNet(ModifiedResNet),
}

impl Visual {
    /// `keep` (FLIP) reaches the ViT only: cn_clip's `encode_image` drops `mask_ratio` for the
    /// ResNet (`model.py:391-393`).
    fn forward(&self, image: &Tensor, train: bool, keep: Option<&Tensor>) -> Tensor {
        match self {
            Visual::Transformer(v) => v.forward(image, train, keep),
            Visual::ResNet(r) => r.forward(image),
        }
    }

    fn dtype(&self) -> Kind {
        match self {
            Visual::Transformer(v) => v.dtype(),
            Visual::ResNet(r) => r.dtype(),
        }
    }
}

pub struct Clip {
    config: ClipConfig,
    vs: VarStore,
    visual: Visual,
    bert: Bert,
    text_projection: Tensor,
    text_projection_delta: DeltaSlot,
    logit_scale: Tensor,
}

impl std::fmt::Debug for Clip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clip")
            .field("config", &self.config)
            .field("device", &self.vs.device())
            .finish()
    }
}

/// cn_clip's `convert_weights` casts every Conv/Linear/MHA projection, the whole BERT and both
/// projection matrices; it leaves the vision LayerNorms, class and positional embeddings, the
/// ResNet's BatchNorms and `logit_scale` in fp32. Decided by key, which is how cn_clip's modules
/// map onto our variables.
pub(crate) fn converted_by_cn_clip(key: &str) -> bool {
    if key == "logit_scale" {
        return false;
    }
    if key.starts_with("bert.") || key == "text_projection" {
        return true;
    }
    let Some(visual) = key.strip_prefix("visual.") else {
        return false;
    };
    let leaf_module = visual.rsplit('.').nth(1).unwrap_or("");
    let keeps_fp32 = visual == "class_embedding"
        || visual.ends_with("positional_embedding")
        || leaf_module.starts_with("ln_")
        || leaf_module.starts_with("bn")
        || visual.contains("downsample.1.");
    !keeps_fp32
}

impl Clip {
    /// A model with cn_clip's initialisation (for training from scratch or as a shape template
    /// before loading weights).
    pub fn new(config: &ClipConfig, device: Device) -> Self {
        let vs = VarStore::new(device);
        let root = vs.root();
        let visual = match config.vision.vision_layers {
            VisionLayers::Transformer(layers) => Visual::Transformer(VisionTransformer::new(
                &(&root / "visual"),
                &config.vision,
                layers,
            )),
            VisionLayers::ResNet(blocks) => Visual::ResNet(ModifiedResNet::new(
                &(&root / "visual"),
                &config.vision,
                blocks,
            )),
        };
        let bert = Bert::new(&(&root / "bert"), &config.text);
        let h = config.text.text_hidden_size;
        let text_projection = root.var(
            "text_projection",
            &[h, config.vision.embed_dim],
            Init::Randn {
                mean: 0.0,
                stdev: (h as f64).powf(-0.5),
            },
        );
        let logit_scale = root.var("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln()));
        Self {
            config: config.clone(),
            vs,
            visual,
            bert,
            text_projection,
            text_projection_delta: None,
            logit_scale,
        }
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The model's variables by cn_clip key (shallow clones sharing storage with the model).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Copies weights into the model by exact key, like PyTorch's strict `load_state_dict`: every
    /// model key must be present with the same shape and nothing else may be given. Values are cast
    /// to each variable's dtype and device.
    ///
    /// `resize_pos_embed`: when the checkpoint's ViT grid differs from the config's, resize
    /// `visual.positional_embedding` as cn_clip's training resume does instead of failing.
    pub fn load_named<'a, I>(
        &mut self,
        weights: I,
        resize_pos_embed: bool,
    ) -> Result<(), ModelError>
    where
        I: IntoIterator<Item = (&'a str, &'a Tensor)>,
    {
        let vars = self.vs.variables();
        let given: BTreeMap<&str, &Tensor> = weights.into_iter().collect();
        let missing: Vec<String> = vars
            .keys()
            .filter(|k| !given.contains_key(k.as_str()))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let unexpected: Vec<String> = given
            .keys()
            .filter(|k| !vars.contains_key(**k))
            .map(|k| k.to_string())
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(ModelError::KeyMismatch {
                missing,
                unexpected,
            });
        }
        let mut plan = Vec::with_capacity(vars.len());
        for (key, var) in &vars {
            let mut src = given[key.as_str()].shallow_clone();
            if src.size() != var.size() && key == "visual.positional_embedding" && resize_pos_embed
            {
                src = resize_positional_embedding(&src, self.config.vision.grid()).unwrap_or(src);
            }
            if src.size() != var.size() {
                return Err(ModelError::ShapeMismatch {
                    key: key.clone(),
                    expected: var.size(),
                    found: src.size(),
                });
            }
            // copy_ casts any dtype; only a float-to-float cast (fp16/bf16 checkpoints) is sound.
            if src.is_floating_point() != var.is_floating_point() {
                return Err(ModelError::DtypeMismatch {
                    key: key.clone(),
                    expected: var.kind(),
                    found: src.kind(),
                });
            }
            plan.push((key, var, src));
        }
        tch::no_grad(|| {
            for (key, var, src) in plan {
                let mut var = var.shallow_clone();
                var.f_copy_(&src).map_err(|source| ModelError::Copy {
                    key: key.clone(),
                    source,
                })?;
            }
            Ok(())
        })
    }

    /// Puts the model into one of cn_clip's numeric modes (see [`Precision`]). Start from fp32
    /// weights: `Fp32Fp16Rounded` rounds the affected weights irreversibly.
    pub fn set_precision(&mut self, precision: Precision) {
        let target = match precision {
            Precision::Fp32 | Precision::Fp32Fp16Rounded => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        };
        tch::no_grad(|| {
            for (key, mut var) in self.vs.variables() {
                if !var.is_floating_point() {
                    continue;
                }
                let kind = if converted_by_cn_clip(&key) {
                    target
                } else {
                    Kind::Float
                };
                let value = if precision == Precision::Fp32Fp16Rounded && converted_by_cn_clip(&key)
                {
                    var.to_kind(Kind::Half).to_kind(Kind::Float)
                } else {
                    var.to_kind(kind)
                };
                var.set_data(&value);
            }
        });
    }

    /// `[N, 3, R, R]` preprocessed images → `[N, embed_dim]` unnormalised features.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        self.encode_image_t(images, false)
    }

    /// [`Clip::encode_image`] in training mode when `train` is true. cn_clip's vision towers have
    /// no dropout, so `train` only reaches adapter deltas (e.g. LoRA dropout).
    pub fn encode_image_t(&self, images: &Tensor, train: bool) -> Tensor {
        self.encode_image_masked(images, train, None)
    }

    /// [`Clip::encode_image_t`] with FLIP's patch dropping: the ViT keeps only the class token and
    /// the patch tokens `keep` names (`[N, len_keep]`, from [`Clip::flip_keep`] or
    /// [`super::flip_keep_indices`]). Ignored by the ResNet, as in cn_clip.
    pub fn encode_image_masked(
        &self,
        images: &Tensor,
        train: bool,
        keep: Option<&Tensor>,
    ) -> Tensor {
        self.visual
            .forward(&images.to_device(self.device()), train, keep)
    }

    /// FLIP's kept patches for a batch of `batch` images at `mask_ratio`, from noise drawn like
    /// cn_clip's `random_masking` (`torch.rand(N, L−1)` on the model's device, from torch's global
    /// generator, which the trainer seeds). `None` when nothing is dropped: a ratio of 0 (cn_clip
    /// skips the masking then) or a ResNet tower.
    pub fn flip_keep(&self, batch: i64, mask_ratio: f64) -> Option<Tensor> {
        match &self.visual {
            Visual::Transformer(vit) if mask_ratio != 0.0 => {
                let noise =
                    Tensor::rand([batch, vit.num_tokens() - 1], (Kind::Float, self.device()));
                Some(super::flip_keep_indices(&noise, mask_ratio))
            }
            _ => None,
        }
    }

    /// `[N, L]` token ids (PAD 0) → `[N, embed_dim]` unnormalised features.
    pub fn encode_text(&self, ids: &Tensor) -> Tensor {
        self.encode_text_t(ids, false)
    }

    /// [`Clip::encode_text`] with cn_clip's training-mode dropout when `train` is true (the text
    /// tower is the only one with dropout; the ViT has none and the ResNet's BatchNorms stay in
    /// inference mode, as fine-tuning with frozen statistics).
    pub fn encode_text_t(&self, ids: &Tensor, train: bool) -> Tensor {
        let ids = ids.to_device(self.device());
        let mask = ids.ne(0).to_kind(self.compute_dtype());
        self.text_head(&self.bert.forward(&ids, &mask, train), train)
    }

    /// cn_clip pools the `[CLS]` hidden state and projects it without bias.
    pub(crate) fn text_head(&self, hidden: &Tensor, train: bool) -> Tensor {
        let dtype = self.compute_dtype();
        let pooled = hidden.to_kind(dtype).select(1, 0);
        let y = pooled.matmul(&self.text_projection.to_kind(dtype));
        delta::apply(&self.text_projection_delta, &pooled, y, train)
    }

    /// The linear maps of this model that can carry an adapter's delta (see
    /// [`delta::linear_sites`]).
    pub fn linear_sites(&self) -> Vec<LinearSite> {
        delta::linear_sites(&self.config)
    }

    /// Puts `delta` into site `name`'s slot (`None` empties it) and returns what was there.
    pub fn set_linear_delta(
        &mut self,
        name: &str,
        delta: DeltaSlot,
    ) -> Result<DeltaSlot, ModelError> {
        let slot = self.slot_mut(name).ok_or_else(|| ModelError::UnknownSite {
            name: name.to_string(),
        })?;
        Ok(std::mem::replace(slot, delta))
    }

    /// The delta in site `name`'s slot, if any.
    pub fn linear_delta(&self, name: &str) -> Option<&dyn LinearDelta> {
        self.slot(name)?.as_deref()
    }

    fn slot_mut(&mut self, name: &str) -> Option<&mut DeltaSlot> {
        if name == "text_projection" {
            return Some(&mut self.text_projection_delta);
        }
        if let Some(rest) = name.strip_prefix("bert.") {
            return self.bert.slot_mut(rest);
        }
        match (&mut self.visual, name.strip_prefix("visual.")) {
            (Visual::Transformer(vit), Some(rest)) => vit.slot_mut(rest),
            _ => None,
        }
    }

    fn slot(&self, name: &str) -> Option<&DeltaSlot> {
        if name == "text_projection" {
            return Some(&self.text_projection_delta);
        }
        if let Some(rest) = name.strip_prefix("bert.") {
            return self.bert.slot(rest);
        }
        match (&self.visual, name.strip_prefix("visual.")) {
            (Visual::Transformer(vit), Some(rest)) => vit.slot(rest),
            _ => None,
        }
    }

    /// The dtype cn_clip computes in: `visual.conv1.weight`'s (also used for the text mask).
    pub(crate) fn compute_dtype(&self) -> Kind {
        self.visual.dtype()
    }

    pub(crate) fn visual(&self) -> &Visual {
        &self.visual
    }

    pub(crate) fn bert(&self) -> &Bert {
        &self.bert
    }

    /// L2-normalised image features (no epsilon, as cn_clip).
    pub fn image_features(&self, images: &Tensor) -> Tensor {
        normalize(&self.encode_image(images))
    }

    /// L2-normalised text features (no epsilon, as cn_clip).
    pub fn text_features(&self, ids: &Tensor) -> Tensor {
        normalize(&self.encode_text(ids))
    }

    /// `exp(logit_scale)`, the temperature of the contrastive logits.
    pub fn logit_scale_exp(&self) -> Tensor {
        self.logit_scale.exp()
    }

    /// cn_clip's `forward(image, text)`: normalised image and text features and `exp(logit_scale)`.
    pub fn forward(&self, images: &Tensor, ids: &Tensor) -> (Tensor, Tensor, Tensor) {
        self.forward_t(images, ids, false)
    }

    /// [`Clip::forward`] in training mode when `train` is true (see [`Clip::encode_text_t`]).
    pub fn forward_t(
        &self,
        images: &Tensor,
        ids: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor, Tensor) {
        self.forward_masked(images, ids, train, None)
    }

    /// [`Clip::forward_t`] with FLIP's patch dropping in the vision tower (cn_clip's
    /// `forward(image, text, mask_ratio)`; see [`Clip::encode_image_masked`]).
    pub fn forward_masked(
        &self,
        images: &Tensor,
        ids: &Tensor,
        train: bool,
        keep: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor) {
        (
            normalize(&self.encode_image_masked(images, train, keep)),
            normalize(&self.encode_text_t(ids, train)),
            self.logit_scale_exp(),
        )
    }

    /// `logits_per_image = exp(logit_scale) · img · txtᵀ` and its transpose, as `get_similarity`.
    pub fn similarity(&self, images: &Tensor, ids: &Tensor) -> (Tensor, Tensor) {
        let (img, txt, scale) = self.forward(images, ids);
        let per_image = img.matmul(&txt.tr()) * scale.to_kind(img.kind());
        let per_text = per_image.tr();
        (per_image, per_text)
    }
}

pub(crate) fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClipConfig;

    #[test]
    fn fp16_conversion_follows_cn_clip_convert_weights() {
        for key in [
            "visual.conv1.weight",
            "visual.proj",
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.0.attn.out_proj.bias",
            "visual.transformer.resblocks.3.mlp.c_fc.weight",
            "visual.layer1.0.conv2.weight",
            "visual.layer1.0.downsample.0.weight",
            "visual.attnpool.q_proj.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.position_embeddings.weight",
            "text_projection",
        ] {
            assert!(converted_by_cn_clip(key), "{key}");
        }
        for key in [
            "logit_scale",
            "visual.class_embedding",
            "visual.positional_embedding",
            "visual.ln_pre.weight",
            "visual.ln_post.bias",
            "visual.transformer.resblocks.0.ln_1.weight",
            "visual.bn1.running_var",
            "visual.layer2.0.bn3.weight",
            "visual.layer2.0.downsample.1.running_mean",
            "visual.attnpool.positional_embedding",
        ] {
            assert!(!converted_by_cn_clip(key), "{key}");
        }
    }

    fn tiny() -> ClipConfig {
        ClipConfig::from_json_str(
            r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,"vision_patch_size":8,
                "vision_head_width":16,"vocab_size":200,"text_attention_probs_dropout_prob":0.0,
                "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
                "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
                "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
            "tiny",
        )
        .unwrap()
    }

    #[test]
    fn vit_keys_are_cn_clip_state_dict_keys() {
        let model = Clip::new(&tiny(), Device::Cpu);
        let keys = model.named_tensors();
        // 2 ViT blocks × 12, 8 other visual, 5 embeddings, 2 BERT layers × 16, 2 top-level.
        assert_eq!(keys.len(), 2 * 12 + 8 + 5 + 2 * 16 + 2);
        for key in [
            "visual.transformer.resblocks.1.attn.in_proj_weight",
            "visual.conv1.weight",
            "bert.encoder.layer.1.attention.output.LayerNorm.bias",
            "bert.embeddings.token_type_embeddings.weight",
            "logit_scale",
        ] {
            assert!(
                keys.contains_key(key),
                "{key} missing from {:?}",
                keys.keys()
            );
        }
        assert_eq!(keys["visual.positional_embedding"].size(), vec![17, 32]);
    }

    #[test]
    fn rn50_has_the_documented_state_dict() {
        let model = Clip::new(&ClipConfig::from_name("RN50").unwrap(), Device::Cpu);
        let keys = model.named_tensors();
        let visual = keys.keys().filter(|k| k.starts_with("visual.")).count();
        let total: i64 = keys
            .values()
            .filter(|t| t.is_floating_point())
            .map(|t| t.numel() as i64)
            .sum();
        // cn_clip's RN50 state dict: 394 entries (229 params + 165 BN buffers); our count includes
        // the buffers.
        assert_eq!(keys.len(), 394);
        assert!(visual > 0);
        // Parameters + BN running stats; num_batches_tracked (int64) excluded.
        let running: i64 = keys
            .iter()
            .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(total - running, 76_989_537);
    }

    #[test]
    fn vit_b_16_has_the_documented_parameter_count() {
        let model = Clip::new(&ClipConfig::from_name("ViT-B-16").unwrap(), Device::Cpu);
        let keys = model.named_tensors();
        assert_eq!(keys.len(), 351);
        let total: i64 = keys.values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, 188_262_913);
    }

    #[test]
    fn load_reports_missing_unexpected_and_shape_errors() {
        let mut model = Clip::new(&tiny(), Device::Cpu);
        let mut weights = model.named_tensors();
        let removed = weights.remove("visual.ln_pre.weight").unwrap();
        weights.insert("bert.pooler.dense.weight".into(), removed);
        let err = model
            .load_named(weights.iter().map(|(k, v)| (k.as_str(), v)), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing keys: visual.ln_pre.weight"), "{err}");
        assert!(
            err.contains("unexpected keys: bert.pooler.dense.weight"),
            "{err}"
        );

        let mut weights = model.named_tensors();
        weights.insert(
            "text_projection".into(),
            Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)),
        );
        let err = model
            .load_named(weights.iter().map(|(k, v)| (k.as_str(), v)), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_projection") && err.contains("[24, 16]") && err.contains("[3, 3]"),
            "{err}"
        );
    }

    #[test]
    fn loading_copies_values_and_features_are_unit_norm() {
        let config = tiny();
        tch::manual_seed(3);
        let source = Clip::new(&config, Device::Cpu);
        let mut target = Clip::new(&config, Device::Cpu);
        let weights = source.named_tensors();
        target
            .load_named(weights.iter().map(|(k, v)| (k.as_str(), v)), false)
            .unwrap();
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[101i64, 5, 7, 102, 0, 0, 101, 9, 102, 0, 0, 0]).view([2, 6]);
        let a = tch::no_grad(|| source.forward(&images, &ids));
        let b = tch::no_grad(|| target.forward(&images, &ids));
        assert_eq!((&a.0 - &b.0).abs().max().double_value(&[]), 0.0);
        assert_eq!((&a.1 - &b.1).abs().max().double_value(&[]), 0.0);
        let norms = a.1.norm_scalaropt_dim(2, [-1], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-6);
    }

    /// Adds an input-dependent term to a site's output (nothing outside training when `train_only`).
    #[derive(Debug)]
    struct Shift {
        out: i64,
        train_only: bool,
    }

    impl delta::LinearDelta for Shift {
        fn forward(&self, x: &Tensor, train: bool) -> Option<Tensor> {
            if self.train_only && !train {
                return None;
            }
            // Depends on the input (a constant added to every key would leave softmax unchanged).
            let ramp = Tensor::arange(self.out, (x.kind(), x.device())) / self.out as f64;
            Some(x.narrow(-1, 0, 1) * 0.5 * ramp + 0.25)
        }

        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn every_linear_site_names_a_weight_and_takes_a_delta() {
        tch::manual_seed(8);
        let mut model = Clip::new(&tiny(), Device::Cpu);
        let weights = model.named_tensors();
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[101i64, 5, 7, 102, 101, 9, 102, 0]).view([2, 4]);
        let (img, txt) = tch::no_grad(|| (model.encode_image(&images), model.encode_text(&ids)));
        let sites = model.linear_sites();
        // 2 ViT blocks × 4 + visual.proj, 2 BERT layers × 6 + text_projection.
        assert_eq!(sites.len(), 2 * 4 + 1 + 2 * 6 + 1);
        for site in &sites {
            let shape = weights[&site.weight_key].size();
            let expected = match site.layout {
                delta::WeightLayout::OutIn => vec![site.output, site.input],
                delta::WeightLayout::InOut => vec![site.input, site.output],
            };
            assert_eq!(shape, expected, "{}", site.name);
            let shift = Shift {
                out: site.output,
                train_only: false,
            };
            assert!(
                model
                    .set_linear_delta(&site.name, Some(Box::new(shift)))
                    .unwrap()
                    .is_none()
            );
            let (img2, txt2) =
                tch::no_grad(|| (model.encode_image(&images), model.encode_text(&ids)));
            let moved = if site.name.starts_with("visual.") {
                !img2.equal(&img) && txt2.equal(&txt)
            } else {
                img2.equal(&img) && !txt2.equal(&txt)
            };
            assert!(
                moved,
                "{}: the delta did not act on its tower only",
                site.name
            );
            assert!(model.linear_delta(&site.name).is_some());
            let train_only = Shift {
                out: site.output,
                train_only: true,
            };
            let old = model
                .set_linear_delta(&site.name, Some(Box::new(train_only)))
                .unwrap();
            assert!(old.is_some());
            // The training flag reaches the slot: inactive in inference, active in training.
            let (img3, txt3) =
                tch::no_grad(|| (model.encode_image(&images), model.encode_text(&ids)));
            assert!(img3.equal(&img) && txt3.equal(&txt), "{}", site.name);
            let (img4, txt4) = tch::no_grad(|| {
                (
                    model.encode_image_t(&images, true),
                    model.encode_text_t(&ids, true),
                )
            });
            assert!(!img4.equal(&img) || !txt4.equal(&txt), "{}", site.name);
            model.set_linear_delta(&site.name, None).unwrap();
        }
        let err = model
            .set_linear_delta("visual.transformer.resblocks.0.attn.in_proj_weight", None)
            .unwrap_err();
        assert!(matches!(err, ModelError::UnknownSite { .. }), "{err}");
        assert!(
            model
                .set_linear_delta("visual.transformer.resblocks.2.mlp.c_fc", None)
                .is_err()
        );
    }

    #[test]
    fn dropout_acts_only_in_training_mode() {
        let mut config = tiny();
        config.text.text_hidden_dropout_prob = 0.1;
        config.text.text_attention_probs_dropout_prob = 0.1;
        tch::manual_seed(6);
        let model = Clip::new(&config, Device::Cpu);
        let ids = Tensor::from_slice(&[101i64, 5, 7, 9, 11, 102]).view([1, 6]);
        let eval_a = tch::no_grad(|| model.encode_text_t(&ids, false));
        let eval_b = tch::no_grad(|| model.encode_text(&ids));
        assert!(eval_a.equal(&eval_b));
        let train_a = tch::no_grad(|| model.encode_text_t(&ids, true));
        let train_b = tch::no_grad(|| model.encode_text_t(&ids, true));
        assert!(
            !train_a.equal(&train_b),
            "two training forwards drew the same dropout masks"
        );
        assert!(!train_a.equal(&eval_a));
    }

    #[test]
    fn padding_does_not_change_text_features() {
        tch::manual_seed(4);
        let model = Clip::new(&tiny(), Device::Cpu);
        let short = Tensor::from_slice(&[101i64, 5, 7, 102]).view([1, 4]);
        let padded = Tensor::from_slice(&[101i64, 5, 7, 102, 0, 0, 0, 0]).view([1, 8]);
        let a = tch::no_grad(|| model.encode_text(&short));
        let b = tch::no_grad(|| model.encode_text(&padded));
        assert!((a - b).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn precisions_keep_features_close_to_fp32() {
        tch::manual_seed(5);
        let mut model = Clip::new(&tiny(), Device::Cpu);
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[101i64, 5, 7, 102, 101, 9, 102, 0]).view([2, 4]);
        let reference = tch::no_grad(|| model.forward(&images, &ids));
        model.set_precision(Precision::Bf16);
        assert_eq!(
            model.named_tensors()["visual.conv1.weight"].kind(),
            Kind::BFloat16
        );
        assert_eq!(
            model.named_tensors()["visual.ln_pre.weight"].kind(),
            Kind::Float
        );
        let bf16 = tch::no_grad(|| model.forward(&images, &ids));
        let cos = (&bf16.0.to_kind(Kind::Float) * &reference.0).sum_dim_intlist(
            [-1].as_slice(),
            false,
            Kind::Float,
        );
        assert!(cos.min().double_value(&[]) > 0.99, "{cos}");
        let cos = (&bf16.1.to_kind(Kind::Float) * &reference.1).sum_dim_intlist(
            [-1].as_slice(),
            false,
            Kind::Float,
        );
        assert!(cos.min().double_value(&[]) > 0.99, "{cos}");
    }
}
