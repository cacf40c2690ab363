//! Validation across two Gloo ranks (two threads of this process on 127.0.0.1): each rank encodes
//! its share of the validation images and texts, the rows are all-gathered, rank 0's recall is
//! broadcast — and every rank's result equals one process's, bit for bit: loss, accuracies,
//! recall, the features and the ground truth.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip_model::preprocess::Preprocessor;
use cnclip_train::RunConfig;
use cnclip_train::ddp::launch::free_port;
use cnclip_train::validate::validate_in;
use common::{lmdb, tiny_model};
use muge_data::{LmdbSplit, TextPipeline};
use std::time::Duration;
use torch_ext::dist::{GlooDevice, ProcessGroup, Store};

#[test]
fn two_ranks_validate_as_one_process() {
    let split = LmdbSplit::open(lmdb("valid-ddp")).unwrap();
    let model = tiny_model();
    let size = u32::try_from(model.config().vision.image_resolution).unwrap();
    let prep = Preprocessor::new(size).unwrap();
    let text = TextPipeline::new(RunConfig::default().context_length).unwrap();
    // Batches of 3: the split's images and texts divide unevenly between the two ranks.
    let batch = 3;
    let (single, single_features, single_last) =
        validate_in(&model, &split, &prep, &text, batch, 1, None, &mut |_, _| {}).unwrap();
    assert!(
        single_features.images.ids.len() > batch,
        "more than one batch per rank"
    );

    let port = free_port().unwrap();
    let timeout = Duration::from_secs(60);
    let (split, prep, text) = (&split, &prep, &text);
    let results: Vec<_> = std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                scope.spawn(move || {
                    // Each rank its own copy of the weights (a model is not shared across threads).
                    let model = &tiny_model();
                    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, timeout).unwrap();
                    let loopback = GlooDevice::Hostname("127.0.0.1".into());
                    let group = ProcessGroup::gloo(&store, "validate", rank, 2, timeout, &loopback)
                        .unwrap();
                    let mut seen = Vec::new();
                    let result = validate_in(
                        model,
                        split,
                        prep,
                        text,
                        batch,
                        1,
                        Some(&group),
                        &mut |done, total| seen.push((done, total)),
                    )
                    .unwrap();
                    (result, seen)
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (rank, ((v, features, last), seen)) in results.into_iter().enumerate() {
        assert_eq!(v, single, "rank {rank}");
        assert_eq!(last, single_last, "rank {rank}");
        assert_eq!(features.images, single_features.images, "rank {rank}");
        assert_eq!(features.texts, single_features.texts, "rank {rank}");
        assert_eq!(features.ground_truth, single_features.ground_truth);
        // Progress ends at the number of validation batches on every rank.
        let batches = split.num_samples().div_ceil(batch as u64);
        assert_eq!(seen.last(), Some(&(batches, batches)), "rank {rank}");
    }
    // The raw files and the LMDB `common::lmdb` made for this test.
    for tag in ["raw-valid-ddp", "lmdb-valid-ddp"] {
        let dir = std::env::temp_dir().join(format!("cnclip-train-{}-{tag}", std::process::id()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
