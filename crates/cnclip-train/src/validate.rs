//! Validation during training: cn_clip's loss and in-batch accuracy (`train.py:334-404`, each
//! batch's own logits, no gather), plus what contestants select checkpoints by — MUGE Recall@1/5/10
//! of every validation text against every validation image, ranked and scored by
//! [`retrieval::muge::muge_score`] (the function the soup scores with too), so the number equals
//! `evaluate` on the predictions `retrieval` writes from the same features.

use cnclip_model::Clip;
use muge_data::sampler::DistributedSampler;
use muge_data::{ImageTransform, LmdbSplit, Loader, LoaderConfig, TextPipeline};
use retrieval::{FeatureKind, Features};
use std::collections::BTreeMap;
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
    #[error("validation features: {0}")]
    Retrieval(#[from] retrieval::RetrievalError),
    #[error("validation features: {0}")]
    Torch(#[from] tch::TchError),
}

/// What a validation pass ranked: every distinct image and text of the split encoded once (in
/// ascending id order) and the text→images ground truth of its pairs.
pub struct ValidationFeatures {
    pub images: Features,
    pub texts: Features,
    pub ground_truth: Vec<(i64, Vec<i64>)>,
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
    validate_with_features(model, split, transform, text, batch_size, workers, progress)
        .map(|(v, _, last)| (v, last))
}

/// [`validate_with_progress`], also returning the features and ground truth the recall was
/// computed from.
pub fn validate_with_features<T: ImageTransform + 'static>(
    model: &Clip,
    split: Arc<LmdbSplit>,
    transform: Arc<T>,
    text: TextPipeline,
    batch_size: usize,
    workers: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Validation, ValidationFeatures, u64), ValidationError> {
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
    let mut truth: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
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
    let features = ValidationFeatures {
        images: collect(FeatureKind::Image, images)?,
        texts: collect(FeatureKind::Text, texts)?,
        ground_truth: truth.into_iter().collect(),
    };
    let ground_truth = eval::GroundTruth::from_pairs(features.ground_truth.iter().cloned());
    let score = retrieval::muge::muge_score(
        &features.texts.view(),
        &features.images.view(),
        &ground_truth,
        tch::Device::Cpu,
    )?;
    Ok((
        Validation {
            loss: loss_sum / count as f64,
            image_to_text_accuracy: i2t / count as f64,
            text_to_image_accuracy: t2i / count as f64,
            score,
        },
        features,
        last_batch,
    ))
}

/// Rows in ascending id order, as f32.
fn collect(kind: FeatureKind, rows: BTreeMap<i64, Tensor>) -> Result<Features, ValidationError> {
    let mut out = None;
    for (id, row) in rows {
        let row = Vec::<f32>::try_from(row.f_to_kind(Kind::Float)?.f_contiguous()?)?;
        out.get_or_insert_with(|| Features::new(kind, row.len()))
            .push(id, &row)?;
    }
    out.ok_or_else(|| ValidationError::Data(format!("no {} features", kind.as_str())))
}
