//! Zero-shot classification as cn_clip's `cn_clip/eval/zeroshot_evaluation.py` does it: each class
//! is the normalised mean of its normalised prompt embeddings ([`class_vector`], [`classifier`]),
//! and an image's class probabilities are `softmax(scale · image · W)`
//! ([`probabilities_with_scale`]): the script's fixed 100 ([`probabilities`]), or the model's
//! `exp(logit_scale)` as `get_similarity` in cn_clip's README (what the search service uses; the
//! same for a trained model, whose `logit_scale` sits at cn_clip's clamp of ln 100).
//!
//! Prompts go through the datasets' text preprocessing (lower-casing, curly quotes), as cn_clip's
//! script applies it to every template.

use crate::Clip;
use crate::tokenizer::{Tokenizer, TokenizerError, preprocess_dataset_text};
use tch::{Kind, Tensor};

pub use crate::zeroshot_templates::{DATASET_TEMPLATES, OPENAI_TEMPLATES};

/// The fixed logit scale of cn_clip's zero-shot script.
pub const ZERO_SHOT_SCALE: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ZeroShotError {
    #[error("no class labels were given")]
    NoLabels,
    #[error("label {index} is empty")]
    EmptyLabel { index: usize },
    #[error("{origin} line {line}: template {template:?} has no `{{}}` for the label")]
    TemplateWithoutSlot {
        origin: String,
        line: usize,
        template: String,
    },
    #[error("{origin}: no templates")]
    NoTemplates { origin: String },
    #[error(
        "{origin}: expected a JSON list of row indices (cn_clip's --index), e.g. [2, 0, 1]: {reason}"
    )]
    BadIndex { origin: String, reason: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Prompt templates, each with one `{}` for the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates(Vec<String>);

impl Default for Templates {
    /// cn_clip's `openai_templates` (183), what `zeroshot_evaluation.py` uses for ImageNet and any
    /// data set without its own list, so class vectors equal the script's.
    fn default() -> Self {
        Self(OPENAI_TEMPLATES.iter().map(|t| t.to_string()).collect())
    }
}

impl Templates {
    /// These templates, each of which must hold a `{}`; `origin` names the source in errors.
    pub fn new(
        templates: impl IntoIterator<Item = impl Into<String>>,
        origin: &str,
    ) -> Result<Self, ZeroShotError> {
        let templates: Vec<String> = templates.into_iter().map(Into::into).collect();
        if let Some((i, t)) = templates
            .iter()
            .enumerate()
            .find(|(_, t)| !t.contains("{}"))
        {
            return Err(ZeroShotError::TemplateWithoutSlot {
                origin: origin.to_string(),
                line: i + 1,
                template: t.clone(),
            });
        }
        if templates.is_empty() {
            return Err(ZeroShotError::NoTemplates {
                origin: origin.to_string(),
            });
        }
        Ok(Self(templates))
    }

    /// The single template `{}`: the label alone.
    pub fn label_only() -> Self {
        Self(vec!["{}".to_string()])
    }

    /// One template per non-empty line; `origin` names the source in errors.
    pub fn from_lines(text: &str, origin: &str) -> Result<Self, ZeroShotError> {
        let mut templates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if !line.contains("{}") {
                return Err(ZeroShotError::TemplateWithoutSlot {
                    origin: origin.to_string(),
                    line: i + 1,
                    template: line.to_string(),
                });
            }
            templates.push(line.to_string());
        }
        if templates.is_empty() {
            return Err(ZeroShotError::NoTemplates {
                origin: origin.to_string(),
            });
        }
        Ok(Self(templates))
    }

    /// The templates cn_clip's `zeroshot_evaluation.py` uses for `--dataset name`: the data set's
    /// own list for the six names of its `template_dict` (aircraft, food, flowers, EuroSAT and
    /// RESISC45, Country211, `openai`), `openai_templates` for every other name, ImageNet included.
    /// The second value says whether the name had its own list.
    pub fn for_dataset(name: &str) -> (Self, bool) {
        match DATASET_TEMPLATES.iter().find(|(n, _)| *n == name) {
            Some((_, list)) => (Self(list.iter().map(|t| t.to_string()).collect()), true),
            None => (Self::default(), false),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The prompts of one label, preprocessed like cn_clip's datasets.
    pub fn prompts(&self, label: &str) -> Vec<String> {
        self.0
            .iter()
            .map(|t| preprocess_dataset_text(&t.replacen("{}", label, 1)))
            .collect()
    }
}

/// `[E, C]` class vectors: per label, the mean of its L2-normalised prompt features, normalised.
pub fn classifier(
    model: &Clip,
    tokenizer: &Tokenizer,
    labels: &[impl AsRef<str>],
    templates: &Templates,
    context_length: usize,
) -> Result<Tensor, ZeroShotError> {
    if labels.is_empty() {
        return Err(ZeroShotError::NoLabels);
    }
    let _guard = tch::no_grad_guard();
    let mut columns = Vec::with_capacity(labels.len());
    for (index, label) in labels.iter().enumerate() {
        let label = label.as_ref().trim();
        if label.is_empty() {
            return Err(ZeroShotError::EmptyLabel { index });
        }
        let ids = tokenizer
            .tokenize(&templates.prompts(label), context_length)?
            .to_device(model.device());
        columns.push(class_vector(&model.text_features(&ids)));
    }
    Ok(Tensor::stack(&columns, 1))
}

/// One label's `[E]` class vector from its prompts' L2-normalised features `[P, E]`
/// (`Clip::text_features`): their mean in fp32, normalised (cn_clip's `zero_shot_classifier`).
pub fn class_vector(prompt_features: &Tensor) -> Tensor {
    let features = prompt_features.to_kind(Kind::Float);
    let mean = features.mean_dim(0, false, Kind::Float);
    &mean / mean.norm()
}

/// `softmax(100 · normalise(image_features) · classifier)`: `[N, C]` probabilities, with
/// `zeroshot_evaluation.py`'s fixed scale.
pub fn probabilities(image_features: &Tensor, classifier: &Tensor) -> Tensor {
    probabilities_with_scale(image_features, classifier, ZERO_SHOT_SCALE)
}

/// `softmax(scale · normalise(image_features) · classifier)`: `[N, C]` probabilities for `[N, E]`
/// image features and `[E, C]` class vectors.
pub fn probabilities_with_scale(
    image_features: &Tensor,
    classifier: &Tensor,
    scale: f64,
) -> Tensor {
    let images = image_features.to_kind(Kind::Float);
    let images = &images / images.norm_scalaropt_dim(2.0, [-1], true);
    (images.matmul(&classifier.to_device(images.device())) * scale).softmax(-1, Kind::Float)
}

/// Top-1 accuracy in percent of probability rows against class indices (the first maximum
/// wins, as `argmax`).
pub fn top1_accuracy(rows: &[Vec<f32>], targets: &[usize]) -> f64 {
    let argmax =
        |row: &[f32]| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best });
    let correct = rows
        .iter()
        .zip(targets)
        .filter(|(row, t)| argmax(row) == **t)
        .count();
    100.0 * correct as f64 / rows.len().max(1) as f64
}

