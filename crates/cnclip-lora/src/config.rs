//! What a LoRA run adapts and how: rank, alpha, dropout, the target patterns over cn_clip's module
//! names, and which base weights train besides the adapters.

use crate::LoraError;
use cnclip_model::model::LinearSite;
use serde::{Deserialize, Serialize};

/// The q, k and v parts of the ViT's fused `attn.in_proj`, in `in_proj_weight`'s row order.
pub const QKV: [&str; 3] = ["q", "k", "v"];

/// Named target sets, usable wherever a pattern is (`--lora-targets qv`).
pub const PRESETS: [(&str, &[&str]); 4] = [
    // PEFT's default for BERT and CLIP-like models: queries and values.
    (
        "qv",
        &["query", "value", "attn.in_proj.q", "attn.in_proj.v"],
    ),
    (
        "attn",
        &[
            "query",
            "key",
            "value",
            "attention.output.dense",
            "attn.in_proj",
            "attn.out_proj",
        ],
    ),
    (
        "all",
        &[
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "attn.in_proj",
            "attn.out_proj",
            "mlp.c_fc",
            "mlp.c_proj",
        ],
    ),
    (
        "all+proj",
        &[
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "attn.in_proj",
            "attn.out_proj",
            "mlp.c_fc",
            "mlp.c_proj",
            "visual.proj",
            "text_projection",
        ],
    ),
];

/// A LoRA configuration. Serialised as the adapter file's JSON config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// `r`: the adapters' inner dimension.
    pub rank: i64,
    /// `lora_alpha`; the update is scaled by `alpha / rank`, as PEFT does.
    pub alpha: f64,
    /// Dropout on the adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// Patterns or preset names (see [`LoraConfig::adapter_names`]).
    pub targets: Vec<String>,
    /// Also train `logit_scale`.
    #[serde(default)]
    pub train_logit_scale: bool,
    /// Also train every LayerNorm (ViT `ln_*`, BERT `LayerNorm`).
    #[serde(default)]
    pub train_layer_norms: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["qv".into()],
            train_logit_scale: false,
            train_layer_norms: false,
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> Result<(), LoraError> {
        let bad = |what: String| Err(LoraError::Config(what));
        if self.rank < 1 {
            return bad(format!("rank must be at least 1, got {}", self.rank));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("no targets given".into());
        }
        Ok(())
    }

    /// The targets with presets expanded.
    pub fn patterns(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.targets {
            match PRESETS.iter().find(|(name, _)| name == t) {
                Some((_, list)) => out.extend(list.iter().map(|s| s.to_string())),
                None => out.push(t.clone()),
            }
        }
        out
    }

    /// The adapters these targets select among `sites`, in site order: one per site, except the
    /// ViT's fused `attn.in_proj`, which has three selectable adapters `attn.in_proj.q|k|v`.
    ///
    /// A pattern selects an adapter when it equals the adapter's name or a dot-separated suffix of
    /// it (PEFT's `target_modules` rule), and selects all three parts when it names the fused
    /// `in_proj` itself. `*` matches within one name segment (`layer.*.output.dense` is the FFN
    /// output only; plain `output.dense` also matches `attention.output.dense`, as in PEFT).
    /// Every pattern must select something.
    pub fn adapter_names(&self, sites: &[LinearSite]) -> Result<Vec<String>, LoraError> {
        self.validate()?;
        let patterns = self.patterns();
        let mut used = vec![false; patterns.len()];
        let mut out = Vec::new();
        for site in sites {
            for name in adapters_of_site(&site.name) {
                let mut hit = false;
                for (i, p) in patterns.iter().enumerate() {
                    let matches = suffix_match(p, &name)
                        || (name != site.name && suffix_match(p, &site.name));
                    if matches {
                        used[i] = true;
                        hit = true;
                    }
                }
                if hit {
                    out.push(name);
                }
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(LoraError::NoMatch {
                pattern: patterns[i].clone(),
            });
        }
        Ok(out)
    }

    /// Whether base weight `key` trains in this configuration (adapters aside).
    pub fn trains_base_key(&self, key: &str) -> bool {
        (self.train_logit_scale && key == "logit_scale")
            || (self.train_layer_norms && is_layer_norm(key))
    }
}

/// ViT LayerNorms (`ln_pre`, `ln_post`, `ln_1`, `ln_2`) and BERT's `LayerNorm`s.
pub fn is_layer_norm(key: &str) -> bool {
    let module = key.rsplit('.').nth(1).unwrap_or("");
    module.starts_with("ln_") || module == "LayerNorm"
}

