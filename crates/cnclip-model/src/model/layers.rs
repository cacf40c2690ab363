//! Small building blocks shared by the towers. Each holds the tensors registered in the model's
//! `VarStore` under cn_clip's names, so the forward code reads like cn_clip's modules.

use super::delta::{self, DeltaSlot};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

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

/// `nn.BatchNorm2d` in inference mode, with the buffers cn_clip checkpoints carry
/// (`running_mean`, `running_var`, `num_batches_tracked`).
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl BatchNorm2d {
    pub fn new(p: &Path, channels: i64) -> Self {
        let weight = p.var("weight", &[channels], Init::Const(1.0));
        let bias = p.var("bias", &[channels], Init::Const(0.0));
        let running_mean = p.zeros_no_train("running_mean", &[channels]);
        let running_var = p.ones_no_train("running_var", &[channels]);
        let _ = p.add(
            "num_batches_tracked",
            Tensor::zeros([], (Kind::Int64, p.device())),
            false,
        );
        Self {
            weight,
            bias,
            running_mean,
            running_var,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.1,
            1e-5,
            true,
        )
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
