//! The one batched extraction pipeline: image features of an [`ImageSource`] and text features of
//! tokenised texts, as L2-normalised f32 rows in the order asked for.
//!
//! Images: a producer thread reads a batch's bytes (one LMDB read transaction per batch), decodes
//! and transforms them on rayon's pool, and hands the `[N,3,S,S]` tensor over a bounded channel
//! (`prefetch` batches ahead) while this thread encodes the previous one. The model runs on its
//! own device in its own precision (see [`Clip::set_precision`]: fp32, cn_clip's fp16, bf16); rows
//! come back as f32 on the CPU. A batch's rows depend only on the batch's contents, so features
//! computed in shards of whole batches ([`crate::shard`]) equal those of one pass.

use cnclip_model::Clip;
use cnclip_model::preprocess::decode_named;
use muge_data::{ImageTransform, SampleKey};
use rayon::prelude::*;
use retrieval::{FeatureKind, Features};
use tch::{Device, Kind, Tensor};

use crate::error::ExtractError;
use crate::source::{FetchImages, ImageSource};

/// What an extraction reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A new phase with `total` items (`what`: "images", "texts", "tensors", …).
    Start {
        what: String,
        total: u64,
    },
    /// `n` more items of the current phase done.
    Advance(u64),
    Finish,
}

/// A terminal progress bar (stderr) driven by the pipeline's events; `what` names the items
/// (`"images"`, `"gallery images encoded"`); hidden when `visible` is false.
#[cfg(feature = "progress")]
pub fn progress_bar(what: &str, visible: bool) -> impl FnMut(Progress) + use<> {
    let bar = if visible {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let template = format!("{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    move |p| match p {
        Progress::Start { total, .. } => bar.set_length(total),
        Progress::Advance(n) => bar.inc(n),
        Progress::Finish => bar.finish(),
    }
}

/// Batching of an extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Images or texts per encoder call (0 is taken as 1).
    pub batch_size: usize,
    /// Image batches decoded ahead of the encoder (0 is taken as 1).
    pub prefetch: usize,
}

impl ExtractOptions {
    pub fn new(batch_size: usize) -> Self {
        ExtractOptions {
            batch_size,
            prefetch: 1,
        }
    }
}

/// Appends normalised feature rows (converted to f32 on the CPU) under their ids.
pub fn push_rows(features: &mut Features, ids: &[i64], rows: &Tensor) -> Result<(), ExtractError> {
    let rows = rows
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let data = Vec::<f32>::try_from(rows.f_flatten(0, -1)?)?;
    let dim = features.dim;
    if data.len() != ids.len() * dim {
        return Err(ExtractError::Invalid(format!(
            "the encoder returned {} values for {} rows of dimension {dim}",
            data.len(),
            ids.len()
        )));
    }
    for (id, row) in ids.iter().zip(data.chunks_exact(dim.max(1))) {
        features.push(*id, row)?;
    }
    Ok(())
}