/// The adapter names a site offers.
pub fn adapters_of_site(site: &str) -> Vec<String> {
    if site.ends_with(".attn.in_proj") {
        QKV.iter().map(|p| format!("{site}.{p}")).collect()
    } else {
        vec![site.to_string()]
    }
}

/// Splits an adapter name into its site and, for a fused-qkv part, the part's index.
pub fn site_of_adapter(name: &str) -> (&str, Option<usize>) {
    if let Some((site, part)) = name.rsplit_once('.')
        && site.ends_with(".attn.in_proj")
        && let Some(i) = QKV.iter().position(|p| *p == part)
    {
        return (site, Some(i));
    }
    (name, None)
}

fn suffix_match(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    if p.len() > n.len() {
        return false;
    }
    p.iter()
        .zip(&n[n.len() - p.len()..])
        .all(|(p, n)| segment_match(p, n))
}

/// `*` matches any run of characters within a segment.
fn segment_match(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(tail) = text.strip_prefix(head) else {
        return false;
    };
    (0..=tail.len())
        .filter(|&i| tail.is_char_boundary(i))
        .any(|i| segment_match(rest, &tail[i..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cnclip_model::ClipConfig;
    use cnclip_model::model::delta::linear_sites;

    fn sites() -> Vec<LinearSite> {
        linear_sites(&ClipConfig::from_name("ViT-B-16").unwrap())
    }

    fn names(targets: &[&str]) -> Result<Vec<String>, LoraError> {
        LoraConfig {
            targets: targets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .adapter_names(&sites())
    }

    #[test]
    fn patterns_follow_peft_suffix_rule_and_split_in_proj() -> Result<(), LoraError> {
        let qv = names(&["qv"])?;
        assert_eq!(qv.len(), 12 * 2 + 12 * 2);
        assert!(qv.contains(&"visual.transformer.resblocks.3.attn.in_proj.q".to_string()));
        assert!(qv.contains(&"bert.encoder.layer.11.attention.self.value".to_string()));
        assert!(!qv.iter().any(|n| n.ends_with("in_proj.k")));

        assert_eq!(names(&["attn.in_proj"])?.len(), 36);
        assert_eq!(names(&["in_proj.k"])?.len(), 12);
        // PEFT's rule: `output.dense` is a suffix of `attention.output.dense` too.
        assert_eq!(names(&["output.dense"])?.len(), 24);
        assert_eq!(names(&["layer.*.output.dense"])?.len(), 12);
        assert_eq!(names(&["attention.output.dense"])?.len(), 12);
        assert_eq!(
            names(&["visual.transformer.resblocks.1*.mlp.c_fc"])?,
            vec![
                "visual.transformer.resblocks.1.mlp.c_fc".to_string(),
                "visual.transformer.resblocks.10.mlp.c_fc".to_string(),
                "visual.transformer.resblocks.11.mlp.c_fc".to_string()
            ]
        );
        assert_eq!(names(&["all+proj"])?.len(), 12 * 6 + 12 * 6 + 2);
        Ok(())
    }

    #[test]
    fn a_pattern_matching_nothing_is_an_error() -> Result<(), LoraError> {
        let err = names(&["query", "c_attn"]).unwrap_err().to_string();
        assert!(err.contains("c_attn"), "{err}");
        // Whole segments only: `proj` is not a suffix of `c_proj` or `out_proj`.
        assert_eq!(names(&["proj"])?, vec!["visual.proj".to_string()]);
        assert_eq!(names(&["q"])?.len(), 12);
        assert!(names(&["uery"]).is_err());
        let bad = LoraConfig {
            rank: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        Ok(())
    }

    #[test]
    fn layer_norms_and_adapter_names() {
        assert!(is_layer_norm("visual.transformer.resblocks.0.ln_1.weight"));
        assert!(is_layer_norm("visual.ln_post.bias"));
        assert!(is_layer_norm(
            "bert.encoder.layer.0.output.LayerNorm.weight"
        ));
        assert!(!is_layer_norm("visual.proj"));
        assert!(!is_layer_norm("bert.encoder.layer.0.output.dense.weight"));
        assert_eq!(
            site_of_adapter("visual.transformer.resblocks.2.attn.in_proj.v"),
            ("visual.transformer.resblocks.2.attn.in_proj", Some(2))
        );
        assert_eq!(site_of_adapter("visual.proj"), ("visual.proj", None));
    }
}
