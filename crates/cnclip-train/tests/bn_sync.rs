//! `--use-bn-sync`: a tiny ResNet tower trained one step by two Gloo ranks (threads of this test)
//! × 3 rows with SyncBatchNorm equals one process on the 6 concatenated rows — gradients, the
//! BatchNorms' running statistics, the loss and the weights after the step — and the same two ranks
//! with per-rank BatchNorm statistics (what `--use-bn-sync` fixes) differ from it by far more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_model::Clip;
use cnclip_model::model::BatchNormMode;
use cnclip_train::ddp::{Ddp, DistEnv, GatherMode};
use cnclip_train::trainer::Trainer;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use torch_ext::dist::Backend;

/// torch's global RNG is shared by this binary's tests.
static TORCH_RNG: Mutex<()> = Mutex::new(());

const WORLD: usize = 2;
const BATCH: i64 = 3; // per rank
const LR: f64 = common::SGD_LIKE_LR;

/// Name → (value, gradient) of every tensor of a model (gradient undefined for buffers).
type State = BTreeMap<String, (Tensor, Tensor)>;

fn state(model: &Clip) -> State {
    model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, (t.detach().copy(), copy(&t.grad()))))
        .collect()
}

/// A copy, or the undefined tensor.
fn copy(t: &Tensor) -> Tensor {
    if t.defined() {
        t.copy()
    } else {
        t.shallow_clone()
    }
}

fn model_from(init: &State) -> Clip {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    model_from_locked(init)
}

/// [`model_from`] for a caller that holds `TORCH_RNG` (`Clip::new` draws random weights).
fn model_from_locked(init: &State) -> Clip {
    let model = Clip::new(&common::tiny_resnet_config(), Device::Cpu);
    let tensors = model.named_tensors();
    tch::no_grad(|| {
        for (key, (value, _)) in init {
            tensors[key].shallow_clone().copy_(value);
        }
    });
    model
}

/// The initial weights, the 6-row batch (images, token ids) and the single process's state after
/// one step on all 6 rows with its loss.
fn setup() -> (State, Tensor, Tensor, State, f64) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let init = state(&Clip::new(&common::tiny_resnet_config(), Device::Cpu));
    let n = BATCH * WORLD as i64;
    // Channel offsets make per-rank statistics visibly different from the global ones.
    let images = Tensor::randn([n, 3, 64, 64], (Kind::Float, Device::Cpu))
        + Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1, 1, 1]) * 0.5;
    let texts = Tensor::randint_low(1, 300, [n, 12], (Kind::Int64, Device::Cpu));
    let _ = texts.narrow(1, 9, 3).fill_(0);
    let mut single = Trainer::new(model_from_locked(&init), common::sgd_like_trainer_config());
    let report = single.train_batch(&images, &texts).unwrap().unwrap();
    (init, images, texts, state(single.model()), report.loss)
}

/// Rank `rank` of the Gloo group of `WORLD` threads of this process meeting at `port`.
fn thread_rank(rank: usize, port: u16, gather: GatherMode) -> Ddp {
    let env = DistEnv {
        rank,
        world_size: WORLD,
        local_rank: rank,
        local_world_size: WORLD,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
        gloo_interface: None,
    };
    Ddp::init(&env, Backend::Gloo, Duration::from_secs(30), gather).unwrap()
}

