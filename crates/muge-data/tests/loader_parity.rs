//! The loader against cn_clip's `LMDBDataset` (evaluation transform, resolution 32, context
//! length 52) on the committed LMDB: same pixels bit for bit, same token ids (with and without the
//! product prompt), same `eos_index`; plus ordering, worker-count independence, resume, error
//! reporting and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use cnclip_model::preprocess::{DecodedImage, PreprocessError, Preprocessor, RgbImage};
use common::{cnclip_lmdb, fixtures, tiny_data};
use muge_data::files::BadRecordPolicy;
use muge_data::lmdb::LmdbSplit;
use muge_data::loader::{
    Batch, ImageTransform, Loader, LoaderConfig, LoaderError, MemorySource, SampleError, SampleKey,
};
use muge_data::sampler::{DistributedSampler, EpochPlan, pad_dataset_len};
use muge_data::text::TextPipeline;
use tch::{Kind, Tensor};

struct Expected {
    images: Tensor,
    texts: Tensor,
    texts_prompt: Tensor,
    eos: Tensor,
}

fn expected() -> Expected {
    let (sd, _) =
        cnclip_model::weights::read_safetensors(fixtures().join("cnclip_samples.safetensors"))
            .unwrap();
    let get = |k: &str| sd.get(k).unwrap().shallow_clone();
    Expected {
        images: get("images"),
        texts: get("texts"),
        texts_prompt: get("texts_prompt"),
        eos: get("eos"),
    }
}

fn split() -> Arc<LmdbSplit> {
    Arc::new(LmdbSplit::open(cnclip_lmdb().join("train")).unwrap())
}

fn preprocessor() -> Arc<Preprocessor> {
    Arc::new(Preprocessor::new(32).unwrap())
}

fn plan(indices: Vec<u64>) -> EpochPlan {
    EpochPlan {
        epoch: 0,
        offset: 0,
        indices,
    }
}

fn config(batch_size: usize, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        workers,
        ..LoaderConfig::default()
    }
}

fn collect(loader: Loader) -> Vec<Batch> {
    loader.map(|b| b.unwrap()).collect()
}

/// Every row of every batch equals cn_clip's tensors for pair `index % N`.
fn assert_matches_cn_clip(batches: &[Batch], want: &Expected, prompt: bool, n: u64) {
    let texts = if prompt {
        &want.texts_prompt
    } else {
        &want.texts
    };
    for batch in batches {
        assert_eq!(batch.images.kind(), Kind::Float);
        assert_eq!(batch.texts.kind(), Kind::Int64);
        for (k, &index) in batch.indices.iter().enumerate() {
            let i = (index % n) as i64;
            let k = k as i64;
            assert!(
                batch.images.get(k).equal(&want.images.get(i)),
                "pixels of sample {index} differ from cn_clip's"
            );
            assert!(
                batch.texts.get(k).equal(&texts.get(i)),
                "ids of sample {index}"
            );
            if !prompt {
                assert_eq!(
                    batch.eos_indices[k as usize],
                    want.eos.int64_value(&[i]),
                    "eos of {index}"
                );
            }
        }
    }
}

#[test]
fn loader_reproduces_lmdb_dataset() {
    let want = expected();
    let split = split();
    let n = split.num_samples();
    assert_eq!(n, 9);
    let loader = Loader::new(
        split.clone(),
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan((0..n).collect()),
        config(4, 2),
    )
    .unwrap();
    assert_eq!(loader.num_batches(), 3);
    let batches = collect(loader);
    let sizes: Vec<_> = batches.iter().map(|b| b.len()).collect();
    assert_eq!(sizes, [4, 4, 1]);
    assert_eq!(batches[0].images.size(), [4, 3, 32, 32]);
    assert_eq!(batches[0].texts.size(), [4, 52]);
    assert_matches_cn_clip(&batches, &want, false, n);
    let order: Vec<u64> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());
    assert_eq!(batches[2].batch_index, 2);
}

#[test]
fn product_prompt_matches_the_seed_edit() {
    let want = expected();
    let split = split();
    let n = split.num_samples();
    let text = TextPipeline::new(52).unwrap().with_product_prompt();
    let loader = Loader::new(
        split,
        preprocessor(),
        text,
        &plan((0..n).collect()),
        config(3, 1),
    )
    .unwrap();
    assert_matches_cn_clip(&collect(loader), &want, true, n);
}

