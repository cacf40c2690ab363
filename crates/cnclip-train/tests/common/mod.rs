//! Shared by the integration tests: a tiny model config (2 ViT blocks, 2 BERT layers), the tiny
//! fixture model, temporary directories and the loop fixture built into an LMDB. Each test binary
//! uses some of these.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::{Clip, ClipConfig, LoadOptions};
use cnclip_train::freeze::Freeze;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{TrainPrecision, TrainerConfig};
use muge_data::files::BadRecordPolicy;
use std::path::{Path, PathBuf};
use tch::Device;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh directory for this test process.
pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// cnclip-model's tiny ViT fixture (an official-layout `.pt`).
pub fn tiny_model() -> Clip {
    tiny_model_from(&repo().join("crates/cnclip-model/tests/fixtures/model/tiny_vit.pt"))
}

/// Official-layout `.pt` weights of cnclip-model's tiny ViT + BERT configs (e.g. a loop fixture's
/// `init_checkpoint`).
pub fn tiny_model_from(path: &Path) -> Clip {
    let fx = repo().join("crates/cnclip-model/tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &fx.join("configs/tiny-vit.json"),
        &fx.join("configs/tiny-bert.json"),
    )
    .unwrap();
    Clip::load(
        path,
        &LoadOptions {
            config: Some(config),
            ..Default::default()
        },
        Device::Cpu,
    )
    .unwrap()
}

/// The loop fixture's raw files as a `train` split, built into an LMDB by muge-data.
pub fn lmdb(tag: &str) -> PathBuf {
    let raw = temp(&format!("raw-{tag}"));
    let fx = repo().join("crates/cnclip-train/tests/fixtures/loop");
    std::fs::copy(fx.join("train_imgs.tsv"), raw.join("train_imgs.tsv")).unwrap();
    std::fs::copy(fx.join("train_texts.jsonl"), raw.join("train_texts.jsonl")).unwrap();
    let out = temp(&format!("lmdb-{tag}"));
    muge_data::build_split(&raw, "train", &out, BadRecordPolicy::Fail, &mut |_| {}).unwrap();
    out.join("train")
}

/// A tiny ViT + BERT config whose text tower has dropout `dropout`.
pub fn tiny_config(dropout: f64) -> ClipConfig {
    let mut config = ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,"vision_patch_size":8,
            "vision_head_width":16,"vocab_size":300,"text_attention_probs_dropout_prob":0.0,
            "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
            "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny test config",
    )
    .expect("the tiny config is valid");
    config.text.text_hidden_dropout_prob = dropout;
    config.text.text_attention_probs_dropout_prob = dropout;
    config
}

/// A ResNet of one bottleneck per stage, 8 wide (256-wide attention pool, 4 heads), on 64-pixel
/// images, with the tiny BERT of [`tiny_config`] (no dropout).
pub fn tiny_resnet_config() -> ClipConfig {
    ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":64,"vision_layers":"[1,1,1,1]","vision_width":8,
            "vision_patch_size":null,"vocab_size":300,"text_attention_probs_dropout_prob":0.0,
            "text_hidden_act":"gelu","text_hidden_dropout_prob":0.0,"text_hidden_size":24,
            "text_initializer_range":0.02,"text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny ResNet config",
    )
    .expect("the tiny ResNet config is valid")
}

/// The learning rate of [`sgd_like_trainer_config`].
pub const SGD_LIKE_LR: f64 = 0.5;
/// Adam's epsilon in [`sgd_like_trainer_config`].
pub const SGD_LIKE_EPS: f64 = 1.0;

/// One fp32 step per batch with AdamW whose epsilon is large: Adam then behaves like momentum SGD,
/// moving weights in proportion to their gradients, so a gradient off by a factor (say a missing
/// 1/W) moves the weights visibly instead of being normalised away.
pub fn sgd_like_trainer_config() -> TrainerConfig {
    plain_trainer_config(
        CosineSchedule {
            base_lr: SGD_LIKE_LR,
            warmup: 0,
            total_steps: 100,
        },
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: SGD_LIKE_EPS,
            weight_decay: 0.1,
        },
    )
}

