//! The template choices of `/api/classify`, for zero-shot classification with Chinese labels.
//!
//! A choice names a set of `cnclip_model::zeroshot::Templates`; the classifier is the model
//! crate's (cn_clip's `zero_shot_classifier`: each label the normalised mean of its normalised
//! prompt embeddings), its prompts preprocessed as cn_clip's datasets do (lower case, curly quotes):
//!
//! | name | texts per label | source |
//! |---|---|---|
//! | `plain` (default) | the label itself | cn_clip's README example (`["皮卡丘", …]`) |
//! | `photo` | `{label}的照片` | the first of cn_clip's `openai_templates` |
//! | `openai` | all 183 `openai_templates` | what `zeroshot_evaluation.py` uses for ImageNet |
//! | `product` | `这是一张图片，里面存在商品：{label}` | the MUGE recipe's product prompt, for a model fine-tuned with it |
//! | any text containing `{}` | that text with `{}` replaced by the label | the caller's own |
//!
//! Probabilities are `softmax(exp(logit_scale) · cos)`, as `get_similarity` in cn_clip's README;
//! `zeroshot_evaluation.py` multiplies by a fixed 100 instead, which is the same for a trained
//! model (cn_clip clamps `logit_scale` at ln 100 and trained checkpoints sit at that bound).

use cnclip_model::zeroshot::{OPENAI_TEMPLATES, Templates};
use muge_data::PRODUCT_PROMPT;

/// Longest custom template accepted (characters).
pub const MAX_TEMPLATE_CHARS: usize = 64;

/// A request's `template` value: the name reported back (a custom template is reported as
/// itself; it also keys the class-vector cache) and its templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateChoice {
    pub name: String,
    pub templates: Templates,
}

impl TemplateChoice {
    /// Parses a request's `template` value (see the module doc).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, list): (&str, Vec<String>) = match s.trim() {
            "" | "plain" => ("plain", vec!["{}".into()]),
            "photo" => ("photo", vec![OPENAI_TEMPLATES[0].into()]),
            "openai" => (
                "openai",
                OPENAI_TEMPLATES.iter().map(|t| t.to_string()).collect(),
            ),
            "product" => ("product", vec![format!("{PRODUCT_PROMPT}{{}}")]),
            custom if custom.contains("{}") => {
                if custom.chars().count() > MAX_TEMPLATE_CHARS {
                    return Err(format!(
                        "the template is longer than {MAX_TEMPLATE_CHARS} characters"
                    ));
                }
                (custom, vec![custom.to_string()])
            }
            other => {
                return Err(format!(
                    "unknown template {other:?}: use plain, photo, openai, product, or a text with {{}} \
                     where the label goes"
                ));
            }
        };
        let templates = Templates::new(list, "the template").map_err(|e| e.to_string())?;
        Ok(TemplateChoice {
            name: name.to_string(),
            templates,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn templates_fill_the_label() {
        let prompts =
            |s: &str, label: &str| TemplateChoice::parse(s).unwrap().templates.prompts(label);
        assert_eq!(prompts("", "皮卡丘"), vec!["皮卡丘"]);
        assert_eq!(prompts("photo", "皮卡丘"), vec!["皮卡丘的照片"]);
        let all = prompts("openai", "猫");
        assert_eq!(all.len(), 183);
        assert!(all.iter().all(|t| t.contains('猫') && !t.contains("{}")));
        assert_eq!(
            prompts("product", "连衣裙"),
            vec!["这是一张图片，里面存在商品：连衣裙"]
        );
        let custom = TemplateChoice::parse("一张{}的图片").unwrap();
        assert_eq!(custom.name, "一张{}的图片");
        assert_eq!(custom.templates.prompts("猫"), vec!["一张猫的图片"]);
        assert_eq!(TemplateChoice::parse("openai").unwrap().name, "openai");
        assert!(TemplateChoice::parse("photos").is_err());
    }
}
