//! Averaging: exact on small tensors, streaming equal to the in-memory reference, mismatches
//! rejected naming the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::ClipConfig;
use cnclip_model::weights::{
    NativeReader, StateDict, WeightsError, load_native, read_safetensors_metadata, save_native,
    save_safetensors,
};
use soup::average::{average, plan};
use soup::sink::average_files;
use soup::sink::{StateDictSink, average_state_dicts};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-soup-avg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(embed_dim: i64) -> ClipConfig {
    let fx =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../cnclip-model/tests/fixtures/model/configs");
    let mut c =
        ClipConfig::from_json_files(&fx.join("tiny-vit.json"), &fx.join("tiny-bert.json")).unwrap();
    c.vision.embed_dim = embed_dim;
    c
}

fn sd(entries: Vec<(&str, Tensor)>) -> StateDict {
    entries
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .collect()
}

fn f32s(v: &[f32]) -> Tensor {
    Tensor::from_slice(v)
}

fn save(dir: &Path, name: &str, state: &StateDict) -> PathBuf {
    let p = dir.join(name);
    save_native(&p, &config(32), state).unwrap();
    p
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn averages_are_exact_on_small_tensors() {
    let dir = temp("exact");
    let a = sd(vec![
        ("w", f32s(&[1.0, 2.0, 3.0, 4.0]).view([2, 2])),
        ("h", f32s(&[1.0, -2.0, 0.5]).to_kind(Kind::Half)),
        ("b", f32s(&[1.0, 2.0]).to_kind(Kind::BFloat16)),
        ("d", Tensor::from_slice(&[1.0f64, 1e-300])),
        ("ids", Tensor::from_slice(&[0i64, 1, 2])),
        ("bn.num_batches_tracked", Tensor::from(7i64)),
        ("mask", Tensor::from_slice(&[true, false])),
    ]);
    let b = sd(vec![
        ("w", f32s(&[3.0, 4.0, 5.0, 8.0]).view([2, 2])),
        ("h", f32s(&[3.0, 2.0, 0.25]).to_kind(Kind::Half)),
        // bf16 with fp16: neither holds the other, the output is fp32.
        ("b", f32s(&[2.0, 3.0]).to_kind(Kind::Half)),
        ("d", Tensor::from_slice(&[3.0f64, 3e-300])),
        ("ids", Tensor::from_slice(&[0i64, 1, 2])),
        ("bn.num_batches_tracked", Tensor::from(9i64)),
        ("mask", Tensor::from_slice(&[true, false])),
    ]);
    let (pa, pb) = (
        save(&dir, "a.safetensors", &a),
        save(&dir, "b.safetensors", &b),
    );
    let out = dir.join("avg.safetensors");
    average_files(
        &[&pa, &pb],
        &[0.5, 0.5],
        &out,
        &[("cnclip.soup".into(), "{}".into())],
    )
    .unwrap();
    let (cfg, avg) = load_native(&out).unwrap();
    assert_eq!(cfg, config(32));
    assert_eq!(
        read_safetensors_metadata(&out).unwrap()["cnclip.soup"],
        "{}"
    );
    let get = |k: &str| avg.get(k).unwrap();
    assert_eq!(get("w").kind(), Kind::Float);
    assert_eq!(get("w").size(), vec![2, 2]);
    assert_eq!(values(get("w")), vec![2.0, 3.0, 4.0, 6.0]);
    assert_eq!(get("h").kind(), Kind::Half);
    assert_eq!(values(get("h")), vec![2.0, 0.0, 0.375]);
    assert_eq!(get("b").kind(), Kind::Float);
    assert_eq!(values(get("b")), vec![1.5, 2.5]);
    assert_eq!(get("d").kind(), Kind::Double);
    assert_eq!(values(get("d")), vec![2.0, 2e-300]);
    assert_eq!(get("ids").kind(), Kind::Int64);
    assert_eq!(values(get("ids")), vec![0.0, 1.0, 2.0]);
    assert_eq!(values(get("bn.num_batches_tracked")), vec![9.0]);
    assert_eq!(get("mask").kind(), Kind::Bool);
    assert_eq!(values(get("mask")), vec![1.0, 0.0]);

    // Unequal weights, and a single member with weight 1 reproduces it bit for bit.
    let out = dir.join("w.safetensors");
    average_files(&[&pa, &pb], &[0.25, 0.75], &out, &[]).unwrap();
    let (_, w) = load_native(&out).unwrap();
    assert_eq!(values(w.get("w").unwrap()), vec![2.5, 3.5, 4.5, 7.0]);
    let out = dir.join("one.safetensors");
    average_files(&[&pa], &[1.0], &out, &[]).unwrap();
    let (_, one) = load_native(&out).unwrap();
    for (k, t) in a.iter() {
        assert!(one.get(k).unwrap().equal(t), "{k}");
    }
}

#[test]
fn streaming_equals_in_memory() {
    let dir = temp("stream");
    tch::manual_seed(3);
    let make = |scale: f64| {
        sd(vec![
            (
                "big",
                Tensor::randn([300, 70], (Kind::Float, tch::Device::Cpu)) * scale,
            ),
            (
                "half",
                Tensor::randn([33, 5], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::Half),
            ),
            (
                "bf",
                Tensor::randn([40000], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16),
            ),
            ("scalar", Tensor::from(scale as f32)),
            ("pos", Tensor::arange(9, (Kind::Int64, tch::Device::Cpu))),
        ])
    };
    let members = [make(1.0), make(2.0), make(-0.5)];
    let weights = [0.2, 0.3, 0.5];
    let paths: Vec<PathBuf> = members
        .iter()
        .enumerate()
        .map(|(i, m)| save(&dir, &format!("m{i}.safetensors"), m))
        .collect();
    let reference = average_state_dicts(&members.iter().zip(weights).collect::<Vec<_>>()).unwrap();

    let out = dir.join("avg.safetensors");
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    average_files(&refs, &weights, &out, &[]).unwrap();
    let (_, streamed) = load_native(&out).unwrap();
    let opened: Vec<NativeReader> = paths
        .iter()
        .map(|p| NativeReader::open(p).unwrap())
        .collect();
    let ms: Vec<(&NativeReader, f64)> = opened.iter().zip(weights).collect();
    let plan = plan(&ms).unwrap();
    let mut sink = StateDictSink::default();
    average(&ms, &plan, &mut sink, &mut |_| {}).unwrap();

    assert_eq!(streamed.len(), reference.len());
    for (k, t) in reference.iter() {
        for (what, got) in [
            ("file", streamed.get(k).unwrap()),
            ("sink", sink.state_dict.get(k).unwrap()),
        ] {
            assert_eq!(got.kind(), t.kind(), "{what} {k}");
            assert!(
                got.equal(t),
                "{what} {k}: streamed average differs from torch's"
            );
        }
    }
    // The file is laid out as save_native lays it out: 8-byte kinds first, then 4, then 2.
    let ck = NativeReader::open(&out).unwrap();
    let order: Vec<&str> = ck.entries().iter().map(|e| e.key.as_str()).collect();
    assert_eq!(order, ["pos", "big", "scalar", "half", "bf"]);
}

fn expect_err(dir: &Path, a: &StateDict, b: &StateDict, cb: ClipConfig) -> String {
    let pa = save(dir, "a.safetensors", a);
    let pb = dir.join("b.safetensors");
    save_native(&pb, &cb, b).unwrap();
    let err =
        average_files(&[&pa, &pb], &[0.5, 0.5], &dir.join("out.safetensors"), &[]).unwrap_err();
    assert!(!dir.join("out.safetensors").exists(), "no output on error");
    err.to_string()
}

#[test]
fn mismatches_are_rejected_with_the_key() {
    let dir = temp("mismatch");
    let base = || {
        sd(vec![
            ("x.weight", f32s(&[1.0, 2.0])),
            ("y.bias", f32s(&[0.0])),
        ])
    };
    let msg = expect_err(
        &dir,
        &base(),
        &sd(vec![("x.weight", f32s(&[1.0, 2.0]))]),
        config(32),
    );
    assert!(
        msg.contains("has no tensor y.bias") && msg.contains("b.safetensors"),
        "{msg}"
    );
    let mut extra = base();
    extra.insert("z.extra", f32s(&[1.0]));
    let msg = expect_err(&dir, &base(), &extra, config(32));
    assert!(msg.contains("has tensor z.extra"), "{msg}");
    let msg = expect_err(
        &dir,
        &base(),
        &sd(vec![
            ("x.weight", f32s(&[1.0, 2.0, 3.0])),
            ("y.bias", f32s(&[0.0])),
        ]),
        config(32),
    );
    assert!(
        msg.contains("tensor x.weight: shape [3]") && msg.contains("[2]"),
        "{msg}"
    );
    let msg = expect_err(&dir, &base(), &base(), config(16));
    assert!(msg.contains("configs differ"), "{msg}");
    let msg = expect_err(
        &dir,
        &base(),
        &sd(vec![
            ("x.weight", Tensor::from_slice(&[1i64, 2])),
            ("y.bias", f32s(&[0.0])),
        ]),
        config(32),
    );
    assert!(msg.contains("tensor x.weight: dtype I64"), "{msg}");
    let ints = |v: i64| sd(vec![("ids", Tensor::from_slice(&[0i64, v]))]);
    let msg = expect_err(&dir, &ints(1), &ints(2), config(32));
    assert!(msg.contains("tensor ids (I64) differs"), "{msg}");

    // Not a model: a safetensors file without the native metadata (a training state file).
    let state = dir.join("epoch1.state.safetensors");
    save_safetensors(&state, &base(), HashMap::new()).unwrap();
    let err = NativeReader::open(&state).unwrap_err();
    assert!(
        matches!(err, WeightsError::MissingNativeConfig { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("epoch1.state.safetensors"),
        "{err}"
    );
    // Truncated file.
    let good = save(&dir, "good.safetensors", &base());
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let err = NativeReader::open(&cut).unwrap_err();
    assert!(matches!(err, WeightsError::Safetensors { .. }), "{err}");
    // The in-memory reference applies the same rules.
    let err = average_state_dicts(&[(&base(), 0.5), (&ints(1), 0.5)]).unwrap_err();
    assert!(err.to_string().contains("ids"), "{err}");
}
