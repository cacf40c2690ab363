//! Scoring a checkpoint on the validation split, as a contestant does with cn_clip's scripts:
//! image features of every image in the split's LMDB, text features of its queries (with the
//! product prompt when asked), then [`retrieval::muge::muge_score`] — top-10 images per query and
//! Recall@1/5/10 with their mean, the function training validation reports with too — so
//! `extract_features.py`, `make_topk_predictions.py` and `evaluation.py` in one pass, without the
//! files in between.
//!
//! Queries and ground truth come from `{split}_texts.jsonl` when one is given (the official
//! evaluation), else from the LMDB's `pairs/` (every text id once, relevant images = the images it
//! is paired with, cn_clip's `--val-data` alone).

use crate::error::SoupError;
use cnclip_extract::{ExtractOptions, ImageSource};
use cnclip_model::Clip;
use cnclip_model::preprocess::Preprocessor;
use eval::{GroundTruth, Score};
use muge_data::TextPipeline;
use muge_data::files::BadRecordPolicy;
use muge_data::lmdb::LmdbPairs;
use retrieval::Features;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What a scoring pass reports as it goes (the extraction pipeline's events).
pub use cnclip_extract::Progress;

/// How the validation split is read.
#[derive(Debug, Clone)]
pub struct ValOptions {
    /// `{split}_texts.jsonl`; `None`: queries from the LMDB's `pairs/`.
    pub texts: Option<PathBuf>,
    /// Prefix [`muge_data::PRODUCT_PROMPT`] to every query (the MUGE recipe's `--text-prompt`;
    /// use the setting the checkpoints were trained with).
    pub text_prompt: bool,
    pub context_length: usize,
}

/// The validation split, loaded once: image ids, tokenised queries, ground truth.
pub struct ValSet {
    dir: PathBuf,
    images: ImageSource,
    text_ids: Vec<i64>,
    /// `[queries, context_length]` i64, CPU.
    tokens: Tensor,
    ground_truth: GroundTruth,
    fingerprint: String,
}

impl std::fmt::Debug for ValSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValSet")
            .field("dir", &self.dir)
            .field("images", &self.images.len())
            .field("queries", &self.text_ids.len())
            .finish()
    }
}

/// `path`'s identity for cache keys (the workspace's one definition, in `cnclip-extract`).
pub fn file_identity(path: &Path) -> Result<String, SoupError> {
    Ok(cnclip_extract::file_identity(path)?)
}

impl ValSet {
    /// Opens `dir` (an LMDB split with `imgs/`, and `pairs/` unless `options.texts` is given).
    pub fn open(dir: impl AsRef<Path>, options: &ValOptions) -> Result<Self, SoupError> {
        let dir = dir.as_ref().to_path_buf();
        let images = ImageSource::lmdb(dir.join("imgs"))?;
        if images.is_empty() {
            return Err(SoupError::Data(format!(
                "{} holds no images",
                images.path().display()
            )));
        }
        let mut pipeline = TextPipeline::new(options.context_length)?;
        if options.text_prompt {
            pipeline = pipeline.with_product_prompt();
        }
        let mut fingerprint = format!(
            "imgs={}|prompt={}|context={}",
            file_identity(&dir.join("imgs").join("data.mdb"))?,
            options.text_prompt,
            options.context_length
        );
        let mut texts: Vec<String> = Vec::new();
        let mut text_ids: Vec<i64> = Vec::new();
        let mut truth: Vec<(i64, Vec<i64>)> = Vec::new();
        match &options.texts {
            Some(path) => {
                fingerprint.push_str(&format!("|texts={}", file_identity(path)?));
                let (records, _) = muge_data::files::read_texts_jsonl(path, BadRecordPolicy::Fail)?;
                for r in records {
                    let Some(relevant) = r.image_ids else {
                        return Err(SoupError::Data(format!(
                            "{} line {}: text {} has no image_ids, so it cannot be scored",
                            path.display(),
                            r.line,
                            r.text_id
                        )));
                    };
                    text_ids.push(r.text_id);
                    texts.push(r.text);
                    truth.push((r.text_id, relevant));
                }
            }
            None => {
                fingerprint.push_str(&format!(
                    "|pairs={}",
                    file_identity(&dir.join("pairs").join("data.mdb"))?
                ));
                let pairs = LmdbPairs::open(dir.join("pairs"))?;
                let reader = pairs.reader()?;
                let mut row: HashMap<i64, usize> = HashMap::new();
                for index in 0..pairs.num_samples() {
                    let pair = reader.pair(index)?;
                    let i = *row.entry(pair.text_id).or_insert_with(|| {
                        text_ids.push(pair.text_id);
                        texts.push(pair.text.clone());
                        truth.push((pair.text_id, Vec::new()));
                        truth.len() - 1
                    });
                    if !truth[i].1.contains(&pair.image_id) {
                        truth[i].1.push(pair.image_id);
                    }
                }
            }
        }
        if text_ids.is_empty() {
            return Err(SoupError::Data(format!(
                "{}: no queries to score",
                dir.display()
            )));
        }
        let tokens = pipeline.encode_batch(&texts)?;
        Ok(ValSet {
            dir,
            images,
            text_ids,
            tokens,
            ground_truth: GroundTruth::from_pairs(truth),
            fingerprint,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    pub fn num_queries(&self) -> usize {
        self.text_ids.len()
    }

    pub fn ground_truth(&self) -> &GroundTruth {
        &self.ground_truth
    }

    /// Identifies the data and the text settings (files by path, size and mtime) for cache keys.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// How a model is run.
#[derive(Debug, Clone, Copy)]
pub struct ScoreOptions {
    pub img_batch_size: usize,
    pub text_batch_size: usize,
    pub precision: cnclip_model::Precision,
    pub device: Device,
}

/// A scored checkpoint: its features (L2-normalised, f32) and its score.
pub struct Scored {
    pub image: Features,
    pub text: Features,
    pub score: Score,
}

/// Runs `model` over the split and scores it. The model is put in `options.precision`.
pub fn score_model(
    model: &mut Clip,
    val: &ValSet,
    options: &ScoreOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Scored, SoupError> {
    model.set_precision(options.precision);
    let text = cnclip_extract::text_features(
        model,
        &val.text_ids,
        &val.tokens,
        &ExtractOptions::new(options.text_batch_size),
        progress,
    )?;
    let resolution = u32::try_from(model.config().vision.image_resolution)
        .map_err(|_| SoupError::Invalid("image resolution out of range".into()))?;
    let image = cnclip_extract::image_features(
        model,
        &val.images,
        val.images.ids(),
        &Preprocessor::new(resolution)?,
        &ExtractOptions::new(options.img_batch_size),
        progress,
    )?;
    let score = retrieval::muge::muge_score(
        &text.view(),
        &image.view(),
        &val.ground_truth,
        options.device,
    )?;
    Ok(Scored { image, text, score })
}
