//! Small building blocks shared by the towers. Each holds the tensors registered in the model's
//! `VarStore` under cn_clip's names, so the forward code reads like cn_clip's modules.

use super::delta::{self, DeltaSlot};
use std::sync::Arc;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};
use torch_ext::dist::ProcessGroup;
use torch_ext::sync_bn::{RunningStats, sync_batch_norm};

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`, `y = x Wᵀ + b` (+ an adapter's delta
/// when its slot is filled).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub delta: DeltaSlot,
}

impl Linear {
    /// Weights `~ N(0, std)`, bias zero (BERT's and the attention pool's init).
    pub fn new(p: &Path, input: i64, output: i64, std: f64) -> Self {
        let weight = p.var(
            "weight",
            &[output, input],
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        );
        let bias = Some(p.var("bias", &[output], Init::Const(0.0)));
        Self {
            weight,
            bias,
            delta: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }

    /// `train` reaches the delta only (the map itself has no training mode).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        delta::apply(
            &self.delta,
            x,
            x.linear(&self.weight, self.bias.as_ref()),
            train,
        )
    }
}

/// `nn.LayerNorm` with elementwise affine.
///
/// `compute_in_fp32` reproduces cn_clip's vision `LayerNorm` subclass, which upcasts its input to
/// fp32 and casts the result back; BERT uses the plain module (computes in the input's dtype).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub compute_in_fp32: bool,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64, compute_in_fp32: bool) -> Self {
        let weight = p.var("weight", &[dim], Init::Const(1.0));
        let bias = p.var("bias", &[dim], Init::Const(0.0));
        Self {
            weight,
            bias,
            eps,
            compute_in_fp32,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.compute_in_fp32 && x.kind() != Kind::Float {
            let y = x.to_kind(Kind::Float).layer_norm(
                [self.dim],
                Some(&self.weight.to_kind(Kind::Float)),
                Some(&self.bias.to_kind(Kind::Float)),
                self.eps,
                true,
            );
            return y.to_kind(x.kind());
        }
        let (w, b) = if self.weight.kind() == x.kind() {
            (self.weight.shallow_clone(), self.bias.shallow_clone())
        } else {
            (self.weight.to_kind(x.kind()), self.bias.to_kind(x.kind()))
        };
        x.layer_norm([self.dim], Some(&w), Some(&b), self.eps, true)
    }
}

/// How the training forwards of a ResNet's BatchNorms normalise (inference forwards always use the
/// running statistics). Set with [`crate::Clip::set_batch_norm_mode`]; training code picks it,
/// the model only carries it out.
#[derive(Debug, Clone, Default)]
pub enum BatchNormMode {
    /// `nn.BatchNorm2d` after `model.train()`: the batch's own statistics, running statistics
    /// updated (momentum 0.1, unbiased variance) and `num_batches_tracked` counted.
    #[default]
    Batch,
    /// `nn.SyncBatchNorm` (cn_clip's `--use-bn-sync`): as [`BatchNormMode::Batch`] over the global
    /// batch of every rank of the process group ([`torch_ext::sync_bn`]). Every rank must run the
    /// same training forwards and backwards, like any collective.
    Synced(Arc<ProcessGroup>),
    /// `eval()` BatchNorms also in training forwards (cn_clip's `--freeze-vision`).
    Frozen,
}

/// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1) with the buffers cn_clip checkpoints carry
/// (`running_mean`, `running_var`, `num_batches_tracked`).
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm2d {
    pub fn new(p: &Path, channels: i64) -> Self {
        let weight = p.var("weight", &[channels], Init::Const(1.0));
        let bias = p.var("bias", &[channels], Init::Const(0.0));
        let running_mean = p.zeros_no_train("running_mean", &[channels]);
        let running_var = p.ones_no_train("running_var", &[channels]);
        let num_batches_tracked = p.add(
            "num_batches_tracked",
            Tensor::zeros([], (Kind::Int64, p.device())),
            false,
        );
        Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
        }
    }

    /// In training mode (`train`) as `mode` says; in inference mode with the running statistics.
    ///
    /// # Panics
    /// With [`BatchNormMode::Synced`], when the collective fails (a peer died or timed out): the
    /// forward has no error channel, as for any failing libtorch op.
    pub fn forward_t(&self, x: &Tensor, train: bool, mode: &BatchNormMode) -> Tensor {
        let training = train && !matches!(mode, BatchNormMode::Frozen);
        if training {
            // nn.BatchNorm2d counts every training forward, with or without gradient.
            let mut count = self.num_batches_tracked.shallow_clone();
            let _ = count.g_add_scalar_(1);
        }
        match (training, mode) {
            (true, BatchNormMode::Synced(group)) => {
                let running = RunningStats {
                    mean: &self.running_mean,
                    var: &self.running_var,
                    momentum: BN_MOMENTUM,
                };
                sync_batch_norm(x, &self.weight, &self.bias, Some(running), BN_EPS, group)
                    .unwrap_or_else(|e| panic!("{e}"))
            }
            _ => Tensor::batch_norm(
                x,
                Some(&self.weight),
                Some(&self.bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                training,
                BN_MOMENTUM,
                BN_EPS,
                true,
            ),
        }
    }
}

/// A bias-free 2-D convolution weight `[out, in, k, k]`.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(p: &Path, input: i64, output: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        let fan_in = (input * kernel * kernel) as f64;
        let bound = (1.0 / fan_in).sqrt();
        let weight = p.var(
            "weight",
            &[output, input, kernel, kernel],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        Self {
            weight,
            stride,
            padding,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// CLIP's `x * sigmoid(1.702 x)` (the vision MLP activation; BERT uses the exact erf GELU).
pub fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}

/// Multi-head attention core on `[batch, tokens, heads*head_dim]` projections: splits heads, runs
/// libtorch's fused `scaled_dot_product_attention` (scale 1/sqrt(head_dim), additive mask broadcast
/// over `[batch, heads, query, key]`, dropout on the attention probabilities when `dropout > 0`),
/// and merges heads back.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    mask: Option<&Tensor>,
    dropout: f64,
) -> Tensor {
    let split = |t: &Tensor| {
        let (b, l, d) = t.size3().unwrap_or_default();
        t.view([b, l, heads, d / heads]).transpose(1, 2)
    };
    let (b, lq, d) = q.size3().unwrap_or_default();
    let out = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        mask.map(|m| m.shallow_clone()),
        dropout,
        false,
        None::<f64>,
        false,
    );
    out.transpose(1, 2).reshape([b, lq, d])
}
