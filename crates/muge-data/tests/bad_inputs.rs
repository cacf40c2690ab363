//! The bad-input corpus of `muge-data` (issue 11): what a 250k-pair MUGE download can contain, fed
//! through the path a run takes (TSV + JSONL → `build_split` → LMDB → loader), plus LMDB
//! directories of the wrong layout.
//!
//! Every case ends in an error naming the file and line (or the LMDB, sample and image id), or,
//! under [`BadRecordPolicy::Skip`], in a count in the build summary; a panic fails the test.
//! Inputs are generated here (a few KB), nothing is committed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cnclip_model::preprocess::Preprocessor;
use common::{TempDir, tiny_data};
use muge_data::base64::encode;
use muge_data::files::{BadRecordPolicy, ProblemKind};
use muge_data::lmdb::{
    BuildOptions, LmdbError, LmdbImages, LmdbPairs, LmdbSplit, build_split, build_split_with,
};
use muge_data::loader::{Loader, LoaderConfig};
use muge_data::sampler::EpochPlan;
use muge_data::text::TextPipeline;

/// The first JPEG of the committed tiny split, as file bytes.
fn real_jpeg() -> Vec<u8> {
    let tsv = std::fs::read_to_string(tiny_data().join("train_imgs.tsv")).unwrap();
    let b64 = tsv.lines().next().unwrap().split('\t').nth(1).unwrap();
    muge_data::base64::decode_cn_clip(b64.as_bytes()).unwrap()
}

fn write_split(dir: &Path, split: &str, tsv: &[u8], jsonl: &[u8]) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(format!("{split}_imgs.tsv")), tsv).unwrap();
    std::fs::write(data.join(format!("{split}_texts.jsonl")), jsonl).unwrap();
    data
}

fn build(dir: &Path, tsv: &[u8], jsonl: &[u8], policy: BadRecordPolicy) -> Result<PathBuf, String> {
    let data = write_split(dir, "train", tsv, jsonl);
    let lmdb = dir.join("lmdb");
    build_split(&data, "train", &lmdb, policy, &mut |_| {})
        .map(|s| s.dir)
        .map_err(|e| e.to_string())
}

/// Lines of a TSV/JSONL corpus with one problem each, and what the error must say.
struct Case {
    name: &'static str,
    tsv: Vec<u8>,
    jsonl: Vec<u8>,
    /// (file suffix, line, text) the Fail-policy error must contain.
    want: (&'static str, u64, &'static str),
    /// What Skip counts.
    kind: ProblemKind,
}