/// Two ranks (threads) of one step with `--gather-with-grad`, whose averaged gradients are the
/// single process's on the concatenated batch; `sync`: SyncBatchNorm, else per-rank statistics.
fn two_ranks(init: &State, images: &Tensor, texts: &Tensor, sync: bool) -> Vec<(State, f64)> {
    let port = cnclip_train::ddp::launch::free_port().unwrap();
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            let init: State = init
                .iter()
                .map(|(k, (v, g))| (k.clone(), (v.copy(), copy(g))))
                .collect();
            let rows = |t: &Tensor| t.narrow(0, rank as i64 * BATCH, BATCH).copy();
            let (images, texts) = (rows(images), rows(texts));
            std::thread::spawn(move || {
                let ddp = thread_rank(rank, port, GatherMode::WithGrad);
                let mut model = model_from(&init);
                if sync {
                    model.set_batch_norm_mode(BatchNormMode::Synced(ddp.process_group()));
                }
                let mut trainer =
                    Trainer::with_gather(model, common::sgd_like_trainer_config(), ddp.gather());
                let sync = ddp.gradient_sync(trainer.model()).unwrap();
                trainer.set_gradient_sync(sync);
                let report = trainer.train_batch(&images, &texts).unwrap().unwrap();
                (state(trainer.model()), report.loss)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_abs(t: &Tensor) -> f64 {
    if t.numel() == 0 {
        0.0
    } else {
        t.abs().max().to_kind(Kind::Double).double_value(&[])
    }
}

/// How far rounding alone can take the two computations apart, relative to the magnitude of a
/// tensor's values. The argument of `common::rounding_bound` (λ·√(k·n)·u, λ = 8) with this model's
/// numbers: the longest sums are the stem's, over the 6 × 32 × 32 = 6144 positions of the first
/// feature map (conv1's weight gradient, bn1's statistics); the longest path stacks stem (3 conv +
/// 3 BatchNorm), four bottlenecks (3 conv + 3 BatchNorm + downsample conv and BatchNorm each),
/// attention pool (mean, q/k/v, scores, weighted sum, projection) and the loss, 46 sums forward and
/// as many backward: k = 100 with margin. 8·√(100·6144)·2⁻²⁴ ≈ 3.7e-4.
fn bound() -> f64 {
    8.0 * (100.0_f64 * 6144.0).sqrt() * common::F32_UNIT_ROUNDOFF
}

/// The largest difference of any tensor between `rank` and `single`, in units of its bound:
/// gradients relative to the tensor's largest gradient, running statistics relative to their
/// largest value, weights after the step as the first Adam step implies (an ε = 1 step
/// lr·g/(|g|+1) moves by at most lr·|Δg| when g moves by Δg, plus 8u of the update's own
/// rounding; see `common::assert_first_adam_step_matches`). Returns (worst ratio, its tensor).
///
/// Key biases (BERT's, the attention pool's `k_proj.bias`) have an analytically zero gradient
/// (see `common::analytically_zero_part`): their rounding noise is measured against the model's
/// largest gradient.
fn worst(rank: &State, single: &State, init: &State) -> (f64, String) {
    let rho = bound();
    let largest = single
        .values()
        .filter(|(_, g)| g.defined())
        .map(|(_, g)| max_abs(g))
        .fold(0.0, f64::max);
    let mut worst = (0.0, String::new());
    let mut note = |ratio: f64, what: String| {
        if ratio > worst.0 || ratio.is_nan() {
            worst = (ratio, what);
        }
    };
    for (key, (value, grad)) in single {
        let (rv, rg) = &rank[key];
        assert_eq!(
            grad.defined(),
            rg.defined(),
            "{key}: gradient on one side only"
        );
        if !value.is_floating_point() {
            // num_batches_tracked: counted, not rounded.
            assert!(rv.equal(value), "{key}: {rv:?} vs {value:?}");
            continue;
        }
        if grad.defined() {
            let zero =
                key.ends_with("k_proj.bias") || common::analytically_zero_part(key, grad).is_some();
            let scale = if zero { largest } else { max_abs(grad) };
            note(
                max_abs(&(rg - grad)) / (rho * scale),
                format!("{key} gradient"),
            );
            let allowed =
                LR * rho * scale + 8.0 * common::F32_UNIT_ROUNDOFF * (max_abs(&init[key].0) + LR);
            note(max_abs(&(rv - value)) / allowed, format!("{key} weight"));
        } else {
            // Buffers: the running statistics.
            let scale = max_abs(value);
            note(
                max_abs(&(rv - value)) / (rho * scale),
                format!("{key} (buffer)"),
            );
        }
    }
    worst
}

#[test]
fn two_ranks_with_bn_sync_equal_one_process_on_the_global_batch() {
    let (init, images, texts, single, loss) = setup();
    let rho = bound();
    let synced = two_ranks(&init, &images, &texts, true);
    for (rank, (state, rank_loss)) in synced.iter().enumerate() {
        // The global loss, seen by every rank with --gather-with-grad.
        assert!(
            (rank_loss - loss).abs() <= rho * loss.abs(),
            "rank {rank}: loss {rank_loss} vs {loss}"
        );
        let (ratio, what) = worst(state, &single, &init);
        println!("rank {rank} with --use-bn-sync: worst {what}, {ratio:.4} × its bound");
        assert!(
            ratio <= 1.0,
            "rank {rank} with --use-bn-sync: {what} differs by {ratio:.3} × its bound"
        );
    }
    // Buffers were updated at all (else the comparison above would be vacuous for them).
    let key = "visual.bn1.running_mean";
    assert!(max_abs(&single[key].0) > 0.0, "{key} was not updated");
    assert_eq!(
        single["visual.bn1.num_batches_tracked"].0.int64_value(&[]),
        1
    );

    // Without SyncBatchNorm each rank normalises with its own 3 rows: the check above must fail.
    let local = two_ranks(&init, &images, &texts, false);
    let (ratio, what) = worst(&local[0].0, &single, &init);
    println!("rank 0 without: worst {what}, {ratio:.1} × its bound");
    assert!(
        ratio > 100.0,
        "per-rank BatchNorm statistics differ from the global ones by only {ratio:.3} × the bound \
         ({what}): the test could not tell SyncBatchNorm from BatchNorm"
    );
}

/// The run wiring: `--use-bn-sync` attaches the run's process group to the BatchNorms only on
/// several processes; `--freeze-vision` keeps them in eval mode (cn_clip's `freeze_vision_bn`).
#[test]
fn run_settings_pick_the_batch_norm_mode() {
    use cnclip_train::RunConfig;
    use cnclip_train::run::batch_norm_mode;
    let sync = RunConfig {
        use_bn_sync: true,
        ..RunConfig::default()
    };
    let frozen = RunConfig {
        freeze_vision: true,
        ..sync.clone()
    };
    assert!(matches!(batch_norm_mode(&sync, None), BatchNormMode::Batch));
    assert!(matches!(
        batch_norm_mode(&frozen, None),
        BatchNormMode::Frozen
    ));
    let port = cnclip_train::ddp::launch::free_port().unwrap();
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            let (sync, frozen) = (sync.clone(), frozen.clone());
            std::thread::spawn(move || {
                let ddp = thread_rank(rank, port, GatherMode::Aggregate);
                let plain = RunConfig::default();
                let synced = matches!(
                    batch_norm_mode(&sync, Some(&ddp)),
                    BatchNormMode::Synced(g) if g.size() == WORLD && g.rank() == rank
                );
                let batch = matches!(batch_norm_mode(&plain, Some(&ddp)), BatchNormMode::Batch);
                let eval = matches!(batch_norm_mode(&frozen, Some(&ddp)), BatchNormMode::Frozen);
                (synced, batch, eval)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), (true, true, true));
    }
}

#[test]
fn frozen_batch_norms_train_with_running_statistics() {
    let (init, images, texts, ..) = setup();
    let mut model = model_from(&init);
    model.set_batch_norm_mode(BatchNormMode::Frozen);
    let mut trainer = Trainer::new(model, common::sgd_like_trainer_config());
    trainer.train_batch(&images, &texts).unwrap().unwrap();
    let after = state(trainer.model());
    for key in ["visual.bn1.running_mean", "visual.layer1.0.bn3.running_var"] {
        assert!(after[key].0.equal(&init[key].0), "{key} moved under Frozen");
    }
    assert_eq!(
        after["visual.bn1.num_batches_tracked"].0.int64_value(&[]),
        0
    );
    // Inference forwards never touch the statistics either.
    let model = model_from(&init);
    let _ = tch::no_grad(|| model.encode_image_t(&images, false));
    let key = "visual.bn1.running_mean";
    assert!(model.named_tensors()[key].equal(&init[key].0));
}
