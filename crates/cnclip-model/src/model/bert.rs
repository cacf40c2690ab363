//! cn_clip's BERT text tower (`modeling_bert.py`): an old Hugging Face style, post-LN encoder with
//! exact erf GELU, LayerNorm eps 1e-12, a −10000 additive key mask, token type 0 everywhere and no
//! pooler (cn_clip pools the `[CLS]` hidden state itself).

use super::delta::{self, DeltaSlot};
use super::layers::{LayerNorm, Linear, multi_head_attention};
use crate::config::TextConfig;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

const LAYER_NORM_EPS: f64 = 1e-12;

#[derive(Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: i64,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl BertLayer {
    fn new(p: &Path, c: &TextConfig) -> Self {
        let (h, i, std) = (
            c.text_hidden_size,
            c.text_intermediate_size,
            c.text_initializer_range,
        );
        let attn = p / "attention";
        let this = &attn / "self";
        let out = &attn / "output";
        Self {
            query: Linear::new(&(&this / "query"), h, h, std),
            key: Linear::new(&(&this / "key"), h, h, std),
            value: Linear::new(&(&this / "value"), h, h, std),
            attention_output: Linear::new(&(&out / "dense"), h, h, std),
            attention_norm: LayerNorm::new(&(&out / "LayerNorm"), h, LAYER_NORM_EPS, false),
            intermediate: Linear::new(&(p / "intermediate" / "dense"), h, i, std),
            output: Linear::new(&(p / "output" / "dense"), i, h, std),
            output_norm: LayerNorm::new(&(p / "output" / "LayerNorm"), h, LAYER_NORM_EPS, false),
            heads: c.text_num_attention_heads,
            hidden_dropout: c.text_hidden_dropout_prob,
            attention_dropout: c.text_attention_probs_dropout_prob,
        }
    }

    /// Dropout (attention probabilities, and each sub-layer's output before its residual LayerNorm)
    /// is active only when `train` is true, as in cn_clip's `train()` mode.
    fn forward(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (q, k, v) = (
            self.query.forward_t(x, train),
            self.key.forward_t(x, train),
            self.value.forward_t(x, train),
        );
        let dropout = if train { self.attention_dropout } else { 0.0 };
        let context = if x.kind() == Kind::Half {
            stepwise_attention(&q, &k, &v, self.heads, mask, dropout)
        } else {
            multi_head_attention(&q, &k, &v, self.heads, Some(mask), dropout)
        };
        let projected = self
            .attention_output
            .forward_t(&context, train)
            .dropout(self.hidden_dropout, train);
        let attended = self.attention_norm.forward(&(projected + x));
        let hidden = erf_gelu(&self.intermediate.forward_t(&attended, train));
        let output = self
            .output
            .forward_t(&hidden, train)
            .dropout(self.hidden_dropout, train);
        self.output_norm.forward(&(output + attended))
    }

    fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        Some(match module {
            "attention.self.query" => &mut self.query,
            "attention.self.key" => &mut self.key,
            "attention.self.value" => &mut self.value,
            "attention.output.dense" => &mut self.attention_output,
            "intermediate.dense" => &mut self.intermediate,
            "output.dense" => &mut self.output,
            _ => return None,
        })
    }

    fn linear(&self, module: &str) -> Option<&Linear> {
        Some(match module {
            "attention.self.query" => &self.query,
            "attention.self.key" => &self.key,
            "attention.self.value" => &self.value,
            "attention.output.dense" => &self.attention_output,
            "intermediate.dense" => &self.intermediate,
            "output.dense" => &self.output,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<BertLayer>,
    hidden_dropout: f64,
}

impl Bert {
    pub fn new(p: &Path, c: &TextConfig) -> Self {
        let emb = p / "embeddings";
        let init = Init::Randn {
            mean: 0.0,
            stdev: c.text_initializer_range,
        };
        let h = c.text_hidden_size;
        let word_embeddings = (&emb / "word_embeddings").var("weight", &[c.vocab_size, h], init);
        let position_embeddings = (&emb / "position_embeddings").var(
            "weight",
            &[c.text_max_position_embeddings, h],
            init,
        );
        let token_type_embeddings =
            (&emb / "token_type_embeddings").var("weight", &[c.text_type_vocab_size, h], init);
        let embedding_norm = LayerNorm::new(&(&emb / "LayerNorm"), h, LAYER_NORM_EPS, false);
        let layer = p / "encoder" / "layer";
        let layers = (0..c.text_num_hidden_layers)
            .map(|j| BertLayer::new(&(&layer / j), c))
            .collect();
        Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
            hidden_dropout: c.text_hidden_dropout_prob,
        }
    }

    /// `[B, L]` token ids and a `[B, L]` mask (1 keep, 0 pad, in the compute dtype) → `[B, L, H]`.
    /// `train` switches cn_clip's dropout on (embeddings, attention probabilities, sub-layers).
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let mut x = self.embed(ids, train);
        let mask = Self::additive_mask(attention_mask, x.kind());
        for layer in &self.layers {
            x = layer.forward(&x, &mask, train);
        }
        x
    }

    /// Word + position + token-type-0 embeddings, LayerNorm and dropout: the input of layer 0.
    pub(crate) fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        let len = ids.size()[1];
        let positions = Tensor::arange(len, (Kind::Int64, ids.device()));
        let x = Tensor::embedding(&self.word_embeddings, ids, 0, false, false)
            + self.position_embeddings.index_select(0, &positions)
            + self.token_type_embeddings.get(0);
        self.embedding_norm
            .forward(&x)
            .dropout(self.hidden_dropout, train)
    }

    /// cn_clip's `(1 − mask) · −10000`, broadcast over heads and queries.
    pub(crate) fn additive_mask(attention_mask: &Tensor, kind: Kind) -> Tensor {
        ((attention_mask.unsqueeze(1).unsqueeze(2) - 1.0) * 10000.0).to_kind(kind)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn layer(&self, index: usize, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.layers[index].forward(x, mask, train)
    }

    /// The slot of site `name` relative to `bert.` (`encoder.layer.{j}.…`).
    pub(crate) fn slot_mut(&mut self, name: &str) -> Option<&mut DeltaSlot> {
        let (j, module) = delta::indexed(name, "encoder.layer.")?;
        Some(&mut self.layers.get_mut(j)?.linear_mut(module)?.delta)
    }

    pub(crate) fn slot(&self, name: &str) -> Option<&DeltaSlot> {
        let (j, module) = delta::indexed(name, "encoder.layer.")?;
        Some(&self.layers.get(j)?.linear(module)?.delta)
    }
}

