//! cn_clip's symmetric contrastive loss (`train.py:get_loss`, `train.py:21-126`) and the in-batch accuracy
//! it reports.
//!
//! Distributed training changes only which rows enter the logits and how their gradient gets back
//! to the features that made them; that choice sits behind [`FeatureGather`] (implementations for
//! DDP in [`crate::ddp`]), so the loss is the same code for one process and for DDP.

use tch::{Kind, Reduction, Tensor};
use torch_ext::dist::DistError;

/// How the local batch's features become the rows of the global logits.
pub trait FeatureGather {
    /// All rows the loss sees, given this rank's `[B, D]` features. Rows of `local` that should
    /// receive gradient directly keep their graph; rows of other ranks are constants.
    fn gather(&self, local: &Tensor) -> Result<Tensor, DistError>;

    /// `true` for `--gather-with-grad`: every row's gradient belongs to the rank that made it.
    /// The trainer then back-propagates the loss to the gathered rows (as leaves, from
    /// `gather(local.detach())`) and asks [`FeatureGather::local_gradient`] for this rank's share.
    fn differentiable(&self) -> bool {
        false
    }

    /// Given `d loss / d rows` of this rank's loss, the gradient of this rank's `local` features
    /// over all ranks' losses (`sum_j d loss_j / d local`): what torch's differentiable
    /// `all_gather` back-propagates.
    fn local_gradient(&self, rows_grad: &Tensor) -> Result<Tensor, DistError> {
        Ok(rows_grad.shallow_clone())
    }
}

/// One process (or `--skip-aggregate`): only the local batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalOnly;

impl FeatureGather for LocalOnly {
    fn gather(&self, local: &Tensor) -> Result<Tensor, DistError> {
        Ok(local.shallow_clone())
    }
}

/// The loss and the accuracies cn_clip logs with `--report-training-batch-acc`.
#[derive(Debug)]
pub struct ContrastiveOutput {
    /// `(CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2`, mean reduction.
    pub loss: Tensor,
    /// Fraction of rows of `logits_per_image` whose argmax is the diagonal.
    pub image_to_text_accuracy: f64,
    pub text_to_image_accuracy: f64,
}

/// The loss over normalised `image` and `text` features `[B, D]` and `logit_scale` (already
/// exponentiated, as cn_clip's model returns it), with the cross-entropies in fp32.
pub fn contrastive_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    gather: &dyn FeatureGather,
) -> Result<ContrastiveOutput, DistError> {
    contrastive_loss_in(image, text, logit_scale, gather, true)
}

/// [`contrastive_loss`], with the cross-entropies in the logits' own dtype when `fp32_ce` is false:
/// cn_clip's `--precision fp16`, where `nn.CrossEntropyLoss` gets fp16 logits outside autocast.
/// (Under AMP autocast runs it in fp32, hence `true` there and for fp32/bf16.)
pub fn contrastive_loss_in(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    gather: &dyn FeatureGather,
    fp32_ce: bool,
) -> Result<ContrastiveOutput, DistError> {
    let all_image = gather.gather(image)?;
    let all_text = gather.gather(text)?;
    // cn_clip: `logit_scale * all_image_features @ all_text_features.t()`, i.e. the features are
    // scaled first, by `mul(scale, features)` with the 0-dim fp32 scale as the *first* operand
    // (which matters for fp16 features: libtorch then casts the scale to fp16 before multiplying,
    // where as the second operand its fp32 value would be used).
    let scale = logit_scale.mean(Kind::Float);
    let logits_per_image = (&scale * &all_image).matmul(&all_text.tr());
    let logits_per_text = logits_per_image.tr();
    let rows = logits_per_image.size()[0];
    let truth = Tensor::arange(rows, (Kind::Int64, logits_per_image.device()));
    let ce = |logits: &Tensor| {
        let logits = if fp32_ce {
            logits.to_kind(Kind::Float)
        } else {
            logits.shallow_clone()
        };
        logits.cross_entropy_loss::<Tensor>(&truth, None, Reduction::Mean, -100, 0.0)
    };
    let loss = (ce(&logits_per_image) + ce(&logits_per_text)) / 2.0;
    let accuracy = |logits: &Tensor| {
        tch::no_grad(|| {
            logits
                .argmax(-1, false)
                .eq_tensor(&truth)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        })
    };
    Ok(ContrastiveOutput {
        image_to_text_accuracy: accuracy(&logits_per_image),
        text_to_image_accuracy: accuracy(&logits_per_text),
        loss,
    })
}
