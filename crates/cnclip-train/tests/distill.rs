//! `--distillation`: cn_clip's KD loss (`cosineSimilarityLoss`) and three training steps with a
//! fixed teacher against cn_clip's `get_loss`; the finetune flags end to end (teacher and
//! `--clip-weight-path`/`--bert-weight-path` through a [`Session`]). Fixtures:
//! tests/fixtures/make_distill_fixtures.py (distill/) and cnclip-model's make_init_fixtures.py.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// torch's generator is global to the process and these tests run in parallel: the dropout and FLIP
/// re-seeds and the models' random init of one test must not interleave with another's draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

mod common;

use cnclip_model::{Clip, ClipConfig, LoadOptions};
use cnclip_train::distill::{Teacher, cosine_similarity_loss};
use cnclip_train::freeze::Freeze;
use cnclip_train::observe::Observers;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use cnclip_train::{RunConfig, Session};
use common::{F32_UNIT_ROUNDOFF, repo, temp, tiny_model};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    repo()
        .join("crates/cnclip-train/tests/fixtures/distill")
        .join(name)
}

fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn teacher_model() -> Clip {
    let config =
        ClipConfig::from_json_files(&fixture("teacher-vit.json"), &fixture("teacher-bert.json"))
            .unwrap();
    let options = LoadOptions {
        config: Some(config),
        ..Default::default()
    };
    Clip::load(fixture("teacher.pt"), &options, Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().to_kind(Kind::Double).double_value(&[])
}

#[test]
fn kd_loss_equals_cn_clips_cosine_similarity_loss() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let r = reference();
    // The loss is 1 − the mean of 6 cosines, each a dot product over at most 12 terms divided by
    // two norms of as many: with unit-roundoff error analysis (Higham §3.1, γₙ = n·u per sum) every
    // cosine (|cos| ≤ 1) errs by at most about (12 + 12 + 12 + 4 bilinear terms + a few divisions)
    // u < 48 u, and so does their mean; 64 u leaves room for the final 1 − m. Gradients pass
    // through the same sums once more (backward), relative to the largest gradient: 2 × 64 u.
    let bound = 64.0 * F32_UNIT_ROUNDOFF;
    for case in ["wider", "narrower", "same"] {
        let get = |what: &str| r[&format!("loss.{case}.{what}")].shallow_clone();
        let student = get("student").set_requires_grad(true);
        let loss = cosine_similarity_loss(&get("teacher"), &student);
        loss.backward();
        let theirs = get("loss").double_value(&[0]);
        let ours = loss.double_value(&[]);
        assert!((ours - theirs).abs() <= bound, "{case}: {ours} vs {theirs}");
        let grad = student.grad();
        let diff = max_abs(&(&grad - get("grad")));
        assert!(
            diff <= 2.0 * bound * max_abs(&get("grad")),
            "{case}: gradient differs by {diff}"
        );
    }
}

fn trainer_config(accum_freq: usize) -> TrainerConfig {
    TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 1e-3,
            warmup: 1,
            total_steps: 3,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        },
        accum_freq,
        freeze: Freeze::NONE,
        dropout_seed: None,
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
        mask_ratio: 0.0,
    }
}