/// cn_clip's `BertSelfAttention` operation by operation (`modeling_bert.py:118-140`): `q·kᵀ`, then
/// `/ sqrt(head_dim)`, `+ mask`, softmax, dropout, `· v`. In fp16 every step rounds to fp16, which
/// the fused kernel (fp32 accumulation inside) does not; cn_clip's fp16 modes (inference on GPU,
/// `--precision fp16` training) round this way, so fp16 takes this path to match them.
fn stepwise_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    mask: &Tensor,
    dropout: f64,
) -> Tensor {
    let (b, l, d) = q.size3().unwrap_or_default();
    let split = |t: &Tensor| t.view([b, l, heads, d / heads]).permute([0, 2, 1, 3]);
    let scores = split(q).matmul(&split(k).transpose(-1, -2)) / ((d / heads) as f64).sqrt();
    let probs = (scores + mask)
        .softmax(-1, None::<Kind>)
        .dropout(dropout, dropout > 0.0);
    probs
        .matmul(&split(v))
        .permute([0, 2, 1, 3])
        .contiguous()
        .view([b, l, d])
}

/// cn_clip's `gelu` (`modeling_bert.py:39-45`), `x · 0.5 · (1 + erf(x / √2))`: libtorch's exact
/// GELU kernel in fp32 (same function, one rounding); in fp16 operation by operation, rounding
/// where cn_clip's fp16 modes round.
fn erf_gelu(x: &Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        (x * 0.5) * ((x / std::f64::consts::SQRT_2).erf() + 1.0)
    } else {
        x.gelu("none")
    }
}
