//! Augmentation against timm 1.0.31 / Pillow 13.0.0 (fixtures from
//! `tests/fixtures/augment/make_augment_fixtures.py`), and reproducibility across threads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cnclip_model::preprocess::{RgbImage, decode_named};
use muge_data::SampleKey;
use muge_data::augment::{
    AugmentDraws, CropAttempt, CropBox, TrainTransform, augment_with_draws, ops,
    random_resized_crop_box,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/augment/augment.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// (max |Δ|, number of differing bytes).
fn diff(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0, 0), |(m, n), (&x, &y)| {
        let d = x.abs_diff(y);
        (m.max(d), n + usize::from(d != 0))
    })
}

fn apply(op: &str, img: &RgbImage, arg: f64, fill: [u8; 3]) -> RgbImage {
    match op {
        "posterize" => ops::posterize(img, arg as u8),
        "solarize" => ops::solarize(img, arg as u32),
        "invert" => ops::invert(img),
        "autocontrast" => ops::autocontrast(img),
        "equalize" => ops::equalize(img),
        "color" => ops::color(img, arg),
        "contrast" => ops::contrast(img, arg),
        "sharpness" => ops::sharpness(img, arg),
        "rotate" => ops::rotate(img, arg, fill),
        "shear_x" => ops::shear_x(img, arg, fill),
        other => panic!("unknown op {other}"),
    }
}

/// Every op is bit-exact against Pillow 13 on every fixture image and argument.
#[test]
fn ops_match_pillow_exactly() {
    let f = fixture();
    let fill: Vec<u8> = f["fill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    let fill = [fill[0], fill[1], fill[2]];
    assert_eq!(fill, ops::FILL_COLOR);
    let images: Vec<RgbImage> = f["op_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            RgbImage::from_raw(
                i["width"].as_u64().unwrap() as usize,
                i["height"].as_u64().unwrap() as usize,
                unhex(i["rgb"].as_str().unwrap()),
            )
            .unwrap()
        })
        .collect();
    let mut per_op: BTreeMap<String, (usize, u8)> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in f["op_cases"].as_array().unwrap() {
        let op = case["op"].as_str().unwrap();
        let arg = case["arg"].as_f64().unwrap();
        let img = &images[case["image"].as_u64().unwrap() as usize];
        let want = unhex(case["out"].as_str().unwrap());
        let got = apply(op, img, arg, fill);
        assert_eq!((got.width(), got.height()), (img.width(), img.height()));
        let (max, n) = diff(got.as_raw(), &want);
        let e = per_op.entry(op.to_string()).or_default();
        e.0 += 1;
        e.1 = e.1.max(max);
        if max != 0 {
            failures.push(format!(
                "{op}({arg}) on image {}: {n} bytes differ, max {max}",
                case["image"]
            ));
        }
    }
    // Every op of the policy is covered.
    assert_eq!(per_op.len(), 10, "{per_op:?}");
    assert!(failures.is_empty(), "{failures:#?}");
}

fn draws_from(v: &Value) -> AugmentDraws {
    let u = |x: &Value| x.as_f64().unwrap();
    let mut crop_attempts = [CropAttempt::default(); 10];
    for (a, j) in crop_attempts
        .iter_mut()
        .zip(v["crop_attempts"].as_array().unwrap())
    {
        a.scale_u = u(&j[0]);
        a.log_ratio_u = u(&j[1]);
    }
    AugmentDraws {
        crop_attempts,
        crop_top_u: u(&v["crop_top_u"]),
        crop_left_u: u(&v["crop_left_u"]),
        flip: v["flip"].as_bool().unwrap(),
        sub_policy: v["sub_policy"].as_u64().unwrap() as usize,
        op_apply_u: [u(&v["op_apply_u"][0]), u(&v["op_apply_u"][1])],
        op_negate_u: [u(&v["op_negate_u"][0]), u(&v["op_negate_u"][1])],
    }
}

/// The whole training transform (crop box, bicubic resize in the file's Pillow mode, flip, RGB,
/// AutoAugment) equals cn_clip's/timm's for the same draws, on JPEG/PNG files of modes RGB, RGBA,
/// P and L, for all 25 sub-policies and for the centre-crop fallback.
#[test]
fn pipeline_matches_timm_for_the_same_draws() {
    let f = fixture();
    let inputs: Vec<_> = f["pipeline_inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let name = i["name"].as_str().unwrap();
            decode_named(&unhex(i["file"].as_str().unwrap()), name).unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    let mut sub_policies = std::collections::BTreeSet::new();
    let cases = f["pipeline_cases"].as_array().unwrap();
    for (k, case) in cases.iter().enumerate() {
        let img = &inputs[case["input"].as_u64().unwrap() as usize];
        let draws = draws_from(&case["draws"]);
        sub_policies.insert(draws.sub_policy);
        let size = case["size"].as_u64().unwrap() as u32;
        let c: Vec<usize> = case["crop"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let want_box = CropBox {
            left: c[0],
            top: c[1],
            width: c[2],
            height: c[3],
        };
        let got_box = random_resized_crop_box(img.width(), img.height(), &draws).unwrap();
        if got_box != want_box {
            failures.push(format!("case {k}: crop {got_box:?} != timm {want_box:?}"));
            continue;
        }
        let got = augment_with_draws(img, size, &draws).unwrap();
        let (max, n) = diff(got.as_raw(), &unhex(case["out"].as_str().unwrap()));
        if max != 0 {
            failures.push(format!(
                "case {k} (sub-policy {}): {n} bytes differ, max {max}",
                draws.sub_policy
            ));
        }
    }
    assert_eq!(sub_policies.len(), 25);
    assert!(cases.len() >= 50);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same key gives the same pixels whether samples run on 1 thread in order or on 4 threads
/// in another order; different keys give different pixels.
#[test]
fn same_key_same_pixels_across_threads() {
    let f = fixture();
    let file = unhex(f["pipeline_inputs"][1]["file"].as_str().unwrap());
    let img = decode_named(&file, "rgb_64x48.jpg").unwrap();
    let t = TrainTransform::new(32, 0).unwrap();
    let keys: Vec<SampleKey> = (0..24)
        .map(|i| SampleKey {
            seed: 42,
            epoch: i / 8,
            index: i % 8,
        })
        .collect();
    let serial: Vec<Vec<u8>> = keys
        .iter()
        .map(|&k| t.apply(&img, k).unwrap().into_raw())
        .collect();
    let mut parallel: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let (img, keys) = (&img, &keys);
                s.spawn(move || {
                    // Each worker takes every 4th key, newest first.
                    (0..keys.len())
                        .rev()
                        .filter(|i| i % 4 == w)
                        .map(|i| (i, t.apply(img, keys[i]).unwrap().into_raw()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, px) in h.join().unwrap() {
                parallel[i] = Some(px);
            }
        }
    });
    for (i, (a, b)) in serial.iter().zip(&parallel).enumerate() {
        assert_eq!(Some(a), b.as_ref(), "key {i}");
    }
    let distinct: std::collections::HashSet<_> = serial.iter().collect();
    assert!(
        distinct.len() > 20,
        "only {} distinct outputs",
        distinct.len()
    );
    // Another stream on the same key changes the result.
    let other = TrainTransform::new(32, 1).unwrap();
    assert_ne!(other.apply(&img, keys[0]).unwrap().into_raw(), serial[0]);
}
