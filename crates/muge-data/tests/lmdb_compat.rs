//! cn_clip LMDB compatibility both ways: we read what `build_lmdb_dataset.py` built (committed
//! fixture), and what we build is the same database, byte for byte. Opt-in checks run cn_clip's
//! own reader on our output and compare larger builds (`MUGE_DATA_REF_PYTHON`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{TempDir, cnclip_lmdb, ref_python, tiny_data};
use muge_data::files::{BadRecordPolicy, ProblemKind, read_image_tsv, read_texts_jsonl};
use muge_data::lmdb::{LmdbError, LmdbImages, LmdbSplit, build_split, parse_splits};

fn build(
    data: &Path,
    out: &Path,
    policy: BadRecordPolicy,
) -> Result<muge_data::lmdb::SplitSummary, LmdbError> {
    build_split(data, "train", out, policy, &mut |_| {})
}

/// `(image_id, text_id, text)` in LMDB order.
type Pairs = Vec<(i64, i64, String)>;

/// What the fixture files say the LMDB must hold: pairs in order and base64 text per id.
fn expected_from_files(data: &Path) -> (Pairs, BTreeMap<i64, String>) {
    let (images, _) = read_image_tsv(data.join("train_imgs.tsv"), BadRecordPolicy::Fail).unwrap();
    let (texts, _) =
        read_texts_jsonl(data.join("train_texts.jsonl"), BadRecordPolicy::Fail).unwrap();
    let pairs = texts
        .iter()
        .flat_map(|t| {
            t.image_ids
                .iter()
                .flatten()
                .map(|&i| (i, t.text_id, t.text.clone()))
        })
        .collect();
    let images = images.into_iter().map(|r| (r.image_id, r.base64)).collect();
    (pairs, images)
}

#[test]
fn reads_the_lmdb_cn_clip_built() {
    let split = LmdbSplit::open(cnclip_lmdb().join("train")).unwrap();
    let (pairs, images) = expected_from_files(&tiny_data());
    assert_eq!(split.num_samples(), pairs.len() as u64);
    assert_eq!(split.num_images(), images.len() as u64);
    let reader = split.reader().unwrap();
    for (i, (image_id, text_id, text)) in pairs.iter().enumerate() {
        let pair = reader.pairs().pair(i as u64).unwrap();
        assert_eq!(
            (pair.image_id, pair.text_id, &pair.text),
            (*image_id, *text_id, text)
        );
    }
    for (id, b64) in &images {
        assert_eq!(reader.images().base64(*id, "").unwrap(), b64.as_bytes());
    }
    // EvalImgDataset's order: bytewise order of the id strings.
    let mut by_text: Vec<String> = images.keys().map(|i| i.to_string()).collect();
    by_text.sort();
    let want: Vec<i64> = by_text.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(split.images().ids_in_key_order().unwrap(), want);
    assert!(split.missing_images().unwrap().is_empty());
    // Sample i wraps modulo the pair count, as LMDBDataset.__getitem__ does.
    let n = split.num_samples();
    let wrapped = split.sample(n + 2).unwrap();
    assert_eq!(wrapped.pair_index, 2);
    assert_eq!(wrapped.image, split.sample(2).unwrap().image);
}

#[test]
fn builds_the_same_bytes_as_cn_clip() {
    let out = TempDir::new("build");
    let summary = build(&tiny_data(), out.path(), BadRecordPolicy::Fail).unwrap();
    assert_eq!((summary.images, summary.pairs, summary.texts), (8, 9, 6));
    assert_eq!(summary.texts_report.total_skipped(), 0);
    assert!(!summary.replaced_existing);
    for env in ["pairs", "imgs"] {
        let file = out.path().join("train").join(env).join("data.mdb");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644, "data sets are readable by other users");
        let ours = std::fs::read(&file).unwrap();
        let theirs = std::fs::read(cnclip_lmdb().join("train").join(env).join("data.mdb")).unwrap();
        assert!(
            ours == theirs,
            "{env}/data.mdb differs from cn_clip's ({} vs {} bytes)",
            ours.len(),
            theirs.len()
        );
    }
    // No temporary directories are left behind.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["train"]);
}

