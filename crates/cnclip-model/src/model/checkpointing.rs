//! Gradient checkpointing per transformer block (cn_clip's `--grad-checkpointing`), staged by hand
//! because tch has no custom autograd functions.
//!
//! The forward pass runs every ViT block and BERT layer without recording a graph and keeps only
//! each block's input. Only the small heads (ViT `ln_post` + projection, BERT [CLS] projection)
//! are recorded, on leaves standing in for the last block outputs. After `loss.backward()` has
//! filled those leaves' gradients, [`CheckpointedForward::backward`] walks the blocks in reverse:
//! recompute block i from its saved input with a graph, back-propagate the incoming gradient
//! through it (`(y · g).sum().backward()`), read the gradient of its input, and go on; the
//! embeddings come last. Parameter gradients accumulate exactly as in the plain path.
//!
//! Dropout masks must be the same in both passes, so each BERT stage re-seeds torch's generator
//! from a base drawn once per forward; the ViT blocks are re-seeded the same way (on their own
//! stream) so that adapter dropout inside them (cnclip-lora) also draws the same masks twice. The
//! ResNet tower has no blocks to checkpoint (cn_clip's is a no-op too) and is recorded whole.

use super::clip::{Clip, Visual};
use tch::{Kind, Tensor};

/// What a checkpointed forward leaves for the backward walk.
pub struct CheckpointedForward {
    /// Normalised image features (part of the recorded graph).
    pub image_features: Tensor,
    /// Normalised text features (part of the recorded graph).
    pub text_features: Tensor,
    /// `exp(logit_scale)`.
    pub logit_scale: Tensor,
    images: Tensor,
    ids: Tensor,
    /// FLIP's kept patches, re-applied when the embeddings are recomputed.
    keep: Option<Tensor>,
    train: bool,
    seed_base: i64,
    /// Inputs of the ViT blocks and the leaf standing for the last block's output.
    vision: Option<(Vec<Tensor>, Tensor)>,
    /// Inputs of the BERT layers and the leaf standing for the last layer's output.
    text: (Vec<Tensor>, Tensor),
}

impl std::fmt::Debug for CheckpointedForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointedForward")
            .field("train", &self.train)
            .finish()
    }
}

fn leaf(x: &Tensor) -> Tensor {
    x.detach().set_requires_grad(true)
}

/// Back-propagates `grad` (the gradient of the loss w.r.t. `output`) through the graph of `output`.
/// An output without a graph (the embeddings when all their weights are frozen, as in a LoRA run
/// or under `--freeze-vision`) has nothing to propagate to.
fn backward_with(output: &Tensor, grad: &Tensor) -> Result<(), tch::TchError> {
    if output.requires_grad() {
        (output * grad.detach()).sum(Kind::Float).f_backward()?;
    }
    Ok(())
}

impl Clip {
    /// [`Clip::forward_t`] with per-block gradient checkpointing; finish with
    /// [`CheckpointedForward::backward`] instead of `loss.backward()`.
    pub fn forward_checkpointed(
        &self,
        images: &Tensor,
        ids: &Tensor,
        train: bool,
    ) -> CheckpointedForward {
        self.forward_checkpointed_masked(images, ids, train, None)
    }

    /// [`Clip::forward_checkpointed`] with FLIP's patch dropping (see [`Clip::forward_masked`]).
    pub fn forward_checkpointed_masked(
        &self,
        images: &Tensor,
        ids: &Tensor,
        train: bool,
        keep: Option<&Tensor>,
    ) -> CheckpointedForward {
        let keep = keep.map(|k| k.to_device(self.device()));
        let images = images.to_device(self.device());
        let ids = ids.to_device(self.device());
        let seed_base = tch::no_grad(|| {
            Tensor::randint(1 << 40, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0])
        });

