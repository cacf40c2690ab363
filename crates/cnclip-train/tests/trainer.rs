//! The optimizer step: accumulation equals one large batch, freezing, non-finite losses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_model::Clip;
use cnclip_train::freeze::{Freeze, TowerFreeze};
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainError, TrainPrecision, Trainer, TrainerConfig};
use tch::{Device, Kind, Tensor};

fn config(accum_freq: usize, freeze_vision: bool) -> TrainerConfig {
    TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 1e-3,
            warmup: 1,
            total_steps: 4,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
        accum_freq,
        freeze: if freeze_vision {
            Freeze::VISION
        } else {
            Freeze::NONE
        },
        dropout_seed: None,
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
    }
}

/// Two copies of the same random model.
fn twins(seed: i64) -> (Clip, Clip) {
    tch::manual_seed(seed);
    let a = Clip::new(&common::tiny_config(0.0), Device::Cpu);
    let mut b = Clip::new(&common::tiny_config(0.0), Device::Cpu);
    let weights = a.named_tensors();
    b.load_named(weights.iter().map(|(k, v)| (k.as_str(), v)), false)
        .unwrap();
    (a, b)
}

fn batch(n: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let images = Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu));
    let texts = Tensor::randint_low(1, 300, [n, 8], (Kind::Int64, Device::Cpu));
    (images, texts)
}

