//! Shared by the integration tests: a tiny model config (2 ViT blocks, 2 BERT layers), the tiny
//! fixture model, temporary directories and the loop fixture built into an LMDB. Each test binary
//! uses some of these.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, ClipConfig, LoadOptions};
use muge_data::files::BadRecordPolicy;
use std::path::{Path, PathBuf};
use tch::Device;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh directory for this test process.
pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// cnclip-model's tiny ViT fixture (an official-layout `.pt`).
pub fn tiny_model() -> Clip {
    let fx = repo().join("crates/cnclip-model/tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &fx.join("configs/tiny-vit.json"),
        &fx.join("configs/tiny-bert.json"),
    )
    .unwrap();
    Clip::load(
        fx.join("tiny_vit.pt"),
        &LoadOptions {
            config: Some(config),
            ..Default::default()
        },
        Device::Cpu,
    )
    .unwrap()
}

/// The loop fixture's raw files as a `train` split, built into an LMDB by muge-data.
pub fn lmdb(tag: &str) -> PathBuf {
    let raw = temp(&format!("raw-{tag}"));
    let fx = repo().join("crates/cnclip-train/tests/fixtures/loop");
    std::fs::copy(fx.join("train_imgs.tsv"), raw.join("train_imgs.tsv")).unwrap();
    std::fs::copy(fx.join("train_texts.jsonl"), raw.join("train_texts.jsonl")).unwrap();
    let out = temp(&format!("lmdb-{tag}"));
    muge_data::build_split(&raw, "train", &out, BadRecordPolicy::Fail, &mut |_| {}).unwrap();
    out.join("train")
}

/// A tiny ViT + BERT config whose text tower has dropout `dropout`.
pub fn tiny_config(dropout: f64) -> ClipConfig {
    let mut config = ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,"vision_patch_size":8,
            "vision_head_width":16,"vocab_size":300,"text_attention_probs_dropout_prob":0.0,
            "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
            "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny test config",
    )
    .expect("the tiny config is valid");
    config.text.text_hidden_dropout_prob = dropout;
    config.text.text_attention_probs_dropout_prob = dropout;
    config
}
