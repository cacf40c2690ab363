//! A whole run over a cn_clip LMDB built from the loop fixture's raw files: the loss of every step
//! equals cn_clip 1.6.0's `main.py` on the same data (same LMDB bytes, sampler, batches and
//! optimizer), cn_clip's checkpoint names are written, and resuming from a step checkpoint ends
//! with the same weights as the uninterrupted run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// torch's generator is global to the process and these tests run in parallel: the dropout and FLIP
/// re-seeds and the models' random init of one test must not interleave with another's draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

mod common;

use cnclip_model::{Clip, LoadOptions};
use cnclip_train::run::{RunConfig, TrainPrecision, train};
use common::{lmdb, repo, temp, tiny_model};
use std::path::PathBuf;
use tch::Device;

fn config(train_data: PathBuf, logs: PathBuf) -> RunConfig {
    RunConfig {
        train_data,
        batch_size: 4,
        valid_batch_size: 4,
        num_workers: 1,
        valid_num_workers: 1,
        seed: 123,
        max_epochs: 99,
        max_steps: Some(5),
        lr: Some(1e-3),
        beta1: Some(0.9),
        beta2: Some(0.98),
        eps: Some(1e-6),
        wd: 0.1,
        warmup: 2,
        logs,
        name: "loop".into(),
        save_step_frequency: 2,
        precision: TrainPrecision::Fp32,
        ..RunConfig::default()
    }
}

#[test]
fn run_equals_cn_clip_and_resumes_exactly() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo().join("crates/cnclip-train/tests/fixtures/loop/expected.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let data = lmdb("parity");
    let logs = temp("logs");
    let summary = train(tiny_model(), &config(data.clone(), logs.clone()), None).unwrap();
    assert_eq!(summary.steps, 5);

    // Every step's loss equals cn_clip's (replayed at full precision from its run). Losses after
    // optimizer steps are safe to compare across CPUs: the elements Adam's ε-amplification moves
    // arbitrarily are those whose gradient is rounding noise, along which the loss is flat to
    // first order (tests/cn_clip_loop.rs compares the weights themselves with that in mind).
    let records = cnclip_train::metrics::read_records(
        &summary
            .checkpoint_dir
            .clone()
            .unwrap()
            .with_file_name("metrics.jsonl"),
    )
    .unwrap();
    assert_eq!(records.len(), 5);
    for (record, reference) in records.iter().zip(expected["replay"].as_array().unwrap()) {
        let cnclip_train::metrics::Record::Train { step, loss, lr, .. } = record else {
            panic!("{record:?}")
        };
        let want = reference["loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= 1e-5 * want,
            "step {step}: loss {loss} vs cn_clip {want}"
        );
        assert_eq!(*lr, reference["lr"].as_f64().unwrap(), "step {step}");
    }
    // cn_clip's names: epoch1 (3 batches per epoch), epoch2 (the last), step files every 2 steps.
    assert!(summary.last_validation.is_none());
    for stem in ["epoch1", "epoch2", "epoch_1_2", "epoch_2_4", "epoch_latest"] {
        assert!(
            summary
                .checkpoint_dir
                .clone()
                .unwrap()
                .join(format!("{stem}.safetensors"))
                .is_file(),
            "{stem} missing"
        );
    }
    assert!(logs.join("loop").join("curves.png").is_file());

    // Resume from the step-2 checkpoint in a copy of the run: same final weights.
    let logs2 = temp("logs-resumed");
    let dir2 = logs2.join("loop").join("checkpoints");
    std::fs::create_dir_all(&dir2).unwrap();
    for file in ["epoch_1_2.safetensors", "epoch_1_2.state.safetensors"] {
        std::fs::copy(
            summary.checkpoint_dir.clone().unwrap().join(file),
            dir2.join(file),
        )
        .unwrap();
    }
    let resumed = train(tiny_model(), &config(data, logs2), Some("epoch_1_2")).unwrap();
    assert_eq!(resumed.steps, 5);
    let a = Clip::load(
        summary
            .checkpoint_dir
            .clone()
            .unwrap()
            .join("epoch_latest.safetensors"),
        &LoadOptions::default(),
        Device::Cpu,
    )
    .unwrap();
    let b = Clip::load(
        resumed
            .checkpoint_dir
            .clone()
            .unwrap()
            .join("epoch_latest.safetensors"),
        &LoadOptions::default(),
        Device::Cpu,
    )
    .unwrap();
    let (a, b) = (a.named_tensors(), b.named_tensors());
    for (key, tensor) in &a {
        assert!(
            tensor.equal(&b[key]),
            "{key} differs after resuming from step 2"
        );
    }
}

