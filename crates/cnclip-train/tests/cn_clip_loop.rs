//! Five optimizer steps of cn_clip 1.6.0's real training loop (`main.py`, fp32, no dropout, the
//! batches its sampler produced) reproduced from the same tiny init: per-step loss, accuracies,
//! rate and `logit_scale`, and the final weights. Fixture: `tests/fixtures/make_loop_fixtures.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_model::{Clip, ClipConfig};
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::Trainer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// How far above the rounding noise level a gradient element must stay for its Adam steps to be
/// compared (see the final-weights check).
const NOISE_MARGIN: f64 = 4.0;

#[test]
fn five_steps_equal_cn_clip_main_py() {
    let dir = repo().join("crates/cnclip-train/tests/fixtures/loop");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model =
        common::tiny_model_from(&repo().join(expected["init_checkpoint"].as_str().unwrap()));

    let args = &expected["args"];
    let f = |key: &str| args[key].as_f64().unwrap();
    let trainer_config = common::plain_trainer_config(
        CosineSchedule {
            base_lr: f("lr"),
            warmup: args["warmup"].as_u64().unwrap(),
            total_steps: args["max_steps"].as_u64().unwrap(),
        },
        AdamWConfig {
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("wd"),
        },
    );
    let mut trainer = Trainer::new(model, trainer_config);
    let (no_decay, decay) = trainer.optimizer().group_sizes();
    let groups = &expected["param_groups"];
    assert_eq!(no_decay, groups["no_decay"].as_array().unwrap().len());
    assert_eq!(decay, groups["decay"].as_array().unwrap().len());

    let batches: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("batches.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // Elements whose gradient was ever within 100× rounding noise of zero (see below).
    let mut noise_driven: HashMap<String, Tensor> = HashMap::new();
    // The fixture models' longest sum: 4 rows × 52 tokens in the text tower's weight gradients.
    let rho = common::rounding_bound(208.0);
    for (i, reference) in expected["replay"].as_array().unwrap().iter().enumerate() {
        let report = trainer
            .train_batch(
                &batches["images"].get(i as i64),
                &batches["texts"].get(i as i64),
            )
            .unwrap()
            .unwrap();
        let want = |key: &str| reference[key].as_f64().unwrap();
        assert_eq!(report.step, reference["global_step"].as_u64().unwrap());
        assert_eq!(report.lr, want("lr"), "rate of step {}", report.step);
        let loss_err = (report.loss - want("loss")).abs() / want("loss");
        assert!(
            loss_err <= 1e-5,
            "step {}: loss {} vs cn_clip {}",
            report.step,
            report.loss,
            want("loss")
        );
        assert_eq!(report.image_to_text_accuracy, want("i2t_acc"));
        assert_eq!(report.text_to_image_accuracy, want("t2i_acc"));
        assert!(
            (report.logit_scale - want("logit_scale_after")).abs()
                <= 1e-5 * want("logit_scale_after")
        );
        let named = trainer.model().named_tensors();
        let largest = named
            .values()
            .filter(|t| t.grad().defined())
            .map(|t| t.grad().abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        for (key, t) in &named {
            let g = t.grad();
            if !g.defined() {
                continue;
            }
            // Noise scale per element: ρ × the tensor's largest gradient, or × the model's largest
            // in an analytically zero part (whose own values are noise). Exact zeros (embedding
            // rows of tokens not in the batch) are exact on both sides.
            let mut noise = g.abs().max().ones_like() * (rho * g.abs().max().double_value(&[]));
            noise = noise.expand_as(&g).copy();
            if let Some(mut zero_part) = common::analytically_zero_part(key, &noise) {
                let _ = zero_part.fill_(rho * largest);
            }
            let weak = g
                .abs()
                .le_tensor(&(noise * NOISE_MARGIN))
                .logical_and(&g.ne(0.0));
            let entry = noise_driven
                .entry(key.clone())
                .or_insert_with(|| weak.zeros_like());
            *entry = entry.logical_or(&weak);
        }
    }

    let final_weights: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("final.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ours = trainer.model().named_tensors();
    assert_eq!(final_weights.len(), ours.len());
    // Adam's step is lr·m̂/(√v̂ + ε). Where an element's gradient is at the level of rounding noise
    // (ρ times its tensor's largest gradient, `common::rounding_bound`) — attention key biases,
    // whose gradient is analytically zero, and any element that happens to sit near zero — the
    // two implementations (on two CPUs: the fixture's and this one) feed Adam different noise,
    // which it scales to steps of ±lr in arbitrary directions. Those elements are left out:
    // every element whose gradient was ever within NOISE_MARGIN × that noise level of zero, so the
    // sign and size of every compared element's steps are fixed by its gradient, not by rounding.
    // The losses above need no such care: they are flat, to first order, along those elements.
    let mut worst = (0.0f64, String::new());
    let (mut left_out, mut total) = (0i64, 0i64);
    for (key, theirs) in &final_weights {
        let keep = noise_driven
            .get(key)
            .map(|m| m.logical_not())
            .unwrap_or_else(|| theirs.ones_like().to_kind(tch::Kind::Bool));
        total += theirs.numel() as i64;

        left_out += theirs.numel() as i64 - keep.sum(tch::Kind::Int64).int64_value(&[]);
        let (mine, theirs) = (ours[key].masked_select(&keep), theirs.masked_select(&keep));
        if theirs.numel() == 0 {
            continue;
        }
        let err =
            (&mine - &theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-12);
        if err > worst.0 {
            worst = (err, key.clone());
        }
    }
    eprintln!("{left_out} of {total} weights left out as noise-driven");
    assert!(
        (left_out as f64) < 0.02 * total as f64,
        "{left_out} of {total} weights are noise-driven: the comparison would cover too little"
    );
    // For the compared elements rounding moves each step by about lr·ρ relative to the step's
    // size, so after 5 steps of lr ≤ 1e-3 on weights of the init's scale (0.02) the tensors
    // differ by about 5 × 1e-3 × ρ / 0.02 ≈ 1.1e-5 of their norm (ρ = 4.4e-5 here): the bound.
    let bound = 5.0 * 1e-3 * rho / 0.02;
    eprintln!(
        "worst relative weight error after 5 steps: {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= bound,
        "{} differs from cn_clip by {:.3e}",
        worst.1,
        worst.0
    );
}

/// cn_clip clamps `logit_scale` to 4.6052 after every step: a value above it (as a user's
/// checkpoint may hold) is brought back after the first step.
#[test]
fn logit_scale_is_clamped_after_each_step() {
    let model_fx = repo().join("crates/cnclip-model/tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &model_fx.join("configs/tiny-vit.json"),
        &model_fx.join("configs/tiny-bert.json"),
    )
    .unwrap();
    let model = Clip::new(&config, Device::Cpu);
    if let Some(mut scale) = model.named_tensors().remove("logit_scale") {
        let _ = tch::no_grad(|| scale.fill_(4.7));
    }
    let trainer_config = common::plain_trainer_config(
        CosineSchedule {
            base_lr: 1e-9,
            warmup: 0,
            total_steps: 3,
        },
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.0,
        },
    );
    let mut trainer = Trainer::new(model, trainer_config);
    let images = Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    let texts =
        Tensor::from_slice(&[101i64, 5, 102, 101, 6, 102, 101, 7, 102, 101, 8, 102]).view([4, 3]);
    let report = trainer.train_batch(&images, &texts).unwrap().unwrap();
    assert_eq!(report.logit_scale, f64::from(4.6052f32));
}
