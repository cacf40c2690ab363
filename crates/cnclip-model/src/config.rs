//! Model configurations in cn_clip's own JSON schema.
//!
//! cn_clip describes a model as two JSON files, one per tower (`ViT-B-16.json`,
//! `RoBERTa-wwm-ext-base-chinese.json`, …), whose keys are merged into the keyword arguments of its
//! `CLIP` constructor. We keep that schema verbatim so a user's own config files (tiny test models,
//! new sizes) work unchanged, and so the native weight format can record the merged dict.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// The vision tower configs shipped with cn_clip 1.6.0 (`cn_clip/clip/model_configs`).
const VISION_CONFIGS: &[(&str, &str)] = &[
    (
        "ViT-B-16",
        include_str!("../assets/model_configs/ViT-B-16.json"),
    ),
    (
        "ViT-B-32",
        include_str!("../assets/model_configs/ViT-B-32.json"),
    ),
    (
        "ViT-L-14",
        include_str!("../assets/model_configs/ViT-L-14.json"),
    ),
    (
        "ViT-L-14-336",
        include_str!("../assets/model_configs/ViT-L-14-336.json"),
    ),
    (
        "ViT-H-14",
        include_str!("../assets/model_configs/ViT-H-14.json"),
    ),
    ("RN50", include_str!("../assets/model_configs/RN50.json")),
];

/// The text tower configs shipped with cn_clip 1.6.0.
const TEXT_CONFIGS: &[(&str, &str)] = &[
    (
        "RoBERTa-wwm-ext-base-chinese",
        include_str!("../assets/model_configs/RoBERTa-wwm-ext-base-chinese.json"),
    ),
    (
        "RoBERTa-wwm-ext-large-chinese",
        include_str!("../assets/model_configs/RoBERTa-wwm-ext-large-chinese.json"),
    ),
    (
        "RBT3-chinese",
        include_str!("../assets/model_configs/RBT3-chinese.json"),
    ),
];

/// The released checkpoints and their tower pairing (`cn_clip/clip/utils.py` `_MODEL_INFO`).
pub const RELEASED_MODELS: &[(&str, &str, &str)] = &[
    ("ViT-B-16", "ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    ("ViT-L-14", "ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
    (
        "ViT-L-14-336",
        "ViT-L-14-336",
        "RoBERTa-wwm-ext-base-chinese",
    ),
    ("ViT-H-14", "ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
    ("RN50", "RN50", "RBT3-chinese"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown {kind} {name:?}; valid names: {}", valid.join(", "))]
    UnknownName {
        kind: &'static str,
        name: String,
        valid: Vec<String>,
    },
    #[error("cannot read model config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model config {origin} is not valid: {source}")]
    Json {
        origin: String,
        source: serde_json::Error,
    },
    #[error("model config {origin}: {field} {reason}")]
    Invalid {
        origin: String,
        field: &'static str,
        reason: String,
    },
}

/// `vision_layers`: a layer count for a ViT, four block counts for a ModifiedResNet.
///
/// cn_clip writes the ResNet form as a *string* (`"[3,4,6,3]"`) that it `eval`s; we accept that, a
/// JSON array, and write the string form back so cn_clip can read our configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionLayers {
    Transformer(i64),
    ResNet([i64; 4]),
}

impl Serialize for VisionLayers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            VisionLayers::Transformer(n) => s.serialize_i64(*n),
            VisionLayers::ResNet(b) => {
                s.serialize_str(&format!("[{},{},{},{}]", b[0], b[1], b[2], b[3]))
            }
        }
    }
}