fn max_weight_difference(a: &Clip, b: &Clip) -> f64 {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    a.iter()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(k, t)| (t - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// cn_clip's accumulation (cached features, each micro-batch re-run with gradient) must give the
/// gradient of one batch of all rows: every row's features receive gradient exactly once. The
/// exception is cn_clip's own: `logit_scale` enters every micro-batch's loss with gradient, so it
/// receives `accum_freq` times the large-batch gradient (Adam's update is invariant to that scale).
#[test]
fn accumulation_gives_the_gradient_of_one_large_batch() {
    let (plain_model, accum_model) = twins(1);
    let (images, texts) = batch(6, 2);
    let mut plain = Trainer::new(plain_model, config(1, false));
    let mut accum = Trainer::new(accum_model, config(2, false));
    let report = plain.train_batch(&images, &texts).unwrap().unwrap();
    assert!(
        accum
            .train_batch(&images.narrow(0, 0, 3), &texts.narrow(0, 0, 3))
            .unwrap()
            .is_none()
    );
    let accumulated = accum
        .train_batch(&images.narrow(0, 3, 3), &texts.narrow(0, 3, 3))
        .unwrap()
        .unwrap();
    assert_eq!((report.step, report.lr), (accumulated.step, accumulated.lr));
    assert!(
        (report.loss - accumulated.loss).abs() < 1e-5,
        "{report:?} vs {accumulated:?}"
    );
    // The gradients of the step just taken are still on the parameters.
    let (a, b) = (plain.model().named_tensors(), accum.model().named_tensors());
    let mut compared = 0;
    for (key, tensor) in &a {
        let (ga, gb) = (tensor.grad(), b[key].grad());
        if !ga.defined() {
            assert!(!gb.defined(), "{key}: gradient only in the accumulated run");
            continue;
        }
        let ga = if key == "logit_scale" { ga * 2.0 } else { ga };
        let scale = ga.abs().max().double_value(&[]).max(1e-12);
        let diff = (&ga - &gb).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-5 * scale + 1e-9,
            "{key}: gradients differ by {diff:e} (scale {scale:e})"
        );
        compared += 1;
    }
    assert!(compared > 30, "only {compared} gradients compared");
    // The step moved the weights, identically up to Adam's amplification of rounding.
    let (fresh, _) = twins(1);
    assert!(max_weight_difference(&fresh, plain.model()) > 1e-4);
    assert!(max_weight_difference(plain.model(), accum.model()) < 1e-5);
}

#[test]
fn frozen_vision_tower_stays_put() {
    let (model, reference) = twins(3);
    let (images, texts) = batch(4, 4);
    let mut trainer = Trainer::new(model, config(1, true));
    trainer.train_batch(&images, &texts).unwrap().unwrap();
    let after = trainer.model().named_tensors();
    let before = reference.named_tensors();
    for (key, tensor) in &after {
        let changed = !tensor.equal(&before[key]);
        if key.starts_with("visual.") {
            assert!(!changed, "{key} moved although the vision tower is frozen");
        }
    }
    assert!(!after["text_projection"].equal(&before["text_projection"]));
}

/// Beyond cn_clip: a frozen text tower and a vision tower trained only in its last block. The
/// frozen weights are bit-identical after a step; every other weight that receives gradient moves.
#[test]
fn partial_freezing_moves_only_the_trainable_weights() {
    let (model, reference) = twins(13);
    let (images, texts) = batch(4, 14);
    let mut cfg = config(1, false);
    cfg.freeze = Freeze {
        vision: TowerFreeze::AllButLast(1),
        text: TowerFreeze::All,
    };
    let mut trainer = Trainer::new(model, cfg);
    trainer.train_batch(&images, &texts).unwrap().unwrap();
    let after = trainer.model().named_tensors();
    let before = reference.named_tensors();
    let mut moved = Vec::new();
    for (key, tensor) in &after {
        if !tensor.is_floating_point() {
            continue;
        }
        let frozen = key.starts_with("bert.")
            || key == "text_projection"
            || (key.starts_with("visual.")
                && !key.starts_with("visual.transformer.resblocks.1.")
                && !key.starts_with("visual.ln_post")
                && key != "visual.proj");
        let changed = !tensor.equal(&before[key]);
        if frozen {
            assert!(!changed, "{key} moved although it is frozen");
        } else if changed {
            moved.push(key.clone());
        }
    }
    assert!(
        moved
            .iter()
            .any(|k| k.starts_with("visual.transformer.resblocks.1."))
    );
    assert!(moved.iter().any(|k| k == "visual.proj"));
    assert!(moved.iter().any(|k| k == "logit_scale"));
}

#[test]
fn a_non_finite_loss_stops_with_the_step() {
    let (model, _) = twins(5);
    let (images, texts) = batch(4, 6);
    let mut trainer = Trainer::new(model, config(1, false));
    trainer.train_batch(&images, &texts).unwrap().unwrap();
    let poisoned = images.fill(f64::NAN);
    let err = trainer.train_batch(&poisoned, &texts).unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::NonFiniteLoss {
                step: 2,
                micro_batch: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("optimizer step 2"), "{err}");
}

#[test]
fn stops_at_the_configured_number_of_steps() {
    let (model, _) = twins(7);
    let (images, texts) = batch(2, 8);
    let mut trainer = Trainer::new(model, config(1, false));
    for expected in 1..=4 {
        assert_eq!(
            trainer.train_batch(&images, &texts).unwrap().unwrap().step,
            expected
        );
    }
    assert!(trainer.is_finished());
    assert!(matches!(
        trainer.train_batch(&images, &texts),
        Err(TrainError::Finished { max_steps: 4 })
    ));
}

/// `--grad-checkpointing` (with and without accumulation) leaves the step's gradients equal to the
/// recorded path's.
#[test]
fn grad_checkpointing_gives_the_same_gradients() {
    for accum_freq in [1usize, 2] {
        let (plain_model, staged_model) = twins(11);
        let (images, texts) = batch(6, 12);
        let mut plain = Trainer::new(plain_model, config(accum_freq, false));
        let mut staged = Trainer::new(
            staged_model,
            TrainerConfig {
                grad_checkpointing: true,
                ..config(accum_freq, false)
            },
        );
        let chunk = 6 / accum_freq as i64;
        for i in 0..accum_freq as i64 {
            let (im, tx) = (
                images.narrow(0, i * chunk, chunk),
                texts.narrow(0, i * chunk, chunk),
            );
            let (a, b) = (
                plain.train_batch(&im, &tx).unwrap(),
                staged.train_batch(&im, &tx).unwrap(),
            );
            assert_eq!(a.is_some(), b.is_some());
            if let (Some(a), Some(b)) = (a, b) {
                assert!((a.loss - b.loss).abs() < 1e-6, "{a:?} vs {b:?}");
            }
        }
        let (a, b) = (
            plain.model().named_tensors(),
            staged.model().named_tensors(),
        );
        for (key, tensor) in &a {
            let (ga, gb) = (tensor.grad(), b[key].grad());
            assert_eq!(ga.defined(), gb.defined(), "{key}");
            if ga.defined() {
                let scale = ga.abs().max().double_value(&[]).max(1e-12);
                let diff = (&ga - &gb).abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-5 * scale + 1e-9,
                    "accum {accum_freq} {key}: {diff:e} (scale {scale:e})"
                );
            }
        }
    }
}

/// `--precision amp` on the CPU: autocast is a CUDA feature, so the forward stays fp32, but the
/// scaler runs. Scaling by a power of two and back is exact, so a clean step equals the fp32 step;
/// an overflowing step is skipped and halves the scale, as torch's GradScaler.
#[test]
fn amp_scaler_steps_like_fp32_and_skips_overflow() {
    let (fp32_model, amp_model) = twins(21);
    let (images, texts) = batch(4, 22);
    let mut fp32 = Trainer::new(fp32_model, config(1, false));
    let mut amp = Trainer::new(
        amp_model,
        TrainerConfig {
            precision: TrainPrecision::Amp,
            ..config(1, false)
        },
    );
    let a = fp32.train_batch(&images, &texts).unwrap().unwrap();
    let b = amp.train_batch(&images, &texts).unwrap().unwrap();
    assert!(!b.skipped);
    assert_eq!(a.loss, b.loss);
    assert_eq!(max_weight_difference(fp32.model(), amp.model()), 0.0);
    assert_eq!(amp.scaler().unwrap().scale_value(), 65536.0);

    let before = amp.model().state_dict();
    let poisoned = images.fill(f64::NAN);
    let report = amp.train_batch(&poisoned, &texts).unwrap().unwrap();
    assert!(report.skipped, "{report:?}");
    assert_eq!(report.step, 2);
    assert_eq!(amp.scaler().unwrap().scale_value(), 32768.0);
    for (key, tensor) in amp.model().named_tensors() {
        assert!(
            tensor.equal(before.get(&key).unwrap()),
            "{key} changed in a skipped step"
        );
    }
}