fn corpus() -> Vec<Case> {
    let img = encode(&real_jpeg());
    let good_tsv = format!("1\t{img}\n2\t{img}\n").into_bytes();
    let good_jsonl = b"{\"text_id\": 10, \"text\": \"a\", \"image_ids\": [1]}\n".to_vec();
    let with_tsv = |extra: &[u8]| [&good_tsv[..], extra].concat();
    let with_jsonl = |extra: &[u8]| [&good_jsonl[..], extra].concat();
    vec![
        Case {
            name: "bad utf-8 in the tsv",
            tsv: with_tsv(b"3\tZm9v\xff\xfe\n"),
            jsonl: good_jsonl.clone(),
            want: ("train_imgs.tsv", 3, "not valid UTF-8"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "no tab",
            tsv: with_tsv(b"3 Zm9v\n"),
            jsonl: good_jsonl.clone(),
            want: ("train_imgs.tsv", 3, "found 1 tab-separated field"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "missing image id",
            tsv: with_tsv(b"\tZm9v\n"),
            jsonl: good_jsonl.clone(),
            want: ("train_imgs.tsv", 3, "found 1 tab-separated field"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "non-integer image id",
            tsv: with_tsv(b"abc\tZm9v\n"),
            jsonl: good_jsonl.clone(),
            want: ("train_imgs.tsv", 3, "image id \"abc\" is not an integer"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "duplicate image id",
            tsv: with_tsv(b"1\tZm9v\n"),
            jsonl: good_jsonl.clone(),
            want: ("train_imgs.tsv", 3, "image id 1 already appeared on line 1"),
            kind: ProblemKind::DuplicateImage,
        },
        Case {
            name: "bad utf-8 in the jsonl",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 11, \"text\": \"\xe4\xb8\", \"image_ids\": [2]}\n"),
            want: ("train_texts.jsonl", 2, "not valid UTF-8"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "malformed json",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 11, \"text\": \"b\", \"image_ids\": [2\n"),
            want: ("train_texts.jsonl", 2, "not valid JSON"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "json that is not an object",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"\"just a string\"\n"),
            want: ("train_texts.jsonl", 2, "expected a JSON object"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "missing text id",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text\": \"b\", \"image_ids\": [2]}\n"),
            want: ("train_texts.jsonl", 2, "text_id"),
            kind: ProblemKind::Malformed,
        },
        Case {
            name: "duplicate text id",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 10, \"text\": \"b\", \"image_ids\": [2]}\n"),
            want: (
                "train_texts.jsonl",
                2,
                "text id 10 already appeared on line 1",
            ),
            kind: ProblemKind::DuplicateText,
        },
        Case {
            name: "reference to a missing image",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 11, \"text\": \"b\", \"image_ids\": [2, 99]}\n"),
            want: ("train_texts.jsonl", 2, "references image 99"),
            kind: ProblemKind::MissingImage,
        },
        Case {
            name: "image id repeated in one list",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 11, \"text\": \"b\", \"image_ids\": [2, 2]}\n"),
            want: ("train_texts.jsonl", 2, "lists image 2 more than once"),
            kind: ProblemKind::RepeatedImageRef,
        },
        Case {
            name: "text of the wrong type",
            tsv: good_tsv.clone(),
            jsonl: with_jsonl(b"{\"text_id\": 11, \"text\": null, \"image_ids\": [2]}\n"),
            want: ("train_texts.jsonl", 2, "text must be a string"),
            kind: ProblemKind::Malformed,
        },
    ]
}

