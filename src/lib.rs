//! cnclip: Chinese-CLIP fine-tuning and text→image retrieval on libtorch.
//!
//! This facade re-exports the workspace crates under one name and hosts the runnable examples
//! (`cargo run --example …`) and the benches. Each crate can also be used on its own:
//!
//! | crate | owns |
//! |---|---|
//! | [`model`] (`cnclip-model`) | architectures, weight import, tokenizer, preprocessing |
//! | [`lora`] (`cnclip-lora`) | LoRA adapters, merge, adapter files |
//! | [`data`] (`muge-data`) | MUGE files, LMDB, augmentation, sampler, loader |
//! | [`retrieval`] | feature stores and exact top-k |
//! | [`eval`] | MUGE recall exactly as cn_clip's scripts |
//! | [`soup`] | weight-space soups |
//! | [`train`] (`cnclip-train`) | the fine-tuning loop, single process and DDP |
//! | [`serve`] (`cnclip-serve`) | the HTTP search service: text→image, image→image, zero-shot classify |
//! | [`torch_ext`] | libtorch glue tch lacks: CUDA init, devices, c10d |
//!
//! Encoding images and texts with a released checkpoint (the README's example, compiled here):
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use cnclip::model::{Clip, ClipConfig, LoadOptions, Precision, preprocess::Preprocessor, tokenizer::Tokenizer};
//!
//! let device = cnclip::torch_ext::parse_device("auto")?; // first: loads CUDA when present
//! let options = LoadOptions { config: Some(ClipConfig::from_name("ViT-B-16")?), ..Default::default() };
//! let mut model = Clip::load("clip_cn_vit-b-16.pt", &options, device)?;
//! model.set_precision(Precision::Fp32); // or Fp16 / Bf16 on a GPU
//! let images = Preprocessor::new(224)?.preprocess_files(&["a.jpg", "b.png"])?;
//! let texts = Tokenizer::new().tokenize(&["这是一张图片，里面存在商品：连衣裙"], 52)?;
//! let (img, txt, _scale) = tch::no_grad(|| model.forward(&images, &texts));
//! # let _ = (img, txt);
//! # Ok(())
//! # }
//! ```

pub use cnclip_extract as extract;
pub use cnclip_lora as lora;
pub use cnclip_model as model;
pub use cnclip_serve as serve;
pub use cnclip_train as train;
pub use eval;
pub use muge_data as data;
pub use retrieval;
pub use soup;
pub use torch_ext;
