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
//! | [`torch_ext`] | libtorch glue tch lacks: CUDA init, devices, c10d |

pub use cnclip_lora as lora;
pub use cnclip_model as model;
pub use cnclip_train as train;
pub use eval;
pub use muge_data as data;
pub use retrieval;
pub use soup;
pub use torch_ext;