/// `label p, label p, …` of the `k` most likely labels of one row (probabilities to 3 decimals).
pub fn top_labels(row: &[f32], labels: &[String], k: usize) -> String {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    let top: Vec<String> = order
        .iter()
        .take(k)
        .filter_map(|&i| Some(format!("{} {:.3}", labels.get(i)?, row[i])))
        .collect();
    top.join(", ")
}

/// The `{dataset}.json` `zeroshot_evaluation.py --save-dir` writes: cn_clip's keys, parameter
/// counts of `model`, and `predictions` as a list holding the one `[N, C]` matrix (rounded to 6
/// decimals). `vision` names the model (`CN-CLIP-{vision}`; default: the shipped pair's, else
/// `custom`).
pub fn predictions_json(
    model: &Clip,
    vision: Option<&str>,
    dataset: &str,
    rows: &[Vec<f32>],
) -> serde_json::Value {
    let predictions: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|&p| (f64::from(p) * 1e6).round() / 1e6)
                .collect()
        })
        .collect();
    let vision = match (vision, model.config().shipped_pair()) {
        (Some(v), _) => v.to_string(),
        (None, Some((v, _))) => v.to_string(),
        (None, None) => "custom".to_string(),
    };
    let tensors = model.named_tensors();
    let count = |visual: bool| -> usize {
        tensors
            .iter()
            .filter(|(k, _)| !visual || k.starts_with("visual."))
            .map(|(_, t)| t.numel())
            .sum()
    };
    serde_json::json!({
        "model_name": format!("CN-CLIP-{vision}"),
        "dataset_name": dataset,
        "num_trainable_params": 0,
        "num_params": count(false),
        "num_visual_params": count(true),
        "num_backbone_params": count(false),
        "n_shot": 0,
        "rnd_seeds": [123],
        "predictions": [predictions],
    })
}

