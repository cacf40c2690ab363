//! The MUGE text→image score of a set of features: every text's top 10 images by [`search`]'s
//! canonical order, scored by [`eval::muge_score`] — what `make_topk_predictions.py` followed by
//! `evaluation.py` computes. Training validation, the soup's candidate scoring and anything else
//! that reports "valid MUGE recall" call [`muge_score`], so the number printed while training,
//! in a sweep table and in a soup report is the one `evaluate` gives on the predictions
//! [`write_predictions`](crate::write_predictions) writes from the same features.

use std::collections::HashMap;

use tch::Device;

use crate::error::Result;
use crate::search::{Hit, SearchOptions, search};
use crate::store::FeatureView;

/// Images ranked per text: cn_clip's `make_topk_predictions.py` default `--top-k`.
pub const MUGE_TOP_K: usize = 10;

/// The top [`MUGE_TOP_K`] images of every text (rows of `image`), in [`search`]'s order.
pub fn text_to_image_hits(
    text: &FeatureView<'_>,
    image: &FeatureView<'_>,
    device: Device,
) -> Result<Vec<Vec<Hit>>> {
    let options = SearchOptions {
        k: MUGE_TOP_K,
        device,
        ..SearchOptions::default()
    };
    search(text, image, &options)
}

/// MUGE Recall@1/5/10 and their mean of `text` against `image` (ids are the views' ids).
pub fn muge_score(
    text: &FeatureView<'_>,
    image: &FeatureView<'_>,
    ground_truth: &eval::GroundTruth,
    device: Device,
) -> Result<eval::Score> {
    let hits = text_to_image_hits(text, image, device)?;
    let rankings: HashMap<i64, Vec<i64>> = text
        .ids()
        .iter()
        .zip(&hits)
        .map(|(&q, hits)| (q, hits.iter().map(|h| image.ids()[h.index]).collect()))
        .collect();
    Ok(eval::muge_score(&rankings, ground_truth)?)
}
