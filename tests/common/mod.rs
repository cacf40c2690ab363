//! Shared by the root package's integration tests, which run the example binaries as users do.

use cnclip::data::files::BadRecordPolicy;
use cnclip::data::synth::{MiniMugeConfig, write_mini_muge};
use std::path::{Path, PathBuf};

pub mod netns;

/// The example `name` as `cargo test` built it (`target/<profile>/examples/`, next to this test's
/// own `deps/` directory).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "{} is missing: run the tests through `cargo test` (it builds the examples)",
        bin.display()
    );
    bin
}

/// A tiny ViT config in cn_clip's schema (16-wide features, 32 px images, one block).
#[allow(dead_code)]
pub const TINY_VISION: &str = r#"{"embed_dim":16,"image_resolution":32,"vision_layers":1,"vision_width":32,
    "vision_head_width":16,"vision_patch_size":16}"#;

/// A tiny BERT config in cn_clip's schema (one 16-wide layer, cn_clip's vocabulary).
#[allow(dead_code)]
pub const TINY_TEXT: &str = r#"{"vocab_size":21128,"text_attention_probs_dropout_prob":0.1,"text_hidden_act":"gelu",
    "text_hidden_dropout_prob":0.1,"text_hidden_size":16,"text_initializer_range":0.02,
    "text_intermediate_size":32,"text_max_position_embeddings":64,"text_num_attention_heads":2,
    "text_num_hidden_layers":1,"text_type_vocab_size":2}"#;

/// A training fixture in `dir`: a mini-MUGE train split (8 queries × `train_images_per_query`
/// 32 px images) under `data/`, its LMDB under `lmdb/`, and the model configs `vision.json`
/// (`vision`) and `text.json` ([`TINY_TEXT`]).
#[allow(dead_code)]
pub fn tiny_training_fixture(dir: &Path, train_images_per_query: usize, vision: &str) {
    let data = dir.join("data");
    write_mini_muge(
        &data,
        &MiniMugeConfig {
            train_queries: 8,
            valid_queries: 1,
            test_queries: 1,
            train_images_per_query,
            eval_images_per_query: 1,
            image_size: 32,
            ..MiniMugeConfig::default()
        },
    )
    .unwrap();
    cnclip::data::build_split(
        &data,
        "train",
        &dir.join("lmdb"),
        BadRecordPolicy::Fail,
        &mut |_| {},
    )
    .unwrap();
    std::fs::write(dir.join("vision.json"), vision).unwrap();
    std::fs::write(dir.join("text.json"), TINY_TEXT).unwrap();
}
