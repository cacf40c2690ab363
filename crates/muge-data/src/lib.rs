//! MUGE and cn_clip data sets: from the files contestants download to batches of tensors.
//!
//! Owns: streaming readers of `{split}_imgs.tsv` and `{split}_texts.jsonl` (Chinese-CLIP and original
//! Tianchi forms) with errors that name file and line, the LMDB layout of cn_clip's
//! `build_lmdb_dataset.py` (byte-compatible both ways), the query prompt prefix, image augmentation,
//! a sampler that reproduces torch's `DistributedSampler` permutation, and a multi-threaded loader.
//!
//! Depends on `cnclip-model` for its tokenizer and preprocessing only. Must not depend on training,
//! retrieval, eval or soup: data flows one way, from here into `cnclip-train`.
//!
//! The implementation arrives with its issue ("muge-data: MUGE files, cn_clip-compatible LMDB …").