/// With `val_data`, every epoch end (and every N steps) is validated: cn_clip's loss and accuracy
/// plus MUGE recall, logged as records and lines.
#[test]
fn validation_reports_loss_accuracy_and_recall() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = lmdb("valid");
    let logs = temp("logs-valid");
    let mut cfg = config(data.clone(), logs);
    cfg.val_data = Some(data);
    cfg.valid_step_interval = Some(2);
    let summary = train(tiny_model(), &cfg, None).unwrap();
    let v = summary.last_validation.unwrap();
    assert!(v.loss.is_finite() && v.loss > 0.0, "{v:?}");
    for r in [v.score.r1, v.score.r5, v.score.r10] {
        assert!((0.0..=100.0).contains(&r), "{v:?}");
    }
    assert!(
        v.score.r1 <= v.score.r5 && v.score.r5 <= v.score.r10,
        "{v:?}"
    );
    // 11 images: a text's relevant image is always within the top 10 unless ranked last.
    assert!(v.score.r10 >= 80.0, "{v:?}");
    let records = cnclip_train::metrics::read_records(
        &summary
            .checkpoint_dir
            .clone()
            .unwrap()
            .with_file_name("metrics.jsonl"),
    )
    .unwrap();
    let valid: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            cnclip_train::metrics::Record::Valid {
                step, mean_recall, ..
            } => Some((*step, *mean_recall)),
            _ => None,
        })
        .collect();
    // Steps 2 and 4, and the ends of epochs 1 (step 3) and 2 (step 5).
    assert_eq!(
        valid.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![2, 3, 4, 5],
        "{valid:?}"
    );
    assert!(valid.iter().all(|v| v.1.is_some()));
}