/// `schedule` and `adamw` with nothing else: fp32, one micro-batch per step, nothing frozen, no
/// dropout re-seeding, no gradient checkpointing, no FLIP masking.
pub fn plain_trainer_config(schedule: CosineSchedule, adamw: AdamWConfig) -> TrainerConfig {
    TrainerConfig {
        schedule,
        adamw,
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: None,
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
        mask_ratio: 0.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Rounding bounds for comparing two f32 computations of the same quantity.
//
// Two training paths that are equal in exact arithmetic (one batch vs accumulated micro-batches,
// checkpointed vs recorded backward, one process vs ranks) still round differently: libtorch
// picks GEMM blockings by shape and CPU (MKL on Intel vs AMD, OpenBLAS or KleidiAI on aarch64),
// so they sum the same products in other orders. The bounds below follow from that alone and hold
// on any IEEE-754 CPU; none was measured on one machine.

/// f32's unit roundoff, 2⁻²⁴.
pub const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// The longest reduction in the tiny models' forward or backward pass: the MLP's 4 × 32 = 128
/// hidden units feeding `c_proj`, which is longer than any batch × token sum (6 rows × 17 tokens).
pub const TINY_LONGEST_SUM: f64 = 128.0;

/// Reductions stacked on the longest path through the tiny models, forward and backward: per
/// transformer block LayerNorm, q/k/v, scores, softmax-weighted values, out-projection,
/// LayerNorm, two MLP GEMMs (8), times 2 blocks, plus stem, final LayerNorm and projection, once
/// forward and once backward: 2 × (2 × 8 + 3) = 38, rounded up to 40.
pub const TINY_STACKED_SUMS: f64 = 40.0;

/// The relative error with which two orderings of the tiny models' computation can disagree.
/// Rounding a sum of n products in any order errs by at most γₙ = n·u times the sum of their
/// magnitudes (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), but that worst
/// case needs every rounding to go the same way; treating roundings as independent and mean-zero,
/// the error exceeds λ·√n·u of that magnitude with probability at most 2·exp(−λ²/2) (Higham &
/// Mary, SIAM J. Sci. Comput. 41(5), 2019, Thm. 2.8). Stacked sums add independent errors, so
/// k of them give λ·√(k·n)·u. With k = 40, n = 128 and λ = 8 (a chance below 3e-14 per value of
/// being exceeded): 8 × √5120 × 2⁻²⁴ ≈ 3.4e-5 of the magnitude of its terms. Real bugs of the
/// kinds these tests target (a micro-batch counted twice, a missing 1/W, a wrong `logit_scale`
/// factor, a rate off by 0.1 %) change gradients or steps by far more.
pub fn tiny_rounding_bound() -> f64 {
    rounding_bound(TINY_LONGEST_SUM)
}

/// The same bound for a tiny model whose longest sum has `longest_sum` terms (40 stacked sums).
pub fn rounding_bound(longest_sum: f64) -> f64 {
    const LAMBDA: f64 = 8.0;
    LAMBDA * (TINY_STACKED_SUMS * longest_sum).sqrt() * F32_UNIT_ROUNDOFF
}

/// Attention key biases get an analytically zero gradient: adding one constant to every key score
/// of a query leaves its softmax unchanged. What any implementation computes there is rounding
/// noise, so they are checked to be noise (below the bound relative to the largest gradient of
/// the model), not compared element by element. In a ViT they are the middle third of
/// `attn.in_proj_bias`; in BERT, `attention.self.key.bias`.
pub fn analytically_zero_part(key: &str, gradient: &tch::Tensor) -> Option<tch::Tensor> {
    if key.ends_with("attention.self.key.bias") {
        Some(gradient.shallow_clone())
    } else if key.ends_with("attn.in_proj_bias") {
        let width = gradient.size()[0] / 3;
        Some(gradient.narrow(0, width, width))
    } else {
        None
    }
}

/// The comparable rest of a gradient: everything but its analytically zero part.
fn comparable_part(key: &str, gradient: &tch::Tensor) -> tch::Tensor {
    if key.ends_with("attention.self.key.bias") {
        gradient.narrow(0, 0, 0)
    } else if key.ends_with("attn.in_proj_bias") {
        let width = gradient.size()[0] / 3;
        tch::Tensor::cat(
            &[
                gradient.narrow(0, 0, width),
                gradient.narrow(0, 2 * width, width),
            ],
            0,
        )
    } else {
        gradient.shallow_clone()
    }
}

fn max_abs(t: &tch::Tensor) -> f64 {
    if t.numel() == 0 {
        0.0
    } else {
        t.abs().max().double_value(&[])
    }
}

/// Asserts that the gradients left on `a`'s and `b`'s parameters are the same gradient computed
/// in two orders: defined on the same parameters, each element within `bound` × the tensor's
/// largest gradient (the magnitude of the terms its elements sum), analytically zero parts below
/// `bound` × the model's largest gradient on both sides. `expected_a` maps a's gradient to what
/// b should hold (e.g. a known factor on `logit_scale`). Returns how many tensors were compared.
pub fn assert_same_gradients(
    a: &Clip,
    b: &Clip,
    bound: f64,
    expected_a: impl Fn(&str, tch::Tensor) -> tch::Tensor,
    context: &str,
) -> usize {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    let largest = a
        .values()
        .map(|t| t.grad())
        .filter(|g| g.defined())
        .map(|g| max_abs(&g))
        .fold(0.0, f64::max);
    assert!(largest > 0.0, "{context}: no gradient at all");
    let mut compared = 0;
    for (key, tensor) in &a {
        let (ga, gb) = (tensor.grad(), b[key].grad());
        assert_eq!(
            ga.defined(),
            gb.defined(),
            "{context} {key}: gradient on one side only"
        );
        if !ga.defined() {
            continue;
        }
        let ga = expected_a(key, ga);
        if let (Some(za), Some(zb)) = (
            analytically_zero_part(key, &ga),
            analytically_zero_part(key, &gb),
        ) {
            for (side, z) in [("a", za), ("b", zb)] {
                let noise = max_abs(&z);
                assert!(
                    noise <= bound * largest,
                    "{context} {key} ({side}): analytically zero part is {noise:e}, not noise \
                     (largest gradient {largest:e})"
                );
            }
        }
        let (ca, cb) = (comparable_part(key, &ga), comparable_part(key, &gb));
        let scale = max_abs(&ca);
        let diff = max_abs(&(&ca - &cb));
        assert!(
            diff <= bound * scale,
            "{context} {key}: gradients differ by {diff:e} (scale {scale:e}, bound {:e})",
            bound * scale
        );
        compared += 1;
    }
    compared
}

/// Asserts that one AdamW step from the same weights `w0` moved `a` and `b` as their own gradients
/// (still on the parameters) imply. On the first step Adam's bias-corrected moments are m̂ = g and
/// v̂ = g², so each element moves by lr·g/(|g| + ε) besides the weight decay both share. Where |g|
/// is near the rounding noise that is ±lr either way, so the two runs' weights are compared with
/// the difference their gradients predict: |w_a − w_b| ≤ lr·|f(g_a) − f(g_b)| + 8u(|w0| + lr),
/// f(g) = g/(|g| + ε), the last term covering the few rounded operations of the update itself.
pub fn assert_first_adam_step_matches(
    w0: &std::collections::BTreeMap<String, tch::Tensor>,
    a: &Clip,
    b: &Clip,
    lr: f64,
    eps: f64,
    context: &str,
) {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    let direction = |g: &tch::Tensor| {
        let g = g.to_kind(tch::Kind::Double);
        &g / (g.abs() + eps)
    };
    for (key, wa) in &a {
        if !wa.is_floating_point() {
            continue;
        }
        let (wb, start) = (&b[key], w0[key].to_kind(tch::Kind::Double));
        let diff = (wa.to_kind(tch::Kind::Double) - wb.to_kind(tch::Kind::Double)).abs();
        let (ga, gb) = (wa.grad(), wb.grad());
        let predicted = if ga.defined() && gb.defined() {
            (direction(&ga) - direction(&gb)).abs() * lr
        } else {
            tch::Tensor::zeros_like(&diff)
        };
        let allowed = predicted + (start.abs() + lr) * (8.0 * F32_UNIT_ROUNDOFF);
        let excess = (&diff - &allowed).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{context} {key}: weights differ by up to {:e}, {excess:e} more than their gradients \
             explain",
            diff.max().double_value(&[])
        );
    }
}
