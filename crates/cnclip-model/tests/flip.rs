//! FLIP (`--mask-ratio`): our ViT fed the patches cn_clip's `random_masking` kept, from the same
//! noise, gives cn_clip's features. Fixture: `tests/fixtures/model/flip.safetensors`, made by
//! `tests/fixtures/make_flip_fixtures.py` with cn_clip's own `VisualTransformer.forward`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::LoadOptions;
use cnclip_model::config::ClipConfig;
use cnclip_model::model::{Clip, flip_keep_indices};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// torch's generator is global to the process and the tests of this file run in parallel: building a
/// model (random init) in one would consume draws the other seeded.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

fn tiny(vision: &str) -> ClipConfig {
    let dir = fixtures().join("configs");
    ClipConfig::from_json_files(
        &dir.join(format!("{vision}.json")),
        &dir.join("tiny-bert.json"),
    )
    .unwrap()
}

fn tiny_vit() -> Clip {
    let options = LoadOptions {
        config: Some(tiny("tiny-vit")),
        ..Default::default()
    };
    Clip::load(fixtures().join("tiny_vit.pt"), &options, Device::Cpu).unwrap()
}

fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    (ours - theirs).norm().double_value(&[]) / theirs.norm().double_value(&[])
}

/// The bound of the unmasked fp32 parity (`model_parity.rs`): masking only removes token rows
/// before `ln_pre`; every remaining sum is the one the unmasked forward computes, at most 192 terms
/// long (the 3·8·8 patch convolution, the 4·48 `c_proj` input). A float32 sum of n terms carries a
/// relative error of at most n·u = 192 · 2⁻²⁴ ≈ 1.1e-5 in the worst case and about √n·u ≈ 8e-7
/// typically; two blocks and the heads stay well within 1e-5 unless an operation differs.
const TOLERANCE: f64 = 1e-5;

#[test]
fn masked_vit_equals_cn_clip_on_the_same_noise() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let io: HashMap<String, Tensor> = Tensor::read_safetensors(fixtures().join("flip.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let model = tiny_vit();
    let _guard = tch::no_grad_guard();
    let image = &io["image"];
    let unmasked = model.encode_image(image);
    let err = relative_error(&unmasked, &io["features_r0"]);
    assert!(err <= TOLERANCE, "unmasked: {err:.3e}");
    for pct in [30, 50, 75] {
        let ratio = f64::from(pct) / 100.0;
        let keep = flip_keep_indices(&io[&format!("noise_r{pct}")], ratio);
        // The kept indices are cn_clip's exactly (same argsort of the same noise, same truncation
        // of (L−1)(1−r): 11, 8 and 4 of 16 patches).
        assert!(
            keep.equal(&io[&format!("ids_keep_r{pct}")]),
            "ratio {ratio}: {keep}"
        );
        // (Which patches are kept is what matters: with the positions already added, the blocks
        // are permutation-equivariant over tokens and only the class token is read out.)
        let ours = model.encode_image_masked(image, true, Some(&keep));
        let err = relative_error(&ours, &io[&format!("features_r{pct}")]);
        eprintln!(
            "mask ratio {ratio}: {} patches kept, relative error {err:.2e}",
            keep.size()[1]
        );
        assert!(err <= TOLERANCE, "ratio {ratio}: relative error {err:.3e}");
        // And the masking matters: far from the unmasked features.
        assert!(relative_error(&ours, &unmasked) > 1e-2, "ratio {ratio}");
    }
}

/// `Clip::flip_keep` draws `torch.rand(N, L−1)` from torch's global generator, as cn_clip does, so a
/// seeded generator reproduces it; ratio 0 and a ResNet tower drop nothing.
#[test]
fn flip_keep_draws_from_the_seeded_generator() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let model = tiny_vit();
    tch::manual_seed(77);
    let a = model.flip_keep(5, 0.5).unwrap();
    tch::manual_seed(77);
    let noise = Tensor::rand([5, 16], (Kind::Float, Device::Cpu));
    assert!(a.equal(&flip_keep_indices(&noise, 0.5)));
    assert_eq!(a.size(), vec![5, 8]);
    // Every row: distinct patch tokens 1..=16, never the class token.
    for row in 0..5 {
        let r = Vec::<i64>::try_from(a.get(row)).unwrap();
        let mut sorted = r.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert!(r.iter().all(|&t| (1..=16).contains(&t)), "{r:?}");
    }
    tch::manual_seed(78);
    assert!(!model.flip_keep(5, 0.5).unwrap().equal(&a));
    assert!(model.flip_keep(5, 0.0).is_none());
    let resnet = Clip::new(&tiny("tiny-rn50"), Device::Cpu);
    assert!(resnet.flip_keep(5, 0.5).is_none());
}