/// bf16 autocast: the forward runs in bf16 (its loss differs from fp32 by bf16 rounding only),
/// master weights and optimizer state stay fp32.
#[test]
fn bf16_autocast_trains_with_fp32_master_weights() {
    let (fp32_model, bf16_model) = twins(31);
    let (images, texts) = batch(4, 32);
    let mut fp32 = Trainer::new(fp32_model, config(1, false));
    let mut bf16 = Trainer::new(
        bf16_model,
        TrainerConfig {
            precision: TrainPrecision::Bf16,
            ..config(1, false)
        },
    );
    let a = fp32.train_batch(&images, &texts).unwrap().unwrap();
    let b = bf16.train_batch(&images, &texts).unwrap().unwrap();
    assert_ne!(a.loss, b.loss, "bf16 autocast had no effect");
    assert!(
        (a.loss - b.loss).abs() <= 2e-2 * a.loss.abs(),
        "{a:?} vs {b:?}"
    );
    for (key, tensor) in bf16.model().named_tensors() {
        if tensor.is_floating_point() {
            assert_eq!(tensor.kind(), Kind::Float, "{key}");
            assert!(tensor.isfinite().all().int64_value(&[]) == 1, "{key}");
        }
    }
    assert!(max_weight_difference(fp32.model(), bf16.model()) > 0.0);
}

/// On a GPU machine: bf16 steps land close to fp32 ones; AMP (real fp16 autocast there) skips
/// the first steps while its 2¹⁶ loss scale overflows fp16 gradients — as torch's GradScaler
/// does — then trains. Master weights stay fp32 throughout. Skipped, and says so, without CUDA.
#[test]
fn cuda_amp_and_bf16_steps() {
    if !torch_ext::init_cuda() {
        eprintln!(
            "skipped: {}",
            torch_ext::cuda_init_error().unwrap_or_default()
        );
        return;
    }
    let device = Device::Cuda(0);
    let (images, texts) = batch(8, 41);
    let (images, texts) = (images.to(device), texts.to(device));
    let trainer_for = |precision| {
        let (model, _) = twins(42);
        let mut on_gpu = Clip::new(model.config(), device);
        let weights = model.named_tensors();
        on_gpu
            .load_named(weights.iter().map(|(k, v)| (k.as_str(), v)), false)
            .unwrap();
        let long = TrainerConfig {
            precision,
            ..config(1, false)
        };
        let long = TrainerConfig {
            schedule: CosineSchedule {
                total_steps: 20,
                ..long.schedule
            },
            ..long
        };
        Trainer::new(on_gpu, long)
    };
    let mut losses = Vec::new();
    for precision in [TrainPrecision::Fp32, TrainPrecision::Bf16] {
        let mut trainer = trainer_for(precision);
        let mut last = None;
        for _ in 0..3 {
            last = trainer.train_batch(&images, &texts).unwrap();
        }
        let last = last.unwrap();
        assert!(!last.skipped);
        eprintln!("cuda {precision:?}: loss at step 3 {:.6}", last.loss);
        losses.push(last.loss);
    }
    assert!(
        (losses[1] - losses[0]).abs() <= 1e-2 * losses[0].abs(),
        "bf16 {} vs fp32 {}",
        losses[1],
        losses[0]
    );

    let mut amp = trainer_for(TrainPrecision::Amp);
    let reports: Vec<_> = (0..20)
        .map(|_| amp.train_batch(&images, &texts).unwrap().unwrap())
        .collect();
    let skipped = reports.iter().filter(|r| r.skipped).count();
    let scale = amp.scaler().unwrap().scale_value();
    eprintln!(
        "cuda Amp: {skipped}/20 steps skipped, final loss scale {scale}, last loss {:.6}",
        reports[19].loss
    );
    assert!(skipped < 20, "AMP never took a step");
    assert_eq!(
        scale,
        65536.0 / 2f64.powi(skipped as i32),
        "one back-off per skipped step"
    );
    assert!(
        reports[19].loss < reports[0].loss,
        "AMP did not learn: {:?}",
        (reports[0].loss, reports[19].loss)
    );
    for (key, t) in amp.model().named_tensors() {
        if t.is_floating_point() {
            assert_eq!(t.kind(), Kind::Float, "{key}");
            assert_eq!(t.isfinite().all().int64_value(&[]), 1, "{key}");
        }
    }
}
