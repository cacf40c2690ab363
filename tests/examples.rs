//! Every example run as a user runs it, on tiny data, checking the files it writes: mini-MUGE →
//! `build_lmdb` → `finetune` (from scratch, with validation) → `convert` → `extract_features` →
//! `predict` → `evaluate`, and `zero_shot` on an image folder.
//!
//! `cargo test` builds the examples (debug) before running tests; this test runs those binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::example_bin;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(name: &str, args: &[&str]) -> String {
    let bin = example_bin(name);
    let out = Command::new(&bin).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

fn fails(name: &str, args: &[&str]) -> String {
    let out = Command::new(example_bin(name)).args(args).output().unwrap();
    assert!(!out.status.success(), "{name} {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-examples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const VISION: &str = r#"{"embed_dim":16,"image_resolution":32,"vision_layers":1,"vision_width":32,
    "vision_head_width":16,"vision_patch_size":16}"#;
const TEXT: &str = r#"{"vocab_size":21128,"text_attention_probs_dropout_prob":0.0,"text_hidden_act":"gelu",
    "text_hidden_dropout_prob":0.0,"text_hidden_size":16,"text_initializer_range":0.02,
    "text_intermediate_size":32,"text_max_position_embeddings":64,"text_num_attention_heads":2,
    "text_num_hidden_layers":1,"text_type_vocab_size":2}"#;

#[test]
fn the_pipeline_examples_write_what_cn_clip_would() {
    let dir = tempdir();
    let data = dir.join("data");
    let lmdb = dir.join("lmdb");
    let vision = dir.join("vision.json");
    let text = dir.join("text.json");
    std::fs::write(&vision, VISION).unwrap();
    std::fs::write(&text, TEXT).unwrap();

    let out = run(
        "mini_muge",
        &[
            "--out",
            s(&data),
            "--train-queries",
            "12",
            "--valid-queries",
            "4",
            "--test-queries",
            "4",
            "--train-images-per-query",
            "2",
            "--eval-images-per-query",
            "2",
            "--image-size",
            "32",
        ],
    );
    assert!(out.contains("valid    4 queries     8 images"), "{out}");
    run(
        "build_lmdb",
        &[
            "--data_dir",
            s(&data),
            "--splits",
            "train,valid,test",
            "--lmdb_dir",
            s(&lmdb),
        ],
    );
    for split in ["train", "valid", "test"] {
        assert!(lmdb.join(split).join("imgs").join("data.mdb").is_file());
        assert!(lmdb.join(split).join("pairs").join("data.mdb").is_file());
    }

    // Offline augmentation: 12 train queries of 2 images each all qualify.
    let out = run(
        "build_lmdb",
        &[
            "--data_dir",
            s(&data),
            "--splits",
            "train",
            "--lmdb_dir",
            s(&dir.join("lmdb-offline")),
            "--offline-augment",
            "2",
            "--offline-size",
            "32",
            "--check-images",
        ],
    );
    assert!(
        out.contains("24 images × 2 copies = 48 new images"),
        "{out}"
    );
    assert!(
        out.contains("Finished serializing 72 train split pairs"),
        "{out}"
    );

    let logs = dir.join("logs");
    let out = run(
        "finetune",
        &[
            "--train-data",
            s(&lmdb.join("train")),
            "--val-data",
            s(&lmdb.join("valid")),
            "--vision-model",
            s(&vision),
            "--text-model",
            s(&text),
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--beta1",
            "0.9",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--warmup",
            "1",
            "--max-epochs",
            "2",
            "--context-length",
            "24",
            "--precision",
            "fp32",
            "--num-workers",
            "1",
            "--device",
            "cpu",
            "--text-prompt",
            "--use-augment",
            "--logs",
            s(&logs),
            "--name",
            "tiny",
        ],
    );
    assert!(out.contains("Mean Recall"), "{out}");
    let run_dir = logs.join("tiny");
    let checkpoint = run_dir.join("checkpoints").join("epoch_latest.safetensors");
    assert!(checkpoint.is_file());
    assert!(
        run_dir
            .join("checkpoints")
            .join("epoch2.safetensors")
            .is_file()
    );
    assert!(
        std::fs::read(run_dir.join("curves.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("\"kind\":\"valid\"") && l.contains("mean_recall"))
    );

    // Native → official .pt → native gives the same tensors (each step verifies itself).
    let pt = dir.join("tiny.pt");
    let back = dir.join("tiny-back.safetensors");
    run(
        "convert",
        &[
            "--input",
            s(&checkpoint),
            "--output",
            s(&pt),
            "--format",
            "pt",
        ],
    );
    let err = fails("convert", &["--input", s(&pt), "--output", s(&back)]);
    assert!(err.contains("--vision-model"), "{err}");
    run(
        "convert",
        &[
            "--input",
            s(&pt),
            "--output",
            s(&back),
            "--vision-model",
            s(&vision),
            "--text-model",
            s(&text),
        ],
    );

    // extract_features on the .pt, as cn_clip's script is used; then predict and evaluate.
    let feats = dir.join("feats");
    std::fs::create_dir_all(&feats).unwrap();
    let (img, txt) = (
        feats.join("test_imgs.img_feat.jsonl"),
        feats.join("test_texts.txt_feat.jsonl"),
    );
    run(
        "extract_features",
        &[
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            s(&lmdb.join("test").join("imgs")),
            "--text-data",
            s(&data.join("test_texts.jsonl")),
            "--image-feat-output-path",
            s(&img),
            "--text-feat-output-path",
            s(&txt),
            "--resume",
            s(&pt),
            "--vision-model",
            s(&vision),
            "--text-model",
            s(&text),
            "--context-length",
            "24",
            "--precision",
            "fp32",
            "--text-prompt",
            "--native",
            "--device",
            "cpu",
        ],
    );
    let img_lines = std::fs::read_to_string(&img).unwrap();
    assert_eq!(img_lines.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(img_lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["feature"].as_array().unwrap().len(), 16);
    assert!(first["image_id"].is_i64());
    assert!(
        feats.join("test_imgs.img_feat.safetensors").is_file(),
        "native feature file next to the jsonl"
    );

    let predictions = dir.join("predictions.jsonl");
    run(
        "predict",
        &[
            "--image-feats",
            s(&img),
            "--text-feats",
            s(&txt),
            "--top-k",
            "5",
            "--output",
            s(&predictions),
        ],
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines
            .iter()
            .all(|l| l["image_ids"].as_array().unwrap().len() == 5)
    );

    let score = dir.join("score.json");
    run(
        "evaluate",
        &[
            s(&data.join("test_texts.jsonl")),
            s(&predictions),
            s(&score),
            "--top-k",
            "5",
        ],
    );
    let score: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&score).unwrap()).unwrap();
    assert_eq!(score["success"], true, "{score}");
    assert!(score["scoreJson"]["mean_recall"].as_f64().unwrap() >= 0.0);

    // zero_shot: an ImageFolder of two classes rendered by mini-MUGE's painter.
    let folder = dir.join("classes");
    for (class, combo) in [("000", 0usize), ("001", 5)] {
        let class_dir = folder.join(class);
        std::fs::create_dir_all(&class_dir).unwrap();
        for k in 0..2 {
            cnclip::data::synth::render_product(combo, 1, k, 32)
                .save(class_dir.join(format!("{k}.png")))
                .unwrap();
        }
    }
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "圆形抱枕\n菱形杯垫\n").unwrap();
    let save = dir.join("zs");
    let out = run(
        "zero_shot",
        &[
            "--datapath",
            s(&folder),
            "--label-file",
            s(&labels),
            "--resume",
            s(&back),
            "--save-dir",
            s(&save),
            "--dataset",
            "mini",
            "--context-length",
            "24",
            "--device",
            "cpu",
        ],
    );
    assert!(out.contains("zeroshot-top1:"), "{out}");
    let zs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(save.join("mini.json")).unwrap()).unwrap();
    // cn_clip writes `[probs.tolist()]`: a list holding the [N, C] matrix.
    let rows = zs["predictions"][0].as_array().unwrap();
    assert_eq!(zs["predictions"].as_array().unwrap().len(), 1);
    assert_eq!(rows.len(), 4);
    for row in rows {
        let p: f64 = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-4, "probabilities sum to {p}");
    }
    let err = fails(
        "zero_shot",
        &[
            "--datapath",
            s(&folder),
            "--label-file",
            s(&dir.join("missing.txt")),
            "--resume",
            s(&back),
        ],
    );
    assert!(err.contains("missing.txt"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A randomly initialised tiny model saved as native safetensors (what the config files describe).
fn tiny_model(dir: &Path) -> PathBuf {
    let (vision, text) = (dir.join("vision.json"), dir.join("text.json"));
    std::fs::write(&vision, VISION).unwrap();
    std::fs::write(&text, TEXT).unwrap();
    let config = cnclip::model::ClipConfig::from_tower_args(s(&vision), s(&text)).unwrap();
    let path = dir.join("tiny.safetensors");
    cnclip::model::Clip::new(&config, tch::Device::Cpu)
        .save_native(&path)
        .unwrap();
    path
}

#[test]
fn zero_shot_takes_cn_clips_index_and_per_dataset_templates() {
    // Not under tempdir(): that one is the pipeline test's, which runs at the same time.
    let dir = std::env::temp_dir().join(format!("cnclip-examples-zs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(&dir);
    let folder = dir.join("classes");
    for (class, combo) in [("000", 0usize), ("001", 5)] {
        let class_dir = folder.join(class);
        std::fs::create_dir_all(&class_dir).unwrap();
        for k in 0..2 {
            cnclip::data::synth::render_product(combo, 1, k, 32)
                .save(class_dir.join(format!("{k}.png")))
                .unwrap();
        }
    }
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "圆形抱枕\n菱形杯垫\n").unwrap();
    let zs = |dataset: &str, index: &str| {
        let save = dir.join(format!("save-{dataset}-{}", index.len()));
        // zeroshot_eval.sh's spelling: `--flag=value`, and `--index=` when no index is given.
        let out = run(
            "zero_shot",
            &[
                &format!("--datapath={}", s(&folder)),
                &format!("--label-file={}", s(&labels)),
                &format!("--save-dir={}", s(&save)),
                &format!("--dataset={dataset}"),
                &format!("--index={index}"),
                "--img-batch-size=64",
                &format!("--resume={}", s(&model)),
                "--context-length=24",
                "--device=cpu",
            ],
        );
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(save.join(format!("{dataset}.json"))).unwrap(),
        )
        .unwrap();
        let rows: Vec<Vec<f64>> = serde_json::from_value(json["predictions"][0].clone()).unwrap();
        (out, rows)
    };
    // cn_clip's template_dict: food-101 has its own 21 templates, imagenet the 183 openai ones.
    let (out, plain) = zs("food-101", "");
    assert!(out.contains("2 classes × 21 templates"), "{out}");
    let (out, _) = zs("imagenet", "");
    assert!(out.contains("2 classes × 183 templates"), "{out}");

    // --index: the saved rows are predictions[index] (torch indexing: repeats, negatives).
    let index = dir.join("index.json");
    std::fs::write(&index, "[3, 0, -1]").unwrap();
    let (out, reordered) = zs("food-101", s(&index));
    assert!(out.contains("zeroshot-top1:"), "{out}");
    assert_eq!(
        reordered,
        vec![plain[3].clone(), plain[0].clone(), plain[3].clone()]
    );

    std::fs::write(&index, "[0, 4]").unwrap();
    let err = fails(
        "zero_shot",
        &[
            "--datapath",
            s(&folder),
            "--label-file",
            s(&labels),
            "--resume",
            s(&model),
            "--index",
            s(&index),
            "--context-length=24",
            "--device=cpu",
        ],
    );
    assert!(
        err.contains("index.json") && err.contains("entry 1 is 4"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transform_ir_annotation_to_tr_writes_what_cn_clips_script_writes() {
    let dir = std::env::temp_dir().join(format!("cnclip-examples-tr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The eval crate's fixture: an annotation and the file cn_clip's script wrote from it
    // (crates/eval/tests/fixtures/make_fixtures.py; a text on two lines, an image twice on one).
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/eval/tests/fixtures/transform");
    let input = dir.join("valid_texts.jsonl");
    std::fs::copy(fixtures.join("valid_texts.jsonl"), &input).unwrap();
    let out = run(
        "transform_ir_annotation_to_tr",
        &[&format!("--input={}", s(&input))],
    );
    assert!(out.contains("Done!"), "{out}");
    let written = std::fs::read(dir.join("valid_texts.tr.jsonl")).unwrap();
    assert_eq!(
        written,
        std::fs::read(fixtures.join("valid_texts.tr.jsonl")).unwrap()
    );

    // A bad line names the file and line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text_id\": 1, \"image_ids\": [2]}\n{\"text_id\": 2}\n",
    )
    .unwrap();
    let err = fails("transform_ir_annotation_to_tr", &["--input", s(&bad)]);
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn misused_inputs_get_messages_that_say_what_to_do() {
    let dir = std::env::temp_dir().join(format!("cnclip-examples-misuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(&dir);
    let config = cnclip::model::ClipConfig::from_tower_args(
        s(&dir.join("vision.json")),
        s(&dir.join("text.json")),
    )
    .unwrap();
    let pt = dir.join("tiny.pt");
    cnclip::model::Clip::load(&model, &Default::default(), tch::Device::Cpu)
        .unwrap()
        .export_pt(
            &pt,
            &cnclip::model::weights::PtHeader {
                epoch: 0,
                step: 0,
                name: "tiny".into(),
            },
        )
        .unwrap();
    assert!(config.shipped_pair().is_none());

    // An official .pt without flags whose shapes match no shipped model: its sizes and what to
    // pass, once — not the keys that would not load.
    let err = fails(
        "convert",
        &["--input", s(&pt), "--output", s(&dir.join("o.safetensors"))],
    );
    assert!(
        err.contains("ViT width 32, 1 layers, patch 16, 32 px, embed_dim 16")
            && err.contains("match no model cn_clip ships")
            && err.contains("--vision-model"),
        "{err}"
    );
    assert_eq!(err.matches("match no model").count(), 1, "{err}");
    assert!(!err.contains("missing"), "{err}");
    // Flags that do not fit the shapes: the differing sizes.
    let err = fails(
        "extract_features",
        &[
            "--extract-text-feats",
            "--text-data",
            "x.jsonl",
            "--resume",
            s(&pt),
            "--vision-model",
            "ViT-B-16",
            "--text-model",
            "RoBERTa-wwm-ext-base-chinese",
            "--device",
            "cpu",
        ],
    );
    assert!(
        err.contains("do not fit the requested model")
            && err.contains(
                "shape mismatch for visual.conv1.weight: the model expects [768, 3, 16, 16], the \
                 weights have [32, 3, 16, 16]"
            ),
        "{err}"
    );
    // Flags that fit, one tensor missing: the key named once (no second copy as "Caused by").
    let mut sd = cnclip::model::Clip::load(&model, &Default::default(), tch::Device::Cpu)
        .unwrap()
        .state_dict();
    assert!(sd.remove("visual.ln_post.weight").is_some());
    let holed = dir.join("holed.pt");
    cnclip::model::weights::write_pt(
        &holed,
        &sd,
        &cnclip::model::weights::PtHeader {
            epoch: 0,
            step: 0,
            name: "holed".into(),
        },
    )
    .unwrap();
    let err = fails(
        "convert",
        &[
            "--input",
            s(&holed),
            "--output",
            s(&dir.join("h.safetensors")),
            "--vision-model",
            s(&dir.join("vision.json")),
            "--text-model",
            s(&dir.join("text.json")),
        ],
    );
    assert_eq!(err.matches("visual.ln_post.weight").count(), 1, "{err}");

    // The split directory instead of its imgs LMDB.
    let split = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/muge-data/tests/fixtures/cnclip_lmdb/train");
    let err = fails(
        "extract_features",
        &[
            "--extract-image-feats",
            "--image-data",
            s(&split),
            "--text-data",
            "x_texts.jsonl",
            "--image-feat-output-path",
            s(&dir.join("i.jsonl")),
            "--resume",
            s(&model),
            "--device",
            "cpu",
        ],
    );
    assert!(
        err.contains(&format!(
            "give its imgs directory, {}",
            split.join("imgs").display()
        )),
        "{err}"
    );

    // An empty text file: a warning naming it, and an empty feature file.
    let empty = dir.join("empty_texts.jsonl");
    std::fs::write(&empty, "").unwrap();
    let txt = dir.join("empty.txt_feat.jsonl");
    let out = run(
        "extract_features",
        &[
            "--extract-text-feats",
            "--text-data",
            s(&empty),
            "--text-feat-output-path",
            s(&txt),
            "--resume",
            s(&model),
            "--context-length",
            "24",
            "--device",
            "cpu",
        ],
    );
    assert!(
        out.contains(&format!("warning: {} holds no texts", s(&empty))),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&txt).unwrap(), "");

    // predict with that empty text feature file: no "dimension 0 does not match 16", a warning and
    // an empty predictions file (as cn_clip's script writes).
    let img = dir.join("imgs.img_feat.jsonl");
    std::fs::write(
        &img,
        format!(
            "{{\"image_id\": 1, \"feature\": {:?}}}\n",
            vec![0.25f32; 16]
        ),
    )
    .unwrap();
    let predictions = dir.join("p.jsonl");
    let out = run(
        "predict",
        &[
            "--image-feats",
            s(&img),
            "--text-feats",
            s(&txt),
            "--top-k",
            "1",
            "--output",
            s(&predictions),
        ],
    );
    assert!(
        out.contains(&format!("warning: {} holds no text features", s(&txt))),
        "{out}"
    );
    assert!(!out.contains("dimension"), "{out}");
    assert_eq!(std::fs::read_to_string(&predictions).unwrap(), "");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 20.4: `predict --image-feats a b c` (and `--text-feats a b c` for `--image-to-text`)
/// writes the same bytes as one file holding the shards' rows, with tied rows on both sides of a
/// shard boundary; an id in two shards fails naming the id and both files.
#[test]
fn predict_searches_shards_as_one_file() {
    let dir = std::env::temp_dir().join(format!("cnclip-examples-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = 8;
    let row = |i: usize| -> Vec<f32> {
        // Rows 9, 10 and 25 equal row 2: exact ties across the boundaries 10 and 20.
        let i = if [9, 10, 25].contains(&i) { 2 } else { i };
        (0..d)
            .map(|j| ((i * 31 + j * 17) * 2_654_435_761 % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let lines = |key: &str, rows: std::ops::Range<usize>| -> String {
        rows.map(|i| format!("{{\"{key}\": {}, \"feature\": {:?}}}\n", 500 - i, row(i)))
            .collect()
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    for (key, flag, queries, direction) in [
        ("image_id", "--image-feats", "--text-feats", None),
        (
            "text_id",
            "--text-feats",
            "--image-feats",
            Some("--image-to-text"),
        ),
    ] {
        let qkey = if key == "image_id" {
            "text_id"
        } else {
            "image_id"
        };
        let whole = write(&format!("{key}.all.jsonl"), lines(key, 0..30));
        let shards: Vec<String> = [0..10, 10..20, 20..30]
            .into_iter()
            .enumerate()
            .map(|(s, r)| write(&format!("{key}.{s}.jsonl"), lines(key, r)))
            .collect();
        let q = write(&format!("{qkey}.q.jsonl"), lines(qkey, 0..6));
        let predict = |gallery: &[&str], out: &str| -> Vec<u8> {
            let out = dir.join(out);
            let mut args = vec![flag];
            args.extend_from_slice(gallery);
            args.extend([queries, q.as_str(), "--top-k", "30", "--output", s(&out)]);
            args.extend(direction);
            run("predict", &args);
            std::fs::read(&out).unwrap()
        };
        let want = predict(&[&whole], "whole.jsonl");
        let sharded: Vec<&str> = shards.iter().map(String::as_str).collect();
        assert_eq!(predict(&sharded, "sharded.jsonl"), want, "{key}");
        // Query 2 equals the tied rows: they rank together, in gallery order (not by id).
        let text = String::from_utf8(want.clone()).unwrap();
        assert!(
            text.lines().nth(2).unwrap().contains("498, 491, 490, 475"),
            "{text}"
        );

        let dup = write(&format!("{key}.dup.jsonl"), lines(key, 14..15));
        let out = dir.join("dup.jsonl");
        let mut args = vec![flag, shards[0].as_str(), shards[1].as_str(), dup.as_str()];
        args.extend([queries, q.as_str(), "--output", s(&out)]);
        args.extend(direction);
        let err = fails("predict", &args);
        let what = &key[..key.len() - 3];
        assert!(err.contains(&format!("{what} id 486")), "{err}");
        assert!(err.contains(&shards[1]) && err.contains(&dup), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