#[test]
fn tianchi_form_builds_the_same_database() {
    let data = TempDir::new("tianchi");
    std::fs::copy(
        tiny_data().join("train_imgs.tsv"),
        data.path().join("train_imgs.tsv"),
    )
    .unwrap();
    std::fs::copy(
        tiny_data().join("tianchi_texts.jsonl"),
        data.path().join("train_texts.jsonl"),
    )
    .unwrap();
    let out = TempDir::new("tianchi-out");
    build(data.path(), out.path(), BadRecordPolicy::Fail).unwrap();
    let ours = std::fs::read(out.path().join("train/pairs/data.mdb")).unwrap();
    let theirs = std::fs::read(cnclip_lmdb().join("train/pairs/data.mdb")).unwrap();
    assert!(ours == theirs);
}

#[test]
fn rebuilding_replaces_the_split_whole() {
    let out = TempDir::new("rebuild");
    build(&tiny_data(), out.path(), BadRecordPolicy::Fail).unwrap();
    // A smaller split replaces the larger one entirely (the script would leave stale keys).
    let data = TempDir::new("rebuild-data");
    std::fs::copy(
        tiny_data().join("train_imgs.tsv"),
        data.path().join("train_imgs.tsv"),
    )
    .unwrap();
    std::fs::write(
        data.path().join("train_texts.jsonl"),
        "{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [3]}\n",
    )
    .unwrap();
    let summary = build(data.path(), out.path(), BadRecordPolicy::Fail).unwrap();
    assert!(summary.replaced_existing);
    let split = LmdbSplit::open(out.path().join("train")).unwrap();
    assert_eq!(split.num_samples(), 1);
    assert!(matches!(
        split.pairs().pair(1),
        Err(LmdbError::MissingPair {
            index: 1,
            num_samples: 1,
            ..
        })
    ));
}

/// Writes a split's two files into a fresh directory.
fn data_dir(tag: &str, tsv: &str, jsonl: &str) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::write(d.path().join("train_imgs.tsv"), tsv).unwrap();
    std::fs::write(d.path().join("train_texts.jsonl"), jsonl).unwrap();
    d
}

#[test]
fn bad_input_fails_naming_file_and_line_and_leaves_no_output() {
    // Image 2 is referenced but missing from the TSV.
    let d = data_dir(
        "missing",
        "1\tZm9v\n3\tYmFy\n",
        "{\"text_id\": 10, \"text\": \"a\", \"image_ids\": [1]}\n{\"text_id\": 11, \"text\": \"b\", \"image_ids\": [3, 2]}\n",
    );
    let out = TempDir::new("missing-out");
    let e = build(d.path(), out.path(), BadRecordPolicy::Fail).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("train_texts.jsonl, line 2"), "{msg}");
    assert!(msg.contains("text 11 references image 2"), "{msg}");
    assert!(msg.contains("train_imgs.tsv does not contain"), "{msg}");
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing may be left behind"
    );

    // A duplicate image id.
    let d = data_dir("dup", "1\tZm9v\n1\tYmFy\n", "");
    let e = build(d.path(), out.path(), BadRecordPolicy::Fail).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("train_imgs.tsv, line 2: image id 1 already appeared on line 1"),
        "{e}"
    );

    // Missing input files are named.
    let empty = TempDir::new("empty");
    let e = build(empty.path(), out.path(), BadRecordPolicy::Fail).unwrap_err();
    assert!(e.to_string().contains("train_imgs.tsv"), "{e}");
}

#[test]
fn skip_policy_counts_and_reports() {
    let d = data_dir(
        "skip",
        "1\tZm9v\n1\tYmFy\nnot-an-id\tZm9v\n3\tYmFy\n",
        concat!(
            "{\"text_id\": 10, \"text\": \"a\", \"image_ids\": [1, 2, 1]}\n",
            "{\"text_id\": 10, \"text\": \"dup\", \"image_ids\": [3]}\n",
            "not json\n",
            "{\"text_id\": 12, \"text\": \"c\", \"image_ids\": [3]}\n",
        ),
    );
    let out = TempDir::new("skip-out");
    let s = build(d.path(), out.path(), BadRecordPolicy::Skip).unwrap();
    assert_eq!((s.images, s.pairs, s.texts), (2, 2, 2));
    let kinds = |r: &muge_data::ReadReport| r.skipped.clone().into_iter().collect::<Vec<_>>();
    assert_eq!(
        kinds(&s.images_report),
        [
            (ProblemKind::Malformed, 1),
            (ProblemKind::DuplicateImage, 1)
        ]
    );
    assert_eq!(
        kinds(&s.texts_report),
        [
            (ProblemKind::Malformed, 1),
            (ProblemKind::DuplicateText, 1),
            (ProblemKind::RepeatedImageRef, 1),
            (ProblemKind::MissingImage, 1),
        ]
    );
    let report = s.texts_report.to_string();
    assert!(report.contains("line 3: not valid JSON"), "{report}");
    let split = LmdbSplit::open(out.path().join("train")).unwrap();
    let texts: Vec<_> = (0..2).map(|i| split.pairs().pair(i).unwrap()).collect();
    assert_eq!((texts[0].image_id, texts[0].text_id), (1, 10));
    assert_eq!((texts[1].image_id, texts[1].text_id), (3, 12));
}

