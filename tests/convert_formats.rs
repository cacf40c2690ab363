//! `convert` to the Hugging Face ecosystem, run as a user runs it on the tiny fixture models:
//! official `.pt` → `--format hf` → native is lossless, RN50 is refused, a LoRA adapter is merged
//! onto `--lora-base` or exported with `--format peft` (what PEFT loaded in cnclip-lora's fixture),
//! and an adapter that trained LayerNorms is refused by `--format peft`.
//!
//! `cargo test` builds the examples (debug) before running tests; this test runs the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip::model::weights::{self, StateDict};
use cnclip::model::{Clip, ClipConfig, LoadOptions};
use common::example_bin;
use std::path::{Path, PathBuf};
use std::process::Command;

fn convert(args: &[&str]) -> (bool, String) {
    let out = Command::new(example_bin("convert"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = convert(args);
    assert!(success, "convert {args:?} failed:\n{text}");
    text
}

fn fails(args: &[&str]) -> String {
    let (success, text) = convert(args);
    assert!(!success, "convert {args:?} should have failed:\n{text}");
    text
}

fn model_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/cnclip-model/tests/fixtures/model")
        .join(name)
}

fn peft_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/cnclip-lora/tests/fixtures/peft")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `args` followed by the tower flags an official .pt needs.
fn with<'a>(args: &[&'a str], towers: &[&'a str]) -> Vec<&'a str> {
    [args, towers].concat()
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_identical(a: &StateDict, b: &StateDict) {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        let o = b.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert!(t.kind() == o.kind() && t.equal(o), "{k} differs");
    }
}

#[test]
fn hf_and_peft_exports_from_the_command_line() {
    let dir = tempdir();
    let configs = model_fixture("configs");
    let (vit, bert) = (
        configs.join("tiny-vit.json"),
        configs.join("tiny-bert.json"),
    );
    let towers = ["--vision-model", s(&vit), "--text-model", s(&bert)];
    let pt = model_fixture("tiny_vit.pt");

    // Official .pt → hf → native: the same bits.
    let hf = dir.join("tiny_hf");
    let out = ok(&with(
        &["--input", s(&pt), "--format", "hf", "--output", s(&hf)],
        &towers,
    ));
    assert!(out.contains("verified"), "{out}");
    for file in [
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        assert!(hf.join(file).is_file(), "{file}");
    }
    let native = dir.join("tiny.safetensors");
    ok(&["--input", s(&hf), "--output", s(&native)]);
    let official = weights::read_pt(&pt).unwrap().into_cn_clip_state_dict();
    assert_identical(&official, &weights::load_native(&native).unwrap().1);
    // A second export into the now used directory is refused, not mixed in.
    let err = fails(&with(
        &["--input", s(&pt), "--format", "hf", "--output", s(&hf)],
        &towers,
    ));
    assert!(err.contains("not empty"), "{err}");

    // RN50: a clear refusal, nothing written.
    let rn = dir.join("rn_hf");
    let err = fails(&[
        "--input",
        s(&model_fixture("tiny_rn50.pt")),
        "--format",
        "hf",
        "--output",
        s(&rn),
        "--vision-model",
        s(&configs.join("tiny-rn50.json")),
        "--text-model",
        s(&bert),
    ]);
    assert!(err.contains("no ChineseCLIP ResNet"), "{err}");
    assert!(!rn.exists());

    // A LoRA adapter: merged onto --lora-base for hf, as the library merges it.
    let adapter = peft_fixture("tiny_vit.lora.safetensors");
    let merged_hf = dir.join("merged_hf");
    let err = fails(&[
        "--input",
        s(&adapter),
        "--format",
        "hf",
        "--output",
        s(&merged_hf),
    ]);
    assert!(err.contains("--lora-base"), "{err}");
    ok(&with(
        &[
            "--input",
            s(&adapter),
            "--lora-base",
            s(&pt),
            "--format",
            "hf",
            "--output",
            s(&merged_hf),
        ],
        &towers,
    ));
    let merged = cnclip::lora::merged_state_dict(&official, &adapter).unwrap();
    assert_identical(&merged, &weights::import_hf(&merged_hf).unwrap().1);

    // --format peft: the files PEFT loaded in cnclip-lora's fixture.
    let peft = dir.join("peft");
    ok(&with(
        &[
            "--input",
            s(&adapter),
            "--lora-base",
            s(&pt),
            "--format",
            "peft",
            "--output",
            s(&peft),
        ],
        &towers,
    ));
    let committed = peft_fixture("tiny_vit_peft");
    assert_eq!(
        std::fs::read(peft.join("adapter_config.json")).unwrap(),
        std::fs::read(committed.join("adapter_config.json")).unwrap()
    );
    let (ours, theirs) = (
        weights::read_safetensors(peft.join("adapter_model.safetensors"))
            .unwrap()
            .0,
        weights::read_safetensors(committed.join("adapter_model.safetensors"))
            .unwrap()
            .0,
    );
    assert_identical(&theirs, &ours);
    let err = fails(&[
        "--input",
        s(&pt),
        "--lora-base",
        s(&pt),
        "--format",
        "peft",
        "--output",
        s(&dir.join("p2")),
    ]);
    assert!(err.contains("--lora-base is for a LoRA adapter"), "{err}");
    let err = fails(&with(
        &[
            "--input",
            s(&pt),
            "--format",
            "peft",
            "--output",
            s(&dir.join("p3")),
        ],
        &towers,
    ));
    assert!(err.contains("exports a LoRA adapter file"), "{err}");

    // An adapter whose run trained the LayerNorms: PEFT cannot hold them; hf (merged) can.
    let config = ClipConfig::from_tower_args(s(&vit), s(&bert)).unwrap();
    let options = LoadOptions {
        config: Some(config),
        ..Default::default()
    };
    let mut model = Clip::load(&pt, &options, tch::Device::Cpu).unwrap();
    let lora = cnclip::lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["qv".into()],
        train_logit_scale: true,
        train_layer_norms: true,
    };
    cnclip::lora::inject(&mut model, &lora).unwrap();
    let ln = dir.join("ln.lora.safetensors");
    cnclip::lora::save_adapter(&model, &ln).unwrap();
    let err = fails(&with(
        &[
            "--input",
            s(&ln),
            "--lora-base",
            s(&pt),
            "--format",
            "peft",
            "--output",
            s(&dir.join("ln_peft")),
        ],
        &towers,
    ));
    assert!(err.contains("PEFT") && err.contains("--format hf"), "{err}");
    assert!(!dir.join("ln_peft").exists());
    ok(&with(
        &[
            "--input",
            s(&ln),
            "--lora-base",
            s(&pt),
            "--format",
            "hf",
            "--output",
            s(&dir.join("ln_hf")),
        ],
        &towers,
    ));
    let _ = std::fs::remove_dir_all(dir);
}
