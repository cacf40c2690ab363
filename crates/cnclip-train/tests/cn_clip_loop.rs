//! Five optimizer steps of cn_clip 1.6.0's real training loop (`main.py`, fp32, no dropout, the
//! batches its sampler produced) reproduced from the same tiny init: per-step loss, accuracies,
//! rate and `logit_scale`, and the final weights. Fixture: `tests/fixtures/make_loop_fixtures.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, ClipConfig, LoadOptions};
use cnclip_train::freeze::Freeze;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn five_steps_equal_cn_clip_main_py() {
    let dir = repo().join("crates/cnclip-train/tests/fixtures/loop");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model_fx = repo().join("crates/cnclip-model/tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &model_fx.join("configs/tiny-vit.json"),
        &model_fx.join("configs/tiny-bert.json"),
    )
    .unwrap();
    let init = repo().join(expected["init_checkpoint"].as_str().unwrap());
    let model = Clip::load(
        &init,
        &LoadOptions {
            config: Some(config),
            ..Default::default()
        },
        Device::Cpu,
    )
    .unwrap();

    let args = &expected["args"];
    let f = |key: &str| args[key].as_f64().unwrap();
    let trainer_config = TrainerConfig {
        schedule: CosineSchedule {
            base_lr: f("lr"),
            warmup: args["warmup"].as_u64().unwrap(),
            total_steps: args["max_steps"].as_u64().unwrap(),
        },
        adamw: AdamWConfig {
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("wd"),
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: None,
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
    };
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
    }

    let final_weights: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("final.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ours = trainer.model().named_tensors();
    assert_eq!(final_weights.len(), ours.len());
    // Attention key biases have an analytically zero gradient (adding a constant to every key score
    // of a query leaves its softmax unchanged), so both implementations feed Adam pure rounding
    // noise there, which Adam scales up to steps of size ~lr in arbitrary directions. They are
    // compared separately, against their common initial value, rather than to each other.
    let width = |key: &str| ours[key].size()[0] / 3;
    let comparable = |key: &str, t: &Tensor| -> Tensor {
        if key.ends_with("attn.in_proj_bias") {
            let w = width(key);
            Tensor::cat(&[t.narrow(0, 0, w), t.narrow(0, 2 * w, w)], 0)
        } else {
            t.shallow_clone()
        }
    };
    let mut worst = (0.0f64, String::new());
    for (key, theirs) in &final_weights {
        if key.ends_with("attention.self.key.bias") {
            continue;
        }
        let (mine, theirs) = (comparable(key, &ours[key]), comparable(key, theirs));
        let err =
            (&mine - &theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-12);
        if err > worst.0 {
            worst = (err, key.clone());
        }
    }
    eprintln!(
        "worst relative weight error after 5 steps: {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-5,
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
    let trainer_config = TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 1e-9,
            warmup: 0,
            total_steps: 3,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.0,
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: None,
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
    };
    let mut trainer = Trainer::new(model, trainer_config);
    let images = Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    let texts =
        Tensor::from_slice(&[101i64, 5, 102, 101, 6, 102, 101, 7, 102, 101, 8, 102]).view([4, 3]);
    let report = trainer.train_batch(&images, &texts).unwrap().unwrap();
    assert_eq!(report.logit_scale, f64::from(4.6052f32));
}
