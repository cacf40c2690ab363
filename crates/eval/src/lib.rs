//! MUGE retrieval metrics exactly as cn_clip's `evaluation.py` and `evaluation_tr.py` compute them:
//! Recall@1/5/10 and their mean, the same score JSON, and validation of prediction files with errors
//! naming the offending query.
//!
//! Pure Rust over ids and rankings. Must never import training, and needs no libtorch: checkpoint
//! selection and soups call it on predictions.
//!
//! The implementation arrives with its issue ("retrieval + eval: … MUGE recall identical to
//! evaluation.py").
