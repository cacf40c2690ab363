//! The last two steps of the recipe over finished runs ([`RunScore`]), shared by `demo` and `sweep`: the soup of
//! the runs' checkpoints (through `cargo xtask soup`), then test-set features, top-10 submission and
//! its score (through the `extract_features`, `predict` and `evaluate` examples).

use crate::examples;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A finished run's validation score (percent).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunScore {
    pub name: String,
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    pub mean_recall: f64,
    pub checkpoint: PathBuf,
    pub lora: bool,
    pub base: Option<PathBuf>,
}

/// What the soup step produced.
#[derive(Debug, Clone)]
pub struct SoupResult {
    pub checkpoint: PathBuf,
    pub report: PathBuf,
    /// One line: the soup's members and valid recall.
    pub summary: String,
}

/// Soups the runs' final checkpoints with `strategy`, scored on `valid` (an LMDB split directory).
/// `common` holds the sweep's shared finetune flags (model configs, prompt).
pub fn soup(
    root: &Path,
    runs: &[RunScore],
    valid: &Path,
    strategy: &str,
    out: &Path,
    common: &BTreeMap<String, toml::Value>,
) -> Result<SoupResult> {
    if runs.is_empty() {
        bail!("no runs to soup");
    }
    let lora_bases: Vec<&Path> = runs
        .iter()
        .filter(|r| r.lora)
        .filter_map(|r| r.base.as_deref())
        .collect();
    if let Some(first) = lora_bases.first()
        && lora_bases.iter().any(|b| b != first)
    {
        bail!("the LoRA runs start from different bases; soup them separately");
    }
    let mut args: Vec<OsString> = vec!["--candidates".into()];
    args.extend(runs.iter().map(|r| OsString::from(&r.checkpoint)));
    args.extend([
        "--val-data".into(),
        valid.into(),
        "--strategy".into(),
        strategy.into(),
        "--out".into(),
        out.into(),
    ]);
    if let Some(base) = lora_bases.first() {
        args.extend(["--lora-base".into(), (*base).into()]);
    }
    for key in ["vision-model", "text-model", "context-length"] {
        if let Some(value) = common.get(key) {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            args.extend([format!("--{key}").into(), value.into()]);
        }
    }
    if common.get("text-prompt") == Some(&toml::Value::Boolean(true)) {
        args.push("--text-prompt".into());
    }
    let mut cmd = match examples::prebuilt() {
        Some(dir) => {
            let mut cmd = std::process::Command::new(dir.join("cnclip-soup"));
            cmd.args(&args).current_dir(root);
            cmd
        }
        None => crate::soup::command(root, examples::cargo(), &args),
    };
    let shown = format!(
        "cargo xtask soup {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    examples::run(&mut cmd, &shown)?;
    let report_json = out.join("report.json");
    let text = std::fs::read_to_string(&report_json)
        .with_context(|| format!("the soup wrote no {}", report_json.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", report_json.display()))?;
    let final_score = &report["final"];
    let summary = format!(
        "{} — R@1 {:.2}  R@5 {:.2}  R@10 {:.2}  MR {:.2}",
        final_score["name"].as_str().unwrap_or("soup"),
        final_score["r1"].as_f64().unwrap_or(f64::NAN),
        final_score["r5"].as_f64().unwrap_or(f64::NAN),
        final_score["r10"].as_f64().unwrap_or(f64::NAN),
        final_score["mean_recall"].as_f64().unwrap_or(f64::NAN),
    );
    let checkpoint = final_score["checkpoint"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| out.join("soup.safetensors"));
    Ok(SoupResult {
        checkpoint,
        report: out.join("report.md"),
        summary,
    })
}

/// Test features of the soup model, its top-10 submission (`test_predictions.jsonl`), validated
/// and scored against `{data}/test_texts.jsonl`. Returns the score line.
#[allow(clippy::too_many_arguments)]
pub fn predict_and_score(
    root: &Path,
    soup: &SoupResult,
    test: &Path,
    data: &Path,
    out: &Path,
    vision: &str,
    text: &str,
    context_length: u32,
    device: &str,
) -> Result<String> {
    std::fs::create_dir_all(out)?;
    let texts = data.join("test_texts.jsonl");
    let img_feats = out.join("test_imgs.img_feat.jsonl");
    let txt_feats = out.join("test_texts.txt_feat.jsonl");
    let predictions = out.join("test_predictions.jsonl");
    let score = out.join("test_score.json");
    let s = |p: &Path| OsString::from(p);
    examples::run_example(
        root,
        "extract_features",
        &[
            "--extract-image-feats".into(),
            "--extract-text-feats".into(),
            "--image-data".into(),
            s(&test.join("imgs")),
            "--text-data".into(),
            s(&texts),
            "--image-feat-output-path".into(),
            s(&img_feats),
            "--text-feat-output-path".into(),
            s(&txt_feats),
            "--resume".into(),
            s(&soup.checkpoint),
            "--vision-model".into(),
            vision.into(),
            "--text-model".into(),
            text.into(),
            "--precision".into(),
            "fp32".into(),
            "--context-length".into(),
            context_length.to_string().into(),
            "--text-prompt".into(),
            "--device".into(),
            device.into(),
        ],
    )?;
    examples::run_example(
        root,
        "predict",
        &[
            "--image-feats".into(),
            s(&img_feats),
            "--text-feats".into(),
            s(&txt_feats),
            "--top-k".into(),
            "10".into(),
            "--output".into(),
            s(&predictions),
        ],
    )?;
    if !has_ground_truth(&texts)? {
        // MUGE's real test split has no labels: check the submission's shape instead.
        let queries = count_lines(&texts)?;
        let written = check_submission(&predictions)?;
        if written != queries {
            bail!(
                "{}: {written} predictions for {queries} queries in {}",
                predictions.display(),
                texts.display()
            );
        }
        return Ok(format!(
            "no ground truth in {}; {written} queries × 10 ids written to {}",
            texts.display(),
            predictions.display()
        ));
    }
    examples::run_example(root, "evaluate", &[s(&texts), s(&predictions), s(&score)])?;
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&score)
            .with_context(|| format!("cannot read {}", score.display()))?,
    )?;
    if json["success"] != serde_json::Value::Bool(true) {
        bail!(
            "{}: the submission failed validation: {}",
            score.display(),
            json["errorMsg"]
        );
    }
    let r = &json["scoreJson"];
    Ok(format!(
        "R@1 {:.2}  R@5 {:.2}  R@10 {:.2}  MR {:.2}  (submission {})",
        r["r1"].as_f64().unwrap_or(f64::NAN),
        r["r5"].as_f64().unwrap_or(f64::NAN),
        r["r10"].as_f64().unwrap_or(f64::NAN),
        r["mean_recall"].as_f64().unwrap_or(f64::NAN),
        predictions.display()
    ))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

fn count_lines(path: &Path) -> Result<usize> {
    Ok(read_lines(path)?.len())
}

/// Whether every query line carries a non-empty `image_ids` (or Tianchi `item_ids`) list.
fn has_ground_truth(texts: &Path) -> Result<bool> {
    for (i, line) in read_lines(texts)?.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", texts.display(), i + 1))?;
        let ids = v.get("image_ids").or_else(|| v.get("item_ids"));
        if ids
            .and_then(|ids| ids.as_array())
            .is_none_or(|a| a.is_empty())
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every line has a `text_id` and exactly 10 distinct integer `image_ids`; returns the line count.
fn check_submission(predictions: &Path) -> Result<usize> {
    let lines = read_lines(predictions)?;
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", predictions.display(), i + 1))?;
        let ids: Vec<i64> = v["image_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
            .unwrap_or_default();
        let distinct: std::collections::HashSet<i64> = ids.iter().copied().collect();
        if !v["text_id"].is_i64() || ids.len() != 10 || distinct.len() != 10 {
            bail!(
                "{} line {}: expected a text_id and 10 distinct integer image_ids",
                predictions.display(),
                i + 1
            );
        }
    }
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_without_ground_truth_are_checked_for_shape() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-submission-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let texts = dir.join("test_texts.jsonl");
        std::fs::write(
            &texts,
            "{\"text_id\": 1, \"text\": \"a\", \"image_ids\": []}\n",
        )?;
        assert!(!has_ground_truth(&texts)?);
        std::fs::write(
            &texts,
            "{\"query_id\": 1, \"query_text\": \"a\", \"item_ids\": [3]}\n",
        )?;
        assert!(has_ground_truth(&texts)?);
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"text_id\": 1, \"image_ids\": [1,2,3,4,5,6,7,8,9,10]}\n",
        )?;
        assert_eq!(check_submission(&good)?, 1);
        let bad = dir.join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"text_id\": 1, \"image_ids\": [1,1,3,4,5,6,7,8,9,10]}\n",
        )?;
        let err = check_submission(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl line 1"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
