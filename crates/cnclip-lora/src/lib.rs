//! LoRA for Chinese-CLIP: low-rank adapters on both towers, including the fused `in_proj` of the
//! vision attention, so the seed's LoRA fine-tunes run without a Python `peft` dependency.
//!
//! Owns: adapter injection into a `cnclip-model` model, the trainable/frozen split, merging adapters
//! into the base weights (so a LoRA run can enter a soup), and adapter files.
//!
//! Depends on `cnclip-model` only. Must not depend on training, data, retrieval, eval or soup: the
//! training loop uses this crate, not the other way round.
//!
//! The implementation arrives with its issue ("cnclip-lora: LoRA on both towers …").
