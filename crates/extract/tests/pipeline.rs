//! Image sources and the pipeline on the repository's fixtures: an LMDB, a MUGE TSV, folders made
//! from them; features equal, bit for bit, to the model run directly on the same batches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_extract::{ExtractOptions, ImageSource, image_features, text_features};
use cnclip_model::preprocess::Preprocessor;
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-extract-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lmdb_split() -> PathBuf {
    repo().join("crates/muge-data/tests/fixtures/cnclip_lmdb/train")
}

fn tiny_model() -> Clip {
    let fx = repo().join("crates/cnclip-model/tests/fixtures/model");
    let config = ClipConfig::from_json_files(
        &fx.join("configs/tiny-vit.json"),
        &fx.join("configs/tiny-bert.json"),
    )
    .unwrap();
    let options = LoadOptions {
        config: Some(config),
        ..Default::default()
    };
    Clip::load(fx.join("tiny_vit.pt"), &options, Device::Cpu).unwrap()
}

#[test]
fn sources_list_and_read_the_same_images() {
    // The split directory resolves to its imgs/ LMDB; ids in key order.
    let lmdb = ImageSource::open(lmdb_split()).unwrap();
    assert_eq!(lmdb.kind(), "lmdb");
    assert_eq!(lmdb.path(), lmdb_split().join("imgs"));
    assert!(lmdb.len() >= 2, "{}", lmdb.len());
    let ids = lmdb.ids().to_vec();

    // The same images as files named by id: a folder source gets the ids from the stems and
    // reads the same bytes.
    let dir = temp("folder");
    for id in &ids {
        let bytes = lmdb.image_bytes(*id).unwrap().unwrap();
        std::fs::write(dir.join(format!("{id}.jpg")), bytes).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    let folder = ImageSource::open(&dir).unwrap();
    assert_eq!(folder.kind(), "folder");
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| format!("{id}.jpg"));
    assert_eq!(
        folder.ids(),
        sorted,
        "sorted file names, ids from the stems"
    );
    assert_eq!(folder.fetch(&ids).unwrap(), {
        let mut items = Vec::new();
        for id in &ids {
            let file = dir.join(format!("{id}.jpg"));
            items.push((file.display().to_string(), std::fs::read(&file).unwrap()));
        }
        items
    });
    let err = folder.fetch(&[-7]).unwrap_err().to_string();
    assert!(err.contains("has no image -7"), "{err}");
    assert_eq!(lmdb.image_bytes(-7).unwrap(), None);

    // An ImageFolder: classes from sorted sub-directories, ids 0, 1, … in listing order.
    let classes = temp("classes");
    for (i, id) in ids.iter().enumerate() {
        let class = classes.join(if i % 2 == 0 { "a" } else { "b" });
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(
            dir.join(format!("{id}.jpg")),
            class.join(format!("{id}.jpg")),
        )
        .unwrap();
    }
    let (source, targets) = ImageSource::image_folder(&classes, 2).unwrap();
    let targets = targets.unwrap();
    assert_eq!(source.ids(), (0..ids.len() as i64).collect::<Vec<_>>());
    assert_eq!(
        targets.iter().filter(|&&t| t == 0).count(),
        ids.len().div_ceil(2)
    );
    assert!(targets.windows(2).all(|w| w[0] <= w[1]), "{targets:?}");
    let err = ImageSource::image_folder(&classes, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 2 class folders but the label file has 1 labels"),
        "{err}"
    );
    // A flat folder is the images without classes.
    let (flat, none) = ImageSource::image_folder(&dir, 5).unwrap();
    assert!(none.is_none());
    assert_eq!(flat.len(), ids.len());

    // Identities change when the content does.
    let before = folder.identity().unwrap();
    std::fs::write(dir.join(format!("{}.jpg", ids[0])), b"changed").unwrap();
    assert_ne!(ImageSource::open(&dir).unwrap().identity().unwrap(), before);

    // A MUGE TSV: ids in file order, base64 decoded.
    let tsv =
        ImageSource::open(repo().join("crates/cnclip-train/tests/fixtures/loop/train_imgs.tsv"))
            .unwrap();
    assert_eq!(tsv.kind(), "tsv");
    let items = tsv.fetch(tsv.ids()).unwrap();
    assert_eq!(items.len(), tsv.len());
    assert!(items.iter().all(|(_, b)| b.len() > 100));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&classes).unwrap();
}

/// The pipeline's rows are the model's own outputs for the same batches (decoding ahead on other
/// threads changes nothing), whatever the prefetch depth.
#[test]
fn pipeline_rows_are_the_models_outputs() {
    let model = tiny_model();
    let source = ImageSource::open(lmdb_split()).unwrap();
    let size = u32::try_from(model.config().vision.image_resolution).unwrap();
    let prep = Preprocessor::new(size).unwrap();
    let ids = source.ids();
    let batch = 2;
    let mut expected = Vec::new();
    let _guard = tch::no_grad_guard();
    for chunk in ids.chunks(batch) {
        let pixels = prep
            .preprocess_batch(&source.fetch(chunk).unwrap())
            .unwrap();
        let rows = model
            .image_features(&pixels)
            .to_kind(Kind::Float)
            .contiguous();
        expected.extend(Vec::<f32>::try_from(rows.flatten(0, -1)).unwrap());
    }
    for prefetch in [1, 3] {
        let options = ExtractOptions {
            batch_size: batch,
            prefetch,
        };
        let mut events = Vec::new();
        let features = image_features(&model, &source, ids, &prep, &options, &mut |p| {
            events.push(p)
        })
        .unwrap();
        assert_eq!(features.ids, ids);
        assert_eq!(features.data, expected, "prefetch {prefetch}");
        assert_eq!(events.len(), 2 + ids.len().div_ceil(batch));
    }

    let tokens = Tensor::from_slice(&[101i64, 872, 102, 0, 101, 1962, 1377, 102]).view([2, 4]);
    let features = text_features(
        &model,
        &[5, 9],
        &tokens,
        &ExtractOptions::new(1),
        &mut |_| {},
    )
    .unwrap();
    let direct = model
        .text_features(&tokens)
        .to_kind(Kind::Float)
        .contiguous();
    // Batches of one row against one call over both rows: equal up to float rounding of the
    // batched matmuls; each row is L2-normalised, so its entries are at most 1 in magnitude and
    // a few ulps of 1 (2^-23 ≈ 1.2e-7) bound the difference.
    for (a, b) in features
        .data
        .iter()
        .zip(Vec::<f32>::try_from(direct.flatten(0, -1)).unwrap())
    {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
    assert_eq!(features.ids, [5, 9]);
    let err = text_features(&model, &[5], &tokens, &ExtractOptions::new(1), &mut |_| {});
    assert!(err.is_err(), "one id for two rows of tokens");
}
