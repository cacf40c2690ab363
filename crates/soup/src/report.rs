//! The soup report: every candidate and every merge with R@1/5/10 and mean recall, what was kept,
//! and the final soup, as Markdown (for people) and JSON (for tools).

use crate::error::{SoupError, io_err};
use crate::strategy::{Outcome, score_serde};
use eval::Score;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// A candidate's name or a merge's label (`M1`, …).
    pub name: String,
    /// `candidate` or `merge`.
    pub kind: String,
    /// A merge's inputs (averaged uniformly); the file of a candidate.
    pub members: Vec<String>,
    /// Weights over the candidates, e.g. `0.25·a + 0.75·b`.
    pub recipe: String,
    #[serde(with = "score_serde")]
    pub score: Score,
    /// Candidates: part of the final soup. Merges: kept by the strategy.
    pub kept: bool,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub strategy: String,
    pub val_data: String,
    pub queries: usize,
    pub images: usize,
    pub rows: Vec<Row>,
    #[serde(rename = "final")]
    pub result: Final,
    /// Why the strategy stopped.
    pub stop: String,
}

/// The soup the strategy chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    /// A candidate's name or a merge's label.
    pub name: String,
    /// Weights over the candidates, e.g. `0.625·a + 0.375·b`.
    pub recipe: String,
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    pub mean_recall: f64,
    /// Where it was written (null when only the report was regenerated).
    pub checkpoint: Option<PathBuf>,
}

/// What a report is made from.
pub struct ReportInput<'a> {
    pub names: &'a [String],
    /// Candidate `i`'s path as given.
    pub files: &'a [String],
    pub scores: &'a [Score],
    pub outcome: &'a Outcome,
    pub val_data: String,
    pub queries: usize,
    pub images: usize,
    pub output: Option<PathBuf>,
}

impl Report {
    pub fn new(input: &ReportInput<'_>) -> Report {
        let ReportInput {
            names,
            files,
            scores,
            outcome,
            ..
        } = *input;
        let mut rows = Vec::new();
        let best = scores
            .iter()
            .map(|s| s.mean_recall)
            .fold(f64::NEG_INFINITY, f64::max);
        for (i, (name, score)) in names.iter().zip(scores).enumerate() {
            rows.push(Row {
                name: name.clone(),
                kind: "candidate".into(),
                members: vec![files.get(i).cloned().unwrap_or_default()],
                recipe: format!("1·{name}"),
                score: *score,
                kept: outcome.result.contains(i),
                note: if score.mean_recall == best {
                    "best candidate".into()
                } else {
                    String::new()
                },
            });
        }
        for t in &outcome.trials {
            rows.push(Row {
                name: t.label.clone(),
                kind: "merge".into(),
                members: t.parents.clone(),
                recipe: t.recipe.describe(names),
                score: t.score,
                kept: t.kept,
                note: t.note.clone(),
            });
        }
        Report {
            strategy: outcome.strategy.as_str().into(),
            val_data: input.val_data.clone(),
            queries: input.queries,
            images: input.images,
            rows,
            result: Final {
                name: outcome.result_label.clone(),
                recipe: outcome.result.describe(names),
                r1: outcome.result_score.r1,
                r5: outcome.result_score.r5,
                r10: outcome.result_score.r10,
                mean_recall: outcome.result_score.mean_recall,
                checkpoint: input.output.clone(),
            },
            stop: outcome.stop.clone(),
        }
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# Soup report ({})\n\nValidation: `{}` ({} queries, {} images). Scores are MUGE \
             text→image Recall@k in percent; MR is their mean.\n\n",
            self.strategy, self.val_data, self.queries, self.images
        );
        s.push_str("| name | kind | members | R@1 | R@5 | R@10 | MR | kept | note |\n");
        s.push_str("|---|---|---|---:|---:|---:|---:|:-:|---|\n");
        for r in &self.rows {
            let members = if r.kind == "merge" {
                format!("({}) / {}", r.members.join(" + "), r.members.len())
            } else {
                format!("`{}`", r.members.join(", "))
            };
            s.push_str(&format!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
                r.name,
                r.kind,
                members,
                r.score.r1,
                r.score.r5,
                r.score.r10,
                r.score.mean_recall,
                if r.kept { "yes" } else { "no" },
                r.note
            ));
        }
        s.push_str(&format!(
            "\n**Result: {}** = {}, MR {:.2} (R@1 {:.2}, R@5 {:.2}, R@10 {:.2}).\n\nStopped: {}.\n",
            self.result.name,
            self.result.recipe,
            self.result.mean_recall,
            self.result.r1,
            self.result.r5,
            self.result.r10,
            self.stop
        ));
        if let Some(out) = &self.result.checkpoint {
            s.push_str(&format!("\nWritten to `{}`.\n", out.display()));
        }
        s
    }

    /// Writes `report.md` and `report.json` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), SoupError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let md = dir.join("report.md");
        let json = dir.join("report.json");
        crate::cache::write_atomic(&md, self.to_markdown().as_bytes())?;
        let text = serde_json::to_string_pretty(self).map_err(|source| SoupError::Json {
            path: json.clone(),
            source,
        })?;
        crate::cache::write_atomic(&json, text.as_bytes())?;
        Ok((md, json))
    }
}
