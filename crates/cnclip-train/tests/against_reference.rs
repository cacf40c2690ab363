//! Schedule, optimizer and loss against values computed by cn_clip 1.6.0 and torch 2.11.0
//! (`tests/fixtures/make_train_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, ClipConfig};
use cnclip_train::loss::{LocalOnly, contrastive_loss};
use cnclip_train::optim::{AdamW, AdamWConfig, excluded_from_weight_decay};
use cnclip_train::schedule::CosineSchedule;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Tensor};

fn fixtures() -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let json = std::fs::read_to_string(dir.join("train_reference.json")).unwrap();
    let tensors = Tensor::read_safetensors(dir.join("train_reference.safetensors")).unwrap();
    (
        serde_json::from_str(&json).unwrap(),
        tensors.into_iter().collect(),
    )
}

#[test]
fn schedule_equals_scheduler_py_bit_for_bit() {
    let (meta, _) = fixtures();
    for case in meta["schedules"].as_array().unwrap() {
        let schedule = CosineSchedule {
            base_lr: case["base_lr"].as_f64().unwrap(),
            warmup: case["warmup"].as_u64().unwrap(),
            total_steps: case["steps"].as_u64().unwrap(),
        };
        for (step, expected) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let expected = expected.as_f64().unwrap();
            assert_eq!(
                schedule.lr(step as u64),
                expected,
                "{schedule:?} step {step}"
            );
        }
    }
}

#[test]
fn adamw_equals_torch_over_five_steps() {
    let (meta, t) = fixtures();
    let meta = &meta["adamw"];
    let names: Vec<String> = meta["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let params: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                t[&format!("adamw.init.{n}")].copy().set_requires_grad(true),
            )
        })
        .collect();
    let betas = meta["betas"].as_array().unwrap();
    let config = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    };
    let mut optimizer = AdamW::new(
        params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())),
        config,
    );
    assert_eq!(
        optimizer.group_sizes(),
        (1, 2),
        "ln_pre is the only no-decay tensor here"
    );
    for (step, lr) in meta["lrs"].as_array().unwrap().iter().enumerate() {
        for (name, p) in &params {
            let mut grad = p.grad();
            let given = &t[&format!("adamw.grad.{step}.{name}")];
            if grad.defined() {
                grad.copy_(given);
            } else {
                // First step: materialise the gradient through a backward pass.
                (p * given).sum(tch::Kind::Float).backward();
            }
        }
        optimizer.step(lr.as_f64().unwrap()).unwrap();
    }
    // Element-wise arithmetic only, no sums: both sides run torch's AdamW kernels on the same
    // given gradients, so on the fixture's CPU they agree bit for bit. Another CPU's vector units
    // may fuse a multiply-add the fixture's rounded twice, so allow each of the update's ≤ 8
    // rounded operations per step one rounding: 8u per step of the weight's magnitude plus its
    // step's (lr·|m̂|/√v̂, and |m̂|/√v̂ ≤ (1−β1)/√((1−β2)(1−β1²/β2)) ≈ 1.7 for β = (0.9, 0.98);
    // 10·lr is used). A wrong formula is off by O(lr).
    let steps = meta["lrs"].as_array().unwrap().len() as f64;
    let lr_max = meta["lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_f64().unwrap())
        .fold(0.0, f64::max);
    let u = 1.0 / 16_777_216.0;
    for (name, p) in &params {
        let expected = &t[&format!("adamw.final.{name}")];
        let diff = (p.detach() - expected).abs();
        let allowed = (expected.abs() + 10.0 * lr_max) * (steps * 8.0 * u);
        let excess = (&diff - &allowed).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{name}: max |ours − torch| = {:e}, beyond rounding",
            diff.max().double_value(&[])
        );
    }
}

#[test]
fn loss_and_accuracy_equal_cn_clip() {
    let (_, t) = fixtures();
    let out = contrastive_loss(
        &t["loss.image"],
        &t["loss.text"],
        &t["loss.scale"],
        &LocalOnly,
    )
    .unwrap();
    let expected = t["loss.total"].double_value(&[]);
    let ours = out.loss.double_value(&[]);
    assert!(
        (ours - expected).abs() <= 1e-6 * expected.abs(),
        "loss {ours} vs {expected}"
    );
    assert_eq!(out.image_to_text_accuracy, t["loss.i2t"].double_value(&[]));
    assert_eq!(out.text_to_image_accuracy, t["loss.t2i"].double_value(&[]));
}

#[test]
fn vit_b_16_groups_match_cn_clip_counts() {
    let model = Clip::new(&ClipConfig::from_name("ViT-B-16").unwrap(), Device::Cpu);
    let optimizer = AdamW::for_model(
        &model,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        },
    );
    // cn_clip's groups (`main.py:146-174`, substring tests on the names): 198 no-decay tensors and 153 decayed ones for ViT-B-16 + RoBERTa-base.
    assert_eq!(optimizer.group_sizes(), (198, 153));
    assert!(!excluded_from_weight_decay(
        "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    ));
    assert!(excluded_from_weight_decay(
        "visual.transformer.resblocks.0.ln_1.weight"
    ));
    assert!(!excluded_from_weight_decay(
        "visual.layer1.0.downsample.1.weight"
    ));
}

#[test]
fn optimizer_state_round_trips_and_rejects_wrong_shapes() {
    tch::manual_seed(0);
    let p = Tensor::randn([3, 2], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut a = AdamW::new([("w".to_string(), p.shallow_clone())], config);
    (&p * &p).sum(tch::Kind::Float).backward();
    a.step(1e-2).unwrap();
    let state: HashMap<String, Tensor> =
        a.state().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let q = p.detach().copy().set_requires_grad(true);
    let mut b = AdamW::new([("w".to_string(), q.shallow_clone())], config);
    b.load_state(|k| state.get(k).map(|t| t.shallow_clone()))
        .unwrap();
    assert_eq!(b.steps(), 1);
    // The same gradient on both: the next steps must agree exactly.
    for (opt, t) in [(&mut a, &p), (&mut b, &q)] {
        opt.zero_grad();
        (t * t).sum(tch::Kind::Float).backward();
        opt.step(1e-2).unwrap();
    }
    assert!(p.detach().equal(&q.detach()));

    let mut c = AdamW::new(
        [(
            "w".to_string(),
            Tensor::zeros([5], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true),
        )],
        config,
    );
    let err = c
        .load_state(|k| state.get(k).map(|t| t.shallow_clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exp_avg.w") && err.contains("[5]") && err.contains("[3, 2]"),
        "{err}"
    );
}
