//! DDP over Gloo with two ranks as two processes on 127.0.0.1 (this test binary re-executes itself
//! as the workers: `ddp worker ROLE ...`), against the single-process equivalents of cn_clip's
//! three gather modes, plus the failure paths: a rendezvous nobody joins, a rank killed mid-run,
//! a worker dying under our launcher, and a whole run whose files only rank 0 writes.
//!
//! `harness = false`: the workers need a `main` that is not a test runner. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail, ensure};
use cnclip_model::Clip;
use cnclip_train::ddp::launch::{LaunchConfig, LaunchError, free_port, launch};
use cnclip_train::ddp::{Ddp, DistEnv, GatherMode};
use cnclip_train::distill::{Teacher, cosine_similarity_loss};
use cnclip_train::freeze::Freeze;
use cnclip_train::loss::{LocalOnly, contrastive_loss};
use cnclip_train::optim::{AdamW, clamp_logit_scale};
use cnclip_train::run::{RunConfig, train_distributed};
use cnclip_train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use torch_ext::dist::Backend;
use torch_ext::reducer::CommHook;

const WORLD: usize = 2;
const BATCH: i64 = 3; // per rank
const STEPS: u64 = 3;
/// Collective/rendezvous timeout of the workers.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest any spawned worker may live.
const DEADLINE: Duration = Duration::from_secs(120);

fn model(seed: i64) -> Clip {
    tch::manual_seed(seed);
    Clip::new(&common::tiny_config(0.0), Device::Cpu)
}

/// The distillation teacher of the `+kd` runs: another tiny model with 24-wide image features (the
/// student's are 16), so the KD loss resizes them and pairs rows across ranks.
fn teacher() -> Teacher {
    tch::manual_seed(99);
    let mut config = common::tiny_config(0.0);
    config.vision.embed_dim = 24;
    Teacher::new(Clip::new(&config, Device::Cpu))
}

const KD_WEIGHT: f64 = 0.5;

/// The global batch of `step`: `[W·B, 3, 32, 32]` images and `[W·B, 12]` token ids.
fn global_batch(step: u64) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + step as i64);
    let n = BATCH * WORLD as i64;
    let images = Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu));
    let texts = Tensor::randint_low(1, 300, [n, 12], (Kind::Int64, Device::Cpu));
    let _ = texts.narrow(1, 9, 3).fill_(0); // padding
    (images, texts)
}

fn mode_name(mode: GatherMode) -> &'static str {
    match mode {
        GatherMode::Aggregate => "aggregate",
        GatherMode::WithGrad => "with-grad",
        GatherMode::Skip => "skip",
    }
}

fn parse_mode(s: &str) -> Result<GatherMode> {
    Ok(match s {
        "aggregate" => GatherMode::Aggregate,
        "with-grad" => GatherMode::WithGrad,
        "skip" => GatherMode::Skip,
        other => bail!("unknown mode {other}"),
    })
}

