//! Offline multiplication of rare training images: augmented copies of the images of queries with
//! few images, added to the training set before training.
//!
//! Policy (documented here because it changes the training set):
//!
//! * A training query *qualifies* when it has between 1 and [`OfflinePolicy::max_images`]
//!   (default 2) images: such queries give the contrastive loss few positives, so their images
//!   are multiplied.
//! * Every distinct image of a qualifying query gets [`OfflinePolicy::copies`] augmented copies
//!   (default 4), each the output of the training transform ([`TrainTransform`]: random resized
//!   crop, flip, AutoAugment) at `size`×`size`, JPEG-encoded at quality 95 with the `image`
//!   crate. An image shared by several qualifying queries is copied once and the copies are shared.
//! * Copy `k` of image `id` uses the key `(policy seed, epoch = k, index = id)` on its own stream
//!   ([`OFFLINE_STREAM`]), so it is reproducible, independent of record order, and never equal to
//!   the online augmentation of the same key.
//! * New image ids follow the largest id already in use (images and queries), in order of first
//!   appearance of the source image in the queries, then copy number.
//! * Each qualifying query keeps its images and gains their copies (appended, in the same order).
//!   Other queries are unchanged.
//!
//! Training then still applies the online transform to the copies, as to any image.

use std::collections::HashMap;

use cnclip_model::preprocess::decode_named;
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;

use super::{AugmentError, TrainTransform};
use crate::loader::SampleKey;

/// The stream ([`TrainTransform::seed`]) of offline copies: distinct from the online stream 0.
pub const OFFLINE_STREAM: u64 = 0x6f66_666c_696e_6501;

/// An image record: its id and its encoded file bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineImage {
    pub id: i64,
    pub bytes: Vec<u8>,
}

/// A query and the ids of its relevant images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryImages {
    pub query_id: i64,
    pub image_ids: Vec<i64>,
}

/// How many copies to make, of which images, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflinePolicy {
    /// Queries with at most this many images (and at least one) qualify.
    pub max_images: usize,
    /// Augmented copies per image of a qualifying query.
    pub copies: usize,
    /// Side of the square copies.
    pub size: u32,
    /// The run seed of the copies' keys.
    pub seed: u64,
    /// JPEG quality of the copies.
    pub jpeg_quality: u8,
}

impl Default for OfflinePolicy {
    fn default() -> Self {
        OfflinePolicy {
            max_images: 2,
            copies: 4,
            size: 224,
            seed: 0,
            jpeg_quality: 95,
        }
    }
}

/// The result: the new image records and every query, updated where it qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AugmentedImages {
    /// Only the new (augmented) images, in id order.
    pub new_images: Vec<OfflineImage>,
    /// `(source id, copy id)` for each new image, in the same order.
    pub sources: Vec<(i64, i64)>,
    /// All queries, in input order.
    pub queries: Vec<QueryImages>,
}