#[test]
fn three_steps_with_a_teacher_equal_cn_clip() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let r = reference();
    let mut trainer = Trainer::new(tiny_model(), trainer_config(1));
    trainer.set_distillation(Teacher::new(teacher_model()), 0.5);
    let expected = &r["steps.loss"];
    // One forward + backward pass of the tiny models differs between two correct implementations
    // by at most ρ of the magnitudes involved (common::tiny_rounding_bound); the weights after
    // each Adam step then differ by about lr × 2ρ (Adam's step is m̂/√v̂, which a relative gradient
    // error ρ moves by 2ρ), which moves the next loss by far less than ρ × its size. So every
    // step's loss agrees to 2ρ of its value.
    let rho = common::tiny_rounding_bound();
    let compared: Vec<String> = r
        .keys()
        .filter_map(|k| k.strip_prefix("steps.final.").map(str::to_string))
        .collect();
    // Elements whose gradient was ever within NOISE_MARGIN × rounding noise of zero (below).
    const NOISE_MARGIN: f64 = 4.0;
    let mut noise_driven: HashMap<String, Tensor> = HashMap::new();
    for step in 0..3 {
        let images = &r[&format!("steps.images.{step}")];
        let texts = &r[&format!("steps.texts.{step}")];
        let report = trainer.train_batch(images, texts).unwrap().unwrap();
        let theirs = expected.double_value(&[step]);
        assert!(
            (report.loss - theirs).abs() <= 2.0 * rho * theirs.abs(),
            "step {step}: loss {} vs cn_clip's {theirs}",
            report.loss
        );
        let named = trainer.model().named_tensors();
        for key in &compared {
            let g = named[key].grad();
            let noise = rho * max_abs(&g) * NOISE_MARGIN;
            let weak = g.abs().le(noise).logical_and(&g.ne(0.0));
            let entry = noise_driven
                .entry(key.clone())
                .or_insert_with(|| weak.zeros_like());
            *entry = entry.logical_or(&weak);
        }
    }
    // Weights, as tests/cn_clip_loop.rs compares them: Adam's step lr·m̂/(√v̂ + ε) turns a gradient
    // at the level of rounding noise into a step of ±lr in an arbitrary direction, so elements
    // whose gradient was ever within NOISE_MARGIN × ρ × the tensor's largest gradient of zero are
    // left out (the losses above are flat along them to first order). For the rest, rounding moves
    // each step by about lr·ρ relative to the step's size: after 3 steps of lr ≤ 1e-3 on weights
    // of the init's scale (0.02) the tensors differ by about 3 × 1e-3 × ρ / 0.02 of their norm.
    let ours = trainer.model().named_tensors();
    let bound = 3.0 * 1e-3 * rho / 0.02;
    let (mut left_out, mut total) = (0i64, 0i64);
    for key in &compared {
        let theirs = &r[&format!("steps.final.{key}")];
        let keep = noise_driven[key].logical_not();
        total += theirs.numel() as i64;
        left_out += theirs.numel() as i64 - keep.sum(Kind::Int64).int64_value(&[]);
        let (mine, theirs) = (ours[key].masked_select(&keep), theirs.masked_select(&keep));
        let err =
            (&mine - &theirs).norm().double_value(&[]) / theirs.norm().double_value(&[]).max(1e-12);
        assert!(
            err <= bound,
            "{key}: relative error {err:.3e} (bound {bound:.3e})"
        );
    }
    assert!(
        (left_out as f64) < 0.02 * total as f64,
        "{left_out} of {total} weights are noise-driven: the comparison would cover too little"
    );
}

/// cn_clip's `--accum-freq` with a teacher: the teacher's rows of every micro-batch stand beside
/// the student's, so two micro-batches of 2 give the loss of one batch of 4.
#[test]
fn accumulated_micro_batches_distil_like_one_batch() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let r = reference();
    let mut whole = Trainer::new(tiny_model(), trainer_config(1));
    let mut split = Trainer::new(tiny_model(), trainer_config(2));
    whole.set_distillation(Teacher::new(teacher_model()), 0.5);
    split.set_distillation(Teacher::new(teacher_model()), 0.5);
    // As in the steps above: one pass's rounding (ρ) per step, weights apart by lr·2ρ.
    let rho = common::tiny_rounding_bound();
    for step in 0..3 {
        let images = &r[&format!("steps.images.{step}")];
        let texts = &r[&format!("steps.texts.{step}")];
        let a = whole.train_batch(images, texts).unwrap().unwrap();
        assert!(
            split
                .train_batch(&images.narrow(0, 0, 2), &texts.narrow(0, 0, 2))
                .unwrap()
                .is_none()
        );
        let b = split
            .train_batch(&images.narrow(0, 2, 2), &texts.narrow(0, 2, 2))
            .unwrap()
            .unwrap();
        assert!(
            (a.loss - b.loss).abs() <= 2.0 * rho * a.loss.abs(),
            "step {step}: {} vs {}",
            a.loss,
            b.loss
        );
    }
}

fn run_config(tag: &str, configs: &str) -> RunConfig {
    let fx = repo().join(configs);
    RunConfig {
        train_data: common::lmdb(tag),
        logs: temp(&format!("logs-{tag}")),
        name: "distill".into(),
        batch_size: 4,
        num_workers: 1,
        max_steps: Some(2),
        lr: Some(1e-3),
        beta1: Some(0.9),
        beta2: Some(0.98),
        eps: Some(1e-6),
        warmup: 1,
        context_length: 24,
        vision_model: fx.join("tiny-vit.json").display().to_string(),
        text_model: fx.join("tiny-bert.json").display().to_string(),
        precision: TrainPrecision::Fp32,
        device: "cpu".into(),
        ..RunConfig::default()
    }
}