/// `[N,3,H,W]` for `(name, file bytes)` pairs: decoded as Pillow, transformed, ToTensor +
/// Normalize, on rayon's pool. The error of the first failing item (in input order) is returned.
pub fn prepare_batch<T: ImageTransform + ?Sized>(
    transform: &T,
    items: &[(String, Vec<u8>)],
) -> Result<Tensor, ExtractError> {
    let (w, h) = transform.output_size();
    let per = 3 * w * h;
    let mut buf = vec![0f32; items.len() * per];
    let first_error = buf
        .par_chunks_mut(per.max(1))
        .zip(items.par_iter())
        .enumerate()
        .map(|(k, (out, (name, bytes)))| -> Result<(), ExtractError> {
            let decoded = decode_named(bytes, name)?;
            let key = SampleKey {
                seed: 0,
                epoch: 0,
                index: k as u64,
            };
            let rgb = transform
                .apply(&decoded, key)
                .map_err(|e| ExtractError::Transform {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
            if (rgb.width(), rgb.height()) != (w, h) {
                return Err(ExtractError::TransformSize {
                    name: name.clone(),
                    got_w: rgb.width(),
                    got_h: rgb.height(),
                    want_w: w,
                    want_h: h,
                });
            }
            rgb.normalize_into(out);
            Ok(())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .find_map(Result::err);
    if let Some(e) = first_error {
        return Err(e);
    }
    let n = items.len() as i64;
    Ok(Tensor::f_from_slice(&buf)?.f_view([n, 3, h as i64, w as i64])?)
}

/// Image features of `ids` (in this order) from `source`: read, decoded and transformed ahead of
/// the encoder on other threads, encoded by `model` (inference mode) in batches.
pub fn image_features<T: ImageTransform + ?Sized, S: FetchImages + ?Sized>(
    model: &Clip,
    source: &S,
    ids: &[i64],
    transform: &T,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Features, ExtractError> {
    let _guard = tch::no_grad_guard();
    let dim = model.config().vision.embed_dim as usize;
    let mut features = Features::new(FeatureKind::Image, dim);
    progress(Progress::Start {
        what: "images".into(),
        total: ids.len() as u64,
    });
    let batch = options.batch_size.max(1);
    let device = model.device();
    std::thread::scope(|scope| -> Result<(), ExtractError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Tensor), ExtractError>>(
            options.prefetch.max(1),
        );
        scope.spawn(move || {
            for (i, chunk) in ids.chunks(batch).enumerate() {
                let item = source
                    .fetch(chunk)
                    .and_then(|items| prepare_batch(transform, &items))
                    .map(|pixels| (i * batch, pixels));
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        });
        for received in rx {
            let (start, pixels) = received?;
            let n = pixels.size()[0] as usize;
            let rows = model.image_features(&pixels.f_to_device(device)?);
            push_rows(&mut features, &ids[start..start + n], &rows)?;
            progress(Progress::Advance(n as u64));
        }
        Ok(())
    })?;
    progress(Progress::Finish);
    if features.ids.len() != ids.len() {
        return Err(ExtractError::Invalid(format!(
            "only {} of {} images were encoded",
            features.ids.len(),
            ids.len()
        )));
    }
    Ok(features)
}

/// Text features of `[N, L]` token ids `tokens` (row `i` is text `ids[i]`), encoded by `model`
/// (inference mode) in batches.
pub fn text_features(
    model: &Clip,
    ids: &[i64],
    tokens: &Tensor,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Features, ExtractError> {
    let _guard = tch::no_grad_guard();
    let rows = tokens.size().first().copied().unwrap_or(0);
    if rows != ids.len() as i64 {
        return Err(ExtractError::Invalid(format!(
            "{} text ids but {rows} rows of token ids",
            ids.len()
        )));
    }
    let dim = model.config().vision.embed_dim as usize;
    let mut features = Features::new(FeatureKind::Text, dim);
    let n = ids.len();
    progress(Progress::Start {
        what: "texts".into(),
        total: n as u64,
    });
    let batch = options.batch_size.max(1);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let chunk = tokens
            .f_narrow(0, start as i64, len as i64)?
            .f_to_device(model.device())?;
        let feats = model.text_features(&chunk);
        push_rows(&mut features, &ids[start..start + len], &feats)?;
        progress(Progress::Advance(len as u64));
    }
    progress(Progress::Finish);
    Ok(features)
}

/// Zero-shot probabilities (`cnclip_model::zeroshot::probabilities` against `classifier`) of
/// every image of `source`, in its order: features from [`image_features`], scored batch by
/// batch on the model's device; one `Vec` of class probabilities per image.
pub fn classify<T: ImageTransform + ?Sized>(
    model: &Clip,
    source: &ImageSource,
    classifier: &Tensor,
    transform: &T,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Vec<f32>>, ExtractError> {
    let features = image_features(model, source, source.ids(), transform, options, progress)?;
    let (batch, dim) = (options.batch_size.max(1), features.dim.max(1));
    let _guard = tch::no_grad_guard();
    let mut rows = Vec::with_capacity(features.ids.len());
    for chunk in features.data.chunks(batch * dim) {
        let feats = Tensor::f_from_slice(chunk)?
            .f_view([(chunk.len() / dim) as i64, dim as i64])?
            .f_to_device(model.device())?;
        let probs = cnclip_model::zeroshot::probabilities(&feats, classifier)
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?;
        rows.extend(Vec::<Vec<f32>>::try_from(&probs)?);
    }
    Ok(rows)
}
