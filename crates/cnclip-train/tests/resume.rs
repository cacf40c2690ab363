//! A run stopped mid-way and resumed from its checkpoint equals the uninterrupted run bit for bit
//! (CPU, fp32, dropout on with per-step seeding), and torn or foreign checkpoints are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_model::Clip;
use cnclip_train::checkpoint::{self, CheckpointError, RunPosition};
use cnclip_train::freeze::Freeze;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use std::path::PathBuf;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// torch's generator is process-global: tests that seed it must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn trainer_config() -> TrainerConfig {
    TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 1e-3,
            warmup: 2,
            total_steps: 6,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: Some(2024),
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
        mask_ratio: 0.0,
    }
}

fn batches() -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(99);
    (0..6)
        .map(|_| {
            (
                Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)),
                Tensor::randint_low(1, 300, [4, 10], (Kind::Int64, Device::Cpu)),
            )
        })
        .collect()
}

fn fresh_model() -> Clip {
    tch::manual_seed(5);
    Clip::new(&common::tiny_config(0.1), Device::Cpu)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = batches();
    let mut straight = Trainer::new(fresh_model(), trainer_config());
    let mut losses = Vec::new();
    for (images, texts) in &data {
        losses.push(straight.train_batch(images, texts).unwrap().unwrap().loss);
    }

    let dir = temp_dir("exact");
    let mut first = Trainer::new(fresh_model(), trainer_config());
    for (images, texts) in &data[..3] {
        first.train_batch(images, texts).unwrap().unwrap();
    }
    let position = RunPosition {
        epoch: 0,
        step: 3,
        batches_into_epoch: 3,
        name: "resume".into(),
    };
    checkpoint::save(&dir, "epoch_latest", &first, &position).unwrap();
    drop(first);

    let loaded = checkpoint::load(&dir, "epoch_latest", Device::Cpu).unwrap();
    assert_eq!(loaded.position, position);
    let mut resumed = Trainer::new(loaded.model, trainer_config());
    checkpoint::restore(
        &mut resumed,
        &loaded.optimizer_state,
        &loaded.position,
        &dir,
    )
    .unwrap();
    for (i, (images, texts)) in data[3..].iter().enumerate() {
        let report = resumed.train_batch(images, texts).unwrap().unwrap();
        assert_eq!(report.step, 4 + i as u64);
        assert_eq!(report.loss, losses[3 + i], "loss of step {}", report.step);
    }
    let (a, b) = (
        straight.model().named_tensors(),
        resumed.model().named_tensors(),
    );
    for (key, tensor) in &a {
        assert!(tensor.equal(&b[key]), "{key} differs after resume");
    }
}

#[test]
fn torn_and_missing_checkpoints_are_refused() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = batches();
    let mut trainer = Trainer::new(fresh_model(), trainer_config());
    trainer
        .train_batch(&data[0].0, &data[0].1)
        .unwrap()
        .unwrap();
    let position = RunPosition {
        epoch: 0,
        step: 1,
        batches_into_epoch: 1,
        name: "torn".into(),
    };
    let (a, b) = (temp_dir("torn-a"), temp_dir("torn-b"));
    checkpoint::save(&a, "epoch_latest", &trainer, &position).unwrap();
    trainer
        .train_batch(&data[1].0, &data[1].1)
        .unwrap()
        .unwrap();
    checkpoint::save(
        &b,
        "epoch_latest",
        &trainer,
        &RunPosition {
            step: 2,
            ..position.clone()
        },
    )
    .unwrap();

    // A crash between the two renames: a's model with b's optimizer state.
    let (_, a_state) = checkpoint::paths(&a, "epoch_latest");
    let (_, b_state) = checkpoint::paths(&b, "epoch_latest");
    std::fs::copy(&b_state, &a_state).unwrap();
    let err = checkpoint::load(&a, "epoch_latest", Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, CheckpointError::Torn { .. }), "{err}");
    assert!(err.to_string().contains("interrupted"), "{err}");

    std::fs::remove_file(&b_state).unwrap();
    let err = checkpoint::load(&b, "epoch_latest", Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("epoch_latest.state.safetensors"), "{err}");
}

/// A step that diverged (weights NaN or infinite, loss possibly still finite) must not become a
/// checkpoint: the good checkpoint on disk stays what resuming finds.
#[test]
fn diverged_weights_are_never_written_over_a_good_checkpoint() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = batches();
    let mut trainer = Trainer::new(fresh_model(), trainer_config());
    trainer
        .train_batch(&data[0].0, &data[0].1)
        .unwrap()
        .unwrap();
    let position = RunPosition {
        epoch: 0,
        step: 1,
        batches_into_epoch: 1,
        name: "nan".into(),
    };
    let dir = temp_dir("nan");
    checkpoint::save(&dir, "epoch_latest", &trainer, &position).unwrap();
    let (model_file, _) = checkpoint::paths(&dir, "epoch_latest");
    let good = std::fs::read(&model_file).unwrap();
    // A diverged step: one weight of the text projection overflows.
    let named = trainer.model().named_tensors();
    let _ = tch::no_grad(|| named["text_projection"].get(0).get(0).fill_(f64::INFINITY));
    let err = checkpoint::save(
        &dir,
        "epoch_latest",
        &trainer,
        &RunPosition {
            step: 2,
            ..position
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::NonFiniteWeights { key, step: 2, .. } if key == "text_projection"),
        "{err}"
    );
    assert!(err.to_string().contains("lower --lr"), "{err}");
    assert_eq!(
        std::fs::read(&model_file).unwrap(),
        good,
        "the good checkpoint was replaced"
    );
    let (stem, found) = checkpoint::latest_complete(&dir).unwrap().unwrap();
    assert_eq!((stem.as_str(), found.step), ("epoch_latest", 1));
}
