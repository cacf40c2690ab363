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

/// A ResNet tower's BatchNorm statistics drift apart between ranks when each updates them from its
/// own batch (training without `--use-bn-sync`); validation must still be one process's with rank
/// 0's model, as torch's DDP (which broadcasts buffers from rank 0) gives. Rank 1 starts from
/// statistics far from rank 0's; both ranks' results must equal a single process's on rank 0's
/// model, bit for bit (the gathered rows are the same computations on the same weights).
#[test]
fn ranks_validate_with_rank_0_batch_norm_statistics() {
    let mut config = common::tiny_resnet_config();
    config.text.vocab_size = 21128;
    let reference = cnclip_model::Clip::new(&config, tch::Device::Cpu);
    // Statistics unlike the initial zeros/ones, so a rank that kept its own would encode otherwise.
    tch::no_grad(|| {
        for (key, t) in reference.named_tensors() {
            if key.ends_with(".running_mean") {
                let _ = t.shallow_clone().fill_(0.25);
            } else if key.ends_with(".running_var") {
                let _ = t.shallow_clone().fill_(2.0);
            }
        }
    });
    // Plain values (tensors cannot be shared between the rank threads); f64 holds f32 and the
    // int64 counters exactly.
    let state: Vec<(String, Vec<f64>, Vec<i64>, tch::Kind)> = reference
        .named_tensors()
        .into_iter()
        .map(|(k, t)| {
            let values = Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap();
            (k, values, t.size(), t.kind())
        })
        .collect();
    let copy_of = |rank: usize| {
        let model = cnclip_model::Clip::new(&config, tch::Device::Cpu);
        let tensors = model.named_tensors();
        tch::no_grad(|| {
            for (key, values, shape, kind) in &state {
                let value = tch::Tensor::from_slice(values)
                    .reshape(shape.as_slice())
                    .to_kind(*kind);
                let mut target = tensors[key].shallow_clone();
                if rank == 1 && key.ends_with(".running_var") {
                    target.copy_(&(value * 5.0));
                } else {
                    target.copy_(&value);
                }
            }
        });
        model
    };

    let split = LmdbSplit::open(lmdb("valid-ddp-bn")).unwrap();
    let prep = Preprocessor::new(64).unwrap();
    let text = TextPipeline::new(RunConfig::default().context_length).unwrap();
    let batch = 3;
    let single = validate_in(
        &copy_of(0),
        &split,
        &prep,
        &text,
        batch,
        1,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let port = free_port().unwrap();
    let timeout = Duration::from_secs(60);
    let (split, prep, text, copy_of) = (&split, &prep, &text, &copy_of);
    let results: Vec<_> = std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                scope.spawn(move || {
                    let model = copy_of(rank);
                    let store = Store::tcp("127.0.0.1", port, 2, rank == 0, timeout).unwrap();
                    let loopback = GlooDevice::Hostname("127.0.0.1".into());
                    let group =
                        ProcessGroup::gloo(&store, "validate-bn", rank, 2, timeout, &loopback)
                            .unwrap();
                    let result = validate_in(
                        &model,
                        split,
                        prep,
                        text,
                        batch,
                        1,
                        Some(&group),
                        &mut |_, _| {},
                    )
                    .unwrap();
                    let var = model
                        .named_tensors()
                        .into_iter()
                        .find(|(k, _)| k.ends_with(".running_var"))
                        .map(|(_, t)| t.double_value(&[0]))
                        .unwrap();
                    (result, var)
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (rank, ((v, features, _), var)) in results.into_iter().enumerate() {
        assert_eq!(v, single.0, "rank {rank}");
        assert_eq!(features.images, single.1.images, "rank {rank}");
        assert_eq!(var, 2.0, "rank {rank} holds rank 0's statistics");
    }
    for tag in ["raw-valid-ddp-bn", "lmdb-valid-ddp-bn"] {
        let dir = std::env::temp_dir().join(format!("cnclip-train-{}-{tag}", std::process::id()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