/// cn_clip's training order: padded length, DistributedSampler, rank slices; indices past N wrap.
#[test]
fn shuffled_padded_epoch_with_any_worker_count() {
    let want = expected();
    let split = split();
    let n = split.num_samples();
    let len = pad_dataset_len(n, 4 * 2).unwrap();
    assert_eq!(len, 16);
    let sampler = DistributedSampler::new(len, 2, 1, 123).unwrap();
    let plan = sampler.plan(3, 0).unwrap();
    assert!(
        plan.indices.iter().any(|&i| i >= n),
        "padding indices are exercised"
    );
    let run = |workers| {
        collect(
            Loader::new(
                split.clone(),
                preprocessor(),
                TextPipeline::new(52).unwrap(),
                &plan,
                config(4, workers),
            )
            .unwrap(),
        )
    };
    let inline = run(0);
    assert_matches_cn_clip(&inline, &want, false, n);
    let order: Vec<u64> = inline.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, plan.indices);
    for workers in [1, 3, 8] {
        let other = run(workers);
        assert_eq!(other.len(), inline.len());
        for (a, b) in inline.iter().zip(&other) {
            assert_eq!(a.indices, b.indices, "{workers} workers");
            assert!(
                a.images.equal(&b.images) && a.texts.equal(&b.texts),
                "{workers} workers"
            );
        }
    }
    // Resuming after 3 samples continues with the same samples.
    let resumed = sampler.plan(3, 3).unwrap();
    let batches = collect(
        Loader::new(
            split,
            preprocessor(),
            TextPipeline::new(52).unwrap(),
            &resumed,
            config(4, 2),
        )
        .unwrap(),
    );
    let order: Vec<u64> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, plan.indices[3..]);
}

#[test]
fn memory_source_from_files_gives_the_lmdb_tensors() {
    let want = expected();
    let source = Arc::new(
        MemorySource::from_files(
            tiny_data().join("train_imgs.tsv"),
            tiny_data().join("train_texts.jsonl"),
            BadRecordPolicy::Fail,
        )
        .unwrap(),
    );
    let loader = Loader::new(
        source,
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan((0..12).collect()),
        config(5, 2),
    )
    .unwrap();
    assert_matches_cn_clip(&collect(loader), &want, false, 9);
}

#[test]
fn drop_last_drops_the_short_batch() {
    let mut c = config(4, 2);
    c.drop_last = true;
    let loader = Loader::new(
        split(),
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan((0..9).collect()),
        c,
    )
    .unwrap();
    assert_eq!(loader.num_batches(), 2);
    assert_eq!(collect(loader).len(), 2);
}

/// Records the keys it is called with and returns a fixed-size grey image.
struct Recording {
    keys: Mutex<Vec<SampleKey>>,
    size: usize,
}

impl ImageTransform for Recording {
    type Error = PreprocessError;

    fn output_size(&self) -> (usize, usize) {
        (8, 8)
    }

    fn apply(&self, _image: &DecodedImage, sample: SampleKey) -> Result<RgbImage, PreprocessError> {
        self.keys.lock().unwrap().push(sample);
        Ok(RgbImage::from_raw(self.size, self.size, vec![128; self.size * self.size * 3]).unwrap())
    }
}

#[test]
fn transforms_get_seed_epoch_and_dataset_index() {
    let t = Arc::new(Recording {
        keys: Mutex::new(Vec::new()),
        size: 8,
    });
    let mut c = config(2, 3);
    c.seed = 99;
    let p = EpochPlan {
        epoch: 4,
        offset: 0,
        indices: vec![5, 17, 2, 11],
    };
    let batches =
        collect(Loader::new(split(), t.clone(), TextPipeline::new(52).unwrap(), &p, c).unwrap());
    assert_eq!(batches[0].images.size(), [2, 3, 8, 8]);
    let mut keys = t.keys.lock().unwrap().clone();
    keys.sort_by_key(|k| k.index);
    let want: Vec<SampleKey> = [2, 5, 11, 17]
        .into_iter()
        .map(|index| SampleKey {
            seed: 99,
            epoch: 4,
            index,
        })
        .collect();
    assert_eq!(keys, want);
}

