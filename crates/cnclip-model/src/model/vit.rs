//! cn_clip's `VisualTransformer` (`model.py:230-287`): patch conv, class token, learned positions,
//! pre-LN residual blocks with fused-QKV attention and QuickGELU MLPs, `ln_post` on the class token,
//! projection without bias. Computed batch-first; cn_clip's sequence-first layout is only a transpose.

use super::delta::{self, DeltaSlot};
use super::layers::{LayerNorm, Linear, multi_head_attention, quick_gelu};
use crate::config::VisionConfig;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// One `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug)]
struct ResidualAttentionBlock {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    /// The fused q/k/v map's adapter slot (its delta covers all `3 · width` outputs).
    in_proj_delta: DeltaSlot,
    out_proj: Linear,
    ln_1: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    heads: i64,
}

impl ResidualAttentionBlock {
    fn new(p: &Path, width: i64, heads: i64, layers: i64) -> Self {
        // CLIP's init: attention std width^-0.5, projections scaled by depth.
        let proj_std = (width as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5);
        let attn_std = (width as f64).powf(-0.5);
        let fc_std = (2.0 * width as f64).powf(-0.5);
        let attn = p / "attn";
        let in_proj_weight = attn.var(
            "in_proj_weight",
            &[3 * width, width],
            Init::Randn {
                mean: 0.0,
                stdev: attn_std,
            },
        );
        let in_proj_bias = attn.var("in_proj_bias", &[3 * width], Init::Const(0.0));
        let out_proj = Linear::new(&(&attn / "out_proj"), width, width, proj_std);
        let mlp = p / "mlp";
        Self {
            in_proj_weight,
            in_proj_bias,
            in_proj_delta: None,
            out_proj,
            ln_1: LayerNorm::new(&(p / "ln_1"), width, 1e-5, true),
            c_fc: Linear::new(&(&mlp / "c_fc"), width, 4 * width, fc_std),
            c_proj: Linear::new(&(&mlp / "c_proj"), 4 * width, width, proj_std),
            ln_2: LayerNorm::new(&(p / "ln_2"), width, 1e-5, true),
            heads,
        }
    }

    fn attention(&self, x: &Tensor, train: bool) -> Tensor {
        let qkv = x.linear(&self.in_proj_weight, Some(&self.in_proj_bias));
        let qkv = delta::apply(&self.in_proj_delta, x, qkv, train);
        let parts = qkv.chunk(3, -1);
        let out = multi_head_attention(&parts[0], &parts[1], &parts[2], self.heads, None, 0.0);
        self.out_proj.forward_t(&out, train)
    }

