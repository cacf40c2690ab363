//! Compares this crate with cn_clip 1.6.0's own scripts on the files in `tests/fixtures/`, which
//! `tests/fixtures/make_fixtures.py` produced by running `cn_clip.eval.evaluation`,
//! `cn_clip.eval.evaluation_tr` and `cn_clip.eval.transform_ir_annotation_to_tr` on them. The
//! expected bytes are cn_clip's outputs; nothing here is computed by this crate in advance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use eval::{
    Direction, EvalError, GroundTruth, Predictions, Validation, muge_score, recall_at_k,
    run_cn_clip_evaluation, tr_annotation_path, transform_ir_annotation_to_tr, write_tr_annotation,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

fn direction_of(case: &Path) -> Direction {
    match fs::read_to_string(case.join("direction")).unwrap().trim() {
        "t2i" => Direction::TextToImage,
        "i2t" => Direction::ImageToText,
        other => panic!("bad direction {other:?} in {}", case.display()),
    }
}

fn out_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-{name}.json"))
}

/// Cases where this crate deliberately accepts what cn_clip rejects.
const EXTENSIONS: &[&str] = &["t2i_tianchi_keys_rejected_by_cn_clip"];

#[test]
fn score_files_are_byte_identical_to_cn_clip() {
    let cases = case_dirs();
    assert!(cases.len() >= 40, "fixtures missing: {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        if EXTENSIONS.contains(&name) {
            continue;
        }
        let out = out_path(name);
        run_cn_clip_evaluation(
            &case.join("gt.jsonl"),
            &case.join("pred.jsonl"),
            &out,
            direction_of(case),
            &Validation::cn_clip(),
        )
        .unwrap()
        .ok();
        let ours = fs::read(&out).unwrap();
        let theirs = fs::read(case.join("cn_clip.json")).unwrap();
        if ours != theirs {
            failures.push(format!(
                "{name}:\n  ours   {}\n  cn_clip {}",
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tianchi_keys_score_like_cn_clip_keys() {
    // Same queries and predictions as t2i_random_61, with the ground truth spelled
    // `query_id`/`item_ids`; cn_clip refuses it, we score it as cn_clip scores the original.
    let case = fixtures().join("cases/t2i_tianchi_keys_rejected_by_cn_clip");
    let out = out_path("tianchi");
    let outcome = run_cn_clip_evaluation(
        &case.join("gt.jsonl"),
        &case.join("pred.jsonl"),
        &out,
        Direction::TextToImage,
        &Validation::cn_clip(),
    )
    .unwrap();
    assert!(outcome.is_ok());
    let theirs = fs::read(fixtures().join("cases/t2i_random_61/cn_clip.json")).unwrap();
    assert_eq!(fs::read(&out).unwrap(), theirs);
}

/// Reads a jsonl of `{key: id, list_key: [ids]}` with serde_json alone, independently of the crate.
fn plain_map(path: &Path, key: &str, list_key: &str) -> Vec<(i64, Vec<i64>)> {
    fs::read_to_string(path)
        .unwrap()
        .split(['\n', '\r'])
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l.trim()).unwrap();
            let ids = v[list_key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            (v[key].as_i64().unwrap(), ids)
        })
        .collect()
}

#[test]
fn in_memory_recall_matches_cn_clip() {
    for (name, key, list_key) in [
        ("t2i_random_300", "text_id", "image_ids"),
        ("t2i_random_7", "text_id", "image_ids"),
        ("t2i_hit_at_rank_6_only", "text_id", "image_ids"),
        ("i2t_random", "image_id", "text_ids"),
    ] {
        let case = fixtures().join("cases").join(name);
        let gt = GroundTruth::from_pairs(plain_map(&case.join("gt.jsonl"), key, list_key));
        let rankings: HashMap<i64, Vec<i64>> = plain_map(&case.join("pred.jsonl"), key, list_key)
            .into_iter()
            .collect();
        let score = muge_score(&rankings, &gt).unwrap();
        let theirs = fs::read_to_string(case.join("cn_clip.json")).unwrap();
        assert_eq!(score.to_cn_clip_json(), theirs, "{name}");

        // Other cut-offs: R@k is monotone in k and reaches R@10's value at 10.
        let recall = recall_at_k(&rankings, &gt, &[1, 2, 3, 5, 10, 100]).unwrap();
        assert!(recall.hits.windows(2).all(|w| w[0] <= w[1]), "{name}");
        assert_eq!(recall.at(10).unwrap() * 100.0, score.r10, "{name}");
        assert_eq!(
            recall.hits[4], recall.hits[5],
            "{name}: rankings have 10 ids"
        );
    }
}

#[test]
fn in_memory_errors() {
    let gt = GroundTruth::from_pairs([(1, vec![5]), (2, vec![6])]);
    let rankings: HashMap<i64, Vec<i64>> = [(1, vec![5, 7])].into_iter().collect();
    assert!(matches!(
        recall_at_k(&rankings, &gt, &[1]),
        Err(EvalError::MissingRanking { query: 2 })
    ));
    assert!(matches!(
        recall_at_k(&rankings, &gt, &[]),
        Err(EvalError::InvalidKs { .. })
    ));
    assert!(matches!(
        recall_at_k(&rankings, &gt, &[0, 1]),
        Err(EvalError::InvalidKs { .. })
    ));
    assert!(matches!(
        recall_at_k(&rankings, &GroundTruth::default(), &[1]),
        Err(EvalError::EmptyGroundTruth { .. })
    ));
}

#[test]
fn errors_name_file_line_and_query() {
    let case = fixtures().join("cases/t2i_err_duplicate_ids");
    let gt = GroundTruth::read(&case.join("gt.jsonl"), Direction::TextToImage).unwrap();
    let err = Predictions::read(
        &case.join("pred.jsonl"),
        Direction::TextToImage,
        &gt,
        &Validation::cn_clip(),
    )
    .unwrap_err();
    let msg = err.to_string();
    // The fixture's third line is text_id 3 with id 31 twice.
    assert!(msg.contains("pred.jsonl, line 3: text_id 3:"), "{msg}");
    assert!(msg.contains("31") && msg.contains("distinct"), "{msg}");

    let case = fixtures().join("cases/t2i_err_missing_three");
    let gt = GroundTruth::read(&case.join("gt.jsonl"), Direction::TextToImage).unwrap();
    let err = Predictions::read(
        &case.join("pred.jsonl"),
        Direction::TextToImage,
        &gt,
        &Validation::cn_clip(),
    )
    .unwrap_err();
    match &err {
        EvalError::MissingPredictions { ids, .. } => assert_eq!(ids, &[1, 3, 4, 6]),
        other => panic!("{other}"),
    }

    let case = fixtures().join("cases/t2i_err_gt_blank_line");
    let err = GroundTruth::read(&case.join("gt.jsonl"), Direction::TextToImage).unwrap_err();
    assert!(
        err.to_string().contains("gt.jsonl, line 7: blank line"),
        "{err}"
    );
}

#[test]
fn strict_validation_refuses_what_cn_clip_ignores() {
    // t2i_random_300's predictions hold unknown queries 7 and 8 and one query on two lines.
    let case = fixtures().join("cases/t2i_random_300");
    let gt = GroundTruth::read(&case.join("gt.jsonl"), Direction::TextToImage).unwrap();
    let pred = case.join("pred.jsonl");
    let lenient =
        Predictions::read(&pred, Direction::TextToImage, &gt, &Validation::cn_clip()).unwrap();
    assert_eq!(lenient.unknown_queries, vec![7, 8]);
    assert_eq!(lenient.repeated_queries.len(), 1);

    let strict = Validation {
        allow_repeated_queries: true,
        ..Validation::strict()
    };
    let err = Predictions::read(&pred, Direction::TextToImage, &gt, &strict).unwrap_err();
    assert!(
        matches!(err, EvalError::UnknownQuery { query: 7 | 8, .. }),
        "{err}"
    );
    let strict = Validation {
        allow_unknown_queries: true,
        ..Validation::strict()
    };
    let err = Predictions::read(&pred, Direction::TextToImage, &gt, &strict).unwrap_err();
    match err {
        EvalError::RepeatedQuery { query, .. } => assert_eq!(vec![query], lenient.repeated_queries),
        other => panic!("{other}"),
    }
}

#[test]
fn configurable_k() {
    let case = fixtures().join("cases/t2i_random_7");
    let gt = GroundTruth::read(&case.join("gt.jsonl"), Direction::TextToImage).unwrap();
    let k5 = Validation {
        k: 5,
        ..Validation::cn_clip()
    };
    let err =
        Predictions::read(&case.join("pred.jsonl"), Direction::TextToImage, &gt, &k5).unwrap_err();
    assert!(err.to_string().contains("expected exactly 5"), "{err}");
    assert!(
        err.cn_clip_detail()
            .as_str()
            .unwrap()
            .contains("Require 5, but 10 founded.")
    );
}

#[test]
fn transform_is_byte_identical_to_cn_clip() {
    let dir = fixtures().join("transform");
    let input = dir.join("valid_texts.jsonl");
    assert_eq!(
        tr_annotation_path(&input).unwrap(),
        dir.join("valid_texts.tr.jsonl")
    );
    let records = transform_ir_annotation_to_tr(&input).unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-valid_texts.tr.jsonl");
    write_tr_annotation(&out, &records).unwrap();
    assert_eq!(
        fs::read_to_string(&out).unwrap(),
        fs::read_to_string(dir.join("valid_texts.tr.jsonl")).unwrap()
    );
    // The transformed file reads back as image→text ground truth.
    let gt = GroundTruth::read(&out, Direction::ImageToText).unwrap();
    assert_eq!(gt.len(), records.len());
}
