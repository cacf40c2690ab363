//! The PEFT export loads in Python and gives our features: `tests/fixtures/peft/` holds a LoRA
//! adapter of the tiny ViT model (native file), its PEFT export, and the features that
//! `peft.PeftModel` on transformers' `ChineseCLIPModel` computed with it
//! (`tests/fixtures/make_peft_fixture.py`, which runs the ignored `write_peft_fixture` below).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, LoadOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Max |Δ| / max |reference| between our features and PEFT's (fp32 on both sides; the two
/// compute the same sums in different orders: fused vs separate q/k/v, and the delta added per
/// module by PEFT).
const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn model_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnclip-model/tests/fixtures/model")
}

/// The base: the HF copy of the tiny ViT checkpoint (what the Python side loads too).
fn base() -> Clip {
    Clip::load(
        model_fixtures().join("tiny_vit_hf"),
        &LoadOptions::default(),
        Device::Cpu,
    )
    .unwrap()
}

fn io() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(model_fixtures().join("tiny_vit.io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Writes the native adapter and its PEFT export. Every site kind is adapted; the fused
/// `in_proj` only in q and v, so the k block of zeros is exercised too.
#[test]
#[ignore = "writes the fixture; run by tests/fixtures/make_peft_fixture.py"]
fn write_peft_fixture() {
    let mut model = base();
    tch::manual_seed(20240601);
    let config = cnclip_lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.05,
        targets: [
            "attn.in_proj.q",
            "attn.in_proj.v",
            "attn.out_proj",
            "mlp.c_fc",
            "mlp.c_proj",
            "visual.proj",
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "layer.*.output.dense",
            "text_projection",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        train_logit_scale: false,
        train_layer_norms: false,
    };
    cnclip_lora::inject(&mut model, &config).unwrap();
    // B as a trained adapter would have it: non-zero, deterministic.
    tch::no_grad(|| {
        for (i, (key, mut t)) in model.named_tensors().into_iter().enumerate() {
            if key.ends_with(".lora_B.weight") {
                let n = t.numel() as i64;
                let v =
                    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + i as f64).sin() * 0.2;
                t.copy_(&v.view(t.size().as_slice()));
            }
        }
    });
    let dir = fixtures();
    std::fs::create_dir_all(&dir).unwrap();
    cnclip_lora::save_adapter(&model, dir.join("tiny_vit.lora.safetensors")).unwrap();
    let file = cnclip_lora::read_adapter(dir.join("tiny_vit.lora.safetensors")).unwrap();
    cnclip_lora::export_peft(&file, dir.join("tiny_vit_peft")).unwrap();
}

#[test]
fn export_is_what_peft_loaded() {
    let dir = fixtures();
    let file = cnclip_lora::read_adapter(dir.join("tiny_vit.lora.safetensors")).unwrap();
    let out = std::env::temp_dir().join(format!("cnclip-peft-{}", std::process::id()));
    cnclip_lora::export_peft(&file, &out).unwrap();
    let committed = dir.join("tiny_vit_peft");
    assert_eq!(
        std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        std::fs::read_to_string(committed.join("adapter_config.json")).unwrap()
    );
    let ours = read(&out.join("adapter_model.safetensors"));
    let theirs = read(&committed.join("adapter_model.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 2 * file.adapters().len());
    for (key, t) in &ours {
        assert!(t.equal(&theirs[key]), "{key}");
    }
    assert!(ours.contains_key(
        "base_model.model.vision_model.encoder.layers.1.self_attn.v_proj.lora_A.weight"
    ));
    assert!(!ours.keys().any(|k| k.contains("k_proj")));
    assert!(ours.contains_key("base_model.model.visual_projection.lora_B.weight"));
    assert!(
        ours.contains_key("base_model.model.text_model.encoder.layer.0.output.dense.lora_A.weight")
    );
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn peft_features_equal_ours() {
    let io = io();
    let mut model = base();
    cnclip_lora::load_adapter(&mut model, fixtures().join("tiny_vit.lora.safetensors")).unwrap();
    let peft = read(&fixtures().join("peft_features.safetensors"));
    let (img, txt) = tch::no_grad(|| {
        (
            model.encode_image(&io["image"]),
            model.encode_text(&io["text"]),
        )
    });
    let rel = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    };
    let (ri, rt) = (
        rel(&img, &peft["image_features"]),
        rel(&txt, &peft["text_features"]),
    );
    assert!(ri <= TOLERANCE, "image features: {ri}");
    assert!(rt <= TOLERANCE, "text features: {rt}");
    // The adapters matter: the base model's features are far from PEFT's.
    let plain = base();
    let base_img = tch::no_grad(|| plain.encode_image(&io["image"]));
    assert!(rel(&base_img, &peft["image_features"]) > 1e-2);
    // And PEFT's merge_and_unload agrees with our merge.
    cnclip_lora::unload(&mut model, true).unwrap();
    let merged = tch::no_grad(|| model.encode_text(&io["text"]));
    assert!(rel(&merged, &peft["text_features_merged"]) <= TOLERANCE);
}

/// PEFT applies the exported adapter to the Hugging Face export of the official `.pt` (what
/// `convert --format hf` writes, loaded by `ChineseCLIPModel`) and computes our adapted features
/// (`cnclip-model/tests/fixtures/make_hf_export_fixture.py` recorded PEFT's).
#[test]
fn peft_on_our_hf_export_equals_ours() {
    let c = |n: &str| {
        model_fixtures()
            .join("configs")
            .join(n)
            .display()
            .to_string()
    };
    let options = LoadOptions {
        config: Some(
            cnclip_model::ClipConfig::from_tower_args(&c("tiny-vit.json"), &c("tiny-bert.json"))
                .unwrap(),
        ),
        ..Default::default()
    };
    let official = Clip::load(model_fixtures().join("tiny_vit.pt"), &options, Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("cnclip-peft-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    official.export_hf(&dir).unwrap();
    let mut model = Clip::load(&dir, &LoadOptions::default(), Device::Cpu).unwrap();
    cnclip_lora::load_adapter(&mut model, fixtures().join("tiny_vit.lora.safetensors")).unwrap();
    let io = io();
    let peft = read(&model_fixtures().join("../hf_export/features.safetensors"));
    let (img, txt) = tch::no_grad(|| {
        (
            model.encode_image(&io["image"]),
            model.encode_text(&io["text"]),
        )
    });
    let rel = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    };
    let (ri, rt) = (
        rel(&img, &peft["peft_image_features"]),
        rel(&txt, &peft["peft_text_features"]),
    );
    println!("PEFT on our hf export vs ours: image {ri:e}, text {rt:e}");
    assert!(ri <= TOLERANCE, "image features: {ri}");
    assert!(rt <= TOLERANCE, "text features: {rt}");
    // The adapter matters: PEFT's features are far from the export's own.
    assert!(rel(&peft["image_features"], &peft["peft_image_features"]) > 1e-2);
    let _ = std::fs::remove_dir_all(dir);
}

/// A PEFT adapter needs an HF export of its base to apply to: an RN50 base is refused (even for
/// text-only adapters, which would map), and so is a base the adapter does not fit.
#[test]
fn export_for_a_base_checks_the_base() {
    let c = |n: &str| {
        model_fixtures()
            .join("configs")
            .join(n)
            .display()
            .to_string()
    };
    let load = |pt: &str, vision: &str| {
        let options = LoadOptions {
            config: Some(
                cnclip_model::ClipConfig::from_tower_args(&c(vision), &c("tiny-bert.json"))
                    .unwrap(),
            ),
            ..Default::default()
        };
        Clip::load(model_fixtures().join(pt), &options, Device::Cpu).unwrap()
    };
    let dir = std::env::temp_dir().join(format!("cnclip-peft-for-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut rn = load("tiny_rn50.pt", "tiny-rn50.json");
    let config = cnclip_lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["query".into(), "value".into()],
        train_logit_scale: false,
        train_layer_norms: false,
    };
    cnclip_lora::inject(&mut rn, &config).unwrap();
    let path = dir.with_extension("safetensors");
    cnclip_lora::save_adapter(&rn, &path).unwrap();
    let file = cnclip_lora::read_adapter(&path).unwrap();
    let mut rn = load("tiny_rn50.pt", "tiny-rn50.json");
    let err = cnclip_lora::export_peft_for(&mut rn, &file, &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ResNet"), "{err}");
    assert!(!dir.exists());

    // The ViT fixture adapter on the head-width-40 ViT: its sites have other shapes.
    let file = cnclip_lora::read_adapter(fixtures().join("tiny_vit.lora.safetensors")).unwrap();
    let mut vith = load("tiny_vith.pt", "tiny-vith.json");
    let err = cnclip_lora::export_peft_for(&mut vith, &file, &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another architecture"), "{err}");
    assert!(!dir.exists());
    // On its own base it exports.
    let mut vit = load("tiny_vit.pt", "tiny-vit.json");
    cnclip_lora::export_peft_for(&mut vit, &file, &dir).unwrap();
    assert!(dir.join("adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(path);
}
