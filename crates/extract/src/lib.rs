//! Feature extraction, once for the workspace: image sources ([`ImageSource`]: a cn_clip LMDB
//! split, a MUGE `{split}_imgs.tsv`, a folder or an ImageFolder), the batched pipeline that turns
//! them (and tokenised texts) into L2-normalised feature rows ([`image_features`],
//! [`text_features`]), the identity of files for feature caches ([`identity`]), and sharding of an
//! extraction across ranks with resumable shard files ([`shard`]).
//!
//! Used by the `extract_features` and `zero_shot` examples, the soup's scoring, the search
//! service's gallery cache and training validation. Depends on `cnclip-model` (the model,
//! decoding), `muge-data` (LMDB, TSV, the image transform) and `retrieval` (the feature rows);
//! never on training.
//!
//! | module | what |
//! |---|---|
//! | [`source`] | [`ImageSource`]: ids in a fixed order, bytes by id or batch, identity |
//! | [`pipeline`] | decode ahead on other threads, encode in batches, progress callback |
//! | [`identity`] | `file_identity`/`file_stamp` and the FNV hash of cache file names |
//! | [`shard`] | whole-batch shards per rank, atomic shard files, ordered merge |
//! | [`job`] | [`ShardJob`]: one process or one rank of `extract_features`, resumable; writing the outputs |

pub mod error;
pub mod identity;
pub mod job;
pub mod pipeline;
pub mod shard;
pub mod source;

pub use error::ExtractError;
pub use identity::{file_identity, file_stamp};
pub use job::{ShardJob, ShardOutcome, Written, load_model, model_name, write_features};
#[cfg(feature = "progress")]
pub use pipeline::progress_bar;
pub use pipeline::{ExtractOptions, Progress, classify, image_features, push_rows, text_features};
pub use source::{FetchImages, ImageSource};