impl<'de> Deserialize<'de> for VisionLayers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        let blocks = |items: Vec<i64>| -> Result<Self, D::Error> {
            <[i64; 4]>::try_from(items.as_slice())
                .map(VisionLayers::ResNet)
                .map_err(|_| {
                    D::Error::custom(format!("a ResNet needs 4 block counts, found {items:?}"))
                })
        };
        match value {
            serde_json::Value::Number(n) => {
                n.as_i64().map(VisionLayers::Transformer).ok_or_else(|| {
                    D::Error::custom(format!("vision_layers must be an integer, found {n}"))
                })
            }
            serde_json::Value::String(s) => {
                let inner = s
                    .trim()
                    .trim_start_matches(['[', '('])
                    .trim_end_matches([']', ')']);
                let items = inner
                    .split(',')
                    .map(|x| x.trim().parse::<i64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        D::Error::custom(format!("vision_layers {s:?} is not a list of integers"))
                    })?;
                blocks(items)
            }
            serde_json::Value::Array(items) => {
                let items = items
                    .iter()
                    .map(|v| v.as_i64())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| D::Error::custom("vision_layers array must hold integers"))?;
                blocks(items)
            }
            other => Err(D::Error::custom(format!(
                "vision_layers must be an integer (ViT) or a list of 4 integers (ResNet), found {other}"
            ))),
        }
    }
}

fn default_head_width() -> i64 {
    64
}

/// One vision tower, keys as in cn_clip's `ViT-*.json` / `RN50.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub embed_dim: i64,
    pub image_resolution: i64,
    pub vision_layers: VisionLayers,
    pub vision_width: i64,
    /// `null` for ResNets.
    pub vision_patch_size: Option<i64>,
    /// 64 unless stated (ViT-H-14 uses 80).
    #[serde(default = "default_head_width")]
    pub vision_head_width: i64,
}

/// One text tower, keys as in cn_clip's `RoBERTa-*.json` / `RBT3-chinese.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub text_attention_probs_dropout_prob: f64,
    pub text_hidden_act: String,
    pub text_hidden_dropout_prob: f64,
    pub text_hidden_size: i64,
    pub text_initializer_range: f64,
    pub text_intermediate_size: i64,
    pub text_max_position_embeddings: i64,
    pub text_num_attention_heads: i64,
    pub text_num_hidden_layers: i64,
    pub text_type_vocab_size: i64,
}

/// A whole CLIP model: the merged keys of one vision and one text config, as cn_clip passes them to
/// its `CLIP(**model_info)` constructor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(flatten)]
    pub vision: VisionConfig,
    #[serde(flatten)]
    pub text: TextConfig,
}

fn lookup<'a>(
    table: &'a [(&str, &str)],
    kind: &'static str,
    name: &str,
) -> Result<&'a str, ConfigError> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, json)| *json)
        .ok_or_else(|| ConfigError::UnknownName {
            kind,
            name: name.to_string(),
            valid: table.iter().map(|(n, _)| n.to_string()).collect(),
        })
}

