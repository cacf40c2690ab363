//! The architecture of a state dict, read from its tensor shapes (official `.pt` checkpoints do not
//! record their config): widths, layer and block counts, patch size, resolution, vocabulary,
//! positions and the shared embedding width, matched against the tower configs cn_clip ships.
//!
//! Attention head counts (and the activation, dropouts) leave no trace in the shapes. cn_clip's
//! shipped configs tie them to the width (ViT heads = width / 64, but ViT-H-14 = 1280 / 80; text 12
//! heads at hidden size 768, 16 at 1024), and no two shipped configs have the same shapes (the
//! tests check every pairing), so a state dict that matches a shipped config takes its heads from
//! it. One that matches none, or several, needs its configs from the user.

use super::StateDict;
use crate::config::{ClipConfig, TextConfig, VisionConfig, VisionLayers, shipped_tower_names};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The vision tower as its shapes describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisionShapes {
    Vit {
        width: i64,
        layers: i64,
        patch: i64,
        resolution: i64,
        embed_dim: i64,
    },
    ResNet {
        width: i64,
        blocks: [i64; 4],
        resolution: i64,
        embed_dim: i64,
    },
}

/// The text tower as its shapes describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextShapes {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub layers: i64,
    pub intermediate_size: i64,
    pub max_positions: i64,
    pub type_vocab_size: i64,
    /// `text_projection`'s output width (the shared embedding).
    pub embed_dim: i64,
}

/// Everything the shapes of a cn_clip state dict say about its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchShapes {
    pub vision: VisionShapes,
    pub text: TextShapes,
    /// The shapes of the tensors the sizes were read from, by key.
    shapes: BTreeMap<&'static str, Vec<i64>>,
}

const VIT_CONV: &str = "visual.conv1.weight";
const VIT_POS: &str = "visual.positional_embedding";
const VIT_PROJ: &str = "visual.proj";
const VIT_BLOCKS: &str = "visual.transformer.resblocks.";
const RN_CONV: &str = "visual.conv3.weight";
const RN_POS: &str = "visual.attnpool.positional_embedding";
const RN_PROJ: &str = "visual.attnpool.c_proj.weight";
const WORDS: &str = "bert.embeddings.word_embeddings.weight";
const POSITIONS: &str = "bert.embeddings.position_embeddings.weight";
const TOKEN_TYPES: &str = "bert.embeddings.token_type_embeddings.weight";
const INTERMEDIATE: &str = "bert.encoder.layer.0.intermediate.dense.weight";
const TEXT_LAYERS: &str = "bert.encoder.layer.";
const TEXT_PROJ: &str = "text_projection";

/// One way a config and the shapes disagree: a tensor's shape, or a count of indexed blocks.
struct Expect {
    key: &'static str,
    /// The config fields the shape or count follows, for the message.
    fields: &'static str,
    want: Vec<i64>,
}

fn dims(sd: &StateDict, key: &'static str, rank: usize) -> Result<Vec<i64>, String> {
    let t = sd.get(key).ok_or_else(|| format!("no tensor {key}"))?;
    let size = t.size();
    if size.len() != rank {
        return Err(format!(
            "{key} has shape {size:?}, expected {rank} dimensions"
        ));
    }
    Ok(size)
}

/// The distinct `N` of keys `{prefix}N.…`.
fn count_indexed(sd: &StateDict, prefix: &str) -> i64 {
    sd.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len() as i64
}

/// `n = side² + 1` (a class token and a square grid): the side.
fn grid_side(tokens: i64, key: &str) -> Result<i64, String> {
    let side = ((tokens - 1).max(0) as f64).sqrt().round() as i64;
    if side * side + 1 == tokens && side > 0 {
        Ok(side)
    } else {
        Err(format!(
            "{key} has {tokens} positions, not a square grid plus a class token"
        ))
    }
}

/// cn_clip's grid: `image_resolution // patch_size` per side, plus the class token.
fn tokens(resolution: i64, patch: i64) -> i64 {
    let side = resolution / patch.max(1);
    side * side + 1
}