#[test]
fn each_bad_line_fails_with_file_and_line_or_is_counted_under_skip() {
    for case in corpus() {
        let d = TempDir::new("corpus");
        let e = build(d.path(), &case.tsv, &case.jsonl, BadRecordPolicy::Fail)
            .err()
            .unwrap_or_else(|| panic!("{}: built despite the bad line", case.name));
        let (file, line, text) = case.want;
        assert!(
            e.contains(&format!("{file}, line {line}: ")),
            "{}: {e}",
            case.name
        );
        assert!(e.contains(text), "{}: {e}", case.name);
        // Nothing half-built is left where a run would look for the split.
        assert!(!d.path().join("lmdb/train").exists(), "{}", case.name);

        let d = TempDir::new("corpus-skip");
        let data = write_split(d.path(), "train", &case.tsv, &case.jsonl);
        let summary = build_split(
            &data,
            "train",
            &d.path().join("lmdb"),
            BadRecordPolicy::Skip,
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{}: skip policy failed: {e}", case.name));
        let skipped = summary
            .images_report
            .skipped
            .get(&case.kind)
            .copied()
            .unwrap_or(0)
            + summary
                .texts_report
                .skipped
                .get(&case.kind)
                .copied()
                .unwrap_or(0);
        assert_eq!(skipped, 1, "{}: {summary:?}", case.name);
        let split = LmdbSplit::open(&summary.dir).unwrap();
        assert!(split.num_samples() >= 1, "{}", case.name);
        assert!(split.missing_images().unwrap().is_empty(), "{}", case.name);
    }
}

fn load_all(split: LmdbSplit) -> Vec<Result<muge_data::loader::Batch, String>> {
    let n = split.num_samples();
    let loader = Loader::new(
        Arc::new(split),
        Arc::new(Preprocessor::new(32).unwrap()),
        TextPipeline::new(52).unwrap(),
        &EpochPlan {
            epoch: 0,
            offset: 0,
            indices: (0..n).collect(),
        },
        LoaderConfig::default(),
    )
    .unwrap();
    loader.map(|b| b.map_err(|e| e.to_string())).collect()
}

#[test]
fn bad_images_in_the_lmdb_name_sample_and_image_id() {
    let jpeg = real_jpeg();
    let cases: [(&str, String, &str); 5] = [
        (
            "truncated jpeg",
            encode(&jpeg[..jpeg.len() / 2]),
            "is truncated",
        ),
        (
            "non-image bytes",
            encode(b"<html>not an image</html>"),
            "is not a JPEG, PNG",
        ),
        // Padding alone decodes to 0 bytes in Python's lenient decoder.
        ("zero-byte image", "====".to_owned(), "is empty (0 bytes)"),
        (
            "base64 of 4k+1 characters",
            "Zm9vY".to_owned(),
            "does not decode",
        ),
        (
            "base64 without padding",
            "Zm9vYg".to_owned(),
            "incorrect padding",
        ),
    ];
    for (name, b64, want) in cases {
        let d = TempDir::new("images");
        let tsv = format!("1\t{}\n7\t{b64}\n", encode(&jpeg));
        let jsonl = "{\"text_id\": 10, \"text\": \"a\", \"image_ids\": [1]}\n\
                     {\"text_id\": 11, \"text\": \"b\", \"image_ids\": [7]}\n";
        // cn_clip stores the base64 text as given; the image is checked when it is read.
        let dir = build(
            d.path(),
            tsv.as_bytes(),
            jsonl.as_bytes(),
            BadRecordPolicy::Fail,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let results = load_all(LmdbSplit::open(&dir).unwrap());
        assert!(results[0].is_ok(), "{name}: the good sample must load");
        let e = results[1]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        assert!(e.contains("image 7"), "{name}: {e}");
        assert!(e.contains("text 11"), "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn empty_and_overlong_texts_are_tokenized_to_the_context_length() {
    let d = TempDir::new("texts");
    let tsv = format!("1\t{}\n", encode(&real_jpeg()));
    let long = "很长的商品描述".repeat(20_000);
    let jsonl = format!(
        "{{\"text_id\": 1, \"text\": \"\", \"image_ids\": [1]}}\n\
         {{\"text_id\": 2, \"text\": \"{long}\", \"image_ids\": [1]}}\n\
         {{\"text_id\": 3, \"text\": \"   \\t \", \"image_ids\": [1]}}\n"
    );
    let dir = build(
        d.path(),
        tsv.as_bytes(),
        jsonl.as_bytes(),
        BadRecordPolicy::Fail,
    )
    .unwrap();
    let batches = load_all(LmdbSplit::open(&dir).unwrap());
    assert_eq!(batches.len(), 3);
    for b in batches {
        let b = b.unwrap();
        assert_eq!(b.texts.size(), [1, 52]);
        assert!(b.eos_indices[0] >= 1 && b.eos_indices[0] < 52);
    }
}

#[test]
fn lmdb_directories_of_the_wrong_layout_are_named() {
    let d = TempDir::new("layout");
    let tsv = format!("1\t{}\n", encode(&real_jpeg()));
    let jsonl = b"{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [1]}\n";
    let dir = build(d.path(), tsv.as_bytes(), jsonl, BadRecordPolicy::Fail).unwrap();

    // The LMDB root instead of a split directory.
    let root = dir.parent().unwrap();
    let e = LmdbSplit::open(root).unwrap_err().to_string();
    assert!(e.contains(&root.join("pairs").display().to_string()), "{e}");

    // imgs/ and pairs/ swapped: each lacks its count key.
    let e = LmdbPairs::open(dir.join("imgs")).unwrap_err();
    assert!(matches!(e, LmdbError::MissingCount { .. }), "{e}");
    assert!(e.to_string().contains("num_samples"), "{e}");
    let e = LmdbImages::open(dir.join("pairs")).unwrap_err();
    assert!(matches!(e, LmdbError::MissingCount { .. }), "{e}");
    assert!(e.to_string().contains("num_images"), "{e}");

    // A data.mdb that is not an LMDB at all, and an empty one.
    for (tag, bytes) in [
        ("garbage", &b"this is not an lmdb file"[..]),
        ("empty", &b""[..]),
    ] {
        let fake = d.path().join(tag).join("pairs");
        std::fs::create_dir_all(&fake).unwrap();
        std::fs::write(fake.join("data.mdb"), bytes).unwrap();
        let e = LmdbPairs::open(&fake)
            .err()
            .unwrap_or_else(|| panic!("{tag} data.mdb opened"))
            .to_string();
        assert!(e.contains(&fake.display().to_string()), "{tag}: {e}");
    }

    // A truncated data.mdb (a copy cut in half, as a crashed rsync leaves it).
    let cut = d.path().join("cut/imgs");
    std::fs::create_dir_all(&cut).unwrap();
    let full = std::fs::read(dir.join("imgs/data.mdb")).unwrap();
    std::fs::write(cut.join("data.mdb"), &full[..full.len() / 2]).unwrap();
    let e = LmdbImages::open(&cut).unwrap_err();
    assert!(matches!(e, LmdbError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains(&cut.display().to_string()), "{e}");
}

/// `--check-images`: the same bad pictures caught while building instead of by the loader — an
/// error naming the TSV line and id under Fail; under Skip the image and its pairs are left out and
/// counted, and the split that remains loads completely.
#[test]
fn checked_builds_catch_undecodable_images_before_training() {
    let jpeg = real_jpeg();
    for (name, b64) in [
        ("truncated jpeg", encode(&jpeg[..jpeg.len() / 2])),
        ("non-image bytes", encode(b"<html>not an image</html>")),
        ("zero-byte image", "====".to_owned()),
        ("bad base64", "Zm9vY".to_owned()),
    ] {
        let d = TempDir::new("checked");
        let tsv = format!("1\t{}\n7\t{b64}\n", encode(&jpeg));
        let jsonl = "{\"text_id\": 10, \"text\": \"a\", \"image_ids\": [1]}\n\
                     {\"text_id\": 11, \"text\": \"b\", \"image_ids\": [7, 1]}\n";
        let data = write_split(d.path(), "train", tsv.as_bytes(), jsonl.as_bytes());
        let lmdb = d.path().join("lmdb");
        let fail = BuildOptions {
            policy: BadRecordPolicy::Fail,
            check_images: true,
        };
        let e = build_split_with(&data, "train", &lmdb, &fail, &mut |_| {})
            .err()
            .unwrap_or_else(|| panic!("{name}: a checked build accepted the image"))
            .to_string();
        assert!(
            e.contains("train_imgs.tsv, line 2: image 7 does not decode"),
            "{name}: {e}"
        );
        assert!(
            !lmdb.join("train").exists(),
            "{name}: nothing is left behind"
        );

        let skip = BuildOptions {
            policy: BadRecordPolicy::Skip,
            check_images: true,
        };
        let summary = build_split_with(&data, "train", &lmdb, &skip, &mut |_| {}).unwrap();
        assert_eq!(summary.images, 1, "{name}");
        assert_eq!(
            summary.images_report.skipped[&ProblemKind::UndecodableImage],
            1,
            "{name}"
        );
        assert_eq!(
            summary.texts_report.skipped[&ProblemKind::MissingImage],
            1,
            "{name}"
        );
        assert_eq!(summary.pairs, 2, "{name}: (10, 1) and (11, 1) remain");
        let results = load_all(LmdbSplit::open(&summary.dir).unwrap());
        assert!(
            results.iter().all(Result::is_ok),
            "{name}: the checked split loads"
        );
    }
}

/// A split cut short while it is being read (another program rewriting it in place) is an error
/// naming the file, not a SIGBUS that kills the process.
#[test]
fn an_lmdb_truncated_while_open_is_an_error_not_a_crash() {
    let tmp = TempDir::new("shrink");
    let dir = tmp.path().join("train");
    for part in ["imgs", "pairs"] {
        std::fs::create_dir_all(dir.join(part)).unwrap();
        let from = common::cnclip_lmdb()
            .join("train")
            .join(part)
            .join("data.mdb");
        std::fs::copy(from, dir.join(part).join("data.mdb")).unwrap();
    }
    let split = LmdbSplit::open(&dir).unwrap();
    split.sample(0).unwrap();
    for part in ["imgs", "pairs"] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(part).join("data.mdb"))
            .unwrap();
        file.set_len(4096).unwrap();
    }
    for index in 0..3 {
        let err = split.sample(index).unwrap_err();
        assert!(
            matches!(err, LmdbError::ShrankWhileOpen { found: 4096, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("data.mdb shrank"), "{text}");
        assert!(text.contains(&dir.display().to_string()), "{text}");
    }
}