fn parse<T: for<'de> Deserialize<'de>>(json: &str, origin: &str) -> Result<T, ConfigError> {
    serde_json::from_str(json).map_err(|source| ConfigError::Json {
        origin: origin.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// What the two tower configs share: a table of shipped files and a validation.
trait Tower: for<'de> Deserialize<'de> {
    const SHIPPED: &'static [(&'static str, &'static str)];
    const KIND: &'static str;
    /// Checks what serde cannot: positive sizes, divisibility, supported activations.
    fn check(&self, origin: &str) -> Result<(), ConfigError>;

    fn shipped(name: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(lookup(Self::SHIPPED, Self::KIND, name)?, name)?;
        config.check(name)?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let config: Self = parse(&read(path)?, &origin)?;
        config.check(&origin)?;
        Ok(config)
    }
}

impl Tower for VisionConfig {
    const SHIPPED: &'static [(&'static str, &'static str)] = VISION_CONFIGS;
    const KIND: &'static str = "vision model";

    fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field,
            reason,
        };
        for (field, v) in [
            ("embed_dim", self.embed_dim),
            ("image_resolution", self.image_resolution),
            ("vision_width", self.vision_width),
            ("vision_head_width", self.vision_head_width),
        ] {
            if v <= 0 {
                return Err(invalid(field, format!("must be positive, found {v}")));
            }
        }
        match self.vision_layers {
            VisionLayers::Transformer(layers) => {
                if layers <= 0 {
                    return Err(invalid(
                        "vision_layers",
                        format!("must be positive, found {layers}"),
                    ));
                }
                let patch = self
                    .vision_patch_size
                    .ok_or_else(|| invalid("vision_patch_size", "is required for a ViT".into()))?;
                if patch <= 0 || self.image_resolution % patch != 0 {
                    return Err(invalid(
                        "vision_patch_size",
                        format!(
                            "{patch} must be positive and divide image_resolution {}",
                            self.image_resolution
                        ),
                    ));
                }
                if self.vision_width % self.vision_head_width != 0 {
                    return Err(invalid(
                        "vision_head_width",
                        format!(
                            "{} must divide vision_width {}",
                            self.vision_head_width, self.vision_width
                        ),
                    ));
                }
            }
            VisionLayers::ResNet(blocks) => {
                if blocks.iter().any(|&b| b <= 0) {
                    return Err(invalid(
                        "vision_layers",
                        format!("block counts must be positive, found {blocks:?}"),
                    ));
                }
                if self.image_resolution % 32 != 0 {
                    return Err(invalid(
                        "image_resolution",
                        format!(
                            "{} must be a multiple of 32 for a ResNet",
                            self.image_resolution
                        ),
                    ));
                }
                if (self.vision_width * 32) % self.vision_head_width != 0 {
                    return Err(invalid(
                        "vision_head_width",
                        format!(
                            "{} must divide 32 × vision_width = {}",
                            self.vision_head_width,
                            self.vision_width * 32
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Tower for TextConfig {
    const SHIPPED: &'static [(&'static str, &'static str)] = TEXT_CONFIGS;
    const KIND: &'static str = "text model";

    fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field,
            reason,
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("text_hidden_size", self.text_hidden_size),
            ("text_intermediate_size", self.text_intermediate_size),
            (
                "text_max_position_embeddings",
                self.text_max_position_embeddings,
            ),
            ("text_num_attention_heads", self.text_num_attention_heads),
            ("text_num_hidden_layers", self.text_num_hidden_layers),
            ("text_type_vocab_size", self.text_type_vocab_size),
        ] {
            if v <= 0 {
                return Err(invalid(field, format!("must be positive, found {v}")));
            }
        }
        if self.text_hidden_size % self.text_num_attention_heads != 0 {
            return Err(invalid(
                "text_num_attention_heads",
                format!(
                    "{} must divide text_hidden_size {}",
                    self.text_num_attention_heads, self.text_hidden_size
                ),
            ));
        }
        if self.text_hidden_act != "gelu" {
            return Err(invalid(
                "text_hidden_act",
                format!(
                    "{:?} is not supported (cn_clip's configs all use \"gelu\")",
                    self.text_hidden_act
                ),
            ));
        }
        Ok(())
    }
}

impl VisionConfig {
    /// A vision config shipped with cn_clip, by file stem (`ViT-B-16`, `ViT-B-32`, …, `RN50`).
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        Self::shipped(name)
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(path)
    }

    pub fn is_resnet(&self) -> bool {
        matches!(self.vision_layers, VisionLayers::ResNet(_))
    }

    /// Attention heads: `width / head_width` for a ViT, `width * 32 / head_width` for the ResNet's
    /// attention pool (its final width is 32 × the stem width), as cn_clip derives them.
    pub fn heads(&self) -> i64 {
        match self.vision_layers {
            VisionLayers::Transformer(_) => self.vision_width / self.vision_head_width,
            VisionLayers::ResNet(_) => self.vision_width * 32 / self.vision_head_width,
        }
    }

    /// Patches per side of a ViT (`resolution / patch`), or the ResNet's final feature map side.
    pub fn grid(&self) -> i64 {
        match self.vision_patch_size {
            Some(p) if !self.is_resnet() => self.image_resolution / p,
            _ => self.image_resolution / 32,
        }
    }
}

impl TextConfig {
    /// A text config shipped with cn_clip, by file stem (`RoBERTa-wwm-ext-base-chinese`, …).
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        Self::shipped(name)
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(path)
    }

    pub fn head_dim(&self) -> i64 {
        self.text_hidden_size / self.text_num_attention_heads
    }
}

/// The names of the tower configs shipped with cn_clip (vision, then text), in cn_clip's order.
pub fn shipped_tower_names() -> (Vec<&'static str>, Vec<&'static str>) {
    (
        VISION_CONFIGS.iter().map(|(n, _)| *n).collect(),
        TEXT_CONFIGS.iter().map(|(n, _)| *n).collect(),
    )
}

impl ClipConfig {
    /// A released model by name (`ViT-B-16`, `ViT-L-14`, `ViT-L-14-336`, `ViT-H-14`, `RN50`), or any
    /// pairing of shipped towers written as cn_clip's `VISION@TEXT` (e.g. `ViT-B-32@RBT3-chinese`).
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        if let Some((vision, text)) = name.split_once('@') {
            return Self::from_tower_names(vision, text);
        }
        let (_, vision, text) = RELEASED_MODELS
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| ConfigError::UnknownName {
                kind: "model",
                name: name.to_string(),
                valid: RELEASED_MODELS
                    .iter()
                    .map(|(n, _, _)| n.to_string())
                    .chain(std::iter::once(
                        "VISION@TEXT with shipped tower names".to_string(),
                    ))
                    .collect(),
            })?;
        Self::from_tower_names(vision, text)
    }

    /// Shipped towers by name, as cn_clip's training flags `--vision-model` / `--text-model` take them.
    pub fn from_tower_names(vision: &str, text: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            vision: VisionConfig::from_name(vision)?,
            text: TextConfig::from_name(text)?,
        })
    }

    /// What the examples' `--vision-model` / `--text-model` flags take: a shipped tower name (as
    /// cn_clip reads `clip/model_configs/{name}.json`) or the path of a JSON file in that schema
    /// (how custom sizes, such as the demo's small model, are named).
    pub fn from_tower_args(vision: &str, text: &str) -> Result<Self, ConfigError> {
        let vision = if Path::new(vision).is_file() {
            VisionConfig::from_json_file(Path::new(vision))?
        } else {
            VisionConfig::from_name(vision)?
        };
        let text = if Path::new(text).is_file() {
            TextConfig::from_json_file(Path::new(text))?
        } else {
            TextConfig::from_name(text)?
        };
        Ok(Self { vision, text })
    }

    /// A user's two JSON files in cn_clip's schema.
    pub fn from_json_files(vision: &Path, text: &Path) -> Result<Self, ConfigError> {
        Ok(Self {
            vision: VisionConfig::from_json_file(vision)?,
            text: TextConfig::from_json_file(text)?,
        })
    }

    /// The merged dict (as stored in native weight files' metadata).
    pub fn from_json_str(json: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(json, origin)?;
        config.vision.check(origin)?;
        config.text.check(origin)?;
        Ok(config)
    }

    /// The shipped `(vision, text)` tower names this config equals, if any (for naming a model
    /// whose config was read from a file or inferred from its shapes).
    pub fn shipped_pair(&self) -> Option<(&'static str, &'static str)> {
        let (visions, texts) = shipped_tower_names();
        let vision = visions
            .into_iter()
            .find(|v| VisionConfig::from_name(v).is_ok_and(|c| c == self.vision))?;
        let text = texts
            .into_iter()
            .find(|t| TextConfig::from_name(t).is_ok_and(|c| c == self.text))?;
        Some((vision, text))
    }

    /// The config from the examples' optional `--vision-model` / `--text-model` flags: both or
    /// neither (then an official `.pt`'s architecture is inferred from its tensor shapes).
    pub fn from_optional_tower_args(
        vision: Option<&str>,
        text: Option<&str>,
    ) -> Result<Option<Self>, ConfigError> {
        match (vision, text) {
            (Some(v), Some(t)) => Self::from_tower_args(v, t).map(Some),
            (None, None) => Ok(None),
            (given, _) => Err(ConfigError::Invalid {
                origin: "--vision-model / --text-model".to_string(),
                field: if given.is_some() {
                    "--text-model"
                } else {
                    "--vision-model"
                },
                reason:
                    "is missing: give both flags, or neither to read the architecture from the \
                         weights"
                        .to_string(),
            }),
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising plain numbers, strings and options cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_released_model_loads_with_the_documented_shapes() {
        let expect = [
            ("ViT-B-16", 512, 224, 12, 768, 12, 14, 768, 12),
            ("ViT-L-14", 768, 224, 24, 1024, 16, 16, 768, 12),
            ("ViT-L-14-336", 768, 336, 24, 1024, 16, 24, 768, 12),
            ("ViT-H-14", 1024, 224, 32, 1280, 16, 16, 1024, 24),
        ];
        for (name, embed, res, layers, width, heads, grid, text_h, text_layers) in expect {
            let c = ClipConfig::from_name(name).unwrap();
            assert_eq!(c.vision.embed_dim, embed, "{name}");
            assert_eq!(c.vision.image_resolution, res, "{name}");
            assert_eq!(
                c.vision.vision_layers,
                VisionLayers::Transformer(layers),
                "{name}"
            );
            assert_eq!(c.vision.vision_width, width, "{name}");
            assert_eq!(c.vision.heads(), heads, "{name}");
            assert_eq!(c.vision.grid(), grid, "{name}");
            assert_eq!(c.text.text_hidden_size, text_h, "{name}");
            assert_eq!(c.text.text_num_hidden_layers, text_layers, "{name}");
            assert_eq!(c.text.head_dim(), 64, "{name}");
        }
        let h = ClipConfig::from_name("ViT-H-14").unwrap();
        assert_eq!(h.vision.vision_head_width, 80);
        let rn = ClipConfig::from_name("RN50").unwrap();
        assert_eq!(rn.vision.vision_layers, VisionLayers::ResNet([3, 4, 6, 3]));
        assert_eq!(rn.vision.heads(), 32);
        assert_eq!(rn.vision.grid(), 7);
        assert_eq!(rn.vision.vision_patch_size, None);
        assert_eq!(rn.text.text_num_hidden_layers, 3);
    }

    #[test]
    fn pairings_and_training_only_towers() {
        let c = ClipConfig::from_name("ViT-B-32@RBT3-chinese").unwrap();
        assert_eq!(c.vision.grid(), 7);
        assert_eq!(c.text.text_num_hidden_layers, 3);
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = ClipConfig::from_name("ViT-B-15").unwrap_err().to_string();
        assert!(
            err.contains("ViT-B-15") && err.contains("ViT-B-16") && err.contains("RN50"),
            "{err}"
        );
        let err = ClipConfig::from_name("ViT-B-16@BERT")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown text model \"BERT\""), "{err}");
        assert!(err.contains("RoBERTa-wwm-ext-large-chinese"), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_cn_clip_schema() {
        for name in ["ViT-H-14", "RN50"] {
            let c = ClipConfig::from_name(name).unwrap();
            let json = c.to_json();
            assert_eq!(ClipConfig::from_json_str(&json, "round trip").unwrap(), c);
        }
        let rn = ClipConfig::from_name("RN50").unwrap().to_json();
        assert!(rn.contains("\"vision_layers\":\"[3,4,6,3]\""), "{rn}");
    }

    #[test]
    fn resnet_layers_accept_array_and_string() {
        let base = r#"{"embed_dim":8,"image_resolution":64,"vision_width":8,"vision_patch_size":null,"vision_layers":LAYERS}"#;
        for layers in ["[1,2,1,1]", "\"[1, 2, 1, 1]\"", "\"(1,2,1,1)\""] {
            let json = base.replace("LAYERS", layers);
            let c: VisionConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(
                c.vision_layers,
                VisionLayers::ResNet([1, 2, 1, 1]),
                "{layers}"
            );
        }
        let bad = base.replace("LAYERS", "[1,2,1]");
        let err = serde_json::from_str::<VisionConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 block counts"), "{err}");
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let dir = std::env::temp_dir().join(format!("cnclip-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad-vit.json");
        std::fs::write(
            &path,
            r#"{"embed_dim":8,"image_resolution":30,"vision_layers":2,"vision_width":16,"vision_patch_size":8}"#,
        )
        .unwrap();
        let err = VisionConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad-vit.json") && err.contains("vision_patch_size"),
            "{err}"
        );

        std::fs::write(&path, r#"{"embed_dim":8,"image_resolution":32,"vision_layers":2,"vision_width":16,"vision_patch_size":8,"typo":1}"#).unwrap();
        let err = VisionConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(err.contains("typo"), "{err}");

        let err = VisionConfig::from_json_file(&dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