const INIT_FIXTURES: &str = "crates/cnclip-model/tests/fixtures/init";
const MODEL_CONFIGS: &str = "crates/cnclip-model/tests/fixtures/model/configs";

#[test]
fn init_flags_initialise_the_session_and_yield_to_resume() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let init = repo().join(INIT_FIXTURES);
    let mut config = run_config("init", INIT_FIXTURES);
    config.clip_weight_path = Some(init.join("openai_clip.pt"));
    config.bert_weight_path = Some(init.join("bert"));
    let session = Session::prepare_in(config.clone(), None).unwrap();
    let notes = session.notes().join("\n");
    assert!(
        notes.contains("--clip-weight-path: 33 weights")
            && notes.contains("--bert-weight-path: 37 weights")
            && notes.contains("bert.embeddings.position_ids"),
        "{notes}"
    );
    // The session's model is cnclip-model's init_from_pretrained, itself checked bit for bit
    // against cn_clip in cnclip-model/tests/init_weights.rs.
    let (expected, _) =
        cnclip_model::weights::read_safetensors(init.join("expected.safetensors")).unwrap();
    let ours = session.model().named_tensors();
    for key in [
        "visual.conv1.weight",
        "logit_scale",
        "bert.encoder.layer.1.output.dense.weight",
    ] {
        assert!(ours[key].equal(expected.get(key).unwrap()), "{key}");
    }

    // With --resume, cn_clip loads the resume after the init files: their weights are not used.
    let resume = temp("init-resume").join("start.safetensors");
    let start = Clip::new(session.model().config(), Device::Cpu);
    start.save_native(&resume).unwrap();
    // A prepared session holds its run directory until dropped; the next one takes it over.
    drop(session);
    let resumed = Session::prepare_in(
        RunConfig {
            resume: Some(resume.clone()),
            ..config.clone()
        },
        None,
    )
    .unwrap();
    let notes = resumed.notes().join("\n");
    assert!(notes.contains("are not used"), "{notes}");
    let key = "visual.conv1.weight";
    assert!(resumed.model().named_tensors()[key].equal(&start.named_tensors()[key]));

    // A missing file is refused naming its flag, even when a resume would replace it (cn_clip
    // asserts the file exists).
    let missing = Session::prepare_in(
        RunConfig {
            bert_weight_path: Some(init.join("no-such-dir")),
            resume: Some(resume),
            ..config
        },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("--bert-weight-path") && missing.contains("no-such-dir"),
        "{missing}"
    );
}

#[test]
fn a_distilled_run_trains_with_a_local_teacher() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = run_config("distill", MODEL_CONFIGS);
    // A native teacher of the student's resolution (HF and native teachers carry their config).
    let teacher_file = temp("teacher").join("teacher.safetensors");
    teacher_model().save_native(&teacher_file).unwrap();
    config.distillation = true;
    config.teacher_model_name = Some(teacher_file.display().to_string());
    let session = Session::prepare_in(config.clone(), None).unwrap();
    let notes = session.notes().join("\n");
    assert!(
        notes.contains("distillation: teacher") && notes.contains("48-wide"),
        "{notes}"
    );
    let summary = session.run(&mut Observers::new()).unwrap();
    assert_eq!(summary.steps, 2);
    assert!(summary.last_loss.is_some_and(f64::is_finite));
}

#[test]
fn teachers_that_cannot_teach_are_refused() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = run_config("teachers", MODEL_CONFIGS);
    config.distillation = true;
    let err = |config: RunConfig| Session::prepare_in(config, None).unwrap_err().to_string();
    config.teacher_model_name = Some("damo/multi-modal_clip-vit-huge-patch14_zh".into());
    let e = err(config.clone());
    assert!(
        e.contains("--teacher-model-name") && e.contains("local"),
        "{e}"
    );
    config.teacher_model_name = Some(fixture("teacher.pt").display().to_string());
    let e = err(config.clone());
    assert!(
        e.contains("--teacher-model") && e.contains("architecture"),
        "{e}"
    );
    // A teacher of another resolution cannot take the student's images.
    config.teacher_model = Some("ViT-B-16".into());
    let e = err(config.clone());
    assert!(e.contains("teacher.pt"), "{e}");
    config.teacher_model_name = Some("/no/such/teacher".into());
    let e = err(config);
    assert!(
        e.contains("/no/such/teacher") && e.contains("does not exist"),
        "{e}"
    );
}
