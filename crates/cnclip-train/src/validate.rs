//! Validation during training: cn_clip's loss and in-batch accuracy (`train.py:334-404`: the
//! pairs in order, in batches of `--valid-batch-size`, each batch's own logits, no gather), plus
//! what contestants select checkpoints by — MUGE Recall@1/5/10 of every validation text against
//! every validation image, ranked and scored by [`retrieval::muge::muge_score`] (the function the
//! soup scores with too), so the number equals `evaluate` on the predictions `retrieval` writes
//! from the same features.
//!
//! Every distinct image and text of the split is encoded once by `cnclip-extract`'s pipeline (the
//! one `extract_features` and the soup use); a batch's logits are its pairs' rows of those
//! features times `exp(logit_scale)`. In a data-parallel run every rank encodes its run of whole
//! batches of the images and texts (`cnclip_extract::shard::shard_range`), the rows are
//! all-gathered, every rank computes the loss and accuracy, rank 0 the recall, which it
//! broadcasts: the same numbers as one process, and no rank waits while another encodes.

use cnclip_extract::shard::shard_range;
use cnclip_extract::{ExtractOptions, Progress};
use cnclip_model::Clip;
use muge_data::{ImageTransform, LmdbSplit, TextPipeline};
use retrieval::{FeatureKind, Features};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tch::{Device, Kind, Reduction, Tensor};
use torch_ext::dist::ProcessGroup;

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
    /// Boxed: extraction errors are large, and this enum travels inside `RunError`.
    #[error("validation: {0}")]
    Extract(Box<cnclip_extract::ExtractError>),
    #[error("validation: {0}")]
    Lmdb(#[from] muge_data::LmdbError),
    #[error("validation: {0}")]
    Text(#[from] muge_data::text::TextError),
    #[error("validation across ranks: {0}")]
    Dist(#[from] torch_ext::dist::DistError),
}

impl From<cnclip_extract::ExtractError> for ValidationError {
    fn from(e: cnclip_extract::ExtractError) -> Self {
        ValidationError::Extract(Box::new(e))
    }
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

/// [`validate`], calling `progress(batches_done, batches)` as the work advances (in units of
/// validation batches); also returns the size of the last batch (cn_clip logs it).
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
    validate_in(
        model,
        &split,
        &*transform,
        &text,
        batch_size,
        workers,
        None,
        progress,
    )
}

/// Rank 0's BatchNorm statistics on every rank. torch's DDP broadcasts module buffers from rank 0
/// before each forward (`broadcast_buffers=True`, cn_clip's setting); the only buffers of cn_clip's
/// models are the ResNet's BatchNorm statistics, which each rank otherwise updates from its own
/// batch (without `--use-bn-sync`). With them every rank encodes its share as rank 0's model — the
/// one a single process would validate (and the one rank 0 saves). ViTs have none: nothing is sent.
fn broadcast_batch_norm_statistics(
    model: &Clip,
    group: &ProcessGroup,
) -> Result<(), ValidationError> {
    let buffers = model.named_tensors().into_iter().filter(|(key, _)| {
        key.ends_with(".running_mean")
            || key.ends_with(".running_var")
            || key.ends_with(".num_batches_tracked")
    });
    for (_, tensor) in buffers {
        group.broadcast(&[&tensor], 0)?;
    }
    Ok(())
}

/// [`validate_with_features`] as one rank of `group` (`None`: one process). Every rank of the
/// group must call it with the same split and settings; each encodes its share, and all return
/// the same result (equal, bit for bit, to one process's).
#[allow(clippy::too_many_arguments)]
pub fn validate_in<T: ImageTransform + ?Sized>(
    model: &Clip,
    split: &LmdbSplit,
    transform: &T,
    text: &TextPipeline,
    batch_size: usize,
    workers: usize,
    group: Option<&ProcessGroup>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Validation, ValidationFeatures, u64), ValidationError> {
    let n = split.num_samples();
    if n == 0 {
        return Err(ValidationError::Data(
            "the validation split has no pairs".into(),
        ));
    }
    let batch = batch_size.max(1);
    if let Some(group) = group {
        broadcast_batch_norm_statistics(model, group)?;
    }
    // The pairs in order (cn_clip's validation sampler does not shuffle), their distinct images
    // and texts in ascending id order, and the text→images ground truth.
    let reader = split.pairs().reader()?;
    let mut pairs = Vec::with_capacity(n as usize);
    let mut texts: BTreeMap<i64, String> = BTreeMap::new();
    let mut truth: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for index in 0..n {
        let pair = reader.pair(index)?;
        pairs.push((pair.image_id, pair.text_id));
        let relevant = truth.entry(pair.text_id).or_default();
        if !relevant.contains(&pair.image_id) {
            relevant.push(pair.image_id);
        }
        texts.entry(pair.text_id).or_insert(pair.text);
    }
    drop(reader);
    let mut image_ids: Vec<i64> = pairs.iter().map(|p| p.0).collect();
    image_ids.sort_unstable();
    image_ids.dedup();
    let text_ids: Vec<i64> = texts.keys().copied().collect();
    let texts: Vec<String> = texts.into_values().collect();

    // This rank's share, encoded by the extraction pipeline; progress in units of batches.
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.size()));
    let (ni, nt) = (image_ids.len(), text_ids.len());
    let (image_range, text_range) = (
        shard_range(ni, batch, rank, world),
        shard_range(nt, batch, rank, world),
    );
    let batches = n.div_ceil(batch as u64);
    let total = (image_range.len() + text_range.len()).max(1) as u64;
    let (mut items, mut reported) = (0u64, 0u64);
    let mut advance = |p: Progress| {
        if let Progress::Advance(k) = p {
            items += k;
            let done = items * batches / total;
            if done > reported {
                reported = done;
                progress(done, batches);
            }
        }
    };
    let options = ExtractOptions {
        batch_size: batch,
        prefetch: workers.max(1),
    };
    let tokens = text.encode_batch(&texts[text_range.clone()])?;
    let local_texts = cnclip_extract::text_features(
        model,
        &text_ids[text_range],
        &tokens,
        &options,
        &mut advance,
    )?;
    let local_images = cnclip_extract::image_features(
        model,
        split.images(),
        &image_ids[image_range],
        transform,
        &options,
        &mut advance,
    )?;
    if reported < batches {
        progress(batches, batches);
    }
    let dim = local_images.dim;
    let image_data = gather(group, &local_images.data, ni, batch, dim, model.device())?;
    let text_data = gather(group, &local_texts.data, nt, batch, dim, model.device())?;
    let images = Features {
        ids: image_ids,
        data: image_data,
        ..Features::new(FeatureKind::Image, dim)
    };
    let texts = Features {
        ids: text_ids,
        data: text_data,
        ..Features::new(FeatureKind::Text, dim)
    };

    // cn_clip's per-batch loss and accuracy from the pairs' rows.
    let _guard = tch::no_grad_guard();
    let matrix = |f: &Features| -> Result<Tensor, tch::TchError> {
        Tensor::f_from_slice(&f.data)?.f_view([f.ids.len() as i64, f.dim as i64])
    };
    let (all_images, all_texts) = (matrix(&images)?, matrix(&texts)?);
    let row_of = |ids: &[i64]| -> HashMap<i64, i64> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| (*id, i as i64))
            .collect()
    };
    let (image_row, text_row) = (row_of(&images.ids), row_of(&texts.ids));
    let scale = model
        .logit_scale_exp()
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?;
    let (mut loss_sum, mut i2t, mut t2i) = (0.0, 0.0, 0.0);
    for chunk in pairs.chunks(batch) {
        let rows = |ids: Vec<i64>, m: &Tensor| m.f_index_select(0, &Tensor::from_slice(&ids));
        let img = rows(chunk.iter().map(|p| image_row[&p.0]).collect(), &all_images)?;
        let txt = rows(chunk.iter().map(|p| text_row[&p.1]).collect(), &all_texts)?;
        let logits = img.matmul(&txt.tr()) * &scale;
        let b = chunk.len() as i64;
        let truth_idx = Tensor::arange(b, (Kind::Int64, Device::Cpu));
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
    }
    let count = pairs.len() as f64;
    let last_batch = n - (batches - 1) * batch as u64;

    let features = ValidationFeatures {
        images,
        texts,
        ground_truth: truth.into_iter().collect(),
    };
    // The recall once, on rank 0, then shared.
    let mut score = eval::Score {
        mean_recall: 0.0,
        r1: 0.0,
        r5: 0.0,
        r10: 0.0,
    };
    if rank == 0 {
        let ground_truth = eval::GroundTruth::from_pairs(features.ground_truth.iter().cloned());
        score = retrieval::muge::muge_score(
            &features.texts.view(),
            &features.images.view(),
            &ground_truth,
            Device::Cpu,
        )?;
    }
    if let Some(group) = group {
        // The model's device: its GPU under NCCL, the CPU under Gloo with a CPU model.
        let device = model.device();
        let values = [score.mean_recall, score.r1, score.r5, score.r10];
        let shared = Tensor::from_slice(&values).f_to_device(device)?;
        group.broadcast(&[&shared], 0)?;
        let v = Vec::<f64>::try_from(shared.f_to_device(Device::Cpu)?)?;
        score = eval::Score {
            mean_recall: v[0],
            r1: v[1],
            r5: v[2],
            r10: v[3],
        };
    }
    Ok((
        Validation {
            loss: loss_sum / count,
            image_to_text_accuracy: i2t / count,
            text_to_image_accuracy: t2i / count,
            score,
        },
        features,
        last_batch,
    ))
}

/// Every rank's rows (`local`: this rank's [`shard_range`] of `n` rows of `dim`), in rank order.
fn gather(
    group: Option<&ProcessGroup>,
    local: &[f32],
    n: usize,
    batch: usize,
    dim: usize,
    device: Device,
) -> Result<Vec<f32>, ValidationError> {
    let Some(group) = group else {
        return Ok(local.to_vec());
    };
    let world = group.size();
    let lens: Vec<usize> = (0..world)
        .map(|r| shard_range(n, batch, r, world).len())
        .collect();
    let most = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut padded = vec![0f32; most * dim];
    padded[..local.len()].copy_from_slice(local);
    let padded = Tensor::from_slice(&padded).f_to_device(device)?;
    let mut out = Vec::with_capacity(n * dim);
    for (rows, len) in group.all_gather(&padded)?.into_iter().zip(lens) {
        let rows = Vec::<f32>::try_from(rows.f_to_device(Device::Cpu)?)?;
        out.extend_from_slice(&rows[..len * dim]);
    }
    Ok(out)
}
