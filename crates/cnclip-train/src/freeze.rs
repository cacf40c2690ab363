//! Which weights a run leaves frozen: cn_clip's `--freeze-vision`, and beyond cn_clip the text
//! tower, or all but the last N layers of either tower (the usual partial fine-tune when a
//! contest's data is small and the big model overfits).
//!
//! Freezing is by cn_clip key name, so it works the same for a full model and for one that was
//! loaded from any format. A frozen weight gets `requires_grad = false`, which keeps it out of the
//! optimizer (no state, no update) and out of autograd (no gradient memory).

use cnclip_model::Clip;
use cnclip_model::config::VisionLayers;
use std::fmt;

/// How much of one tower trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TowerFreeze {
    /// Everything in the tower trains (cn_clip's default).
    #[default]
    None,
    /// Nothing in the tower trains.
    All,
    /// Only the last `n` layers and the head after them train; embeddings and earlier layers are
    /// frozen. Layers are the transformer blocks (ViT `visual.transformer.resblocks.{i}`, BERT
    /// `bert.encoder.layer.{i}`) or, for ModifiedResNet, the four stages `visual.layer{1..4}`.
    /// The head is what follows the last layer: ViT `ln_post`/`proj`, ResNet `attnpool`,
    /// and `text_projection` (plus BERT's pooler) for text.
    AllButLast(usize),
}

impl fmt::Display for TowerFreeze {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TowerFreeze::None => f.write_str("trainable"),
            TowerFreeze::All => f.write_str("frozen"),
            TowerFreeze::AllButLast(n) => write!(f, "frozen but the last {n} layers"),
        }
    }
}

/// Freezing of both towers; `logit_scale` always trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freeze {
    pub vision: TowerFreeze,
    pub text: TowerFreeze,
}

impl Freeze {
    /// Nothing frozen.
    pub const NONE: Freeze = Freeze {
        vision: TowerFreeze::None,
        text: TowerFreeze::None,
    };

    /// cn_clip's `--freeze-vision`.
    pub const VISION: Freeze = Freeze {
        vision: TowerFreeze::All,
        text: TowerFreeze::None,
    };

    pub fn is_none(&self) -> bool {
        *self == Freeze::NONE
    }

    /// Whether the weight called `key` stays fixed, given each tower's layer count.
    pub fn is_frozen(&self, key: &str, vision_layers: usize, text_layers: usize) -> bool {
        if let Some(rest) = key.strip_prefix("visual.") {
            frozen_in_tower(self.vision, vision_layer(rest), vision_layers)
        } else if let Some(rest) = key.strip_prefix("bert.") {
            frozen_in_tower(self.text, text_layer(rest), text_layers)
        } else if key == "text_projection" {
            frozen_in_tower(self.text, Position::Head, text_layers)
        } else {
            false
        }
    }

    /// Sets `requires_grad = false` on every frozen floating-point weight of `model`; returns how
    /// many numbers were frozen (for the run's log).
    pub fn apply(&self, model: &Clip) -> i64 {
        if self.is_none() {
            return 0;
        }
        let config = model.config();
        let vision_layers = match config.vision.vision_layers {
            VisionLayers::Transformer(n) => n.max(0) as usize,
            VisionLayers::ResNet(_) => 4,
        };
        let text_layers = config.text.text_num_hidden_layers.max(0) as usize;
        let mut frozen = 0;
        for (name, tensor) in model.named_tensors() {
            if tensor.is_floating_point() && self.is_frozen(&name, vision_layers, text_layers) {
                let _ = tensor.set_requires_grad(false);
                frozen += tensor.numel() as i64;
            }
        }
        frozen
    }
}

/// Where a key sits in its tower.
enum Position {
    /// Before the first layer (patch/token embeddings, `ln_pre`, the ResNet stem).
    Stem,
    Layer(usize),
    /// After the last layer.
    Head,
}

