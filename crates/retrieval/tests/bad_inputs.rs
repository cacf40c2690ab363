//! The bad-input corpus of `retrieval` (issue 11): feature files of the wrong dimension, with NaN,
//! truncated or lying about their size, and the wrong kind. Each must be an error naming the file
//! (and line or id); a panic, or a search that runs on garbage, fails the test. Inputs are
//! generated here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use retrieval::{
    FeatureKind, Features, RetrievalError, SearchOptions, load_features, search, write_native,
};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retrieval-bad-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn features(kind: FeatureKind, dim: usize, rows: &[(i64, Vec<f32>)]) -> Features {
    let mut f = Features::new(kind, dim);
    for (id, v) in rows {
        f.push(*id, v).unwrap();
    }
    f
}

fn load_err(path: &PathBuf, kind: FeatureKind) -> String {
    let e = load_features(path, kind)
        .err()
        .unwrap_or_else(|| panic!("{} loaded", path.display()))
        .to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    e
}

#[test]
fn jsonl_feature_files_of_the_wrong_shape_name_file_and_line() {
    let cases = [
        (
            "dim.jsonl",
            "{\"image_id\": 1, \"feature\": [0.6, 0.8]}\n{\"image_id\": 2, \"feature\": [1.0, 0.0, 0.0]}\n",
            ":2: image_id 2: feature has dimension 3, earlier lines have 2",
        ),
        (
            "nan.jsonl",
            "{\"image_id\": 1, \"feature\": [NaN, 0.8]}\n",
            ":1: malformed json",
        ),
        (
            "overflow.jsonl",
            "{\"image_id\": 1, \"feature\": [0.6, 1e400]}\n",
            ":1: malformed json",
        ),
        (
            "utf8.jsonl",
            "{\"image_id\": 1, \"feature\": [0.6, 0.8]}\n{\"image_id\": 2, \"feature\": [0.6, 0.8], \"x\": \"\u{fffd}\"}\n",
            "",
        ),
        (
            "truncated.jsonl",
            "{\"image_id\": 1, \"feature\": [0.6, 0.8]}\n{\"image_id\": 2, \"feature\": [0.6",
            ":2: malformed json",
        ),
    ];
    for (name, body, want) in cases {
        let path = tmp(name);
        std::fs::write(&path, body).unwrap();
        if want.is_empty() {
            load_features(&path, FeatureKind::Image).unwrap();
            continue;
        }
        let e = load_err(&path, FeatureKind::Image);
        assert!(e.contains(want), "{name}: {e}");
    }
    // Invalid UTF-8 bytes in a line.
    let path = tmp("bytes.jsonl");
    std::fs::write(
        &path,
        b"{\"image_id\": 1, \"feature\": [0.6, 0.8]}\n{\"image_id\": \xff}\n",
    )
    .unwrap();
    let e = load_err(&path, FeatureKind::Image);
    assert!(e.contains(":2: "), "{e}");
}