fn env_for(rank: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", WORLD.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

fn spawn_worker(rank: usize, port: u16, args: &[&str]) -> Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("worker").args(args);
    for (k, v) in env_for(rank, port) {
        cmd.env(k, v);
    }
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits for `child` at most until `deadline`, killing it past that. Returns (success, stdout,
/// stderr, how long it took).
fn finish(mut child: Child, deadline: Instant) -> Result<(bool, String, String, Duration)> {
    let start = Instant::now();
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    loop {
        if let Some(status) = child.try_wait()? {
            let o = out.join().unwrap_or_default();
            let e = err.join().unwrap_or_default();
            return Ok((status.success(), o, e, start.elapsed()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("a worker outlived its deadline and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Workers

fn worker(args: &[String]) -> Result<()> {
    let env = DistEnv::from_env()?.context("worker started without RANK/WORLD_SIZE")?;
    match args.first().map(String::as_str) {
        // worker steps MODE OUT [DIE_AFTER]: STEPS optimizer steps of the tiny model on this
        // rank's half of each global batch; rank 0 writes the weights to OUT.
        Some("steps") => {
            // MODE may carry suffixes: "+ckpt" gradient checkpointing (its staged backward),
            // "+kd" distillation from `teacher()`, "+accum2" two micro-batches per step (rows
            // 2 + 1), "+frozen" the vision tower frozen with find_unused_parameters on,
            // "+fp16hook"/"+bf16hook" the compression comm hooks (one step only).
            let spec = args.get(1).context("mode")?;
            let mut parts = spec.split('+');
            let mode = parse_mode(parts.next().context("mode")?)?;
            let flags: Vec<&str> = parts.collect();
            for f in &flags {
                ensure!(
                    ["ckpt", "kd", "accum2", "frozen", "fp16hook", "bf16hook"].contains(f),
                    "unknown mode suffix {f:?}"
                );
            }
            let has = |f: &str| flags.contains(&f);
            let (kd, checkpointing, accum) = (has("kd"), has("ckpt"), has("accum2"));
            let hook = if has("fp16hook") {
                CommHook::Fp16
            } else if has("bf16hook") {
                CommHook::Bf16
            } else {
                CommHook::None
            };
            let out = PathBuf::from(args.get(2).context("out")?);
            let die_after: Option<u64> = args.get(3).map(|s| s.parse()).transpose()?;
            let steps: u64 = match (die_after, hook) {
                (Some(_), _) => 1000,
                (None, CommHook::None) => STEPS,
                (None, _) => 1,
            };
            let timeout = match std::env::var("CNCLIP_TEST_TIMEOUT_MS") {
                Ok(ms) => Duration::from_millis(ms.parse()?),
                Err(_) => TIMEOUT,
            };
            let ddp = Ddp::init(&env, Backend::Gloo, timeout, mode)?
                .with_bucket_bytes(4096)
                .with_comm_hook(hook)
                .with_find_unused_parameters(has("frozen"));
            // Different initial weights per rank: the broadcast from rank 0 must fix them.
            let model = model(7 + env.rank as i64);
            ddp.broadcast_model(&model)?;
            let config = TrainerConfig {
                grad_checkpointing: checkpointing,
                accum_freq: if accum { 2 } else { 1 },
                freeze: if has("frozen") {
                    Freeze::VISION
                } else {
                    Freeze::NONE
                },
                ..common::sgd_like_trainer_config()
            };
            let mut trainer = Trainer::with_gather(model, config, ddp.gather());
            let sync = ddp.gradient_sync(trainer.model())?;
            trainer.set_gradient_sync(sync);
            if kd {
                trainer.set_distillation(teacher(), KD_WEIGHT);
            }
            let mut losses = Vec::new();
            for step in 0..steps {
                if die_after == Some(step) && env.rank == 1 {
                    std::process::exit(3);
                }
                let (images, texts) = global_batch(step % 5);
                let start = env.rank as i64 * BATCH;
                let rows = |t: &Tensor| t.narrow(0, start, BATCH);
                let report = if accum {
                    let first = |t: &Tensor| t.narrow(0, start, 2);
                    let rest = |t: &Tensor| t.narrow(0, start + 2, BATCH - 2);
                    ensure!(
                        trainer
                            .train_batch(&first(&images), &first(&texts))?
                            .is_none()
                    );
                    trainer.train_batch(&rest(&images), &rest(&texts))?
                } else {
                    trainer.train_batch(&rows(&images), &rows(&texts))?
                }
                .context("the step did not complete")?;
                losses.push(report.loss);
                println!("step {}", report.step);
            }
            if env.rank == 0 {
                Tensor::write_safetensors(
                    &trainer
                        .model()
                        .named_tensors()
                        .into_iter()
                        .collect::<Vec<_>>(),
                    &out,
                )?;
                std::fs::write(out.with_extension("json"), serde_json::to_string(&losses)?)?;
            }
            Ok(())
        }
        // worker run DATA LOGS MAX_STEPS [resume]: a whole run over an LMDB.
        Some("run") => {
            let data = PathBuf::from(args.get(1).context("data")?);
            let logs = PathBuf::from(args.get(2).context("logs")?);
            let max_steps: u64 = args.get(3).context("steps")?.parse()?;
            let resume =
                (args.get(4).map(String::as_str) == Some("resume")).then_some("epoch_latest");
            let ddp = Ddp::init(&env, Backend::Gloo, TIMEOUT, GatherMode::Aggregate)?;
            let config = run_config(data, logs, max_steps);
            let summary = train_distributed(fixture_model()?, &config, resume, &ddp)?;
            println!("steps {}", summary.steps);
            Ok(())
        }
        other => bail!("unknown worker role {other:?}"),
    }
}

/// The tiny model of the loop fixture (its vocabulary covers the fixture's texts).
fn fixture_model() -> Result<Clip> {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnclip-model/tests/fixtures/model");
    let config = cnclip_model::ClipConfig::from_json_files(
        &fx.join("configs/tiny-vit.json"),
        &fx.join("configs/tiny-bert.json"),
    )?;
    let options = cnclip_model::LoadOptions {
        config: Some(config),
        ..Default::default()
    };
    Ok(Clip::load(fx.join("tiny_vit.pt"), &options, Device::Cpu)?)
}

fn run_config(train_data: PathBuf, logs: PathBuf, max_steps: u64) -> RunConfig {
    let t = common::sgd_like_trainer_config();
    RunConfig {
        train_data,
        batch_size: 2,
        num_workers: 1,
        seed: 123,
        max_epochs: 99,
        max_steps: Some(max_steps),
        lr: Some(1e-3),
        beta1: Some(t.adamw.beta1),
        beta2: Some(t.adamw.beta2),
        eps: Some(t.adamw.eps),
        wd: t.adamw.weight_decay,
        warmup: 1,
        logs,
        name: "ddp".into(),
        save_step_frequency: 2,
        precision: TrainPrecision::Fp32,
        dropout_seed: Some(5),
        ..RunConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The single-process equivalents (see cnclip_train::ddp's module doc)

/// Each step's rate and, per tensor, its largest gradient element.
type StepScales = Vec<(f64, BTreeMap<String, f64>)>;

/// The single-process run of `mode`: final model, logged losses, and each step's rate and
/// gradient scales for the rounding bound.
fn reference(mode: GatherMode, kd: bool) -> Result<(Clip, Vec<f64>, StepScales)> {
    reference_with(mode, kd, &Variant::default())
}

/// What a DDP run adds on top of a gather mode (see the worker's MODE suffixes).
#[derive(Debug, Clone, Copy)]
struct Variant {
    /// Micro-batches per step: cn_clip's accumulation differentiates the scale through every
    /// micro-batch's loss, so `logit_scale` gets `accum` times its gradient.
    accum: usize,
    freeze: Freeze,
    steps: u64,
}

impl Default for Variant {
    fn default() -> Self {
        Self {
            accum: 1,
            freeze: Freeze::NONE,
            steps: STEPS,
        }
    }
}

fn reference_with(
    mode: GatherMode,
    kd: bool,
    variant: &Variant,
) -> Result<(Clip, Vec<f64>, StepScales)> {
    let model = model(7);
    let teacher = teacher();
    let config = common::sgd_like_trainer_config();
    variant.freeze.apply(&model);
    let mut optimizer = AdamW::for_model(&model, config.adamw);
    let logit_scale = model.named_tensors()["logit_scale"].shallow_clone();
    let mut losses = Vec::new();
    let mut steps = Vec::new();
    for step in 0..variant.steps {
        let (images, texts) = global_batch(step);
        optimizer.zero_grad();
        let loss_of = |img: &Tensor, txt: &Tensor| -> Result<Tensor> {
            let (i, t, s) = model.forward_t(img, txt, true);
            let loss = contrastive_loss(&i, &t, &s, &LocalOnly)?.loss;
            Ok(if kd {
                loss + cosine_similarity_loss(&teacher.features(img), &i) * KD_WEIGHT
            } else {
                loss
            })
        };
        let logged = match mode {
            // One loss over the concatenated batch; DDP's average gives the towers 1/W of it.
            GatherMode::Aggregate | GatherMode::WithGrad => {
                let loss = loss_of(&images, &texts)?;
                loss.backward();
                if mode == GatherMode::Aggregate {
                    let mut scale_grad = logit_scale.grad();
                    for g in optimizer.grads() {
                        if g.defined() && g.data_ptr() != scale_grad.data_ptr() {
                            let mut g = g;
                            let _ = g.g_div_scalar_(WORLD as f64);
                        }
                    }
                    if variant.accum > 1 {
                        let _ = scale_grad.g_mul_scalar_(variant.accum as f64);
                    }
                }
                loss.double_value(&[])
            }
            // The mean of the per-rank losses; rank 0 logs its own.
            GatherMode::Skip => {
                let mut first = f64::NAN;
                for r in 0..WORLD as i64 {
                    let loss = loss_of(
                        &images.narrow(0, r * BATCH, BATCH),
                        &texts.narrow(0, r * BATCH, BATCH),
                    )?;
                    (&loss / WORLD as f64).backward();
                    if r == 0 {
                        first = loss.double_value(&[]);
                    }
                }
                first
            }
        };
        let largest = model
            .named_tensors()
            .into_iter()
            .filter(|(_, t)| t.grad().defined())
            .map(|(k, t)| (k, t.grad().abs().max().double_value(&[])))
            .collect();
        steps.push((config.schedule.lr(step), largest));
        optimizer.step(config.schedule.lr(step))?;
        clamp_logit_scale(&model);
        losses.push(logged);
    }
    Ok((model, losses, steps))
}

/// How far rounding alone can move the ranks' weights from the single process's. With ε = 1 the
/// AdamW step lr·m̂/(√v̂ + 1) changes by at most 2·lr·max|Δg| when every gradient so far changed
/// by at most |Δg| (m̂ and √v̂ are averages of past gradients and their magnitudes; the step is
/// 1-Lipschitz in m̂ and in √v̂ for |m̂| ≤ √v̂). The ranks' gradients differ by summation order
/// only: ρ times the largest gradient (`common::tiny_rounding_bound`), doubled for what earlier
/// steps' weight differences feed back into later gradients (their effect is lr·ρ-sized, far
/// below ρ·G, but not zero).
/// Per tensor, from its own gradients' scale; BERT's key biases, whose gradient is analytically
/// zero and so pure rounding noise of terms as large as the model's other gradients (see
/// `common::analytically_zero_part`), from the largest gradient of the step.
fn weight_bounds(steps: &StepScales) -> BTreeMap<String, f64> {
    let rho = common::tiny_rounding_bound();
    let mut largest: BTreeMap<String, f64> = BTreeMap::new();
    let mut bounds: BTreeMap<String, f64> = BTreeMap::new();
    for (lr, scales) in steps {
        let step_largest = scales.values().copied().fold(0.0, f64::max);
        for (key, g) in scales {
            let g = if key.ends_with("attention.self.key.bias") {
                &step_largest
            } else {
                g
            };
            let l = largest.entry(key.clone()).or_insert(0.0);
            *l = l.max(*g);
            *bounds.entry(key.clone()).or_insert(0.0) += 2.0 * lr * 2.0 * rho * *l;
        }
    }
    bounds
}

/// The largest difference of any tensor relative to its bound: (difference, that tensor's bound).
/// Tensors without gradient (none here) must be equal.
fn worst_against(
    a: &Clip,
    b: &[(String, Tensor)],
    bounds: &BTreeMap<String, f64>,
) -> Result<(f64, f64)> {
    let ours = a.named_tensors();
    let mut worst = (0.0, 0.0, f64::NEG_INFINITY);
    for (name, t) in b {
        let mine = ours.get(name).with_context(|| format!("no {name}"))?;
        let d = (mine - t).abs().max().double_value(&[]);
        let bound = bounds.get(name).copied().unwrap_or(0.0);
        if d - bound > worst.2 {
            worst = (d, bound, d - bound);
        }
    }
    Ok((worst.0, worst.1))
}

fn max_diff(a: &Clip, b: &[(String, Tensor)]) -> Result<f64> {
    let ours = a.named_tensors();
    let mut worst: f64 = 0.0;
    for (name, t) in b {
        let mine = ours.get(name).with_context(|| format!("no {name}"))?;
        let d = (mine - t).abs().max().double_value(&[]);
        worst = worst.max(d);
    }
    Ok(worst)
}

// ---------------------------------------------------------------------------------------------
// Tests

fn temp(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cnclip-ddp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A single-process reference: (mode, distilled), final model, logged losses, gradient scales.
type Reference = ((GatherMode, bool), Clip, Vec<f64>, StepScales);

/// Two ranks per mode, compared with the single-process equivalent of that mode (and shown to
/// differ from the other modes' equivalents, so the comparison can tell them apart).
fn two_ranks_equal_one_process() -> Result<()> {
    let dir = temp("equal")?;
    // Each mode without and with distillation (the teacher's rows gathered like the student's).
    let refs: Vec<Reference> = [
        GatherMode::Aggregate,
        GatherMode::WithGrad,
        GatherMode::Skip,
    ]
    .into_iter()
    .flat_map(|m| [(m, false), (m, true)])
    .map(|(m, kd)| reference(m, kd).map(|(c, l, s)| ((m, kd), c, l, s)))
    .collect::<Result<_>>()?;
    // A --gather-with-grad run repeats with gradient checkpointing: its staged backward
    // carries the gathered rows' gradient through the checkpointed blocks.
    let runs = [
        (&refs[0], "aggregate"),
        (&refs[2], "with-grad"),
        (&refs[4], "skip"),
        (&refs[2], "with-grad+ckpt"),
        (&refs[1], "aggregate+kd"),
        (&refs[3], "with-grad+kd"),
        (&refs[5], "skip+kd"),
    ];
    for (((mode, kd), want, want_losses, steps), spec) in runs {
        let bounds = weight_bounds(steps);
        let (got, got_losses) = run_spec(&dir, spec)?;
        let (diff, bound) = worst_against(want, &got, &bounds)?;
        println!(
            "{spec}: max |DDP − single process| = {diff:e} (its tensor's rounding bound {bound:e})"
        );
        ensure!(
            diff <= bound,
            "{spec}: weights differ by {diff:e} from the single-process equivalent (bound {bound:e})"
        );
        let bound = bounds.values().copied().fold(0.0, f64::max);
        // Each logged loss is a cross-entropy over logits s·cos(image, text), s = e^logit_scale,
        // of features the ranks computed in other batch shapes (relative error ≤ ρ) from weights
        // that differ by at most `bound`; to first order the features move by ρ plus that, so
        // each logit by 2s(ρ + …), and the loss (1-Lipschitz per logit row, twice) by 4s·ρ'.
        let rho = common::tiny_rounding_bound();
        let scale = want
            .named_tensors()
            .get("logit_scale")
            .map(|t| t.double_value(&[]).exp())
            .unwrap_or(100.0)
            .max(1.0 / 0.07);
        for (step, (a, b)) in got_losses.iter().zip(want_losses).enumerate() {
            ensure!(
                (a - b).abs() <= 4.0 * scale * (rho + bound),
                "{} step {step}: loss {a} vs {b}",
                mode_name(*mode)
            );
        }
        // The modes must be told apart: every other mode's run is far outside the bound.
        for (other, model, _, _) in &refs {
            if *other != (*mode, *kd) {
                let d = max_diff(model, &got)?;
                ensure!(
                    d > 10.0 * bound,
                    "{spec} is indistinguishable from {}{} ({d:e}, bound {bound:e})",
                    mode_name(other.0),
                    if other.1 { "+kd" } else { "" }
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Rank 0's final weights and logged losses.
type RunOutput = (Vec<(String, Tensor)>, Vec<f64>);

/// Two ranks of `spec` (see the worker).
fn run_spec(dir: &Path, spec: &str) -> Result<RunOutput> {
    let out = dir.join(format!("{spec}.safetensors"));
    let port = free_port()?;
    let deadline = Instant::now() + DEADLINE;
    let out_s = out.to_string_lossy().to_string();
    let children: Vec<Child> = (0..WORLD)
        .map(|r| spawn_worker(r, port, &["steps", spec, &out_s]))
        .collect::<Result<_>>()?;
    for (r, child) in children.into_iter().enumerate() {
        let (ok, _, err, _) = finish(child, deadline)?;
        ensure!(ok, "{spec} rank {r} failed:\n{err}");
    }
    let losses = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json"))?)?;
    Ok((Tensor::read_safetensors(&out)?, losses))
}

/// Per tensor, the largest `(|a_0| + |a_1|)/2` over its elements at the initial weights, where
/// `a_r` is rank r's gradient before DDP averages it in the default gather mode: the global
/// batch's loss differentiated through rank r's rows only (the other rows are constants there).
fn local_gradient_scales() -> Result<BTreeMap<String, f64>> {
    let model = model(7);
    let (images, texts) = global_batch(0);
    let named = model.named_tensors();
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    for r in 0..WORLD as i64 {
        for p in named.values() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let (i, t, scale) = model.forward_t(&images, &texts, true);
        let only_r = |x: &Tensor| {
            let parts: Vec<Tensor> = (0..WORLD as i64)
                .map(|q| {
                    let rows = x.narrow(0, q * BATCH, BATCH);
                    if q == r { rows } else { rows.detach() }
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        contrastive_loss(&only_r(&i), &only_r(&t), &scale, &LocalOnly)?
            .loss
            .backward();
        for (k, p) in &named {
            let g = p.grad();
            if g.defined() {
                let a = g.abs();
                let sum = match sums.remove(k) {
                    Some(s) => s + a,
                    None => a,
                };
                sums.insert(k.clone(), sum);
            }
        }
    }
    Ok(sums
        .into_iter()
        .map(|(k, v)| (k, (v / WORLD as f64).max().double_value(&[])))
        .collect())
}

/// torch's reducer beyond the plain step, each against its single-process equivalent:
/// accumulation (`no_sync` on the first micro-batch, one reduction in the second), a frozen tower
/// with find_unused_parameters on, and the fp16/bf16 compression hooks.
fn reducer_variants_equal_one_process() -> Result<()> {
    let dir = temp("variants")?;
    let check = |spec: &str,
                 want: &Clip,
                 got: &[(String, Tensor)],
                 bounds: &BTreeMap<String, f64>| {
        let (diff, bound) = worst_against(want, got, bounds)?;
        println!("{spec}: max |DDP − single process| = {diff:e} (its tensor's bound {bound:e})");
        ensure!(
            diff <= bound,
            "{spec}: weights differ by {diff:e} from the single-process equivalent (bound {bound:e})"
        );
        Ok(bounds.values().copied().fold(0.0, f64::max))
    };
    let (plain, _, _) = reference(GatherMode::Aggregate, false)?;

    // Accumulation: the same weights as one process on the global batch with logit_scale's
    // gradient doubled (and far from the run without the doubling).
    let accum = Variant {
        accum: 2,
        ..Variant::default()
    };
    let (want, _, steps) = reference_with(GatherMode::Aggregate, false, &accum)?;
    let (got, _) = run_spec(&dir, "aggregate+accum2")?;
    let bound = check("aggregate+accum2", &want, &got, &weight_bounds(&steps))?;
    let d = max_diff(&plain, &got)?;
    ensure!(
        d > 10.0 * bound,
        "accumulation is indistinguishable from no accumulation ({d:e})"
    );

    // A frozen vision tower (not in the reducer) with find_unused_parameters on.
    let frozen = Variant {
        freeze: Freeze::VISION,
        ..Variant::default()
    };
    let (want, _, steps) = reference_with(GatherMode::Aggregate, false, &frozen)?;
    let (got, _) = run_spec(&dir, "aggregate+frozen")?;
    let bound = check("aggregate+frozen", &want, &got, &weight_bounds(&steps))?;
    let initial = model(7).named_tensors();
    for (k, t) in got.iter().filter(|(k, _)| k.starts_with("visual.")) {
        ensure!(t.equal(&initial[k]), "frozen {k} moved");
    }
    let d = max_diff(&plain, &got)?;
    ensure!(
        d > 10.0 * bound,
        "the frozen run is indistinguishable from the full one ({d:e})"
    );

    // Compression hooks, one step. Rank r's gradient a_r is rounded to the hook's dtype (relative
    // error u), halved (exact, except below the normal range: absolute error η), and the two
    // halves summed with one more rounding: |hook − (a_0 + a_1)/2| ≤ (2u + u²)·(|a_0| + |a_1|)/2
    // + 4η elementwise (u = 2⁻¹¹, η = 2⁻²⁵ for fp16; u = 2⁻⁸, η = 2⁻¹³⁴ for bf16). The first
    // AdamW step lr·g/(|g| + ε) (m̂ = g, v̂ = g²) moves by at most lr·|Δg| (ε = 1), so each tensor's
    // bound is the fp32 one plus 2·lr·2·((2u + u²)·h + 4η), h its largest (|a_0| + |a_1|)/2 — the
    // same doubling as `weight_bounds`.
    let one = Variant {
        steps: 1,
        ..Variant::default()
    };
    let (want, _, steps) = reference_with(GatherMode::Aggregate, false, &one)?;
    let fp32 = weight_bounds(&steps);
    let h = local_gradient_scales()?;
    let lr = steps[0].0;
    for (spec, u, eta) in [
        ("aggregate+fp16hook", 2f64.powi(-11), 2f64.powi(-25)),
        ("aggregate+bf16hook", 2f64.powi(-8), 2f64.powi(-134)),
    ] {
        let bounds: BTreeMap<String, f64> = fp32
            .iter()
            .map(|(k, b)| {
                let hk = h.get(k).copied().unwrap_or(0.0);
                (
                    k.clone(),
                    b + 2.0 * lr * 2.0 * ((2.0 * u + u * u) * hk + 4.0 * eta),
                )
            })
            .collect();
        let (got, _) = run_spec(&dir, spec)?;
        check(spec, &want, &got, &bounds)?;
        // The compression must show: some tensor is off by more than fp32 rounding allows.
        let (d, b) = worst_against(&want, &got, &fp32)?;
        ensure!(
            d > b,
            "{spec} is within fp32 rounding ({d:e} ≤ {b:e}): no compression?"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn rendezvous_timeout_is_an_error() -> Result<()> {
    let port = free_port()?;
    let env = DistEnv::from_vars(|k| {
        env_for(0, port)
            .into_iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v)
    })?
    .context("env")?;
    let start = Instant::now();
    let err = Ddp::init(
        &env,
        Backend::Gloo,
        Duration::from_secs(2),
        GatherMode::Aggregate,
    )
    .err()
    .context("rank 0 alone formed a world of two")?;
    let took = start.elapsed();
    println!("rendezvous timeout after {took:?}: {err}");
    ensure!(took < Duration::from_secs(30), "took {took:?}");
    Ok(())
}

/// Rank 1 gets `signal` after its second step (workers' collective timeout: `timeout`); returns
/// how long rank 0 took to stop after that, and its stderr. Rank 0 must fail, naming the
/// collective.
fn lose_rank_1(signal: &str, timeout: Duration) -> Result<(Duration, String)> {
    let dir = temp(&format!("lose-{signal}"))?;
    let out = dir.join("w.safetensors").to_string_lossy().to_string();
    let port = free_port()?;
    let deadline = Instant::now() + DEADLINE;
    let args = ["steps", "aggregate", &out, "100000"];
    let spawn = |rank| -> Result<Child> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("worker").args(args);
        for (k, v) in env_for(rank, port) {
            cmd.env(k, v);
        }
        Ok(cmd
            .env("CNCLIP_TEST_TIMEOUT_MS", timeout.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let rank0 = spawn(0)?;
    let mut rank1 = spawn(1)?;
    let stdout = rank1.stdout.take().context("stdout")?;
    for line in BufReader::new(stdout).lines() {
        if line? == "step 2" {
            break;
        }
        ensure!(Instant::now() < deadline, "rank 1 made no progress");
    }
    let sent = Command::new("kill")
        .args([format!("-{signal}"), rank1.id().to_string()])
        .status()?;
    ensure!(sent.success(), "kill -{signal} failed");
    let lost_at = Instant::now();
    let finished = finish(rank0, deadline);
    let took = lost_at.elapsed();
    let _ = rank1.kill();
    let _ = rank1.wait();
    let (ok, _, err, _) = finished?;
    let last = err
        .lines()
        .filter(|l| l.starts_with("Error"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("rank 0 stopped {took:?} after SIG{signal} to rank 1: {last}");
    ensure!(!ok, "rank 0 succeeded although rank 1 got SIG{signal}");
    ensure!(
        // The loss's gather names itself (`all_gather`, `all_reduce`); a rank lost while the
        // reducer's hooks all-reduce inside backward surfaces as the trainer's backward error,
        // which names the gradient all-reduce (which one the kill lands in depends on timing).
        err.contains("failed")
            && (err.contains("all_gather")
                || err.contains("all_reduce")
                || err.contains("gradient all-reduce")),
        "rank 0's error does not say which collective failed:\n{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok((took, last))
}

/// A rank that dies: the other notices the closed connection at once.
fn killed_rank_stops_the_others() -> Result<()> {
    let (took, _) = lose_rank_1("KILL", TIMEOUT)?;
    ensure!(took < TIMEOUT + Duration::from_secs(10), "took {took:?}");
    Ok(())
}

/// A rank that stalls (SIGSTOP: its sockets stay open): the other gives up after the collective
/// timeout, with an error.
fn stalled_rank_times_out() -> Result<()> {
    let timeout = Duration::from_secs(3);
    let (took, _) = lose_rank_1("STOP", timeout)?;
    ensure!(
        took < timeout + Duration::from_secs(10),
        "rank 0 took {took:?} with a {timeout:?} timeout"
    );
    Ok(())
}

/// Under our launcher, a worker that exits with an error stops the whole job with its error.
fn launcher_stops_all_when_one_dies() -> Result<()> {
    let dir = temp("launch")?;
    let out = dir.join("w.safetensors").to_string_lossy().to_string();
    let config = LaunchConfig {
        program: std::env::current_exe()?,
        args: ["worker", "steps", "aggregate", &out, "2"]
            .iter()
            .map(Into::into)
            .collect(),
        nproc_per_node: WORLD,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port()?,
    };
    let start = Instant::now();
    let result = launch(&config);
    println!("launcher returned after {:?}: {result:?}", start.elapsed());
    match result {
        Err(LaunchError::WorkerFailed {
            rank: 1, status, ..
        }) => {
            ensure!(status.code() == Some(3), "rank 1 exited with {status}");
        }
        Err(LaunchError::WorkerFailed { rank: 0, tail, .. }) => {
            // Both went down within one poll; rank 0's error must then name the lost peer.
            ensure!(tail.contains("failed"), "{tail}");
        }
        other => bail!("expected a worker failure, got {other:?}"),
    }
    ensure!(
        start.elapsed() < DEADLINE,
        "launcher took {:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn lmdb(dir: &Path) -> Result<PathBuf> {
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw)?;
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loop");
    std::fs::copy(fx.join("train_imgs.tsv"), raw.join("train_imgs.tsv"))?;
    std::fs::copy(fx.join("train_texts.jsonl"), raw.join("train_texts.jsonl"))?;
    let out = dir.join("lmdb");
    muge_data::build_split(
        &raw,
        "train",
        &out,
        muge_data::files::BadRecordPolicy::Fail,
        &mut |_| {},
    )?;
    Ok(out.join("train"))
}

/// A whole 2-rank run: rank 0 alone writes the checkpoints and the metrics (once per step), and a
/// resumed 2-rank run continues from them.
fn checkpoints_written_once_and_resumed() -> Result<()> {
    let dir = temp("run")?;
    let data = lmdb(&dir)?.to_string_lossy().to_string();
    let logs = dir.join("logs");
    let logs_s = logs.to_string_lossy().to_string();
    let run = |steps: &str, resume: bool| -> Result<Vec<u32>> {
        let port = free_port()?;
        let deadline = Instant::now() + DEADLINE;
        let mut args = vec!["run", &data, &logs_s, steps];
        if resume {
            args.push("resume");
        }
        let children: Vec<Child> = (0..WORLD)
            .map(|r| spawn_worker(r, port, &args))
            .collect::<Result<_>>()?;
        let pids: Vec<u32> = children.iter().map(Child::id).collect();
        for (r, child) in children.into_iter().enumerate() {
            let (ok, _, err, _) = finish(child, deadline)?;
            ensure!(ok, "rank {r} failed:\n{err}");
        }
        Ok(pids)
    };
    let pids = run("3", false)?;
    let checkpoints = logs.join("ddp/checkpoints");
    for stem in ["epoch_1_2", "epoch_latest"] {
        let meta = cnclip_model::weights::read_safetensors_metadata(
            checkpoints.join(format!("{stem}.safetensors")),
        )?;
        let id = meta.get("cnclip.checkpoint_id").context("checkpoint id")?;
        let writer: u32 = id.rsplit('-').next().context("pid")?.parse()?;
        ensure!(
            writer == pids[0],
            "{stem} was written by pid {writer}, not rank 0 ({})",
            pids[0]
        );
    }
    let records = cnclip_train::metrics::read_records(&logs.join("ddp/metrics.jsonl"))?;
    ensure!(
        records.len() == 3,
        "{} metrics records for 3 steps",
        records.len()
    );
    run("4", true)?;
    let records = cnclip_train::metrics::read_records(&logs.join("ddp/metrics.jsonl"))?;
    ensure!(
        records.len() == 4,
        "{} metrics records after resuming to 4 steps",
        records.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

type TestFn = fn() -> Result<()>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        if let Err(e) = worker(&args[1..]) {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    // `cargo test` passes harness flags (e.g. --nocapture); a name filter runs matching tests only.
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let tests: [(&str, TestFn); 7] = [
        ("two_ranks_equal_one_process", two_ranks_equal_one_process),
        (
            "reducer_variants_equal_one_process",
            reducer_variants_equal_one_process,
        ),
        (
            "rendezvous_timeout_is_an_error",
            rendezvous_timeout_is_an_error,
        ),
        ("killed_rank_stops_the_others", killed_rank_stops_the_others),
        ("stalled_rank_times_out", stalled_rank_times_out),
        (
            "launcher_stops_all_when_one_dies",
            launcher_stops_all_when_one_dies,
        ),
        (
            "checkpoints_written_once_and_resumed",
            checkpoints_written_once_and_resumed,
        ),
    ];
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in tests {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let start = Instant::now();
        match test() {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:?})", start.elapsed());
            }
            Err(e) => {
                println!("test {name} ... FAILED ({:?}): {e:#}", start.elapsed());
                failed.push(name);
            }
        }
    }
    println!(
        "test result: {}. {passed} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len()
    );
    ensure!(failed.is_empty(), "failed: {failed:?}");
    Ok(())
}