/// Errors specific to offline multiplication.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("query {query_id} refers to image {image_id}, which is not among the images given")]
    MissingImage { query_id: i64, image_id: i64 },
    #[error("no image id is left above {0} for the augmented copies")]
    IdsExhausted(i64),
    #[error(transparent)]
    Augment(#[from] AugmentError),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("{path}: image {image_id}: bad base64: {reason}")]
    Base64 {
        path: std::path::PathBuf,
        image_id: i64,
        reason: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What [`multiply_rare_images_in_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineSummary {
    pub images_tsv: std::path::PathBuf,
    pub texts_jsonl: std::path::PathBuf,
    /// Queries that qualified and gained copies.
    pub queries_multiplied: usize,
    /// Distinct source images copied, and the copies written.
    pub source_images: usize,
    pub new_images: usize,
}

/// The file-level form of [`multiply_rare_images`], for `build_lmdb --offline-augment`: reads
/// `{data_dir}/{split}_imgs.tsv` and `{split}_texts.jsonl`, and writes both into `out_dir` — every
/// original image line unchanged, the copies appended, and the queries (in the Chinese-CLIP
/// form) with their copies' ids added. Only the images of qualifying queries are held in memory.
pub fn multiply_rare_images_in_files(
    data_dir: &std::path::Path,
    split: &str,
    out_dir: &std::path::Path,
    policy: &OfflinePolicy,
    bad_records: crate::files::BadRecordPolicy,
) -> Result<OfflineSummary, OfflineError> {
    use crate::files::{ImageTsvReader, TextJsonlReader};
    use std::collections::HashSet;
    use std::io::Write;

    let write_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| OfflineError::Write { path, source }
    };
    let texts_in = data_dir.join(format!("{split}_texts.jsonl"));
    let images_in = data_dir.join(format!("{split}_imgs.tsv"));
    let mut texts = Vec::new();
    let mut queries = Vec::new();
    for record in TextJsonlReader::open(&texts_in, bad_records)? {
        let record = record?;
        queries.push(QueryImages {
            query_id: record.text_id,
            image_ids: record.image_ids.clone().unwrap_or_default(),
        });
        texts.push(record);
    }
    let qualifies = |q: &QueryImages| (1..=policy.max_images).contains(&q.image_ids.len());
    let wanted: HashSet<i64> = queries
        .iter()
        .filter(|q| qualifies(q))
        .flat_map(|q| q.image_ids.iter().copied())
        .collect();

    std::fs::create_dir_all(out_dir).map_err(write_err(out_dir))?;
    let images_out = out_dir.join(format!("{split}_imgs.tsv"));
    let texts_out = out_dir.join(format!("{split}_texts.jsonl"));
    let mut tsv = std::io::BufWriter::new(
        std::fs::File::create(&images_out).map_err(write_err(&images_out))?,
    );
    let mut kept = Vec::new();
    for record in ImageTsvReader::open(&images_in, bad_records)? {
        let record = record?;
        writeln!(tsv, "{}\t{}", record.image_id, record.base64).map_err(write_err(&images_out))?;
        if wanted.contains(&record.image_id) {
            let bytes = crate::base64::decode_cn_clip(record.base64.as_bytes()).map_err(|e| {
                OfflineError::Base64 {
                    path: images_in.clone(),
                    image_id: record.image_id,
                    reason: e.to_string(),
                }
            })?;
            kept.push(OfflineImage {
                id: record.image_id,
                bytes,
            });
        }
    }
    let augmented = multiply_rare_images(&kept, &queries, policy)?;
    for image in &augmented.new_images {
        writeln!(tsv, "{}\t{}", image.id, crate::base64::encode(&image.bytes))
            .map_err(write_err(&images_out))?;
    }
    tsv.flush().map_err(write_err(&images_out))?;

    let mut jsonl =
        std::io::BufWriter::new(std::fs::File::create(&texts_out).map_err(write_err(&texts_out))?);
    for (record, query) in texts.iter().zip(&augmented.queries) {
        let line = serde_json::json!({
            "text_id": record.text_id,
            "text": record.text,
            "image_ids": query.image_ids,
        });
        writeln!(jsonl, "{line}").map_err(write_err(&texts_out))?;
    }
    jsonl.flush().map_err(write_err(&texts_out))?;
    Ok(OfflineSummary {
        images_tsv: images_out,
        texts_jsonl: texts_out,
        queries_multiplied: queries.iter().filter(|q| qualifies(q)).count(),
        source_images: augmented
            .sources
            .iter()
            .map(|(s, _)| *s)
            .collect::<HashSet<_>>()
            .len(),
        new_images: augmented.new_images.len(),
    })
}

fn encode_jpeg(
    rgb: &cnclip_model::preprocess::RgbImage,
    quality: u8,
    id: i64,
) -> Result<Vec<u8>, AugmentError> {
    let mut out = Vec::new();
    let (w, h) = (rgb.width() as u32, rgb.height() as u32);
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode(rgb.as_raw(), w, h, ExtendedColorType::Rgb8)
        .map_err(|e| AugmentError::Encode {
            id,
            reason: e.to_string(),
        })?;
    Ok(out)
}

/// Applies the policy to in-memory records (see the module documentation).
pub fn multiply_rare_images(
    images: &[OfflineImage],
    queries: &[QueryImages],
    policy: &OfflinePolicy,
) -> Result<AugmentedImages, OfflineError> {
    let transform = TrainTransform::new(policy.size, OFFLINE_STREAM)?;
    let by_id: HashMap<i64, &OfflineImage> = images.iter().map(|i| (i.id, i)).collect();
    let qualifies = |q: &QueryImages| (1..=policy.max_images).contains(&q.image_ids.len());

    // Source images in order of first appearance in qualifying queries.
    let mut order = Vec::new();
    let mut copies_of: HashMap<i64, Vec<i64>> = HashMap::new();
    for q in queries.iter().filter(|q| qualifies(q)) {
        for &id in &q.image_ids {
            if !by_id.contains_key(&id) {
                return Err(OfflineError::MissingImage {
                    query_id: q.query_id,
                    image_id: id,
                });
            }
            if copies_of.insert(id, Vec::new()).is_none() {
                order.push(id);
            }
        }
    }

    let max_id = images
        .iter()
        .map(|i| i.id)
        .chain(queries.iter().flat_map(|q| q.image_ids.iter().copied()))
        .max()
        .unwrap_or(0);
    let mut next_id = max_id;
    let mut new_images = Vec::new();
    let mut sources = Vec::new();
    for id in order {
        let Some(record) = by_id.get(&id) else {
            continue;
        };
        if policy.copies == 0 {
            continue;
        }
        let decoded = decode_named(&record.bytes, &id.to_string())
            .map_err(|error| AugmentError::Decode { id, error })?;
        let mut ids = Vec::with_capacity(policy.copies);
        for k in 0..policy.copies {
            next_id = next_id
                .checked_add(1)
                .ok_or(OfflineError::IdsExhausted(next_id))?;
            let key = SampleKey {
                seed: policy.seed,
                epoch: k as u64,
                index: id as u64,
            };
            let rgb = transform.apply(&decoded, key)?;
            new_images.push(OfflineImage {
                id: next_id,
                bytes: encode_jpeg(&rgb, policy.jpeg_quality, id)?,
            });
            sources.push((id, next_id));
            ids.push(next_id);
        }
        copies_of.insert(id, ids);
    }

    let queries = queries
        .iter()
        .map(|q| {
            let mut q = q.clone();
            if qualifies(&q) {
                let extra: Vec<i64> = q
                    .image_ids
                    .iter()
                    .flat_map(|id| copies_of.get(id).into_iter().flatten().copied())
                    .collect();
                q.image_ids.extend(extra);
            }
            q
        })
        .collect();
    Ok(AugmentedImages {
        new_images,
        sources,
        queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let mut buf = Vec::new();
        let px: Vec<u8> = (0..w * h * 3)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(&px, w, h, ExtendedColorType::Rgb8)
            .unwrap();
        buf
    }
    use image::ImageEncoder;

    #[test]
    fn rare_queries_gain_copies_and_others_do_not() {
        let images: Vec<OfflineImage> = (1..=4)
            .map(|id| OfflineImage {
                id,
                bytes: png(20, 16, id as u8 * 37),
            })
            .collect();
        let queries = vec![
            QueryImages {
                query_id: 10,
                image_ids: vec![1],
            },
            QueryImages {
                query_id: 11,
                image_ids: vec![2, 3, 4],
            },
            QueryImages {
                query_id: 12,
                image_ids: vec![3, 1],
            },
            QueryImages {
                query_id: 13,
                image_ids: vec![],
            },
        ];
        let policy = OfflinePolicy {
            copies: 2,
            size: 16,
            ..OfflinePolicy::default()
        };
        let out = multiply_rare_images(&images, &queries, &policy).unwrap();
        // Sources 1 and 3 (first seen in queries 10 and 12), two copies each, ids from 5.
        assert_eq!(out.sources, vec![(1, 5), (1, 6), (3, 7), (3, 8)]);
        assert_eq!(out.queries[0].image_ids, vec![1, 5, 6]);
        assert_eq!(out.queries[1].image_ids, vec![2, 3, 4]);
        assert_eq!(out.queries[2].image_ids, vec![3, 1, 7, 8, 5, 6]);
        assert_eq!(out.queries[3].image_ids, Vec::<i64>::new());
        for img in &out.new_images {
            let d = decode_named(&img.bytes, "copy").unwrap();
            assert_eq!((d.width(), d.height()), (16, 16));
        }
        // Copies of one image differ from each other, and the whole result is reproducible.
        assert_ne!(out.new_images[0].bytes, out.new_images[1].bytes);
        assert_eq!(
            out,
            multiply_rare_images(&images, &queries, &policy).unwrap()
        );

        let missing = vec![QueryImages {
            query_id: 9,
            image_ids: vec![99],
        }];
        let e = multiply_rare_images(&images, &missing, &policy).unwrap_err();
        assert!(e.to_string().contains("image 99"), "{e}");
    }

    /// The file form: the same TSV lines plus the copies, queries rewritten with their new ids,
    /// and the result builds into an LMDB.
    #[test]
    fn files_gain_copies_and_build_into_lmdb() {
        let root = std::env::temp_dir().join(format!("offline-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (data, out) = (root.join("data"), root.join("aug"));
        std::fs::create_dir_all(&data).unwrap();
        let tsv: String = (1..=3)
            .map(|id| {
                format!(
                    "{id}\t{}\n",
                    crate::base64::encode(&png(20, 16, id as u8 * 41))
                )
            })
            .collect();
        std::fs::write(data.join("train_imgs.tsv"), &tsv).unwrap();
        std::fs::write(
            data.join("train_texts.jsonl"),
            concat!(
                "{\"text_id\": 7, \"text\": \"红色 抱枕\", \"image_ids\": [1]}\n",
                "{\"text_id\": 8, \"text\": \"蓝色\", \"image_ids\": [1, 2, 3]}\n",
            ),
        )
        .unwrap();
        let policy = OfflinePolicy {
            copies: 3,
            size: 16,
            ..OfflinePolicy::default()
        };
        let summary = multiply_rare_images_in_files(
            &data,
            "train",
            &out,
            &policy,
            crate::files::BadRecordPolicy::Fail,
        )
        .unwrap();
        assert_eq!(
            (
                summary.queries_multiplied,
                summary.source_images,
                summary.new_images
            ),
            (1, 1, 3)
        );
        let written = std::fs::read_to_string(&summary.images_tsv).unwrap();
        assert!(written.starts_with(&tsv), "original lines first, unchanged");
        let new_ids: Vec<&str> = written
            .lines()
            .skip(3)
            .map(|l| l.split('\t').next().unwrap())
            .collect();
        assert_eq!(new_ids, ["4", "5", "6"]);
        let texts = std::fs::read_to_string(&summary.texts_jsonl).unwrap();
        let first: serde_json::Value = serde_json::from_str(texts.lines().next().unwrap()).unwrap();
        assert_eq!(first["text"], "红色 抱枕");
        assert_eq!(first["image_ids"], serde_json::json!([1, 4, 5, 6]));
        let built = crate::lmdb::build_split(
            &out,
            "train",
            &root.join("lmdb"),
            crate::files::BadRecordPolicy::Fail,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(built.images, 6);
        assert_eq!(built.pairs, 7);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
