//! The sampler against torch 2.11: `randperm`, `random64`, and `DistributedSampler` index lists
//! for several (n, world size, rank, seed, epoch, drop_last, shuffle) (fixture from
//! `make_data_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use muge_data::sampler::{DistributedSampler, Mt19937, RANDPERM_SMALL_LIMIT, randperm};
use serde_json::Value;

fn fixture() -> Value {
    let raw = std::fs::read_to_string(common::fixtures().join("sampler.json")).unwrap();
    serde_json::from_str(&raw).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The fixture script's polynomial hash of a whole list.
fn fingerprint(values: &[u64]) -> u64 {
    const P: u128 = (1 << 61) - 1;
    values
        .iter()
        .fold(0u128, |h, &v| (h * 1_000_003 + u128::from(v) + 1) % P) as u64
}

/// Compares a list with the fixture's full list or head, tail and fingerprint.
fn check(got: &[u64], want: &Value, what: &str) {
    if let Some(all) = want.get("indices") {
        assert_eq!(got, u64s(all), "{what}");
        return;
    }
    let head = u64s(&want["head"]);
    let tail = u64s(&want["tail"]);
    assert_eq!(&got[..head.len()], head, "{what}: head");
    assert_eq!(&got[got.len() - tail.len()..], tail, "{what}: tail");
    assert_eq!(
        fingerprint(got),
        want["fingerprint"].as_u64().unwrap(),
        "{what}: fingerprint"
    );
}

#[test]
fn randperm_matches_torch() {
    let doc = fixture();
    let cases = doc["randperm"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let (n, seed) = (case["n"].as_u64().unwrap(), case["seed"].as_u64().unwrap());
        check(
            &randperm(n, seed),
            case,
            &format!("randperm({n}, seed {seed})"),
        );
    }
}

/// `torch.randint(0, 2**40)` draws one `random64()` per value: our 64-bit composition (first
/// 32-bit draw high) must agree, since the large-n permutation uses it.
#[test]
fn random64_matches_torch() {
    let doc = fixture();
    let case = &doc["randint_2_40"];
    let mut rng = Mt19937::new(case["seed"].as_u64().unwrap());
    let got: Vec<u64> = (0..16).map(|_| rng.next_u64() % (1 << 40)).collect();
    assert_eq!(got, u64s(&case["draws"]));
}

#[test]
fn distributed_sampler_matches_torch() {
    let doc = fixture();
    let cases = doc["distributed"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let get = |k: &str| case[k].as_u64().unwrap();
        let flag = |k: &str| case[k].as_bool().unwrap();
        let s = DistributedSampler::new(get("n"), get("world"), get("rank"), get("seed"))
            .unwrap()
            .with_drop_last(flag("drop_last"))
            .with_shuffle(flag("shuffle"));
        let what = format!("{case}");
        assert_eq!(s.num_samples(), get("num_samples"), "{what}");
        let got = s.indices(get("epoch"));
        assert_eq!(got.len() as u64, get("num_samples"), "{what}");
        check(&got, case, &what);
    }
}

/// torch switches to the 64-bit "inside-out" shuffle at n = 2^32/20. Permuting 214,748,364
/// elements takes a few seconds and 1.7 GB, so this runs only when asked for.
#[test]
fn large_randperm_matches_torch() {
    if std::env::var_os("MUGE_DATA_LARGE_RANDPERM").is_none() {
        eprintln!(
            "large_randperm_matches_torch: skipped (set MUGE_DATA_LARGE_RANDPERM=1 to run it)"
        );
        return;
    }
    let doc = fixture();
    let case = &doc["randperm_large"];
    let n = case["n"].as_u64().unwrap();
    assert_eq!(n, RANDPERM_SMALL_LIMIT);
    let p = randperm(n, case["seed"].as_u64().unwrap());
    assert_eq!(&p[..40], u64s(&case["head"]));
    assert_eq!(&p[p.len() - 40..], u64s(&case["tail"]));
}