#[test]
fn a_wrong_transform_size_is_an_error_of_the_sample() {
    let t = Arc::new(Recording {
        keys: Mutex::new(Vec::new()),
        size: 7,
    });
    let mut loader = Loader::new(
        split(),
        t,
        TextPipeline::new(52).unwrap(),
        &plan(vec![4]),
        config(1, 1),
    )
    .unwrap();
    let e = loader.next().unwrap().unwrap_err();
    assert!(matches!(
        e,
        LoaderError::Sample {
            source: SampleError::TransformSize { .. },
            ..
        }
    ));
    let msg = e.to_string();
    assert!(
        msg.starts_with("sample 4 (pair 4, image 999, text 7):"),
        "{msg}"
    );
    assert!(msg.contains("7x7 pixels, expected 8x8"), "{msg}");
}

#[test]
fn a_corrupt_image_names_the_sample_and_ends_the_epoch() {
    let mut source = MemorySource::new();
    source.push_pair(1, 10, "好");
    source.push_pair(2, 20, "坏");
    source.insert_image(1, b"\x89PNG\r\n\x1a\n broken".to_vec());
    source.insert_image(2, b"GIF89a".to_vec());
    let mut loader = Loader::new(
        Arc::new(source),
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan(vec![3, 0, 1, 0]),
        config(1, 2),
    )
    .unwrap();
    let e = loader.next().unwrap().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("sample 3 (pair 1, image 2, text 20): "),
        "{msg}"
    );
    assert!(loader.next().is_none(), "the epoch ends at the first error");

    // A pair whose image is missing names both ids.
    let mut source = MemorySource::new();
    source.push_pair(5, 50, "x");
    let mut loader = Loader::new(
        Arc::new(source),
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan(vec![0]),
        config(1, 0),
    )
    .unwrap();
    let msg = loader.next().unwrap().unwrap_err().to_string();
    assert!(msg.contains("no image 5 (pair 0, text 50)"), "{msg}");
}

#[test]
fn dropping_mid_epoch_joins_the_workers() {
    let split = split();
    let p = plan((0..2000).collect());
    let mut c = config(2, 4);
    c.prefetch = 1;
    let mut loader =
        Loader::new(split, preprocessor(), TextPipeline::new(52).unwrap(), &p, c).unwrap();
    assert_eq!(loader.num_batches(), 1000);
    let first = loader.next().unwrap().unwrap();
    assert_eq!(first.indices, [0, 1]);
    let start = std::time::Instant::now();
    drop(loader);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn invalid_settings_are_rejected() {
    let make = |c| {
        Loader::new(
            split(),
            preprocessor(),
            TextPipeline::new(52).unwrap(),
            &plan(vec![0]),
            c,
        )
    };
    assert!(make(config(0, 1)).is_err());
    let mut c = config(1, 2);
    c.prefetch = 0;
    let e = make(c).err().unwrap();
    assert!(e.to_string().contains("prefetch"), "{e}");
    // An empty plan has no batches.
    let mut empty = Loader::new(
        split(),
        preprocessor(),
        TextPipeline::new(52).unwrap(),
        &plan(vec![]),
        config(4, 2),
    )
    .unwrap();
    assert_eq!(empty.num_batches(), 0);
    assert!(empty.next().is_none());
}

/// The evaluation text path uses the same pipeline: a texts file encodes to the ids cn_clip's
/// datasets give (with and without the product prompt).
#[test]
fn eval_texts_use_the_training_pipeline() {
    let want = expected();
    let split = split();
    let encoded = TextPipeline::new(52)
        .unwrap()
        .with_product_prompt()
        .encode_texts_file(
            tiny_data().join("tianchi_texts.jsonl"),
            BadRecordPolicy::Fail,
        )
        .unwrap();
    assert_eq!(encoded.text_ids, [8428, 248816, 7, 2147483648, 5, 6]);
    assert_eq!(encoded.ids.size(), [6, 52]);
    // Pair i's text row in the cn_clip fixture equals the encoded row of its text id.
    for i in 0..split.num_samples() {
        let text_id = split.pairs().pair(i).unwrap().text_id;
        let row = encoded.text_ids.iter().position(|&t| t == text_id).unwrap() as i64;
        assert!(
            encoded.ids.get(row).equal(&want.texts_prompt.get(i as i64)),
            "pair {i}"
        );
    }
}
