//! The loader's memory is bounded however slowly training consumes: each worker decodes at most
//! `prefetch` finished batches plus the one it is building, so at most
//! `workers × (prefetch + 1) × batch_size` decoded images exist at once. Checked by counting the
//! transform's calls while nothing is consumed, then after each consumed batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cnclip_model::preprocess::{DecodedImage, PreprocessError, Preprocessor, RgbImage};
use common::cnclip_lmdb;
use muge_data::lmdb::LmdbSplit;
use muge_data::loader::{ImageTransform, Loader, LoaderConfig, SampleKey};
use muge_data::sampler::EpochPlan;
use muge_data::text::TextPipeline;

/// The eval transform, counting the images it produced.
struct Counting {
    inner: Preprocessor,
    calls: Arc<AtomicUsize>,
}

impl ImageTransform for Counting {
    type Error = PreprocessError;

    fn output_size(&self) -> (usize, usize) {
        self.inner.output_size()
    }

    fn apply(&self, image: &DecodedImage, sample: SampleKey) -> Result<RgbImage, Self::Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(image, sample)
    }
}

#[test]
fn a_stalled_consumer_holds_the_loader_to_its_bound() {
    let split = LmdbSplit::open(cnclip_lmdb().join("train")).unwrap();
    let n = split.num_samples();
    let calls = Arc::new(AtomicUsize::new(0));
    let (workers, prefetch, batch) = (2usize, 2usize, 3usize);
    let plan = EpochPlan {
        epoch: 0,
        offset: 0,
        // Far more samples than the bound, repeating the split's.
        indices: (0..400u64).map(|i| i % n).collect(),
    };
    let mut loader = Loader::new(
        Arc::new(split),
        Arc::new(Counting {
            inner: Preprocessor::new(32).unwrap(),
            calls: calls.clone(),
        }),
        TextPipeline::new(52).unwrap(),
        &plan,
        LoaderConfig {
            batch_size: batch,
            workers,
            prefetch,
            drop_last: false,
            seed: 0,
        },
    )
    .unwrap();
    let bound = workers * (prefetch + 1) * batch;
    std::thread::sleep(Duration::from_millis(1500));
    let idle = calls.load(Ordering::SeqCst);
    eprintln!("{idle} images decoded while nothing was consumed (bound {bound})");
    assert!(idle > 0, "the workers start at once");
    assert!(
        idle <= bound,
        "{idle} images decoded while nothing was consumed; bound {bound}"
    );
    for consumed in 1..=5 {
        loader.next().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let now = calls.load(Ordering::SeqCst);
        assert!(
            now <= bound + consumed * batch,
            "{now} images after {consumed} batches; bound {}",
            bound + consumed * batch
        );
    }
    // Dropping a loader that is still full stops its workers (no hang).
    drop(loader);
}
