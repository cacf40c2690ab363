//! Recall@k over ids, computed as cn_clip's scripts compute it.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use serde_json::Value;

use crate::error::EvalError;
use crate::ground_truth::GroundTruth;
use crate::pyfmt::{float_repr, json_value};

/// Anything that gives the ranked ids (best first) of a query: a prediction file, a map built by
/// retrieval, a training-time evaluation.
pub trait Rankings {
    fn ranking(&self, query: i64) -> Option<&[i64]>;
}

impl<S: BuildHasher> Rankings for HashMap<i64, Vec<i64>, S> {
    fn ranking(&self, query: i64) -> Option<&[i64]> {
        self.get(&query).map(Vec::as_slice)
    }
}

impl Rankings for BTreeMap<i64, Vec<i64>> {
    fn ranking(&self, query: i64) -> Option<&[i64]> {
        self.get(&query).map(Vec::as_slice)
    }
}

/// Hits per cut-off over the ground-truth queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recall {
    /// Number of ground-truth queries (the denominator).
    pub queries: usize,
    /// The cut-offs, as given.
    pub ks: Vec<usize>,
    /// `hits[i]`: queries with at least one relevant id among their first `ks[i]` ranked ids.
    pub hits: Vec<usize>,
}

impl Recall {
    /// Recall at `ks[i]` as a fraction: cn_clip's `hits * 1.0 / len(reference)`, which is the
    /// f64 division of the two counts.
    pub fn recalls(&self) -> Vec<f64> {
        self.hits
            .iter()
            .map(|&h| h as f64 / self.queries as f64)
            .collect()
    }

    /// Recall at cut-off `k` as a fraction, if `k` was asked for.
    pub fn at(&self, k: usize) -> Option<f64> {
        let i = self.ks.iter().position(|&x| x == k)?;
        Some(self.hits[i] as f64 / self.queries as f64)
    }

    /// Mean of the recalls, summed left to right then divided, so that for `[1, 5, 10]` it is
    /// cn_clip's `(r1 + r5 + r10) / 3.0` to the last bit.
    pub fn mean(&self) -> f64 {
        let r = self.recalls();
        r.iter().fold(0.0, |acc, x| acc + x) / r.len() as f64
    }
}

/// Recall at each cut-off in `ks`: a ground-truth query hits at k when any of its relevant ids is
/// among the first k ranked ids (a query with several relevant ids counts once; one with none is
/// always a miss). Rankings shorter than k are used as they are, as Python's slicing does.
///
/// Every ground-truth query needs a ranking; rankings of other queries are ignored.
pub fn recall_at_k<R: Rankings + ?Sized>(
    rankings: &R,
    ground_truth: &GroundTruth,
    ks: &[usize],
) -> Result<Recall, EvalError> {
    if ks.is_empty() || ks.contains(&0) {
        return Err(EvalError::InvalidKs { ks: ks.to_vec() });
    }
    if ground_truth.is_empty() {
        return Err(EvalError::EmptyGroundTruth {
            source_name: "in-memory ground truth".to_owned(),
        });
    }
    let mut hits = vec![0usize; ks.len()];
    for query in ground_truth.queries() {
        let ranking = rankings
            .ranking(query)
            .ok_or(EvalError::MissingRanking { query })?;
        let relevant = ground_truth.relevant(query).unwrap_or(&[]);
        // The best rank (0-based) of any relevant id decides every cut-off at once.
        let best = ranking.iter().position(|id| relevant.contains(id));
        if let Some(best) = best {
            for (h, &k) in hits.iter_mut().zip(ks) {
                if best < k {
                    *h += 1;
                }
            }
        }
    }
    Ok(Recall {
        queries: ground_truth.len(),
        ks: ks.to_vec(),
        hits,
    })
}

/// MUGE's score: Recall@1/5/10 and their mean, in percent, exactly as `evaluation.py` reports
/// them (each `x * 100` after the division; the mean of the fractions, then `* 100`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// The mean recall in percent (cn_clip writes it as both `score` and `mean_recall`).
    pub mean_recall: f64,
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
}

impl Score {
    /// The score of a [`Recall`] computed at `[1, 5, 10]`.
    pub fn from_recall(recall: &Recall) -> Option<Score> {
        let (r1, r5, r10) = (recall.at(1)?, recall.at(5)?, recall.at(10)?);
        let mean = (r1 + r5 + r10) / 3.0;
        Some(Score {
            mean_recall: mean * 100.0,
            r1: r1 * 100.0,
            r5: r5 * 100.0,
            r10: r10 * 100.0,
        })
    }

    /// The score file `evaluation.py` writes on success, byte for byte (no trailing newline):
    /// `{"success": true, "score": …, "scoreJson": {"score": …, "mean_recall": …, "r1": …, "r5": …, "r10": …}}`.
    pub fn to_cn_clip_json(&self) -> String {
        let f = float_repr;
        let s = f(self.mean_recall);
        format!(
            "{{\"success\": true, \"score\": {s}, \"scoreJson\": {{\"score\": {s}, \"mean_recall\": {s}, \"r1\": {}, \"r5\": {}, \"r10\": {}}}}}",
            f(self.r1),
            f(self.r5),
            f(self.r10)
        )
    }
}

/// MUGE recall of in-memory rankings: [`recall_at_k`] at 1, 5 and 10 as a [`Score`].
pub fn muge_score<R: Rankings + ?Sized>(
    rankings: &R,
    ground_truth: &GroundTruth,
) -> Result<Score, EvalError> {
    let recall = recall_at_k(rankings, ground_truth, &[1, 5, 10])?;
    Score::from_recall(&recall).ok_or(EvalError::InvalidKs { ks: recall.ks })
}

/// The score file `evaluation.py` writes on failure, byte for byte:
/// `{"errorDetail": d, "errorMsg": d, "score": 0, "scoreJson": {}, "success": false}`.
pub fn cn_clip_error_json(detail: &Value) -> String {
    let mut d = String::new();
    json_value(detail, &mut d);
    format!(
        "{{\"errorDetail\": {d}, \"errorMsg\": {d}, \"score\": 0, \"scoreJson\": {{}}, \"success\": false}}"
    )
}
