//! LoRA runs: the loop trains only the adapters (base weights bit-identical afterwards) and the
//! loss falls; checkpoints of a LoRA run hold only adapters plus optimizer state, and resuming one
//! onto the base model ends exactly where the uninterrupted run ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_lora::LoraConfig;
use cnclip_model::Clip;
use cnclip_train::freeze::Freeze;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::run::{RunConfig, train};
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use common::{lmdb, temp, tiny_model};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Torch's global generator is shared by the test threads; tests that seed it run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec!["attn".into(), "mlp.c_fc".into()],
        train_logit_scale: true,
        train_layer_norms: false,
    }
}

fn lora_model(seed: i64) -> Clip {
    let mut model = tiny_model();
    tch::manual_seed(seed);
    cnclip_lora::inject(&mut model, &lora()).unwrap();
    model
}

fn trainer_config(total_steps: u64, grad_checkpointing: bool) -> TrainerConfig {
    TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 5e-3,
            warmup: 1,
            total_steps,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.0,
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: Some(7),
        grad_checkpointing,
        precision: TrainPrecision::Fp32,
        mask_ratio: 0.0,
    }
}

fn snapshot(model: &Clip) -> BTreeMap<String, Tensor> {
    model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect()
}

#[test]
fn a_lora_run_lowers_the_loss_changing_only_adapters() {
    let _serial = serial();
    for grad_checkpointing in [false, true] {
        let model = lora_model(1);
        let before = snapshot(&model);
        let mut trainer = Trainer::new(model, trainer_config(20, grad_checkpointing));
        // The optimizer holds the adapters and logit_scale, nothing else.
        let trainable = trainer
            .model()
            .named_tensors()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .count();
        let adapters = before.keys().filter(|k| k.contains(".lora_")).count();
        assert_eq!(trainable, adapters + 1);
        assert_eq!(
            trainer.optimizer().group_sizes().0 + trainer.optimizer().group_sizes().1,
            trainable
        );

        tch::manual_seed(2);
        let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let texts = Tensor::randint_low(672, 8000, [4, 12], (Kind::Int64, Device::Cpu));
        let mut losses = Vec::new();
        for _ in 0..20 {
            let report = trainer.train_batch(&images, &texts).unwrap().unwrap();
            losses.push(report.loss);
        }
        let first = losses[..3].iter().sum::<f64>() / 3.0;
        let last = losses[17..].iter().sum::<f64>() / 3.0;
        assert!(
            last < 0.7 * first,
            "checkpointing {grad_checkpointing}: loss {first} → {last} ({losses:?})"
        );
        let after = snapshot(trainer.model());
        for (key, old) in &before {
            let changed = !old.equal(&after[key]);
            let may_change = key.contains(".lora_") || key == "logit_scale";
            if may_change {
                // Every adapter moved (A too: B became non-zero after the first step).
                assert!(changed, "{key} did not train");
            } else {
                assert!(!changed, "{key} is a frozen base weight but changed");
            }
        }
    }
}

fn run_config(train_data: PathBuf, logs: PathBuf, max_steps: u64) -> RunConfig {
    RunConfig {
        train_data,
        batch_size: 4,
        num_workers: 1,
        seed: 123,
        max_epochs: 99,
        max_steps: Some(max_steps),
        lr: Some(5e-3),
        beta1: Some(0.9),
        beta2: Some(0.98),
        eps: Some(1e-6),
        wd: 0.0,
        warmup: 1,
        logs,
        name: "lora".into(),
        save_step_frequency: 2,
        precision: TrainPrecision::Fp32,
        dropout_seed: Some(7),
        ..RunConfig::default()
    }
}

#[test]
fn lora_checkpoints_hold_only_adapters_and_resume_exactly() {
    let _serial = serial();
    let data = lmdb("lora");
    let logs = temp("logs");
    let summary = train(lora_model(3), &run_config(data.clone(), logs, 5), None).unwrap();
    assert_eq!(summary.steps, 5);
    let latest = summary
        .checkpoint_dir
        .clone()
        .unwrap()
        .join("epoch_latest.safetensors");
    let step2 = summary
        .checkpoint_dir
        .clone()
        .unwrap()
        .join("epoch_1_2.safetensors");
    for path in [&latest, &step2] {
        let file = cnclip_lora::read_adapter(path).unwrap();
        assert_eq!(file.config, lora());
        // Adapters and the trained logit_scale only: no frozen base weight is stored.
        for key in file.tensors.keys() {
            assert!(key.contains(".lora_") || key == "logit_scale", "{key}");
        }
        let model = tiny_model();
        let adapters = lora_model(3)
            .named_tensors()
            .into_keys()
            .filter(|k| k.contains(".lora_"))
            .count();
        assert_eq!(file.tensors.len(), adapters + 1);
        // Under a quarter of the fp32 model's bytes.
        assert!(std::fs::metadata(path).unwrap().len() < model.state_dict().num_elements() as u64);
    }
    // A full checkpoint reader refuses it with a pointer to load_onto.
    let err = cnclip_train::checkpoint::load(
        &summary.checkpoint_dir.clone().unwrap(),
        "epoch_1_2",
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("load_onto"), "{err}");

    // Resume the step-2 checkpoint in a copy of the run, onto a fresh base with fresh adapters.
    let logs2 = temp("logs-resumed");
    let dir2 = logs2.join("lora").join("checkpoints");
    std::fs::create_dir_all(&dir2).unwrap();
    for file in ["epoch_1_2.safetensors", "epoch_1_2.state.safetensors"] {
        std::fs::copy(
            summary.checkpoint_dir.clone().unwrap().join(file),
            dir2.join(file),
        )
        .unwrap();
    }
    let resumed = train(
        lora_model(99),
        &run_config(data, logs2, 5),
        Some("epoch_1_2"),
    )
    .unwrap();
    assert_eq!(resumed.steps, 5);
    let a = cnclip_lora::read_adapter(&latest).unwrap();
    let b = cnclip_lora::read_adapter(
        resumed
            .checkpoint_dir
            .clone()
            .unwrap()
            .join("epoch_latest.safetensors"),
    )
    .unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (key, tensor) in &a.tensors {
        let other = b.tensors.get(key).unwrap();
        assert!(
            tensor.equal(other),
            "{key} differs after resuming from step 2 by {}",
            (tensor - other).abs().max().double_value(&[])
        );
    }
    // Onto a base without adapters, load_onto attaches them with the file's config.
    let loaded = cnclip_train::checkpoint::load_onto(&dir2, "epoch_1_2", tiny_model()).unwrap();
    assert_eq!(cnclip_lora::config_of(&loaded.model), Some(lora()));
    assert_eq!(loaded.position.step, 2);
}
