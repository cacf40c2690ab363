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
//! | module | what |
//! |---|---|
//! | [`files`] | TSV/JSONL readers, bad-record policy and reports |
//! | [`lmdb`] | building and reading cn_clip's `pairs/` + `imgs/` environments |
//! | [`pickle`], [`base64`] | the value encodings cn_clip's LMDB uses, exactly as Python writes and reads them |
//! | [`text`] | prompt + dataset preprocessing + tokenizer: the one text path of training and evaluation |
//! | [`sampler`] | torch's `randperm` and `DistributedSampler`, cn_clip's padding, mid-epoch resume |
//! | [`loader`] | worker threads turning a sampler's plan into batches of tensors |
//! | [`augment`] | cn_clip's `--use-augment` transform (RandomResizedCrop, flip, AutoAugment 'original'), exact to timm/Pillow 13 for the same random draws, keyed for reproducibility; offline multiplication of rare queries' images |

pub mod augment;
pub mod base64;
pub mod files;
pub mod lmdb;
pub mod loader;
pub mod pickle;
pub mod sampler;
#[cfg(feature = "synth")]
pub mod synth;
pub mod text;

pub use files::{BadRecordPolicy, FileError, ImageTsvReader, ReadReport, TextJsonlReader};
pub use lmdb::{BuildOptions, LmdbError, LmdbImages, LmdbSplit, build_split, build_split_with};
pub use loader::{Batch, ImageTransform, Loader, LoaderConfig, LoaderError, SampleKey};
pub use sampler::{DistributedSampler, EpochPlan};
pub use text::{PRODUCT_PROMPT, TextPipeline};