impl ArchShapes {
    /// Reads the shapes of a state dict keyed by cn_clip's names (`module.` already stripped).
    /// The error says which tensor is missing or has an unexpected rank.
    pub fn from_state_dict(sd: &StateDict) -> Result<Self, String> {
        let mut shapes = BTreeMap::new();
        let mut read = |key: &'static str, rank: usize| -> Result<Vec<i64>, String> {
            let d = dims(sd, key, rank)?;
            shapes.insert(key, d.clone());
            Ok(d)
        };
        let vision = if sd.contains_key(RN_PROJ) {
            let side = grid_side(read(RN_POS, 2)?[0], RN_POS)?;
            let mut blocks = [0; 4];
            for (i, b) in blocks.iter_mut().enumerate() {
                *b = count_indexed(sd, &format!("visual.layer{}.", i + 1));
            }
            VisionShapes::ResNet {
                width: read(RN_CONV, 4)?[0],
                blocks,
                // The ModifiedResNet downsamples 32 times.
                resolution: side * 32,
                embed_dim: read(RN_PROJ, 2)?[0],
            }
        } else {
            let conv = read(VIT_CONV, 4)?;
            let side = grid_side(read(VIT_POS, 2)?[0], VIT_POS)?;
            VisionShapes::Vit {
                width: conv[0],
                layers: count_indexed(sd, VIT_BLOCKS),
                patch: conv[2],
                resolution: side * conv[2],
                embed_dim: read(VIT_PROJ, 2)?[1],
            }
        };
        let words = read(WORDS, 2)?;
        let text = TextShapes {
            vocab_size: words[0],
            hidden_size: words[1],
            layers: count_indexed(sd, TEXT_LAYERS),
            intermediate_size: read(INTERMEDIATE, 2)?[0],
            max_positions: read(POSITIONS, 2)?[0],
            type_vocab_size: read(TOKEN_TYPES, 2)?[0],
            embed_dim: read(TEXT_PROJ, 2)?[1],
        };
        Ok(Self {
            vision,
            text,
            shapes,
        })
    }

    /// Where the vision tower's shapes differ from `config`'s: `shape mismatch for KEY: the model
    /// expects [..], the weights have [..] (the config's FIELDS)`, in the loader's words. With
    /// `resize_pos_embed` a ViT positional embedding of another grid is not a difference.
    pub fn vision_differences(&self, config: &VisionConfig, resize_pos_embed: bool) -> Vec<String> {
        let v = config;
        let mut out = Vec::new();
        let expects = match (&self.vision, v.vision_layers, v.vision_patch_size) {
            (VisionShapes::Vit { layers, .. }, VisionLayers::Transformer(n), Some(patch)) => {
                if *layers != n {
                    out.push(count_mismatch(VIT_BLOCKS, "vision_layers", n, *layers));
                }
                let mut e = vec![
                    Expect {
                        key: VIT_CONV,
                        fields: "vision_width, vision_patch_size",
                        want: vec![v.vision_width, 3, patch, patch],
                    },
                    Expect {
                        key: VIT_PROJ,
                        fields: "vision_width, embed_dim",
                        want: vec![v.vision_width, v.embed_dim],
                    },
                ];
                if !resize_pos_embed {
                    e.insert(
                        1,
                        Expect {
                            key: VIT_POS,
                            fields: "image_resolution / vision_patch_size, vision_width",
                            want: vec![tokens(v.image_resolution, patch), v.vision_width],
                        },
                    );
                }
                e
            }
            (VisionShapes::ResNet { blocks, .. }, VisionLayers::ResNet(b), _) => {
                for (i, (have, want)) in blocks.iter().zip(b).enumerate() {
                    if *have != want {
                        out.push(count_mismatch(
                            [
                                "visual.layer1.",
                                "visual.layer2.",
                                "visual.layer3.",
                                "visual.layer4.",
                            ][i],
                            "vision_layers",
                            want,
                            *have,
                        ));
                    }
                }
                // The attention pool works at width * 32 channels (cn_clip's ModifiedResNet).
                let pool = v.vision_width * 32;
                vec![
                    Expect {
                        key: RN_CONV,
                        fields: "vision_width",
                        want: vec![v.vision_width, v.vision_width / 2, 3, 3],
                    },
                    Expect {
                        key: RN_POS,
                        fields: "image_resolution, vision_width",
                        want: vec![tokens(v.image_resolution, 32), pool],
                    },
                    Expect {
                        key: RN_PROJ,
                        fields: "embed_dim, vision_width",
                        want: vec![v.embed_dim, pool],
                    },
                ]
            }
            (have, want, _) => {
                let kind = |vit: bool| if vit { "a ViT" } else { "a ModifiedResNet" };
                let have_vit = matches!(have, VisionShapes::Vit { .. });
                let want_vit = matches!(want, VisionLayers::Transformer(_));
                let evidence = if have_vit { VIT_CONV } else { RN_PROJ };
                let detail = if have_vit == want_vit {
                    "a ViT without vision_patch_size".to_string()
                } else {
                    kind(want_vit).to_string()
                };
                out.push(format!(
                    "vision tower (vision_layers, vision_patch_size): the model is {detail}, the \
                     weights hold {} ({evidence} {:?})",
                    kind(have_vit),
                    self.shapes.get(evidence).cloned().unwrap_or_default()
                ));
                Vec::new()
            }
        };
        self.compare(&expects, &mut out);
        out
    }

    /// Where the text tower's shapes differ from `config`'s, for a model whose shared embedding
    /// is `embed_dim` wide (the vision config's).
    pub fn text_differences(&self, config: &TextConfig, embed_dim: i64) -> Vec<String> {
        let t = config;
        let h = t.text_hidden_size;
        let mut out = Vec::new();
        if self.text.layers != t.text_num_hidden_layers {
            out.push(count_mismatch(
                TEXT_LAYERS,
                "text_num_hidden_layers",
                t.text_num_hidden_layers,
                self.text.layers,
            ));
        }
        let expects = [
            Expect {
                key: WORDS,
                fields: "vocab_size, text_hidden_size",
                want: vec![t.vocab_size, h],
            },
            Expect {
                key: POSITIONS,
                fields: "text_max_position_embeddings, text_hidden_size",
                want: vec![t.text_max_position_embeddings, h],
            },
            Expect {
                key: TOKEN_TYPES,
                fields: "text_type_vocab_size, text_hidden_size",
                want: vec![t.text_type_vocab_size, h],
            },
            Expect {
                key: INTERMEDIATE,
                fields: "text_intermediate_size, text_hidden_size",
                want: vec![t.text_intermediate_size, h],
            },
            Expect {
                key: TEXT_PROJ,
                fields: "text_hidden_size, embed_dim",
                want: vec![h, embed_dim],
            },
        ];
        self.compare(&expects, &mut out);
        out
    }

    /// Every way `config` disagrees with the shapes (empty: the config fits the weights).
    pub fn differences(&self, config: &ClipConfig, resize_pos_embed: bool) -> Vec<String> {
        let mut out = self.vision_differences(&config.vision, resize_pos_embed);
        out.extend(self.text_differences(&config.text, config.vision.embed_dim));
        out
    }

    fn compare(&self, expects: &[Expect], out: &mut Vec<String>) {
        for e in expects {
            if let Some(have) = self.shapes.get(e.key)
                && have != &e.want
            {
                out.push(format!(
                    "shape mismatch for {}: the model expects {:?}, the weights have {have:?} \
                     (the config's {})",
                    e.key, e.want, e.fields
                ));
            }
        }
    }

    /// The shipped `(vision, text)` tower pairs whose configs these shapes fit, with the config.
    pub fn shipped_matches(&self) -> Vec<(&'static str, &'static str, ClipConfig)> {
        let mut out = Vec::new();
        for v in self.shipped_vision_matches() {
            for t in self.shipped_text_matches() {
                let (Ok(vision), Ok(text)) = (VisionConfig::from_name(v), TextConfig::from_name(t))
                else {
                    continue;
                };
                let config = ClipConfig { vision, text };
                if self.differences(&config, false).is_empty() {
                    out.push((v, t, config));
                }
            }
        }
        out
    }

    /// The shipped vision towers these shapes fit.
    pub fn shipped_vision_matches(&self) -> Vec<&'static str> {
        let (visions, _) = shipped_tower_names();
        visions
            .into_iter()
            .filter(|v| {
                VisionConfig::from_name(v)
                    .is_ok_and(|c| self.vision_differences(&c, false).is_empty())
            })
            .collect()
    }

    /// The shipped text towers these shapes fit (whatever the shared embedding's width).
    pub fn shipped_text_matches(&self) -> Vec<&'static str> {
        let (_, texts) = shipped_tower_names();
        let embed_dim = self.text.embed_dim;
        texts
            .into_iter()
            .filter(|t| {
                TextConfig::from_name(t)
                    .is_ok_and(|c| self.text_differences(&c, embed_dim).is_empty())
            })
            .collect()
    }
}

fn count_mismatch(prefix: &str, field: &str, want: i64, have: i64) -> String {
    format!(
        "layer count mismatch for {prefix}N: the model expects {want}, the weights have {have} \
         (the config's {field})"
    )
}

impl fmt::Display for ArchShapes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.vision {
            VisionShapes::Vit {
                width,
                layers,
                patch,
                resolution,
                embed_dim,
            } => write!(
                f,
                "ViT width {width}, {layers} layers, patch {patch}, {resolution} px, embed_dim {embed_dim}"
            )?,
            VisionShapes::ResNet {
                width,
                blocks,
                resolution,
                embed_dim,
            } => write!(
                f,
                "ModifiedResNet width {width}, blocks {blocks:?}, {resolution} px, embed_dim {embed_dim}"
            )?,
        }
        let t = &self.text;
        write!(
            f,
            "; text hidden {}, {} layers, intermediate {}, vocab {}, {} positions, {} token types",
            t.hidden_size,
            t.layers,
            t.intermediate_size,
            t.vocab_size,
            t.max_positions,
            t.type_vocab_size
        )
    }
}
