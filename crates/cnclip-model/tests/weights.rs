//! Weight files: `.pt` reading/writing against torch-made fixtures, native safetensors, HF import,
//! and corrupt inputs. Fixtures: tests/fixtures/make_weights_fixtures.py (weights/) and
//! make_model_fixtures.py (model/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::config::ClipConfig;
use cnclip_model::weights::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn weights_fixture(name: &str) -> PathBuf {
    fixtures().join("weights").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(weights_fixture("expected.json")).unwrap())
        .unwrap()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-weights-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Double => "float64",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        _ => "other",
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind() && a.size() == b.size() && a.equal(b)
}

fn assert_same_dicts(a: &StateDict, b: &StateDict) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        assert!(same(t, b.get(k).unwrap()), "{k} differs");
    }
}

fn check_raw(sd: &StateDict) {
    let exp = expected();
    let keys: Vec<&str> = exp["raw_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(sd.keys().collect::<Vec<_>>(), keys);
    for (key, t) in sd {
        let e = &exp["raw"][key];
        assert_eq!(kind_name(t.kind()), e["dtype"].as_str().unwrap(), "{key}");
        let shape: Vec<i64> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(t.size(), shape, "{key}");
        let want: Vec<f64> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(values(t), want, "{key}");
    }
}

#[test]
fn raw_state_dicts_in_every_protocol() {
    for name in ["raw_p2.pt", "raw_p4.pt", "raw_p5.pt"] {
        let ck = read_pt(weights_fixture(name)).unwrap();
        assert!(ck.bare_state_dict, "{name}");
        assert_eq!(
            (ck.epoch, ck.step, ck.name.as_deref(), ck.has_optimizer),
            (None, None, None, false)
        );
        check_raw(&ck.state_dict);

        // Views keep torch's layout and share storage like torch.load's result.
        let sd = &ck.state_dict;
        assert_eq!(sd.get("transposed").unwrap().stride(), [1, 4]);
        assert_eq!(sd.get("shared_b").unwrap().stride(), [6]);
        assert_eq!(sd.get("shared_c").unwrap().stride(), [1, 12, 4]);
        let mut a = sd.get("shared_a").unwrap().shallow_clone();
        let _ = a.fill_(-1.0);
        // shared_a covers elements 2..10 of the storage; shared_b[1] is element 7.
        assert_eq!(sd.get("shared_b").unwrap().double_value(&[1]), -1.0);
        assert_eq!(sd.get("shared_b").unwrap().double_value(&[0]), 1.0);
        let mut base = sd.get("base").unwrap().shallow_clone();
        let _ = base.fill_(0.5);
        assert_eq!(sd.get("transposed").unwrap().double_value(&[2, 1]), 0.5);
    }
}

#[test]
fn official_checkpoint_with_optimizer() {
    let exp = &expected()["official"];
    let ck = read_pt(weights_fixture("official.pt")).unwrap();
    assert!(!ck.bare_state_dict);
    assert_eq!(ck.epoch, Some(3));
    assert_eq!(ck.step, Some(120));
    assert_eq!(ck.name.as_deref(), Some("tiny"));
    assert!(ck.has_optimizer);
    let keys: Vec<&str> = exp["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ck.state_dict.keys().collect::<Vec<_>>(), keys);
    for (key, t) in &ck.state_dict {
        assert_eq!(
            kind_name(t.kind()),
            exp["dtypes"][key].as_str().unwrap(),
            "{key}"
        );
        let shape: Vec<i64> = exp["shapes"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(t.size(), shape, "{key}");
        let sum: f64 = values(t).iter().sum();
        let want = exp["sums"][key].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{key}: {sum} vs {want}"
        );
    }
    assert!(keys[0].starts_with("module."));

    let n = ck.state_dict.len();
    let sd = ck.into_cn_clip_state_dict();
    assert_eq!(sd.len(), n - 2);
    assert!(
        sd.keys()
            .all(|k| !k.starts_with("module.") && !k.contains("bert.pooler"))
    );
    assert!(
        sd.contains_key("logit_scale")
            && sd.contains_key("visual.transformer.resblocks.0.attn.in_proj_weight")
    );
}

#[test]
fn legacy_format_is_refused_clearly() {
    let err = read_pt(weights_fixture("legacy.pt")).unwrap_err();
    assert!(matches!(err, WeightsError::LegacyFormat { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("legacy.pt")
            && msg.contains("legacy (pre-1.6) torch.save format is not supported"),
        "{msg}"
    );
}

/// The entries of a stored zip, in order.
fn zip_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(name.as_str(), options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn corrupt_archives_give_precise_errors() {
    let dir = tmp_dir("corrupt");
    let entries = zip_entries(&weights_fixture("raw_p2.pt"));
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let storage0 = entries
        .iter()
        .position(|(n, _)| n.ends_with("/data/0"))
        .unwrap();

    let p = dir.join("garbage.pt");
    std::fs::write(&p, b"hello, this is not a checkpoint").unwrap();
    let msg = read_pt(&p).unwrap_err().to_string();
    assert!(
        msg.contains("garbage.pt") && msg.contains("not a zip"),
        "{msg}"
    );

    let bytes = std::fs::read(weights_fixture("raw_p2.pt")).unwrap();
    let p = dir.join("cut.pt");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = read_pt(&p).unwrap_err().to_string();
    assert!(msg.contains("cut.pt") && msg.contains("not a zip"), "{msg}");

    let p = dir.join("nopkl.pt");
    let mut e = entries.clone();
    e.remove(pkl);
    write_zip(&p, &e);
    assert!(matches!(
        read_pt(&p).unwrap_err(),
        WeightsError::MissingDataPkl { .. }
    ));

    let p = dir.join("nostorage.pt");
    let mut e = entries.clone();
    e.remove(storage0);
    write_zip(&p, &e);
    let err = read_pt(&p).unwrap_err();
    assert!(
        matches!(err, WeightsError::MissingStorage { ref key, .. } if key == "0"),
        "{err}"
    );

    let p = dir.join("short.pt");
    let mut e = entries.clone();
    let full = e[storage0].1.len() as u64;
    e[storage0].1.truncate(5);
    write_zip(&p, &e);
    let err = read_pt(&p).unwrap_err();
    match &err {
        WeightsError::TruncatedStorage {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!((key.as_str(), *expected, *found), ("0", full, 5));
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("expected {full} bytes, found 5")),
        "{err}"
    );

    // A flipped byte in a storage: the CRC catches it.
    let mut bytes = std::fs::read(weights_fixture("raw_p2.pt")).unwrap();
    let needle = values_bytes(&entries[storage0].1);
    let at = find(&bytes, &needle).unwrap();
    bytes[at + 1] ^= 0x40;
    let p = dir.join("flipped.pt");
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(read_pt(&p).unwrap_err(), WeightsError::Crc { .. }));

    // Pickles that are not plain data.
    let prefix = entries[pkl].0.clone();
    let evil = [&[0x80u8, 2][..], b"cos\nsystem\n(X\x02\x00\x00\x00lstR."].concat();
    let p = dir.join("evil.pt");
    write_zip(&p, &[(prefix.clone(), evil)]);
    let msg = read_pt(&p).unwrap_err().to_string();
    assert!(msg.contains("unknown global os.system"), "{msg}");

    let inst = [&[0x80u8, 2][..], b"(ios\nsystem\n."].concat();
    let p = dir.join("inst.pt");
    write_zip(&p, &[(prefix.clone(), inst)]);
    let msg = read_pt(&p).unwrap_err().to_string();
    assert!(
        msg.contains("unsupported pickle opcode INST (0x69) at offset 3"),
        "{msg}"
    );

    let list = [&[0x80u8, 2][..], b"]."].concat();
    let p = dir.join("list.pt");
    write_zip(&p, &[(prefix, list)]);
    let msg = read_pt(&p).unwrap_err().to_string();
    assert!(msg.contains("not a dict"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn values_bytes(b: &[u8]) -> Vec<u8> {
    b[..b.len().min(8)].to_vec()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn mutated_pickles_never_panic() {
    let dir = tmp_dir("mutate");
    let entries = zip_entries(&weights_fixture("raw_p2.pt"));
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let original = entries[pkl].1.clone();
    let p = dir.join("m.pt");
    let mut outcomes = [0usize; 2];
    let mut step = |data: Vec<u8>| {
        let mut e = entries.clone();
        e[pkl].1 = data;
        write_zip(&p, &e);
        outcomes[usize::from(read_pt(&p).is_ok())] += 1;
    };
    for cut in (0..original.len()).step_by(7) {
        step(original[..cut].to_vec());
    }
    for i in (0..original.len()).step_by(3) {
        for v in [0x00u8, 0xff, b'(', b'K', b'X'] {
            let mut data = original.clone();
            data[i] = v;
            step(data);
        }
    }
    assert!(outcomes[0] > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_pt_round_trips() {
    let dir = tmp_dir("writept");
    let src = read_pt(weights_fixture("raw_p2.pt")).unwrap().state_dict;

    let bare = dir.join("bare.pt");
    write_pt_state_dict(&bare, &src).unwrap();
    let back = read_pt(&bare).unwrap();
    assert!(back.bare_state_dict);
    check_raw(&back.state_dict);

    let official = read_pt(weights_fixture("official.pt"))
        .unwrap()
        .into_cn_clip_state_dict();
    let path = dir.join("epoch_latest.pt");
    let header = PtHeader {
        epoch: 7,
        step: 1 << 33,
        name: "名字 run".into(),
    };
    write_pt(&path, &official, &header).unwrap();
    let back = read_pt(&path).unwrap();
    assert_eq!(
        (back.epoch, back.step, back.name.as_deref()),
        (Some(7), Some(1 << 33), Some("名字 run"))
    );
    assert!(!back.has_optimizer && !back.bare_state_dict);
    assert!(back.state_dict.keys().all(|k| k.starts_with("module.")));
    assert_same_dicts(&back.into_cn_clip_state_dict(), &official);

    // Entries are stored, 64-byte aligned like torch.save's.
    let bytes = std::fs::read(&path).unwrap();
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.unwrap().to_string())
        .collect();
    assert_eq!(names[0], "epoch_latest/data.pkl");
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).unwrap();
        let start = f.data_start().unwrap();
        assert_eq!(start % 64, 0, "{}", f.name().unwrap());
        assert!(start as usize <= bytes.len());
    }
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn native_round_trip_keeps_config_dtypes_and_order() {
    let dir = tmp_dir("native");
    let config = ClipConfig::from_name("RN50").unwrap();
    let mut sd = read_pt(weights_fixture("raw_p2.pt")).unwrap().state_dict;
    sd.insert("zz_f32_last", Tensor::from_slice(&[1f32, 2.0]));
    let path = dir.join("model.safetensors");
    save_native(&path, &config, &sd).unwrap();
    let (c, back) = load_native(&path).unwrap();
    assert_eq!(c, config);
    assert_eq!(back.len(), sd.len());
    for (k, t) in &sd {
        let b = back.get(k).unwrap();
        assert!(same(&t.contiguous(), b), "{k}");
        assert!(b.is_contiguous());
    }
    // Within one element size, state-dict order is kept.
    let f32_keys: Vec<&str> = back
        .keys()
        .filter(|k| back.get(k).unwrap().kind() == Kind::Float)
        .collect();
    let want: Vec<&str> = sd
        .keys()
        .filter(|k| sd.get(k).unwrap().kind() == Kind::Float)
        .collect();
    assert_eq!(f32_keys, want);
    let meta = read_safetensors_metadata(&path).unwrap();
    assert_eq!(
        meta.get(NATIVE_FORMAT_KEY).map(String::as_str),
        Some(NATIVE_FORMAT)
    );
    assert_eq!(
        meta.get(NATIVE_VERSION_KEY).map(String::as_str),
        Some(NATIVE_VERSION)
    );

    // Overwriting is atomic and leaves no temporary file.
    save_native(&path, &config, &sd).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // A plain safetensors file is not a native one.
    let plain = dir.join("plain.safetensors");
    save_safetensors(&plain, &sd, HashMap::new()).unwrap();
    let err = load_native(&plain).unwrap_err();
    assert!(
        matches!(err, WeightsError::MissingNativeConfig { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("plain.safetensors"), "{err}");
    let (plain_sd, meta) = read_safetensors(&plain).unwrap();
    assert!(meta.is_empty());
    assert_eq!(plain_sd.len(), sd.len());

    // Truncated and garbage files.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&plain, &bytes[..bytes.len() - 3]).unwrap();
    let msg = load_native(&plain).unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");
    std::fs::write(&plain, b"\xff\xff\xff\xff\xff\xff\xff\xffxx").unwrap();
    assert!(matches!(
        load_native(&plain).unwrap_err(),
        WeightsError::Safetensors { .. }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tiny_vit_fixture() -> Option<(PathBuf, PathBuf, ClipConfig)> {
    let model = fixtures().join("model");
    let hf = model.join("tiny_vit_hf");
    if !hf.join("config.json").is_file() {
        eprintln!("model fixtures not present; skipping");
        return None;
    }
    let config = ClipConfig::from_json_files(
        &model.join("configs/tiny-vit.json"),
        &model.join("configs/tiny-bert.json"),
    )
    .unwrap();
    Some((hf, model.join("tiny_vit.pt"), config))
}

#[test]
fn hf_import_matches_the_official_checkpoint() {
    let Some((hf, pt, config)) = tiny_vit_fixture() else {
        return;
    };
    let (c, sd) = import_hf(&hf).unwrap();
    assert_eq!(c, config);
    let official = read_pt(&pt).unwrap().into_cn_clip_state_dict();
    assert_same_dicts(&sd, &official);

    // The same weights as pytorch_model.bin, and sharded.
    let dir = tmp_dir("hf");
    std::fs::copy(hf.join("config.json"), dir.join("config.json")).unwrap();
    let (hf_sd, _) = read_safetensors(hf.join("model.safetensors")).unwrap();
    write_pt_state_dict(dir.join("pytorch_model.bin"), &hf_sd).unwrap();
    assert_same_dicts(&import_hf(&dir).unwrap().1, &official);
    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();

    let mut shards = [StateDict::new(), StateDict::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (k, t)) in hf_sd.iter().enumerate() {
        shards[i % 2].insert(k, t.shallow_clone());
        weight_map.insert(
            k.to_string(),
            format!("model-0000{}-of-00002.safetensors", i % 2 + 1).into(),
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        save_safetensors(
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            shard,
            HashMap::new(),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_same_dicts(&import_hf(&dir).unwrap().1, &official);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hf_import_rejects_what_cn_clip_lacks() {
    let Some((hf, _, _)) = tiny_vit_fixture() else {
        return;
    };
    let dir = tmp_dir("hfbad");
    std::fs::copy(hf.join("config.json"), dir.join("config.json")).unwrap();
    let (mut sd, _) = read_safetensors(hf.join("model.safetensors")).unwrap();
    // Buffers and a pooler are dropped silently.
    sd.insert(
        "text_model.embeddings.position_ids",
        Tensor::arange(64, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0),
    );
    sd.insert(
        "text_model.pooler.dense.weight",
        Tensor::zeros([8, 8], (Kind::Float, tch::Device::Cpu)),
    );
    save_safetensors(dir.join("model.safetensors"), &sd, HashMap::new()).unwrap();
    import_hf(&dir).unwrap();

    sd.insert(
        "vision_model.embeddings.patch_embedding.bias",
        Tensor::zeros([48], (Kind::Float, tch::Device::Cpu)),
    );
    save_safetensors(dir.join("model.safetensors"), &sd, HashMap::new()).unwrap();
    let msg = import_hf(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("unknown Hugging Face weight vision_model.embeddings.patch_embedding.bias"),
        "{msg}"
    );

    sd.remove("vision_model.embeddings.patch_embedding.bias");
    sd.remove("vision_model.encoder.layers.1.self_attn.v_proj.weight");
    save_safetensors(dir.join("model.safetensors"), &sd, HashMap::new()).unwrap();
    let msg = import_hf(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("resblocks.1.attn.in_proj_weight") && msg.contains("missing"),
        "{msg}"
    );

    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    config["vision_config"]["hidden_act"] = "gelu".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let msg = import_hf(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("vision_config.hidden_act"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the reference Python (torch 2.11, cn_clip 1.6.0) on a `.pt` we wrote:
/// `torch.load(weights_only=True)` must read it, and cn_clip's loader must load it strictly.
/// Opt-in: `CNCLIP_REF_PYTHON=/root/.cache/cnclip-ref/venv/bin/python cargo test -p cnclip-model
/// --test weights -- --ignored`.
#[test]
#[ignore = "needs the reference Python venv (CNCLIP_REF_PYTHON)"]
fn torch_load_weights_only_reads_our_pt() {
    let python = std::env::var("CNCLIP_REF_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/cnclip-ref/venv/bin/python".into());
    let dir = tmp_dir("torchload");
    let official = read_pt(weights_fixture("official.pt"))
        .unwrap()
        .into_cn_clip_state_dict();
    let ours = dir.join("ours.pt");
    write_pt(
        &ours,
        &official,
        &PtHeader {
            epoch: 3,
            step: 120,
            name: "tiny".into(),
        },
    )
    .unwrap();
    let raw = dir.join("raw.pt");
    write_pt_state_dict(
        &raw,
        &read_pt(weights_fixture("raw_p2.pt")).unwrap().state_dict,
    )
    .unwrap();
    let native = dir.join("native.safetensors");
    save_native(
        &native,
        &ClipConfig::from_name("ViT-B-16").unwrap(),
        &read_pt(weights_fixture("raw_p2.pt")).unwrap().state_dict,
    )
    .unwrap();
    let script = r#"
import sys, torch, collections
from cn_clip.clip.model import CLIP
ours, raw, official, raw_ref, native = sys.argv[1:6]
ck = torch.load(ours, map_location="cpu", weights_only=True)
ref = torch.load(official, map_location="cpu", weights_only=True)
assert (ck["epoch"], ck["step"], ck["name"]) == (3, 120, "tiny"), ck.keys()
assert type(ck["state_dict"]) is collections.OrderedDict
want = {k: v for k, v in ref["state_dict"].items() if "bert.pooler" not in k}
assert list(ck["state_dict"].keys()) == list(want.keys())
for k, v in want.items():
    got = ck["state_dict"][k]
    assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
r = torch.load(raw, map_location="cpu", weights_only=True)
rr = torch.load(raw_ref, map_location="cpu", weights_only=True)
assert list(r.keys()) == list(rr.keys())
for k in rr:
    assert r[k].dtype == rr[k].dtype and r[k].shape == rr[k].shape and torch.equal(r[k], rr[k]), k
# cn_clip's loader path (create_model / extract_features.py): strip module., strict load.
sd = ck["state_dict"]
if next(iter(sd.items()))[0].startswith("module"):
    sd = {k[len("module."):]: v for k, v in sd.items() if "bert.pooler" not in k}
model = CLIP(embed_dim=8, image_resolution=16, vision_layers=1, vision_width=16, vision_patch_size=8,
    vision_head_width=8, vocab_size=30, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
    text_hidden_dropout_prob=0.0, text_hidden_size=8, text_initializer_range=0.02,
    text_intermediate_size=16, text_max_position_embeddings=12, text_num_attention_heads=2,
    text_num_hidden_layers=1, text_type_vocab_size=2)
model.load_state_dict(sd, strict=True)
# Our native file is plain safetensors to Python.
from safetensors import safe_open
with safe_open(native, "pt") as f:
    meta = f.metadata()
    assert meta["cnclip.format"] == "cnclip-chinese-clip" and "embed_dim" in meta["cnclip.config"], meta
    for k in rr:
        assert torch.equal(f.get_tensor(k), rr[k].contiguous()), k
zipfile_check = __import__("zipfile").ZipFile(ours).testzip()
assert zipfile_check is None, zipfile_check
# mmap loading needs the 64-byte alignment torch.save uses.
torch.load(ours, map_location="cpu", weights_only=True, mmap=True)
print("OK")
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&ours)
        .arg(&raw)
        .arg(weights_fixture("official.pt"))
        .arg(weights_fixture("raw_p2.pt"))
        .arg(&native)
        .output()
        .expect("run the reference python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Timing on a real-size checkpoint: `CNCLIP_LARGE_PT=/path/to/clip_cn_vit-b-16.pt cargo test
/// -p cnclip-model --test weights large -- --ignored --nocapture`.
#[test]
#[ignore = "needs a large checkpoint (CNCLIP_LARGE_PT)"]
fn large_checkpoint_read_write_speed() {
    let Ok(path) = std::env::var("CNCLIP_LARGE_PT") else {
        return;
    };
    let bytes = std::fs::metadata(&path).unwrap().len() as f64;
    let t = std::time::Instant::now();
    let ck = read_pt(&path).unwrap();
    let read = t.elapsed().as_secs_f64();
    let sd = ck.into_cn_clip_state_dict();
    println!(
        "read_pt: {} tensors, {} elements, {:.2} s, {:.2} GB/s",
        sd.len(),
        sd.num_elements(),
        read,
        bytes / read / 1e9
    );
    let dir = tmp_dir("large");
    let out = dir.join("copy.pt");
    let t = std::time::Instant::now();
    write_pt(
        &out,
        &sd,
        &PtHeader {
            epoch: 1,
            step: 1,
            name: "copy".into(),
        },
    )
    .unwrap();
    println!("write_pt: {:.2} s", t.elapsed().as_secs_f64());
    let native = dir.join("copy.safetensors");
    let config = ClipConfig::from_name("ViT-B-16").unwrap();
    let t = std::time::Instant::now();
    save_native(&native, &config, &sd).unwrap();
    println!("save_native: {:.2} s", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let (_, back) = load_native(&native).unwrap();
    println!("load_native: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(back.len(), sd.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A state dict with cn_clip's keys and shapes for the shipped towers `vision` and `text`, from
/// `fixtures/arch/shapes.json` (made by make_arch_fixtures.py from cn_clip's own `CLIP`). The
/// tensors are zero-stride views of one element: only their shapes matter here.
fn shipped_shapes(vision: &str, text: &str) -> StateDict {
    let all: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("arch/shapes.json")).unwrap(),
    )
    .unwrap();
    let embed = ClipConfig::from_tower_names(vision, "RBT3-chinese")
        .unwrap()
        .vision
        .embed_dim;
    let mut sd = StateDict::new();
    let towers = [&all["vision"][vision], &all["text"][text]];
    for (key, shape) in towers.iter().flat_map(|t| t.as_object().unwrap()) {
        let mut shape: Vec<i64> = serde_json::from_value(shape.clone()).unwrap();
        if key == "text_projection" {
            shape[1] = embed; // its output is the vision tower's embed_dim
        }
        let one = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        sd.insert(key.clone(), one.reshape([]).expand(shape.as_slice(), false));
    }
    sd
}

#[test]
fn official_architectures_are_inferred_from_shapes() {
    use cnclip_model::load::{LoadError, pt_config};
    let path = Path::new("clip_cn.pt");
    let (visions, texts) = cnclip_model::config::shipped_tower_names();
    // cn_clip 1.6.0 ships these towers; the five released models are among the pairings.
    assert_eq!((visions.len(), texts.len()), (6, 3));
    for v in &visions {
        for t in &texts {
            let sd = shipped_shapes(v, t);
            let want = ClipConfig::from_tower_names(v, t).unwrap();
            // Unique, with the heads of the shipped config (not in the shapes).
            let (config, name) =
                pt_config(path, &sd, None, false).unwrap_or_else(|e| panic!("{v}@{t}: {e}"));
            assert_eq!(config, want, "{v}@{t}");
            assert_eq!(name.as_deref(), Some(format!("{v}@{t}").as_str()));
            // The right flags pass too.
            assert_eq!(pt_config(path, &sd, Some(&want), false).unwrap().0, want);
        }
    }
    for released in ["RN50", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"] {
        let want = ClipConfig::from_name(released).unwrap();
        let (v, t) = want.shipped_pair().unwrap();
        let (config, _) = pt_config(path, &shipped_shapes(v, t), None, false).unwrap();
        assert_eq!(config, want, "{released}");
    }

    // Wrong flags (the examples' old default for a ViT-H-14 file): each tensor whose shape
    // differs, both shapes and the fields behind them, and the flags that fit.
    let sd = shipped_shapes("ViT-H-14", "RoBERTa-wwm-ext-large-chinese");
    let b16 = ClipConfig::from_name("ViT-B-16").unwrap();
    let e = pt_config(path, &sd, Some(&b16), false).unwrap_err();
    assert!(matches!(e, LoadError::ShapeMismatch { .. }), "{e}");
    let msg = e.to_string();
    for line in [
        "shape mismatch for visual.conv1.weight: the model expects [768, 3, 16, 16], the weights \
         have [1280, 3, 14, 14] (the config's vision_width, vision_patch_size)",
        "layer count mismatch for visual.transformer.resblocks.N: the model expects 12, the \
         weights have 32 (the config's vision_layers)",
        "shape mismatch for text_projection: the model expects [768, 512], the weights have \
         [1024, 1024] (the config's text_hidden_size, embed_dim)",
        "the weights are ViT-H-14@RoBERTa-wwm-ext-large-chinese: pass --vision-model ViT-H-14 \
         --text-model RoBERTa-wwm-ext-large-chinese, or leave both out where they are optional",
    ] {
        assert!(msg.contains(line), "{line}\nnot in\n{msg}");
    }
    // A ResNet file asked to load as a ViT: says which tower each is.
    let sd = shipped_shapes("RN50", "RBT3-chinese");
    let msg = pt_config(path, &sd, Some(&b16), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("the model is a ViT, the weights hold a ModifiedResNet")
            && msg.contains("pass --vision-model RN50 --text-model RBT3-chinese"),
        "{msg}"
    );

    // ViT-L-14 weights fine-tuned at 336 px (cn_clip's resume resizes the positional embedding):
    // only the grid differs, which is an error unless resizing was asked for.
    let sd = shipped_shapes("ViT-L-14", "RoBERTa-wwm-ext-base-chinese");
    let l336 =
        ClipConfig::from_tower_names("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese").unwrap();
    let msg = pt_config(path, &sd, Some(&l336), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(
            "shape mismatch for visual.positional_embedding: the model expects [577, 1024], the \
             weights have [257, 1024]"
        ),
        "{msg}"
    );
    assert_eq!(pt_config(path, &sd, Some(&l336), true).unwrap().0, l336);

    // A custom size: no shipped match, and heads are not in the shapes, so the configs are needed;
    // a tower that does match a shipped one is named.
    let tiny = ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,
            "vision_head_width":16,"vision_patch_size":16,"vocab_size":21128,
            "text_attention_probs_dropout_prob":0.0,"text_hidden_act":"gelu",
            "text_hidden_dropout_prob":0.0,"text_hidden_size":16,"text_initializer_range":0.02,
            "text_intermediate_size":32,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":1,"text_type_vocab_size":2}"#,
        "tiny",
    )
    .unwrap();
    let sd = cnclip_model::Clip::new(&tiny, tch::Device::Cpu).state_dict();
    let e = pt_config(path, &sd, None, false).unwrap_err();
    assert!(matches!(e, LoadError::ConfigRequired { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("ViT width 32, 2 layers, patch 16, 32 px, embed_dim 16")
            && msg.contains("match no model cn_clip ships")
            && msg.contains(
                "pass --vision-model <a JSON file in cn_clip's schema> --text-model <a JSON file \
                 in cn_clip's schema> (attention head counts are not in the weights)"
            ),
        "{msg}"
    );
    assert_eq!(
        pt_config(path, &sd, Some(&tiny), false).unwrap(),
        (tiny, None)
    );
    // ViT-B-16 with a custom text tower: the vision flag is a shipped name.
    let mut sd = shipped_shapes("ViT-B-16", "RBT3-chinese");
    let words = sd
        .get("bert.embeddings.word_embeddings.weight")
        .unwrap()
        .size();
    sd.insert(
        "bert.embeddings.word_embeddings.weight",
        Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))
            .reshape([])
            .expand([30000, words[1]], false),
    );
    let msg = pt_config(path, &sd, None, false).unwrap_err().to_string();
    assert!(
        msg.contains("vocab 30000")
            && msg.contains("pass --vision-model ViT-B-16 --text-model <a JSON file"),
        "{msg}"
    );
}
