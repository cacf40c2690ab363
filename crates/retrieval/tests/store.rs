#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Feature stores: jsonl round trip (Python float format), native file round trip and memory-mapped
//! streaming search equal to in-memory search, and every malformed input as a clear error.

use std::path::{Path, PathBuf};

use retrieval::store::format_py_float;
use retrieval::{
    FeatureKind, Features, NativeFeatures, RetrievalError, ScanPrecision, SearchOptions,
    load_features, read_jsonl, search, write_jsonl, write_native,
};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retrieval-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn python_float_repr() {
    assert_eq!(format_py_float(f64::from(0.0198f32)), "0.01979999989271164");
    assert_eq!(
        format_py_float(f64::from(-1.5e-5f32)),
        "-1.4999999621068127e-05"
    );
    assert_eq!(format_py_float(1.0), "1.0");
    assert_eq!(format_py_float(-0.0), "-0.0");
    assert_eq!(format_py_float(0.0001), "0.0001");
    assert_eq!(format_py_float(1e16), "1e+16");
    assert_eq!(format_py_float(123.5), "123.5");
}

#[test]
fn jsonl_round_trip_is_byte_identical_to_extract_features_output() {
    for name in ["gauss_imgs.img_feat.jsonl", "ties_texts.txt_feat.jsonl"] {
        let kind = if name.contains("imgs") {
            FeatureKind::Image
        } else {
            FeatureKind::Text
        };
        let f = read_jsonl(fixture(name), kind).unwrap();
        assert!(f.ids.len() > 10);
        let out = tmp(name);
        write_jsonl(&out, &f.view(), kind).unwrap();
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(fixture(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn native_file_round_trip_normalises_and_streams_like_memory() {
    let d = 24;
    let n = 301;
    let mut f = Features::new(FeatureKind::Image, d);
    let mut s = 12345u64;
    for i in 0..n {
        let row: Vec<f32> = (0..d)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect();
        f.push(7_000_000 + i as i64 * 3, &row).unwrap();
    }
    let path = tmp("native.safetensors");
    write_native(&path, &f.view(), FeatureKind::Image, Some("ViT-B-16")).unwrap();
    let native = NativeFeatures::open(&path).unwrap();
    assert_eq!(native.kind(), FeatureKind::Image);
    assert_eq!(native.model(), Some("ViT-B-16"));
    let v = native.view();
    assert_eq!(v.ids(), &f.ids[..]);
    assert_eq!(v.dim(), d);
    let mut normed = f.clone();
    normed.normalize().unwrap();
    assert_eq!(v.data(), &normed.data[..]);
    for i in 0..n {
        let norm: f64 = v.row(i).iter().map(|&x| f64::from(x).powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }
    // streamed (mmapped, small gallery blocks) == in memory (one block)
    let queries = normed.view().rows(0, 40);
    for precision in [ScanPrecision::Int8, ScanPrecision::Fp32] {
        let streamed = search(
            &queries,
            &v,
            &SearchOptions {
                k: 13,
                gallery_block: 17,
                query_block: 9,
                precision,
                ..SearchOptions::default()
            },
        )
        .unwrap();
        let memory = search(
            &queries,
            &normed.view(),
            &SearchOptions {
                k: 13,
                gallery_block: 100_000,
                precision,
                ..SearchOptions::default()
            },
        )
        .unwrap();
        assert_eq!(streamed, memory);
        assert_eq!(streamed[5][0].index, 5); // a vector is its own nearest neighbour
    }
    // load_features detects the format and checks the kind
    assert!(matches!(
        load_features(&path, FeatureKind::Image),
        Ok(retrieval::FeatureSource::Native(_))
    ));
    let err = load_features(&path, FeatureKind::Text).unwrap_err();
    assert!(err.to_string().contains("image features"), "{err}");
}

fn jsonl_err(name: &str, body: &str, kind: FeatureKind) -> String {
    let path = tmp(name);
    std::fs::write(&path, body).unwrap();
    let err = read_jsonl(&path, kind).unwrap_err();
    err.to_string()
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let good = "{\"image_id\": 1, \"feature\": [0.6, 0.8]}\n";
    let cases = [
        ("garbage", format!("{good}not json\n"), ":2: malformed json"),
        (
            "dim",
            format!("{good}{{\"image_id\": 2, \"feature\": [1.0]}}\n"),
            ":2: image_id 2: feature has dimension 1, earlier lines have 2",
        ),
        (
            "noid",
            format!("{good}\n{{\"feature\": [1.0, 0.0]}}\n"),
            ":3: missing \"image_id\"",
        ),
        (
            "strid",
            "{\"image_id\": \"x\", \"feature\": [1.0, 0.0]}\n".to_string(),
            ":1: \"image_id\" is not an integer",
        ),
        (
            "nofeat",
            "{\"image_id\": 5}\n".to_string(),
            ":1: image_id 5: missing \"feature\"",
        ),
        (
            "inf",
            "{\"image_id\": 5, \"feature\": [1e39, 0.0]}\n".to_string(),
            ":1: image_id 5: non-finite feature value at position 0",
        ),
        (
            "empty",
            "{\"image_id\": 5, \"feature\": []}\n".to_string(),
            ":1: image_id 5: empty feature",
        ),
    ];
    for (name, body, want) in cases {
        let msg = jsonl_err(&format!("{name}.jsonl"), &body, FeatureKind::Image);
        assert!(msg.contains(&format!("{name}.jsonl")), "{msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }
    // text ids where image ids were expected
    let msg = jsonl_err(
        "kind.jsonl",
        "{\"text_id\": 1, \"feature\": [1.0]}\n",
        FeatureKind::Image,
    );
    assert!(msg.contains(":1: missing \"image_id\""), "{msg}");
    // missing file
    let err = read_jsonl(tmp("absent.jsonl"), FeatureKind::Text).unwrap_err();
    assert!(matches!(err, RetrievalError::Io { .. }), "{err}");
    // an empty file reads as an empty set, which search refuses
    let path = tmp("empty_file.jsonl");
    std::fs::write(&path, "").unwrap();
    let f = read_jsonl(&path, FeatureKind::Image).unwrap();
    assert!(f.ids.is_empty());
}

#[test]
fn bad_native_files_and_features_are_errors() {
    let path = tmp("bad.safetensors");
    std::fs::write(&path, b"\x02\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let err = NativeFeatures::open(&path).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    let mut f = Features::new(FeatureKind::Text, 2);
    assert!(matches!(
        f.push(9, &[1.0, 2.0, 3.0]),
        Err(RetrievalError::Dim {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    assert!(matches!(
        f.push(9, &[f32::NAN, 2.0]),
        Err(RetrievalError::NonFinite { id: 9, .. })
    ));
    f.push(4, &[0.0, 0.0]).unwrap();
    let err =
        write_native(tmp("zero.safetensors"), &f.view(), FeatureKind::Text, None).unwrap_err();
    assert!(
        matches!(err, RetrievalError::ZeroNorm { id: 4, .. }),
        "{err}"
    );
    assert!(matches!(
        f.normalize(),
        Err(RetrievalError::ZeroNorm { id: 4, .. })
    ));
}