/// A run directory held by another run is refused before anything is read or written there,
/// naming the holder; once free, a run removes what killed writers left and trains.
#[test]
fn a_held_run_directory_is_refused_and_dead_writers_temporaries_are_removed() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    // Its own LMDB: tests of this file run concurrently and each builds the split it names.
    let data = lmdb("locked");
    let logs = temp("locked");
    let mut config = config(data, logs.clone());
    config.max_steps = Some(1);
    let run_dir = config.run_dir().unwrap();
    let other = cnclip_train::run_lock::RunDirLock::acquire(&run_dir).unwrap();
    let err = train(tiny_model(), &config, None).unwrap_err();
    assert!(
        matches!(
            &err,
            cnclip_train::run::RunError::RunDir(cnclip_train::run_lock::RunLockError::Busy { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("pid {} on", std::process::id())),
        "{err}"
    );
    assert!(
        !run_dir.join("metrics.jsonl").exists(),
        "nothing is written"
    );
    drop(other);

    let checkpoints = config.checkpoint_dir().unwrap();
    std::fs::create_dir_all(&checkpoints).unwrap();
    let stale = [
        checkpoints.join(".epoch_latest.safetensors.tmp-999999-0"),
        run_dir.join(".metrics.jsonl.tmp-999999-3"),
    ];
    for path in &stale {
        std::fs::write(path, b"cut short").unwrap();
    }
    let kept = checkpoints.join("notes.txt");
    std::fs::write(&kept, b"mine").unwrap();
    assert_eq!(train(tiny_model(), &config, None).unwrap().steps, 1);
    for path in &stale {
        assert!(!path.exists(), "{} remains", path.display());
    }
    assert!(kept.exists(), "only temporaries are removed");
    // Started again, the finished run trains nothing and says so (no NaN "last loss").
    let again = train(tiny_model(), &config, Some("epoch_latest")).unwrap();
    // `steps` is the global step reached, which the checkpoint already had.
    assert_eq!((again.steps, again.last_loss), (1, None));
}

/// A whole run with `--precision fp16 --mask-ratio 0.5` (and validation): the checkpoints hold the
/// fp16 weights as cn_clip's fp16 checkpoints do, validation runs on the fp16 model, and resuming
/// from the step-2 checkpoint ends with the same weights bit for bit (the FLIP masks follow the
/// position in the run, like dropout).
#[test]
fn fp16_flip_run_checkpoints_validates_and_resumes_exactly() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = lmdb("fp16-flip");
    let logs = temp("logs-fp16-flip");
    let cfg = |logs: PathBuf| RunConfig {
        precision: TrainPrecision::Fp16,
        mask_ratio: 0.5,
        // Above fp16's smallest normal number, so Adam's steps are not rounding noise (see
        // tests/fixtures/make_fp16_loop_fixtures.py).
        eps: Some(1e-4),
        val_data: Some(data.clone()),
        ..config(data.clone(), logs)
    };
    let summary = train(tiny_model(), &cfg(logs), None).unwrap();
    assert_eq!(summary.steps, 5);
    assert!(summary.last_loss.is_some_and(f64::is_finite));
    let v = summary.last_validation.unwrap();
    assert!(v.loss.is_finite() && v.score.r10 >= 80.0, "{v:?}");
    let dir = summary.checkpoint_dir.clone().unwrap();
    let saved: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir.join("epoch_latest.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(saved["visual.conv1.weight"].kind(), tch::Kind::Half);
    assert_eq!(
        saved["bert.embeddings.LayerNorm.weight"].kind(),
        tch::Kind::Half
    );
    assert_eq!(saved["visual.ln_pre.weight"].kind(), tch::Kind::Float);
    assert_eq!(saved["logit_scale"].kind(), tch::Kind::Float);

    let logs2 = temp("logs-fp16-flip-resumed");
    let dir2 = logs2.join("loop").join("checkpoints");
    std::fs::create_dir_all(&dir2).unwrap();
    for file in ["epoch_1_2.safetensors", "epoch_1_2.state.safetensors"] {
        std::fs::copy(dir.join(file), dir2.join(file)).unwrap();
    }
    let resumed = train(tiny_model(), &cfg(logs2), Some("epoch_1_2")).unwrap();
    assert_eq!(resumed.steps, 5);
    let resumed_weights: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(
            resumed
                .checkpoint_dir
                .unwrap()
                .join("epoch_latest.safetensors"),
        )
        .unwrap()
        .into_iter()
        .collect();
    for (key, tensor) in &saved {
        assert!(
            tensor.equal(&resumed_weights[key]),
            "{key} differs after resuming from step 2"
        );
    }
}

/// The recall validation reports is `evaluate`'s on the predictions written from the same features:
/// the validation's features are ranked independently (`retrieval::search`, fp32 scan, k = 10),
/// written as cn_clip's prediction jsonl with the ground truth as cn_clip's annotation jsonl, and
/// `evaluation.py`'s score file (eval's `run_cn_clip_evaluation`) must equal, byte for byte, the
/// score JSON of the validation's own number.
#[test]
fn validation_recall_is_evaluate_on_the_same_features() {
    use cnclip_model::preprocess::Preprocessor;
    use muge_data::{LmdbSplit, TextPipeline};
    use std::io::Write;
    use std::sync::Arc;

    let model = tiny_model();
    let split = Arc::new(LmdbSplit::open(lmdb("valid-eval")).unwrap());
    let size = u32::try_from(model.config().vision.image_resolution).unwrap();
    let text = TextPipeline::new(RunConfig::default().context_length).unwrap();
    let (v, features, _) = cnclip_train::validate::validate_with_features(
        &model,
        split,
        Arc::new(Preprocessor::new(size).unwrap()),
        text,
        4,
        1,
        &mut |_, _| {},
    )
    .unwrap();

    let dir = temp("valid-eval-files");
    let gt = dir.join("valid_texts.jsonl");
    let mut w = std::fs::File::create(&gt).unwrap();
    for (text_id, image_ids) in &features.ground_truth {
        writeln!(
            w,
            "{{\"text_id\": {text_id}, \"image_ids\": {image_ids:?}}}"
        )
        .unwrap();
    }
    drop(w);
    let (texts, images) = (features.texts.view(), features.images.view());
    let hits = retrieval::search(
        &texts,
        &images,
        &retrieval::SearchOptions {
            k: 10,
            precision: retrieval::ScanPrecision::Fp32,
            ..retrieval::SearchOptions::default()
        },
    )
    .unwrap();
    let preds = dir.join("test_predictions.jsonl");
    retrieval::write_predictions(
        &preds,
        retrieval::Direction::TextToImage,
        &texts,
        &images,
        &hits,
    )
    .unwrap();
    let out = dir.join("output.json");
    eval::run_cn_clip_evaluation(
        &gt,
        &preds,
        &out,
        eval::Direction::TextToImage,
        &eval::Validation::cn_clip(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        v.score.to_cn_clip_json(),
        "{v:?}"
    );
}
