//! `export_hf` (what `convert --format hf` writes): lossless round trips through the Hugging Face
//! layout, and what transformers did with the export (`tests/fixtures/hf_export/`, made by
//! `tests/fixtures/make_hf_export_fixture.py`, which loads the export of `model/tiny_vit.pt` with
//! `ChineseCLIPModel` / `ChineseCLIPProcessor` and records their outputs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::preprocess::Preprocessor;
use cnclip_model::weights::{self, StateDict};
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Max |Δ| / max |reference| between transformers' and our features: both fp32, the same sums
/// in different orders (fused vs separate q/k/v, HF's attention kernels), so a few float32 ulps
/// per layer (≈ 1e-7 each) over a handful of layers; 1e-5 leaves two orders of magnitude.
const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_fixture(name: &str) -> PathBuf {
    fixtures().join("model").join(name)
}

fn tiny_config(vision: &str) -> ClipConfig {
    let c = |n: &str| model_fixture("configs").join(n).display().to_string();
    ClipConfig::from_tower_args(&c(vision), &c("tiny-bert.json")).unwrap()
}

fn load_pt(name: &str, vision: &str) -> Clip {
    let options = LoadOptions {
        config: Some(tiny_config(vision)),
        ..Default::default()
    };
    Clip::load(model_fixture(name), &options, Device::Cpu).unwrap()
}

/// A fresh (absent) directory path under the temp dir.
fn out_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-hf-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_identical(a: &StateDict, b: &StateDict) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        let o = b.get(k).unwrap();
        assert_eq!(t.kind(), o.kind(), "{k}");
        assert_eq!(t.size(), o.size(), "{k}");
        assert!(t.equal(o), "{k} differs");
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
fn pt_to_hf_to_native_is_bit_identical() {
    let pt = weights::read_pt(model_fixture("tiny_vit.pt"))
        .unwrap()
        .into_cn_clip_state_dict();
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let hf = out_dir("roundtrip");
    model.export_hf(&hf).unwrap();
    // The HF directory read back: same config, same tensors, in cn_clip's order.
    let (config, back) = weights::import_hf(&hf).unwrap();
    assert_eq!(&config, model.config());
    assert_identical(&pt, &back);
    // … and on to a native file.
    let native = hf.with_extension("safetensors");
    Clip::load(&hf, &LoadOptions::default(), Device::Cpu)
        .unwrap()
        .save_native(&native)
        .unwrap();
    let (config, back) = weights::load_native(&native).unwrap();
    assert_eq!(&config, model.config());
    let mut pt_sorted = StateDict::new();
    for k in back.keys() {
        pt_sorted.insert(k.to_string(), pt.get(k).unwrap().shallow_clone());
    }
    assert_eq!(back.len(), pt.len());
    assert_identical(&pt_sorted, &back);
    let _ = std::fs::remove_dir_all(&hf);
    let _ = std::fs::remove_file(&native);
}

#[test]
fn export_is_what_transformers_loaded() {
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let out = out_dir("loaded");
    model.export_hf(&out).unwrap();
    let committed = fixtures().join("hf_export/tiny_vit_hf_export");
    for name in [
        "config.json",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read_to_string(out.join(name)).unwrap(),
            std::fs::read_to_string(committed.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read(out.join("vocab.txt")).unwrap(),
        cnclip_model::tokenizer::cn_clip_vocab_txt()
    );
    // The script checked that the export it loaded equals `tiny_vit_hf` tensor for tensor (an
    // independent implementation of the mapping, HF's converter); so must a fresh export.
    let ours = read(&out.join("model.safetensors"));
    let reference = read(&model_fixture("tiny_vit_hf/model.safetensors"));
    assert_eq!(ours.len(), reference.len());
    for (k, t) in &reference {
        let o = ours.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert!(o.kind() == t.kind() && o.equal(t), "{k}");
    }
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn transformers_features_equal_ours_and_cn_clip() {
    let io = read(&model_fixture("tiny_vit.io.safetensors"));
    let hf = read(&fixtures().join("hf_export/features.safetensors"));
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let (img, txt) = tch::no_grad(|| {
        (
            model.encode_image(&io["image"]),
            model.encode_text(&io["text"]),
        )
    });
    for (what, ours, theirs, cn_clip) in [
        ("image", &img, &hf["image_features"], &io["image_features"]),
        ("text", &txt, &hf["text_features"], &io["text_features"]),
    ] {
        let r = rel(ours, theirs);
        assert!(r <= TOLERANCE, "{what} features, ours vs transformers: {r}");
        let r = rel(theirs, cn_clip);
        assert!(
            r <= TOLERANCE,
            "{what} features, transformers vs cn_clip: {r}"
        );
    }
    // The processor's tokenizer gave cn_clip's ids.
    assert!(hf["input_ids"].equal(&io["text"]));
}

/// `ChineseCLIPProcessor(backend="pil")` with the exported `preprocessor_config.json` gives our
/// (= cn_clip's) pixels; the bound is the preprocess tests' one (the same float32 normalisation,
/// possibly evaluated in another order).
#[test]
fn image_processor_config_reproduces_our_preprocessing() {
    let hf = read(&fixtures().join("hf_export/features.safetensors"));
    let pre = Preprocessor::new(32).unwrap();
    let dir = fixtures().join("preprocess");
    let ours = Tensor::stack(
        &[
            pre.preprocess_file(dir.join("jpeg_420_300x200.jpg"))
                .unwrap(),
            pre.preprocess_file(dir.join("rgb_300x200.png")).unwrap(),
        ],
        0,
    );
    let d = (&ours - &hf["pixel_values"]).abs().max().double_value(&[]);
    assert!(d <= 1e-6, "max |d| {d}");
}

#[test]
fn resnet_and_used_directories_are_refused() {
    let rn = load_pt("tiny_rn50.pt", "tiny-rn50.json");
    let out = out_dir("rn50");
    let err = rn.export_hf(&out).unwrap_err().to_string();
    assert!(err.contains("ResNet") && err.contains("RN50"), "{err}");
    assert!(!out.exists());

    let vit = load_pt("tiny_vit.pt", "tiny-vit.json");
    let used = out_dir("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("old.bin"), b"x").unwrap();
    let err = vit.export_hf(&used).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(used.join("old.bin")).unwrap(), b"x");
    // An existing empty directory is fine.
    std::fs::remove_file(used.join("old.bin")).unwrap();
    vit.export_hf(&used).unwrap();
    assert!(used.join("model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(used);
}

/// A state dict that does not fit the config is refused before anything is written.
#[test]
fn mismatched_state_dicts_are_refused() {
    let vit = load_pt("tiny_vit.pt", "tiny-vit.json");
    let mut sd = vit.state_dict();
    sd.insert("visual.extra", Tensor::zeros([1], tch::kind::FLOAT_CPU));
    let out = out_dir("extra");
    let err = weights::export_hf(&out, vit.config(), &sd)
        .unwrap_err()
        .to_string();
    assert!(err.contains("visual.extra"), "{err}");
    let sd = StateDict::from_iter(
        vit.state_dict()
            .into_iter()
            .filter(|(k, _)| k != "visual.ln_post.bias"),
    );
    let err = weights::export_hf(&out, vit.config(), &sd)
        .unwrap_err()
        .to_string();
    assert!(err.contains("visual.ln_post.bias"), "{err}");
    assert!(!out.exists());
}