#[test]
fn native_feature_files_that_are_damaged_name_the_file() {
    let good = features(
        FeatureKind::Image,
        4,
        &[(1, vec![1.0, 0.0, 0.0, 0.0]), (2, vec![0.0, 1.0, 0.0, 0.0])],
    );
    let path = tmp("good.safetensors");
    write_native(&path, &good.view(), FeatureKind::Image, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 5, 8, 40, bytes.len() / 2, bytes.len() - 1] {
        let p = tmp(&format!("cut{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        load_err(&p, FeatureKind::Image);
    }
    // The wrong kind.
    let e = load_err(&path, FeatureKind::Text);
    assert!(e.contains("holds image features"), "{e}");

    // Headers that lie: more rows than data, a dim that disagrees with the metadata, wrong dtype.
    let lies = [
        (
            "rows",
            r#"{"__metadata__":{"kind":"image","dim":"4"},"ids":{"dtype":"I64","shape":[1000000],"data_offsets":[0,8000000]},"features":{"dtype":"F32","shape":[1000000,4],"data_offsets":[8000000,24000000]}}"#,
            40,
            "",
        ),
        (
            "dimmeta",
            r#"{"__metadata__":{"kind":"image","dim":"3"},"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"features":{"dtype":"F32","shape":[1,4],"data_offsets":[8,24]}}"#,
            24,
            "metadata dim 3 but features have 4 columns",
        ),
        (
            "dtype",
            r#"{"__metadata__":{"kind":"image","dim":"4"},"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"features":{"dtype":"F64","shape":[1,4],"data_offsets":[8,40]}}"#,
            40,
            "\"features\" must be F32 [n, d]",
        ),
        (
            "ids",
            r#"{"__metadata__":{"kind":"image","dim":"4"},"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"features":{"dtype":"F32","shape":[1,4],"data_offsets":[16,32]}}"#,
            32,
            "2 ids for 1 feature rows",
        ),
    ];
    for (tag, header, data_len, want) in lies {
        let mut header = header.as_bytes().to_vec();
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&vec![0u8; data_len]);
        let p = tmp(&format!("{tag}.safetensors"));
        std::fs::write(&p, &file).unwrap();
        let e = load_err(&p, FeatureKind::Image);
        assert!(e.contains(want), "{tag}: {e}");
    }
}

#[test]
fn searches_over_mismatched_or_non_finite_features_are_refused() {
    let gallery = features(
        FeatureKind::Image,
        3,
        &[(1, vec![1.0, 0.0, 0.0]), (2, vec![0.0, 1.0, 0.0])],
    );
    let queries = features(FeatureKind::Text, 4, &[(7, vec![1.0, 0.0, 0.0, 0.0])]);
    let e = search(&queries.view(), &gallery.view(), &SearchOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            RetrievalError::Dim {
                expected: 3,
                actual: 4,
                ..
            }
        ),
        "{e}"
    );

    // A NaN that reached a native file by another writer: the search names the row's id.
    let path = tmp("nan.safetensors");
    write_native(&path, &gallery.view(), FeatureKind::Image, None).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let source = load_features(&path, FeatureKind::Image).unwrap();
    let queries = features(FeatureKind::Text, 3, &[(7, vec![1.0, 0.0, 0.0])]);
    let e = search(&queries.view(), &source.view(), &SearchOptions::default()).unwrap_err();
    assert!(matches!(e, RetrievalError::NonFinite { id: 2, .. }), "{e}");
}

#[test]
fn an_empty_query_file_is_no_queries_not_a_dimension_mismatch() {
    // An empty jsonl reads as an empty set of dimension 0 (cn_clip's script writes an empty
    // predictions file for it); it used to fail as "feature dimension 0 does not match 3".
    let path = tmp("empty.txt_feat.jsonl");
    std::fs::write(&path, "").unwrap();
    let queries = load_features(&path, FeatureKind::Text).unwrap();
    let gallery = features(FeatureKind::Image, 3, &[(1, vec![1.0, 0.0, 0.0])]);
    let hits = search(&queries.view(), &gallery.view(), &SearchOptions::default()).unwrap();
    assert!(hits.is_empty());
}

#[test]
fn a_failed_native_write_keeps_the_previous_file() {
    let path = tmp("keep.safetensors");
    let good = features(FeatureKind::Image, 2, &[(1, vec![3.0, 4.0])]);
    write_native(&path, &good.view(), FeatureKind::Image, None).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Row 2 has zero norm: the write fails after the header and row 1 are out.
    let bad = features(
        FeatureKind::Image,
        2,
        &[(1, vec![1.0, 0.0]), (2, vec![0.0, 0.0])],
    );
    let e = write_native(&path, &bad.view(), FeatureKind::Image, None).unwrap_err();
    assert!(
        matches!(e, RetrievalError::ZeroNorm { id: 2, .. })
            && e.to_string().contains("keep.safetensors"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old file must survive"
    );
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".keep.safetensors")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