fn frozen_in_tower(freeze: TowerFreeze, position: Position, layers: usize) -> bool {
    match freeze {
        TowerFreeze::None => false,
        TowerFreeze::All => true,
        TowerFreeze::AllButLast(n) => match position {
            Position::Stem => n < layers || layers == 0,
            Position::Layer(i) => i + n < layers,
            Position::Head => false,
        },
    }
}

fn vision_layer(rest: &str) -> Position {
    if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
        return leading_index(block).map_or(Position::Stem, Position::Layer);
    }
    if let Some(stage) = rest.strip_prefix("layer") {
        // ModifiedResNet stages are `layer1` … `layer4`.
        return leading_index(stage)
            .map_or(Position::Stem, |i| Position::Layer(i.saturating_sub(1)));
    }
    if rest.starts_with("ln_post") || rest.starts_with("proj") || rest.starts_with("attnpool") {
        Position::Head
    } else {
        Position::Stem
    }
}

fn text_layer(rest: &str) -> Position {
    if let Some(layer) = rest.strip_prefix("encoder.layer.") {
        return leading_index(layer).map_or(Position::Stem, Position::Layer);
    }
    if rest.starts_with("pooler") {
        Position::Head
    } else {
        Position::Stem
    }
}

fn leading_index(s: &str) -> Option<usize> {
    let digits: &str = &s[..s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len())];
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_only_matches_cn_clip_flag() {
        let f = Freeze::VISION;
        assert!(f.is_frozen("visual.conv1.weight", 12, 12));
        assert!(f.is_frozen("visual.proj", 12, 12));
        assert!(!f.is_frozen("bert.embeddings.word_embeddings.weight", 12, 12));
        assert!(!f.is_frozen("text_projection", 12, 12));
        assert!(!f.is_frozen("logit_scale", 12, 12));
    }

    #[test]
    fn all_but_last_keeps_the_tail_and_head() {
        let f = Freeze {
            vision: TowerFreeze::AllButLast(2),
            text: TowerFreeze::AllButLast(1),
        };
        assert!(f.is_frozen("visual.class_embedding", 12, 12));
        assert!(f.is_frozen("visual.transformer.resblocks.9.attn.in_proj_weight", 12, 12));
        assert!(!f.is_frozen(
            "visual.transformer.resblocks.10.attn.in_proj_weight",
            12,
            12
        ));
        assert!(!f.is_frozen("visual.transformer.resblocks.11.ln_1.weight", 12, 12));
        assert!(!f.is_frozen("visual.ln_post.weight", 12, 12));
        assert!(!f.is_frozen("visual.proj", 12, 12));
        assert!(f.is_frozen("bert.embeddings.word_embeddings.weight", 12, 12));
        assert!(f.is_frozen("bert.encoder.layer.10.output.dense.weight", 12, 12));
        assert!(!f.is_frozen("bert.encoder.layer.11.output.dense.weight", 12, 12));
        assert!(!f.is_frozen("text_projection", 12, 12));
        assert!(!f.is_frozen("logit_scale", 12, 12));
    }

    #[test]
    fn resnet_stages_count_as_layers() {
        let f = Freeze {
            vision: TowerFreeze::AllButLast(1),
            text: TowerFreeze::None,
        };
        assert!(f.is_frozen("visual.conv1.weight", 4, 12));
        assert!(f.is_frozen("visual.layer3.0.conv1.weight", 4, 12));
        assert!(!f.is_frozen("visual.layer4.0.conv1.weight", 4, 12));
        assert!(!f.is_frozen("visual.attnpool.c_proj.weight", 4, 12));
    }

    #[test]
    fn last_n_at_least_all_layers_freezes_nothing() {
        let f = Freeze {
            vision: TowerFreeze::AllButLast(12),
            text: TowerFreeze::None,
        };
        assert!(!f.is_frozen("visual.conv1.weight", 12, 12));
        assert!(!f.is_frozen("visual.transformer.resblocks.0.ln_1.weight", 12, 12));
    }
}
