//! MUGE retrieval metrics exactly as cn_clip's `evaluation.py` and `evaluation_tr.py` compute them:
//! Recall@1/5/10 and their mean, the same score JSON, and validation of prediction files with errors
//! naming the offending file, line and query.
//!
//! Pure Rust over ids and rankings. Must never import training, and needs no libtorch: checkpoint
//! selection and soups call it on predictions.
//!
//! # Two ways in
//!
//! - Files, as the contest does: [`evaluate_files`] (or [`run_cn_clip_evaluation`], which also writes
//!   cn_clip's score file) reads ground truth ([`GroundTruth::read`]) and predictions
//!   ([`Predictions::read`]) and returns a [`Score`]. `examples/evaluate.rs` is
//!   `python -m cn_clip.eval.evaluation GT PRED OUT` on top of it.
//! - Memory, for training and soups: [`recall_at_k`] / [`muge_score`] over any [`Rankings`] (a
//!   `HashMap<i64, Vec<i64>>` of ranked ids works) and a [`GroundTruth`] built with
//!   [`GroundTruth::from_pairs`]. No file is written or read.
//!
//! # What "exactly as cn_clip" covers
//!
//! Same inputs accepted, same order of checks, same numbers to the last bit (`hits * 1.0 / n`,
//! `(r1 + r5 + r10) / 3.0`, then `* 100`), and the same score file bytes: `json.dump` spacing,
//! `ensure_ascii`, Python float `repr`. On failure the file carries cn_clip's own message
//! ([`EvalError::cn_clip_detail`]) while [`EvalError`]'s `Display` gives a clear one with the file,
//! line and query. Lines are split with Python's universal newlines, stripped with `str.strip`, and a
//! blank line is an error in both files, as in cn_clip. A query repeated in the ground truth keeps its
//! last line; in predictions too, unless [`Validation::strict`] is asked for; predictions for unknown
//! queries are ignored likewise.
//!
//! Where cn_clip's behaviour is an accident of Python rather than a rule, this crate refuses the
//! input with a clear error instead of copying it:
//! - booleans as ids (Python counts `true` as the int 1), integers beyond i64, `NaN`/`Infinity`
//!   literals and lone surrogates (Python's `json` accepts them, serde_json does not);
//! - ground truth with non-integer ids or a non-list `image_ids` (cn_clip would fail later with a
//!   `TypeError`, or silently score a string's characters);
//! - JSON syntax errors in the ground truth get our message, not Python's `json` one (the blank-line
//!   message, the common case, is reproduced).
//!
//! One message differs in order only: cn_clip lists missing queries in Python set order (hash
//! slots); this crate lists them ascending, which is the same for small ids.
//!
//! Beyond cn_clip: Tianchi's `{"query_id", "query_text", "item_ids"}` spelling is accepted for
//! text→image ground truth and predictions, and `k` is configurable ([`Validation::k`]).

mod direction;
mod error;
mod files;
mod ground_truth;
mod lines;
mod predictions;
mod pyfmt;
mod recall;

pub use direction::Direction;
pub use error::EvalError;
pub use files::{Evaluation, cn_clip_report, evaluate_files, run_cn_clip_evaluation};
pub use ground_truth::{
    GroundTruth, read_ground_truth_from, tr_annotation_path, transform_ir_annotation_to_tr,
    write_tr_annotation,
};
pub use predictions::{Predictions, Validation};
pub use recall::{Rankings, Recall, Score, cn_clip_error_json, muge_score, recall_at_k};
