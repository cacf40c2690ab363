//! Chinese-CLIP as in cn_clip 1.6.0, on libtorch through tch.
//!
//! Owns: the model configurations (every released vision/text pairing and user JSON configs in
//! cn_clip's schema), the towers (ViT, ModifiedResNet with attention pooling, RoBERTa-style BERT) and
//! the CLIP wrapper, weight import from official `.pt` checkpoints and Hugging Face
//! `ChineseCLIPModel` directories, the native safetensors format, the tokenizer with cn_clip's
//! vocabulary, and image preprocessing that reproduces Pillow's pixels.
//!
//! Variable paths are cn_clip's state-dict keys, so loading a checkpoint is name matching.
//!
//! Must not depend on: training (`cnclip-train`), data sets (`muge-data`), LoRA, retrieval, eval or
//! soup. Everything else builds on this crate, never the other way round.

pub mod config;
pub mod init;
pub mod load;
pub mod model;
pub mod onnx;
pub mod preprocess;
pub mod tokenizer;
pub mod weights;
pub mod zeroshot;
mod zeroshot_templates;

pub use config::ClipConfig;
pub use init::{InitError, InitReport, InitSource};
pub use load::{LoadError, LoadOptions, WeightFormat};
pub use model::{Clip, Precision};
