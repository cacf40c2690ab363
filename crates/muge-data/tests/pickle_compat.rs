//! Pair pickles against CPython's: `dumps_pair` writes what `pickle.dumps` (default protocol 4)
//! writes, and `loads_pair` reads protocols 2 to 5 (fixture from `make_data_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use muge_data::pickle::{dumps_pair, loads_pair};
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Rebuilds the pickled bytes: literal hex, or prefix + text + suffix for long texts.
fn bytes(v: &Value, text: &str) -> Vec<u8> {
    match v {
        Value::String(h) => hex(h),
        Value::Object(o) => {
            let mut b = hex(o["prefix"].as_str().unwrap());
            b.extend_from_slice(text.as_bytes());
            b.extend(hex(o["suffix"].as_str().unwrap()));
            b
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn pickles_match_cpython() {
    let raw = std::fs::read_to_string(common::fixtures().join("pickles.json")).unwrap();
    let doc: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        doc["default_protocol"], 4,
        "fixture made with a Python whose default is not 4"
    );
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let image_id = case["image_id"].as_i64().unwrap();
        let text_id = case["text_id"].as_i64().unwrap();
        let text = match case.get("text") {
            Some(t) => t.as_str().unwrap().to_string(),
            None => case["text_runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r[0].as_str()
                        .unwrap()
                        .repeat(r[1].as_u64().unwrap() as usize)
                })
                .collect(),
        };
        let what = format!("({image_id}, {text_id}, {} bytes of text)", text.len());
        assert_eq!(
            dumps_pair(image_id, text_id, &text),
            bytes(&case["default"], &text),
            "dumps {what}"
        );
        for p in ["p2", "p3", "p4", "p5", "default"] {
            let got =
                loads_pair(&bytes(&case[p], &text)).unwrap_or_else(|e| panic!("{p} {what}: {e}"));
            assert_eq!(
                (got.image_id, got.text_id),
                (image_id, text_id),
                "{p} {what}"
            );
            assert_eq!(got.text, text, "{p} {what}");
        }
    }
}
