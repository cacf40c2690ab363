//! The whole of `evaluation.py` / `evaluation_tr.py`: ground truth and predictions in, score file out.

use std::path::Path;

use crate::direction::Direction;
use crate::error::EvalError;
use crate::ground_truth::GroundTruth;
use crate::predictions::{Predictions, Validation};
use crate::recall::{Score, cn_clip_error_json, recall_at_k};

/// A successful evaluation: the score and what the prediction file had that cn_clip ignores.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub score: Score,
    /// Number of ground-truth queries.
    pub queries: usize,
    /// Predicted queries not in the ground truth (ignored), ascending.
    pub unknown_queries: Vec<i64>,
    /// Queries predicted on several lines (the last line counted), ascending.
    pub repeated_queries: Vec<i64>,
}

/// Reads `ground_truth` then `predictions` (in that order, as cn_clip does, so the first error is
/// the same one) and scores them at 1, 5 and 10.
pub fn evaluate_files(
    ground_truth: &Path,
    predictions: &Path,
    direction: Direction,
    validation: &Validation,
) -> Result<Evaluation, EvalError> {
    let gt = GroundTruth::read(ground_truth, direction)?;
    let preds = Predictions::read(predictions, direction, &gt, validation)?;
    if gt.is_empty() {
        return Err(EvalError::EmptyGroundTruth {
            source_name: ground_truth.display().to_string(),
        });
    }
    let recall = recall_at_k(&preds, &gt, &[1, 5, 10])?;
    let score = Score::from_recall(&recall).ok_or(EvalError::InvalidKs { ks: recall.ks })?;
    Ok(Evaluation {
        score,
        queries: gt.len(),
        unknown_queries: preds.unknown_queries,
        repeated_queries: preds.repeated_queries,
    })
}

/// The score file cn_clip writes for this outcome: the success JSON or the error JSON with
/// [`EvalError::cn_clip_detail`].
pub fn cn_clip_report(outcome: &Result<Evaluation, EvalError>) -> String {
    match outcome {
        Ok(e) => e.score.to_cn_clip_json(),
        Err(err) => cn_clip_error_json(&err.cn_clip_detail()),
    }
}

/// `python -m cn_clip.eval.evaluation GT PRED OUT` (or `evaluation_tr`): evaluates and writes
/// cn_clip's score file to `out` whatever the outcome, then returns the outcome.
///
/// The outer `Err` is only a failure to write `out`.
pub fn run_cn_clip_evaluation(
    ground_truth: &Path,
    predictions: &Path,
    out: &Path,
    direction: Direction,
    validation: &Validation,
) -> Result<Result<Evaluation, EvalError>, EvalError> {
    let outcome = evaluate_files(ground_truth, predictions, direction, validation);
    std::fs::write(out, cn_clip_report(&outcome)).map_err(|source| EvalError::Write {
        path: out.to_owned(),
        what: "score file",
        source,
    })?;
    Ok(outcome)
}
