//! Text→image and image→text retrieval: feature extraction helpers and exact top-k search.
//!
//! Owns: feature stores (the native safetensors feature file and cn_clip's jsonl features), exact
//! top-k on CPU and GPU with documented tie-breaking, blocked so galleries larger than memory stream,
//! and the reduced-precision scan with fp32 rescoring that returns the same ids as a full fp32 scan.
//!
//! May depend on `cnclip-model` (to encode). Must never import training (`cnclip-train`) or data
//! augmentation: a user who only searches should not compile a training loop.
//!
//! The implementation arrives with its issue ("retrieval + eval: feature extraction, exact top-k …").