#[test]
fn reading_errors_name_the_database_and_key() {
    let e = LmdbSplit::open(tiny_data()).unwrap_err();
    assert!(e.to_string().contains("muge_tiny/pairs"), "{e}");
    let images = LmdbImages::open(cnclip_lmdb().join("train/imgs")).unwrap();
    let e = images.image_bytes(123456).unwrap_err();
    assert!(
        e.to_string().contains("train/imgs has no image 123456"),
        "{e}"
    );
    assert!(parse_splits("train,../x").is_err());
}

#[test]
fn a_split_directory_given_for_its_imgs_names_the_imgs_directory() {
    // `extract_features --image-data lmdb/test` instead of `lmdb/test/imgs`.
    let split = cnclip_lmdb().join("train");
    let e = LmdbImages::open(&split).unwrap_err();
    assert!(
        matches!(e, LmdbError::SplitNotPart { part: "imgs", .. }),
        "{e}"
    );
    assert!(
        e.to_string().ends_with(&format!(
            "give its imgs directory, {}",
            split.join("imgs").display()
        )),
        "{e}"
    );
    let e = muge_data::lmdb::LmdbPairs::open(&split).unwrap_err();
    assert!(
        e.to_string()
            .contains(&split.join("pairs").display().to_string()),
        "{e}"
    );
}

/// Runs cn_clip's own `LMDBDataset` over an LMDB we built and checks it sees every pair and
/// decodes every image to the same pixels it decodes from its own build.
#[test]
fn cn_clip_reads_our_lmdb() {
    let Some(py) = ref_python("cn_clip_reads_our_lmdb") else {
        return;
    };
    let out = TempDir::new("ref-read");
    build(&tiny_data(), out.path(), BadRecordPolicy::Fail).unwrap();
    let script = r#"
import sys, torch
from cn_clip.training.data import LMDBDataset
a = LMDBDataset(sys.argv[1], split="val", max_txt_length=52, resolution=32)
b = LMDBDataset(sys.argv[2], split="val", max_txt_length=52, resolution=32)
assert a.number_samples == b.number_samples and a.number_images == b.number_images
for i in range(a.number_samples + 3):
    x, y = a[i], b[i]
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2], i
print("ok", a.number_samples)
"#;
    let status = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(out.path().join("train"))
        .arg(cnclip_lmdb().join("train"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "ok 9");
}

