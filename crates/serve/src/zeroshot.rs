//! Prompt templates for zero-shot classification with Chinese labels.
//!
//! cn_clip's `zeroshot_evaluation.py` embeds every template filled with a label, L2-normalises,
//! averages and normalises again (its `zero_shot_classifier`); texts go through the dataset
//! preprocessing (`_preprocess_text`: lower case, curly quotes), which our text pipeline applies.
//! The choices here:
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

use muge_data::PRODUCT_PROMPT;

use cnclip_model::zeroshot::OPENAI_TEMPLATES;

/// A template set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Templates {
    Plain,
    Photo,
    OpenAi,
    Product,
    /// A text with `{}` where the label goes.
    Custom(String),
}

/// Longest custom template accepted (characters).
pub const MAX_TEMPLATE_CHARS: usize = 64;

impl Templates {
    /// Parses a request's `template` value (see the module doc).
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "" | "plain" => Templates::Plain,
            "photo" => Templates::Photo,
            "openai" => Templates::OpenAi,
            "product" => Templates::Product,
            custom if custom.contains("{}") => {
                if custom.chars().count() > MAX_TEMPLATE_CHARS {
                    return Err(format!(
                        "the template is longer than {MAX_TEMPLATE_CHARS} characters"
                    ));
                }
                Templates::Custom(custom.to_string())
            }
            other => {
                return Err(format!(
                    "unknown template {other:?}: use plain, photo, openai, product, or a text with {{}} \
                     where the label goes"
                ));
            }
        })
    }

    /// The name reported back (a custom template is reported as itself).
    pub fn key(&self) -> String {
        match self {
            Templates::Plain => "plain".into(),
            Templates::Photo => "photo".into(),
            Templates::OpenAi => "openai".into(),
            Templates::Product => "product".into(),
            Templates::Custom(t) => t.clone(),
        }
    }

    /// The texts to embed for `label`.
    pub fn apply(&self, label: &str) -> Vec<String> {
        match self {
            Templates::Plain => vec![label.to_string()],
            Templates::Photo => vec![OPENAI_TEMPLATES[0].replace("{}", label)],
            Templates::OpenAi => OPENAI_TEMPLATES
                .iter()
                .map(|t| t.replace("{}", label))
                .collect(),
            Templates::Product => vec![format!("{PRODUCT_PROMPT}{label}")],
            Templates::Custom(t) => vec![t.replace("{}", label)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_the_label() {
        assert_eq!(Templates::Plain.apply("皮卡丘"), vec!["皮卡丘"]);
        assert_eq!(Templates::Photo.apply("皮卡丘"), vec!["皮卡丘的照片"]);
        let all = Templates::OpenAi.apply("猫");
        assert_eq!(all.len(), 183);
        assert!(all.iter().all(|t| t.contains('猫') && !t.contains("{}")));
        assert_eq!(
            Templates::Product.apply("连衣裙"),
            vec!["这是一张图片，里面存在商品：连衣裙"]
        );
        assert_eq!(
            Templates::parse("一张{}的图片"),
            Ok(Templates::Custom("一张{}的图片".into()))
        );
        assert!(Templates::parse("photos").is_err());
    }
}
