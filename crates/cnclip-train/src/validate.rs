//! Validation during training: cn_clip's loss and in-batch accuracy (`train.py:334-404`, each
//! batch's own logits, no gather), plus what contestants select checkpoints by — MUGE Recall@1/5/10
//! of every validation text against every validation image, computed by the `eval` crate exactly as
//! `evaluation.py` would on the predictions.

use cnclip_model::Clip;
use muge_data::sampler::DistributedSampler;
use muge_data::{ImageTransform, LmdbSplit, Loader, LoaderConfig, TextPipeline};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tch::{Kind, Reduction, Tensor};

/// One validation pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validation {
    /// Mean of the symmetric cross-entropy over samples (cn_clip's `cum_loss / n`).
    pub loss: f64,
    pub image_to_text_accuracy: f64,
    pub text_to_image_accuracy: f64,
    /// MUGE text→image recall in percent.
    pub score: eval::Score,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error(transparent)]
    Loader(#[from] muge_data::LoaderError),
    #[error("validation data: {0}")]
    Data(String),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
}

/// Runs the validation split through `model` in inference mode.
pub fn validate<T: ImageTransform + 'static>(
    model: &Clip,
    split: Arc<LmdbSplit>,
    transform: Arc<T>,
    text: TextPipeline,
    batch_size: usize,
    workers: usize,
) -> Result<Validation, ValidationError> {
    validate_with_progress(
        model,
        split,
        transform,
        text,
        batch_size,
        workers,
        &mut |_, _| {},
    )
    .map(|(v, _)| v)
}

/// [`validate`], calling `progress(batches_done, batches)` after every batch; also returns the
/// size of the last batch (cn_clip logs it).
pub fn validate_with_progress<T: ImageTransform + 'static>(
    model: &Clip,
    split: Arc<LmdbSplit>,
    transform: Arc<T>,
    text: TextPipeline,
    batch_size: usize,
    workers: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Validation, u64), ValidationError> {
    let n = split.num_samples();
    if n == 0 {
        return Err(ValidationError::Data(
            "the validation split has no pairs".into(),
        ));
    }
    let sampler = DistributedSampler::new(n, 1, 0, 0)
        .map_err(|e| ValidationError::Data(e.to_string()))?
        .with_shuffle(false);
    let plan = sampler
        .plan(0, 0)
        .map_err(|e| ValidationError::Data(e.to_string()))?;
    let config = LoaderConfig {
        batch_size: batch_size.max(1),
        workers,
        prefetch: 2,
        drop_last: false,
        seed: 0,
    };
    let batches = n.div_ceil(batch_size.max(1) as u64);
    let loader = Loader::new(split, transform, text, &plan, config)?;
    let device = model.device();
    let (mut done, mut last_batch) = (0u64, 0u64);
    let _guard = tch::no_grad_guard();
    let (mut loss_sum, mut i2t, mut t2i, mut count) = (0.0, 0.0, 0.0, 0usize);
    let mut images: BTreeMap<i64, Tensor> = BTreeMap::new();
    let mut texts: BTreeMap<i64, Tensor> = BTreeMap::new();
    let mut truth: HashMap<i64, Vec<i64>> = HashMap::new();
    for batch in loader {
        let batch = batch?;
        let (img, txt, scale) = model.forward(
            &batch.images.to_device(device),
            &batch.texts.to_device(device),
        );
        let (img, txt) = (img.to_kind(Kind::Float), txt.to_kind(Kind::Float));
        let logits = img.matmul(&txt.tr()) * scale.to_kind(Kind::Float);
        let b = logits.size()[0];
        let truth_idx = Tensor::arange(b, (Kind::Int64, device));
        let ce = |l: &Tensor| {
            l.cross_entropy_loss::<Tensor>(&truth_idx, None, Reduction::Mean, -100, 0.0)
        };
        let loss = ((ce(&logits) + ce(&logits.tr())) / 2.0).double_value(&[]);
        let hits = |l: &Tensor| {
            l.argmax(-1, false)
                .eq_tensor(&truth_idx)
                .sum(Kind::Int64)
                .int64_value(&[]) as f64
        };
        loss_sum += loss * b as f64;
        i2t += hits(&logits);
        t2i += hits(&logits.tr());
        count += b as usize;
        done += 1;
        last_batch = b as u64;
        progress(done, batches);
        for (row, (&image_id, &text_id)) in batch.image_ids.iter().zip(&batch.text_ids).enumerate()
        {
            let row = row as i64;
            images
                .entry(image_id)
                .or_insert_with(|| img.get(row).to_device(tch::Device::Cpu));
            texts
                .entry(text_id)
                .or_insert_with(|| txt.get(row).to_device(tch::Device::Cpu));
            let relevant = truth.entry(text_id).or_default();
            if !relevant.contains(&image_id) {
                relevant.push(image_id);
            }
        }
    }
    let image_ids: Vec<i64> = images.keys().copied().collect();
    let image_matrix = Tensor::stack(&images.into_values().collect::<Vec<_>>(), 0);
    let text_ids: Vec<i64> = texts.keys().copied().collect();
    let text_matrix = Tensor::stack(&texts.into_values().collect::<Vec<_>>(), 0);
    let k = image_ids.len().min(10) as i64;
    let top = text_matrix
        .matmul(&image_matrix.tr())
        .topk(k, -1, true, true)
        .1;
    let mut rankings: HashMap<i64, Vec<i64>> = HashMap::new();
    for (row, text_id) in text_ids.iter().enumerate() {
        let columns = Vec::<i64>::try_from(top.get(row as i64))
            .map_err(|e| ValidationError::Data(e.to_string()))?;
        rankings.insert(
            *text_id,
            columns.into_iter().map(|c| image_ids[c as usize]).collect(),
        );
    }
    let ground_truth = eval::GroundTruth::from_pairs(truth);
    let score = eval::muge_score(&rankings, &ground_truth)?;
    Ok((
        Validation {
            loss: loss_sum / count as f64,
            image_to_text_accuracy: i2t / count as f64,
            text_to_image_accuracy: t2i / count as f64,
            score,
        },
        last_batch,
    ))
}
