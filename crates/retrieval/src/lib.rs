//! Text→image and image→text retrieval: feature stores and exact top-k search.
//!
//! Owns: feature stores ([`store`]: cn_clip's jsonl features and the native memory-mapped
//! safetensors file), exact top-k on CPU and GPU with documented tie-breaking ([`search`]: higher
//! score, then lower gallery row — cn_clip's stable-sort order), blocked so galleries larger than
//! memory stream, the int8 scan with exact rescoring that returns the same ids as a full fp32 scan,
//! a gallery kept resident on a device for repeated queries with the same exact ranking
//! ([`index`], what a server needs), the error bounds both rely on ([`bound`]), and cn_clip's
//! prediction jsonl ([`predict`]).
//!
//! Also the MUGE score of features ([`muge`]: top-10 by this ranking, scored by `eval`), the one
//! function training validation and the soup report recall with.
//!
//! May depend on `cnclip-model` (to encode), `torch-ext` and `eval`. Must never import training
//! (`cnclip-train`) or data augmentation: a user who only searches should not compile a training loop.

pub mod bound;
pub mod error;
pub mod index;
pub mod muge;
pub mod predict;
pub mod search;
pub mod store;

pub use error::{Result, RetrievalError};
pub use index::ResidentIndex;
pub use predict::{Direction, write_predictions};
pub use search::{Hit, ScanPrecision, SearchOptions, brute_force, exact_score, search};
pub use store::{
    FeatureKind, FeatureSource, FeatureView, Features, JsonlReader, NativeFeatures, load_features,
    read_jsonl, write_jsonl, write_native,
};