    /// `train` only reaches adapter deltas: cn_clip's ViT has no dropout.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + self.attention(&self.ln_1.forward(x), train);
        let h = self.c_proj.forward_t(
            &quick_gelu(&self.c_fc.forward_t(&self.ln_2.forward(&x), train)),
            train,
        );
        x + h
    }

    fn slot_mut(&mut self, module: &str) -> Option<&mut DeltaSlot> {
        Some(match module {
            "attn.in_proj" => &mut self.in_proj_delta,
            "attn.out_proj" => &mut self.out_proj.delta,
            "mlp.c_fc" => &mut self.c_fc.delta,
            "mlp.c_proj" => &mut self.c_proj.delta,
            _ => return None,
        })
    }

    fn slot(&self, module: &str) -> Option<&DeltaSlot> {
        Some(match module {
            "attn.in_proj" => &self.in_proj_delta,
            "attn.out_proj" => &self.out_proj.delta,
            "mlp.c_fc" => &self.c_fc.delta,
            "mlp.c_proj" => &self.c_proj.delta,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct VisionTransformer {
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualAttentionBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
    proj_delta: DeltaSlot,
    patch: i64,
}

impl VisionTransformer {
    pub fn new(p: &Path, c: &VisionConfig, layers: i64) -> Self {
        let (width, patch) = (c.vision_width, c.vision_patch_size.unwrap_or(1));
        let grid = c.grid();
        let scale = (width as f64).powf(-0.5);
        let bound = (1.0 / (3 * patch * patch) as f64).sqrt();
        let conv1 = (p / "conv1").var(
            "weight",
            &[width, 3, patch, patch],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let class_embedding = p.var(
            "class_embedding",
            &[width],
            Init::Randn {
                mean: 0.0,
                stdev: scale,
            },
        );
        let positional_embedding = p.var(
            "positional_embedding",
            &[grid * grid + 1, width],
            Init::Randn {
                mean: 0.0,
                stdev: scale,
            },
        );
        let ln_pre = LayerNorm::new(&(p / "ln_pre"), width, 1e-5, true);
        let resblocks = p / "transformer" / "resblocks";
        let blocks = (0..layers)
            .map(|i| ResidualAttentionBlock::new(&(&resblocks / i), width, c.heads(), layers))
            .collect();
        let ln_post = LayerNorm::new(&(p / "ln_post"), width, 1e-5, true);
        let proj = p.var(
            "proj",
            &[width, c.embed_dim],
            Init::Randn {
                mean: 0.0,
                stdev: scale,
            },
        );
        Self {
            conv1,
            class_embedding,
            positional_embedding,
            ln_pre,
            blocks,
            ln_post,
            proj,
            proj_delta: None,
            patch,
        }
    }

    /// The dtype cn_clip runs the vision tower in (`visual.conv1.weight.dtype`).
    pub fn dtype(&self) -> Kind {
        self.conv1.kind()
    }

    /// `[N, 3, R, R]` images → `[N, embed_dim]` unnormalised features.
    /// `train` only reaches adapter deltas (the tower itself has no dropout). `keep`: FLIP's kept
    /// patch tokens (see [`flip_keep_indices`]); `None` keeps all of them.
    pub fn forward(&self, image: &Tensor, train: bool, keep: Option<&Tensor>) -> Tensor {
        let mut x = self.embed(image, keep);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        self.head(&x, train)
    }

    /// Tokens per image before masking, the class token included (`L = grid² + 1`).
    pub fn num_tokens(&self) -> i64 {
        self.positional_embedding.size()[0]
    }

    /// Patch embedding, class token, positions, FLIP's patch dropping when `keep` is given (cn_clip
    /// masks after the positions and before `ln_pre`, `model.py:274-277`), and `ln_pre`: the input
    /// of block 0.
    pub(crate) fn embed(&self, image: &Tensor, keep: Option<&Tensor>) -> Tensor {
        let kind = self.dtype();
        let x = image.to_kind(kind).conv2d(
            &self.conv1,
            None::<Tensor>,
            [self.patch, self.patch],
            [0, 0],
            [1, 1],
            1,
        );
        let (n, width) = (x.size()[0], x.size()[1]);
        let x = x.flatten(2, 3).transpose(1, 2);
        let cls = self
            .class_embedding
            .to_kind(kind)
            .view([1, 1, width])
            .expand([n, 1, width], false);
        let x = Tensor::cat(&[cls, x], 1) + self.positional_embedding.to_kind(kind);
        let x = match keep {
            Some(keep) => keep_tokens(&x, keep),
            None => x,
        };
        self.ln_pre.forward(&x)
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub(crate) fn block(&self, index: usize, x: &Tensor, train: bool) -> Tensor {
        self.blocks[index].forward(x, train)
    }

    /// `ln_post` on the class token, then the projection.
    pub(crate) fn head(&self, x: &Tensor, train: bool) -> Tensor {
        let pooled = self.ln_post.forward(&x.select(1, 0));
        let y = pooled.matmul(&self.proj);
        delta::apply(&self.proj_delta, &pooled, y, train)
    }

    /// The slot of site `name` relative to `visual.` (`proj`, `transformer.resblocks.{i}.…`).
    pub(crate) fn slot_mut(&mut self, name: &str) -> Option<&mut DeltaSlot> {
        if name == "proj" {
            return Some(&mut self.proj_delta);
        }
        let (i, module) = delta::indexed(name, "transformer.resblocks.")?;
        self.blocks.get_mut(i)?.slot_mut(module)
    }

    pub(crate) fn slot(&self, name: &str) -> Option<&DeltaSlot> {
        if name == "proj" {
            return Some(&self.proj_delta);
        }
        let (i, module) = delta::indexed(name, "transformer.resblocks.")?;
        self.blocks.get(i)?.slot(module)
    }
}

/// FLIP's kept patch tokens from `noise` (`[N, L−1]`, one uniform number per patch), as cn_clip's
/// `VisualTransformer.random_masking` (`model.py:252-266`) derives them: the
/// `int((L−1)·(1−mask_ratio))` patches with the smallest noise, in increasing order of noise, as
/// 1-based token indices (token 0 is the class token, always kept). `[N, len_keep]` int64.
pub fn flip_keep_indices(noise: &Tensor, mask_ratio: f64) -> Tensor {
    let patches = noise.size().last().copied().unwrap_or(0);
    // Python's `int((L - 1) * (1 - mask_ratio))`: a float64 product truncated toward zero.
    let len_keep = ((patches as f64) * (1.0 - mask_ratio)) as i64;
    let len_keep = len_keep.clamp(0, patches);
    // torch.argsort(noise, dim=1): the default, not necessarily stable sort (ties have probability
    // ~2⁻²⁴ per pair with float32 uniform noise).
    (noise.argsort(1, false) + 1).narrow(1, 0, len_keep)
}

/// `[N, L, W]` tokens → `[N, 1 + len_keep, W]`: the class token, then the tokens `keep` names
/// (`random_masking`'s gather and concatenation).
fn keep_tokens(x: &Tensor, keep: &Tensor) -> Tensor {
    let width = x.size()[2];
    let (n, len_keep) = (keep.size()[0], keep.size()[1]);
    let index = keep
        .to_device(x.device())
        .unsqueeze(-1)
        .expand([n, len_keep, width], false);
    let kept = x.gather(1, &index, false);
    Tensor::cat(&[x.narrow(1, 0, 1), kept], 1)
}

/// Resizes a `[1 + g_old², W]` positional embedding to `[1 + g_new², W]` as cn_clip's
/// `resize_pos_embed` does (class row kept, grid resized bicubically with `align_corners=True`).
/// Used when fine-tuning at another resolution than the checkpoint was trained at.
pub fn resize_positional_embedding(pos: &Tensor, new_grid: i64) -> Option<Tensor> {
    let (len, width) = pos.size2().ok()?;
    let old_grid = ((len - 1) as f64).sqrt().round() as i64;
    if old_grid * old_grid + 1 != len {
        return None;
    }
    if old_grid == new_grid {
        return Some(pos.shallow_clone());
    }
    let cls = pos.narrow(0, 0, 1);
    let grid = pos
        .narrow(0, 1, len - 1)
        .reshape([1, old_grid, old_grid, width])
        .permute([0, 3, 1, 2]);
    let kind = grid.kind();
    let resized = grid
        .to_kind(Kind::Float)
        .upsample_bicubic2d([new_grid, new_grid], true, None, None)
        .to_kind(kind)
        .permute([0, 2, 3, 1])
        .reshape([new_grid * new_grid, width]);
    Some(Tensor::cat(&[cls, resized], 0))
}