/// cn_clip's `--index` (`zeroshot_evaluation.py` `run`): a JSON list of row numbers, applied as
/// `outputs[index]` to the probabilities after accuracy is computed. As torch indexing does, it
/// may repeat or drop rows and counts negative numbers from the end; a number outside
/// `-rows..rows` is an error naming its position. `origin` names the file in errors.
pub fn parse_index(json: &str, rows: usize, origin: &str) -> Result<Vec<usize>, ZeroShotError> {
    let bad = |reason: String| ZeroShotError::BadIndex {
        origin: origin.to_string(),
        reason,
    };
    let values: Vec<i64> = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let n = i64::try_from(rows).map_err(|e| bad(e.to_string()))?;
    values
        .iter()
        .enumerate()
        .map(|(at, &v)| {
            let i = if v < 0 { v + n } else { v };
            if (0..n).contains(&i) {
                Ok(i as usize)
            } else {
                Err(bad(format!(
                    "entry {at} is {v}, outside the {rows} images (-{rows}..{rows})"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_templates_are_cn_clips() {
        let t = Templates::default();
        assert_eq!(t.len(), 183);
        assert_eq!(t.prompts("猫")[0], "猫的照片");
    }

    #[test]
    fn each_dataset_gets_cn_clips_templates() {
        // zeroshot_evaluation.py's template_dict, with the list lengths of cvinw_zeroshot_templates.
        for (name, len, first) in [
            ("fgvc-aircraft-2013b-variants102", 100, "{}，飞机的照片"),
            ("food-101", 21, "一种叫{}的食物的照片"),
            ("oxford-flower-102", 32, "一种叫{}的花的照片"),
            ("eurosat_clip", 24, "一张{}的卫星照片"),
            ("resisc45_clip", 24, "一张{}的卫星照片"),
            ("country211", 4, "一张在{}拍的照片"),
            ("openai", 183, "{}的照片"),
        ] {
            let (t, own) = Templates::for_dataset(name);
            assert!(own, "{name}");
            assert_eq!(t.len(), len, "{name}");
            assert_eq!(t.0[0], first, "{name}");
        }
        for other in ["imagenet", "cifar-10", "Food-101", ""] {
            assert_eq!(
                Templates::for_dataset(other),
                (Templates::default(), false),
                "{other}"
            );
        }
    }

    #[test]
    fn index_reorders_like_torch_indexing() {
        assert_eq!(
            parse_index("[2, 0, -1, 1]", 3, "i.json").unwrap(),
            [2, 0, 2, 1]
        );
        assert_eq!(
            parse_index(" [] ", 3, "i.json").unwrap(),
            Vec::<usize>::new()
        );
        let e = parse_index("[0, 3]", 3, "i.json").unwrap_err().to_string();
        assert!(e.contains("i.json") && e.contains("entry 1 is 3"), "{e}");
        let e = parse_index("[0, -4]", 3, "i.json").unwrap_err().to_string();
        assert!(e.contains("entry 1 is -4"), "{e}");
        let e = parse_index("{\"a\": 1}", 3, "i.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("i.json: expected a JSON list"), "{e}");
    }

    #[test]
    fn templates_need_a_slot_and_name_the_line() {
        let err = Templates::from_lines("{}的照片\n\n照片\n", "t.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.txt line 3: template \"照片\" has no `{}` for the label"
        );
        let t = Templates::from_lines(" {}的照片 \n一张{}\n", "t.txt").unwrap();
        assert_eq!(
            t.prompts("Ｔ恤“新”"),
            ["ｔ恤\"新\"的照片", "一张ｔ恤\"新\""]
        );
    }

    #[test]
    fn templates_from_a_list_need_a_slot() {
        let t = Templates::new(["{}", "一张{}"], "list").unwrap();
        assert_eq!(t.prompts("猫"), ["猫", "一张猫"]);
        assert_eq!(Templates::label_only().prompts("Ｔ"), ["ｔ"]);
        let e = Templates::new(["{}", "照片"], "request").unwrap_err();
        assert_eq!(
            e.to_string(),
            "request line 2: template \"照片\" has no `{}` for the label"
        );
        assert!(Templates::new(Vec::<String>::new(), "request").is_err());
    }

    /// The scale is the softmax's temperature: with scale `s`, two classes at cosines `a` and
    /// `b` get `1 / (1 + exp(-s (a - b)))`.
    #[test]
    fn the_scale_sets_the_temperature() {
        let classifier = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([2, 2]);
        let image = Tensor::from_slice(&[0.6f32, 0.8]).reshape([1, 2]);
        for scale in [1.0, 14.285_714, 100.0] {
            let p = probabilities_with_scale(&image, &classifier, scale);
            let got = p.double_value(&[0, 0]);
            let expected = 1.0 / (1.0 + (-scale * (0.6 - 0.8f64)).exp());
            // fp32 softmax of logits below 100: relative error a few ulps of 1.
            assert!(
                (got - expected).abs() < 1e-6,
                "{scale}: {got} vs {expected}"
            );
        }
        assert!(
            probabilities(&image, &classifier).equal(&probabilities_with_scale(
                &image,
                &classifier,
                ZERO_SHOT_SCALE
            ))
        );
    }

    #[test]
    fn class_vectors_are_normalised_means() {
        let rows = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([2, 2]);
        let v = class_vector(&rows);
        let half = std::f64::consts::FRAC_1_SQRT_2;
        assert!((v.double_value(&[0]) - half).abs() < 1e-7);
        assert!((v.double_value(&[1]) - half).abs() < 1e-7);
    }

    #[test]
    fn probabilities_rank_the_matching_class_first() {
        let classifier = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([2, 2]);
        let images = Tensor::from_slice(&[3.0f32, 0.1, 0.2, 5.0]).reshape([2, 2]);
        let p = probabilities(&images, &classifier);
        let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&p).unwrap();
        assert!(rows[0][0] > 0.99 && rows[1][1] > 0.99);
        assert!((rows[0][0] + rows[0][1] - 1.0).abs() < 1e-6);
    }
}