        let (image_features, vision) = match self.visual() {
            Visual::Transformer(vit) => {
                let mut inputs = Vec::with_capacity(vit.num_blocks());
                let last = tch::no_grad(|| {
                    let mut x = vit.embed(&images, keep.as_ref());
                    for i in 0..vit.num_blocks() {
                        inputs.push(x.shallow_clone());
                        reseed(seed_base ^ VISION_STREAM, i);
                        x = vit.block(i, &x, train);
                    }
                    x
                });
                let tail = leaf(&last);
                (
                    super::clip::normalize(&vit.head(&tail, train)),
                    Some((inputs, tail)),
                )
            }
            Visual::ResNet(_) => (
                super::clip::normalize(&self.encode_image_masked(&images, train, keep.as_ref())),
                None,
            ),
        };

        let bert = self.bert();
        let dtype = self.compute_dtype();
        let mut inputs = Vec::with_capacity(bert.num_layers());
        let last = tch::no_grad(|| {
            let attention = ids.ne(0).to_kind(dtype);
            reseed(seed_base, 0);
            let mut x = bert.embed(&ids, train);
            let mask = super::bert::Bert::additive_mask(&attention, x.kind());
            for j in 0..bert.num_layers() {
                inputs.push(x.shallow_clone());
                reseed(seed_base, j + 1);
                x = bert.layer(j, &x, &mask, train);
            }
            x
        });
        let tail = leaf(&last);
        let text_features = super::clip::normalize(&self.text_head(&tail, train));
        CheckpointedForward {
            image_features,
            text_features,
            logit_scale: self.logit_scale_exp(),
            images,
            ids,
            keep,
            train,
            seed_base,
            vision,
            text: (inputs, tail),
        }
    }
}

/// Separates the ViT blocks' seeds from the BERT stages'.
const VISION_STREAM: i64 = 0x5649_5400_0000;

fn reseed(base: i64, stage: usize) {
    tch::manual_seed(base.wrapping_add(stage as i64));
}

impl CheckpointedForward {
    /// `loss.backward()` through the recorded heads, then the staged walk back through every
    /// checkpointed block, accumulating parameter gradients into `model`. Panics where
    /// [`CheckpointedForward::try_backward`] returns an error.
    pub fn backward(self, model: &Clip, loss: &Tensor) {
        if let Err(e) = self.try_backward(model, loss) {
            panic!("checkpointed backward failed: {e}");
        }
    }

    /// [`CheckpointedForward::backward`] with libtorch's errors returned (e.g. a hook on the
    /// gradients — DDP's reducer — that failed inside one of the staged backward passes).
    pub fn try_backward(self, model: &Clip, loss: &Tensor) -> Result<(), tch::TchError> {
        loss.f_backward()?;
        if let (Some((inputs, tail)), Visual::Transformer(vit)) = (&self.vision, model.visual()) {
            let mut grad = tail.grad();
            for i in (0..inputs.len()).rev() {
                if !grad.defined() {
                    return Ok(());
                }
                let x = leaf(&inputs[i]);
                reseed(self.seed_base ^ VISION_STREAM, i);
                backward_with(&vit.block(i, &x, self.train), &grad)?;
                grad = x.grad();
            }
            if grad.defined() {
                backward_with(&vit.embed(&self.images, self.keep.as_ref()), &grad)?;
            }
        }
        let bert = model.bert();
        let (inputs, tail) = &self.text;
        let mut grad = tail.grad();
        let attention = self.ids.ne(0).to_kind(model.compute_dtype());
        for j in (0..inputs.len()).rev() {
            if !grad.defined() {
                return Ok(());
            }
            let x = leaf(&inputs[j]);
            let mask = super::bert::Bert::additive_mask(&attention, x.kind());
            reseed(self.seed_base, j + 1);
            backward_with(&bert.layer(j, &x, &mask, self.train), &grad)?;
            grad = x.grad();
        }
        if grad.defined() {
            reseed(self.seed_base, 0);
            backward_with(&bert.embed(&self.ids, self.train), &grad)?;
        }
        Ok(())
    }
}