/// Builds a split with several commit rounds (12,345 pairs, 2,345 images) both ways and compares
/// the files byte for byte: the transaction cadence shapes the page layout.
#[test]
fn large_build_matches_cn_clip_bytes() {
    let Some(py) = ref_python("large_build_matches_cn_clip_bytes") else {
        return;
    };
    let data = TempDir::new("large");
    let mut tsv = String::new();
    for i in 0..2345 {
        tsv.push_str(&format!(
            "{}\t{}\n",
            100_000 + i * 7,
            muge_data::base64::encode(format!("image {i}").as_bytes())
        ));
    }
    let mut jsonl = String::new();
    for t in 0..4115 {
        let ids: Vec<String> = (0..3)
            .map(|k| (100_000 + ((t * 3 + k) % 2345) * 7).to_string())
            .collect();
        jsonl.push_str(&format!(
            "{{\"text_id\": {t}, \"text\": \"查询 {t} “Q”\", \"image_ids\": [{}]}}\n",
            ids.join(", ")
        ));
    }
    std::fs::write(data.path().join("train_imgs.tsv"), tsv).unwrap();
    std::fs::write(data.path().join("train_texts.jsonl"), jsonl).unwrap();
    let ours = TempDir::new("large-ours");
    let theirs = TempDir::new("large-theirs");
    let s = build(data.path(), ours.path(), BadRecordPolicy::Fail).unwrap();
    assert_eq!((s.images, s.pairs), (2345, 12345));
    let status = Command::new(py)
        .args([
            "-m",
            "cn_clip.preprocess.build_lmdb_dataset",
            "--splits",
            "train",
        ])
        .arg("--data_dir")
        .arg(data.path())
        .arg("--lmdb_dir")
        .arg(theirs.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for env in ["pairs", "imgs"] {
        let a = std::fs::read(ours.path().join("train").join(env).join("data.mdb")).unwrap();
        let b = std::fs::read(theirs.path().join("train").join(env).join("data.mdb")).unwrap();
        assert!(
            a == b,
            "{env}/data.mdb differs ({} vs {} bytes)",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn a_split_rebuilt_while_open_is_not_served_stale() {
    let out = TempDir::new("stale");
    build(&tiny_data(), out.path(), BadRecordPolicy::Fail).unwrap();
    let old = LmdbSplit::open(out.path().join("train")).unwrap();
    assert_eq!(old.num_samples(), 9);
    // Same path, same file: shared.
    assert_eq!(
        LmdbSplit::open(out.path().join("train"))
            .unwrap()
            .num_samples(),
        9
    );
    let data = data_dir(
        "stale-data",
        "3\tZm9v\n",
        "{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [3]}\n",
    );
    build(data.path(), out.path(), BadRecordPolicy::Fail).unwrap();
    let e = LmdbSplit::open(out.path().join("train")).unwrap_err();
    assert!(matches!(e, LmdbError::Replaced { .. }), "{e}");
    // The old handle still reads the old data; once dropped, the new split opens.
    assert_eq!(old.sample(0).unwrap().text_id, 8428);
    drop(old);
    assert_eq!(
        LmdbSplit::open(out.path().join("train"))
            .unwrap()
            .num_samples(),
        1
    );
}

/// `(txnid, mapsize)` of the newer of an LMDB file's two meta pages (64-bit layout: page header 16
/// bytes, then magic, version, address, mapsize at 32, two 48-byte database records, last page,
/// txnid at 144).
fn meta(data_mdb: &Path) -> (u64, u64) {
    let b = std::fs::read(data_mdb).unwrap();
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(
        u32::from_le_bytes(b[16..20].try_into().unwrap()),
        0xBEEF_C0DE,
        "LMDB magic"
    );
    let page = 4096;
    let (a, c) = (u64_at(144), u64_at(page + 144));
    (a.max(c), u64_at(if a >= c { 32 } else { page + 32 }))
}

/// The script commits every 5,000 pairs and every 1,000 images, then once more with the count;
/// the number of commits is the last transaction id, which shapes the file (free pages, meta).
/// One put short of the cadence gives a single commit, exactly the cadence gives two (the second
/// holding only the count), which pins both cadences exactly.
#[test]
fn commit_cadence_matches_the_script() {
    assert_eq!(
        meta(&cnclip_lmdb().join("train/pairs/data.mdb")),
        (1, 1 << 40)
    );
    assert_eq!(
        meta(&cnclip_lmdb().join("train/imgs/data.mdb")),
        (1, 1 << 40)
    );
    for (images, pairs, commits) in [(999, 4999, 1), (1000, 5000, 2)] {
        let data = TempDir::new("cadence");
        let tsv: String = (0..images).map(|i| format!("{i}\tZm9v\n")).collect();
        let jsonl: String = (0..pairs)
            .map(|t| {
                format!(
                    "{{\"text_id\": {t}, \"text\": \"t\", \"image_ids\": [{}]}}\n",
                    t % images
                )
            })
            .collect();
        std::fs::write(data.path().join("train_imgs.tsv"), tsv).unwrap();
        std::fs::write(data.path().join("train_texts.jsonl"), jsonl).unwrap();
        let out = TempDir::new("cadence-out");
        let s = build(data.path(), out.path(), BadRecordPolicy::Fail).unwrap();
        assert_eq!((s.images, s.pairs), (images, pairs));
        assert_eq!(
            meta(&out.path().join("train/pairs/data.mdb")),
            (commits, 1 << 40),
            "{pairs} pairs"
        );
        assert_eq!(
            meta(&out.path().join("train/imgs/data.mdb")),
            (commits, 1 << 40),
            "{images} images"
        );
    }
}
