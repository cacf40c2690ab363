//! Trainable-parameter counts of a LoRA config on a model config, from shapes alone (no model is
//! built, so ViT-H-14's count costs nothing).

use crate::LoraError;
use crate::adapter::rows;
use crate::config::{LoraConfig, site_of_adapter};
use cnclip_model::ClipConfig;
use cnclip_model::config::VisionLayers;
use cnclip_model::model::delta::linear_sites;

/// What a LoRA run trains, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    /// Adapters selected by the targets.
    pub adapters: usize,
    /// Numbers in their `A` and `B`.
    pub adapter_parameters: i64,
    /// Base numbers that still train (`logit_scale`, LayerNorms when the config says so).
    pub base_parameters: i64,
    /// Numbers in the whole base model (ViT towers only; `None` for ModifiedResNet).
    pub model_parameters: Option<i64>,
}

impl ParameterCount {
    pub fn trainable(&self) -> i64 {
        self.adapter_parameters + self.base_parameters
    }
}

/// Counts for `lora` on a model of `model`'s config.
pub fn parameter_count(model: &ClipConfig, lora: &LoraConfig) -> Result<ParameterCount, LoraError> {
    let sites = linear_sites(model);
    let names = lora.adapter_names(&sites)?;
    let r = lora.rank;
    let mut adapter_parameters = 0;
    for name in &names {
        let (site, part) = site_of_adapter(name);
        let site = sites
            .iter()
            .find(|s| s.name == site)
            .ok_or_else(|| LoraError::Config(format!("{name}: no such site")))?;
        let (_, len) = rows(site, part);
        adapter_parameters += r * (site.input + len);
    }
    let (h, layers_t) = (
        model.text.text_hidden_size,
        model.text.text_num_hidden_layers,
    );
    let mut base_parameters = 0;
    if lora.train_logit_scale {
        base_parameters += 1;
    }
    if lora.train_layer_norms {
        // BERT: the embeddings' LayerNorm and two per layer.
        base_parameters += 2 * h * (1 + 2 * layers_t);
        if let VisionLayers::Transformer(l) = model.vision.vision_layers {
            // ViT: ln_pre, ln_post and ln_1/ln_2 per block.
            base_parameters += 2 * model.vision.vision_width * (2 + 2 * l);
        }
    }
    Ok(ParameterCount {
        adapters: names.len(),
        adapter_parameters,
        base_parameters,
        model_parameters: model_parameters(model),
    })
}

/// Numbers in a ViT + BERT model of `config` (cn_clip's state dict, `logit_scale` included).
pub fn model_parameters(config: &ClipConfig) -> Option<i64> {
    let VisionLayers::Transformer(l) = config.vision.vision_layers else {
        return None;
    };
    let v = &config.vision;
    let (w, e, p, g) = (v.vision_width, v.embed_dim, v.vision_patch_size?, v.grid());
    let block = (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w) + 4 * w;
    let vision = w * 3 * p * p + w + (g * g + 1) * w + 2 * w + l * block + 2 * w + w * e;
    let t = &config.text;
    let (h, i) = (t.text_hidden_size, t.text_intermediate_size);
    let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
    let text = (t.vocab_size + t.text_max_position_embeddings + t.text_type_vocab_size) * h
        + 2 * h
        + t.text_num_hidden_layers * layer
        + h * e;
    Some(vision + text + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of docs/LORA.md (rank 8; counts scale linearly with the rank).
    #[test]
    fn documented_counts() {
        let table = [
            ("ViT-B-16", "qv", 48, 589_824),
            ("ViT-B-16", "attn", 96, 1_179_648),
            ("ViT-B-16", "all", 144, 2_654_208),
            ("ViT-B-16", "all+proj", 146, 2_674_688),
            ("ViT-H-14", "qv", 112, 2_097_152),
            ("ViT-H-14", "attn", 224, 4_194_304),
            ("ViT-H-14", "all", 336, 9_437_184),
            ("ViT-H-14", "all+proj", 338, 9_472_000),
        ];
        for (model, targets, adapters, numbers) in table {
            let c = ClipConfig::from_name(model).unwrap();
            let lora = LoraConfig {
                rank: 8,
                targets: vec![targets.into()],
                ..Default::default()
            };
            let n = parameter_count(&c, &lora).unwrap();
            assert_eq!((n.adapters, n.adapter_parameters), (adapters, numbers));
            assert_eq!(n.base_parameters, 0);
            let extras = LoraConfig {
                train_logit_scale: true,
                train_layer_norms: true,
                ..lora
            };
            let n = parameter_count(&c, &extras).unwrap();
            let expected = if model == "ViT-B-16" { 78_337 } else { 269_313 };
            assert_eq!(n.base_parameters, expected);
        }
        let h = ClipConfig::from_name("ViT-H-14").unwrap();
        assert_eq!(model_parameters(&h), Some(957_598_209));
    }

    #[test]
    fn model_count_matches_the_built_model() {
        // The documented ViT-B-16 total (cnclip-model builds it and checks 188,262,913).
        let c = ClipConfig::from_name("ViT-B-16").unwrap();
        assert_eq!(model_parameters(&c), Some(188_262_913));
    }
}
