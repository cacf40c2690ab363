//! `onnx::export` (what `convert --format onnx` writes): cn_clip's file names and I/O contract,
//! a graph whose every value is defined, weights stored bit for bit, external data, and (opt-in,
//! `CNCLIP_REF_PYTHON`) `onnx.checker` plus ONNX Runtime's features against ours and cn_clip's
//! on the model fixtures (`tests/fixtures/onnx/check_onnx.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::onnx::proto::{DimensionValue, ModelProto, TensorProto, data_type};
use cnclip_model::onnx::{self, OnnxOptions, Tower};
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use prost::Message;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Max |Δ| / max |reference| between ONNX Runtime's fp32 features and ours (and cn_clip's): the
/// same fp32 operations in a different association (separate q/k/v MatMuls vs one fused map,
/// MatMul/Softmax vs libtorch's SDPA, ORT's GEMM blocking and LayerNorm kernels). Each reduction
/// of length n rounds to ~√n·2⁻²⁴ relative (n ≤ 4·width = 192 here: ≈ 1e-6), a few per layer
/// over 2–10 layers and LayerNorms that do not amplify: ≈ 1e-6 expected; the bound 1e-5 leaves
/// a factor 10 for the association differences.
const FP32_TOLERANCE: f64 = 1e-5;
/// fp16 graphs against our fp32 features: the bound our own fp16 inference is held to against
/// cn_clip's fp32 (model_parity.rs, `cpu_low_precision_tracks_cn_clip`): fp16 keeps 11 bits
/// (≈ 4.9e-4 per rounding), ≈ 3× the measured error.
const FP16_TOLERANCE: f64 = 3e-3;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_config(vision: &str) -> ClipConfig {
    let c = |n: &str| {
        fixtures()
            .join("model/configs")
            .join(n)
            .display()
            .to_string()
    };
    ClipConfig::from_tower_args(&c(vision), &c("tiny-bert.json")).unwrap()
}

fn load_pt(name: &str, vision: &str) -> Clip {
    let options = LoadOptions {
        config: Some(tiny_config(vision)),
        ..Default::default()
    };
    Clip::load(fixtures().join("model").join(name), &options, Device::Cpu).unwrap()
}

fn out_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-onnx-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_model(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

fn dims(info: &cnclip_model::onnx::proto::ValueInfoProto) -> (i32, Vec<String>) {
    let t = info.r#type.as_ref().unwrap().tensor_type.as_ref().unwrap();
    let dims = t
        .shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| match d.value.as_ref().unwrap() {
            DimensionValue::DimValue(v) => v.to_string(),
            DimensionValue::DimParam(p) => p.clone(),
        })
        .collect();
    (t.elem_type, dims)
}

/// Every node input is a graph input, an initializer or an earlier node's output (topological
/// order, as the ONNX checker demands), and the graph output is produced.
fn assert_well_formed(m: &ModelProto) {
    let g = m.graph.as_ref().unwrap();
    let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
    for n in &g.node {
        for i in &n.input {
            assert!(
                defined.contains(i.as_str()),
                "{} uses undefined {i}",
                n.name
            );
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
    for o in &g.output {
        assert!(
            defined.contains(o.name.as_str()),
            "{} never produced",
            o.name
        );
    }
}

fn initializers(m: &ModelProto) -> BTreeMap<String, TensorProto> {
    let g = m.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect()
}

fn as_f32(t: &TensorProto) -> Vec<f32> {
    t.raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn files_names_and_io_are_cn_clips() {
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let dir = out_dir("contract");
    let prefix = dir.join("vit");
    let options = OnnxOptions::default();
    for (tower, file, input, output, input_dims) in [
        (
            Tower::Vision,
            "vit.img.fp32.onnx",
            "image",
            "unnorm_image_features",
            (data_type::FLOAT, vec!["batch", "3", "32", "32"]),
        ),
        (
            Tower::Text,
            "vit.txt.fp32.onnx",
            "text",
            "unnorm_text_features",
            (data_type::INT64, vec!["batch", "52"]),
        ),
    ] {
        let path = onnx::file_name(&prefix, tower, false);
        assert_eq!(path, dir.join(file));
        let written = onnx::export(&model, tower, &path, &options).unwrap();
        assert_eq!(
            written,
            vec![path.clone()],
            "small fp32 graphs are one file"
        );
        let m = read_model(&path);
        assert_eq!(m.ir_version, onnx::IR_VERSION);
        assert_eq!(m.opset_import.len(), 1);
        assert_eq!(m.opset_import[0].domain, "");
        assert_eq!(m.opset_import[0].version, onnx::OPSET);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.input[0].name, input);
        let (ty, d) = dims(&g.input[0]);
        assert_eq!(
            (ty, d.iter().map(String::as_str).collect::<Vec<_>>()),
            input_dims
        );
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, output);
        assert_eq!(
            dims(&g.output[0]),
            (data_type::FLOAT, vec!["batch".into(), "32".into()])
        );
        assert_well_formed(&m);
    }
    // Weights are stored bit for bit (conv1 as is; linear weights transposed for MatMul).
    let m = read_model(&dir.join("vit.img.fp32.onnx"));
    let inits = initializers(&m);
    let w = model.named_tensors()["visual.conv1.weight"].shallow_clone();
    let stored = &inits["visual.conv1.weight"];
    assert_eq!(stored.dims, w.size());
    assert_eq!(
        as_f32(stored),
        Vec::<f32>::try_from(&w.flatten(0, -1)).unwrap()
    );
    let w = model.named_tensors()["visual.transformer.resblocks.1.mlp.c_fc.weight"].tr();
    let stored = &inits["visual.transformer.resblocks.1.mlp.c_fc.weight"];
    assert_eq!(stored.dims, w.size());
    assert_eq!(
        as_f32(stored),
        Vec::<f32>::try_from(&w.contiguous().flatten(0, -1)).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resnet_graph_is_well_formed() {
    let model = load_pt("tiny_rn50.pt", "tiny-rn50.json");
    let m = onnx::build(&model, Tower::Vision, &OnnxOptions::default()).unwrap();
    assert_well_formed(&m);
    let ops: HashSet<&str> = m
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .collect();
    for op in ["BatchNormalization", "AveragePool", "ReduceMean", "Softmax"] {
        assert!(ops.contains(op), "{op} missing");
    }
}

/// Beyond the protobuf limit (lowered here to 4 KiB) tensors of ≥ 1 KiB go to one
/// `{file}.extra_file`, each at its recorded offset and length, the rest stay inline.
#[test]
fn external_data_beyond_the_protobuf_limit() {
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let dir = out_dir("external");
    let path = dir.join("x.img.fp32.onnx");
    let options = OnnxOptions {
        protobuf_limit: 4096,
        ..Default::default()
    };
    let written = onnx::export(&model, Tower::Vision, &path, &options).unwrap();
    let extra = dir.join("x.img.fp32.onnx.extra_file");
    assert_eq!(written, vec![path.clone(), extra.clone()]);
    let data = std::fs::read(&extra).unwrap();
    let inline = onnx::build(&model, Tower::Vision, &options).unwrap();
    let (inline, stored) = (initializers(&inline), initializers(&read_model(&path)));
    assert_eq!(
        inline.keys().collect::<Vec<_>>(),
        stored.keys().collect::<Vec<_>>()
    );
    let mut external = 0;
    for (name, t) in &stored {
        let want = &inline[name].raw_data;
        if want.len() < onnx::EXTERNAL_SIZE_THRESHOLD {
            assert_eq!(&t.raw_data, want, "{name} should stay inline");
            assert!(t.external_data.is_empty());
            continue;
        }
        external += 1;
        assert!(t.raw_data.is_empty(), "{name}");
        assert_eq!(t.data_location, onnx::proto::DATA_LOCATION_EXTERNAL);
        let entry = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(entry("location"), "x.img.fp32.onnx.extra_file");
        let offset: usize = entry("offset").parse().unwrap();
        let length: usize = entry("length").parse().unwrap();
        assert_eq!(offset % 4096, 0);
        assert_eq!(&data[offset..offset + length], want.as_slice(), "{name}");
    }
    assert!(external > 10, "only {external} tensors went external");
    // Below the limit nothing is external.
    let written = onnx::export(&model, Tower::Vision, &path, &OnnxOptions::default()).unwrap();
    assert_eq!(written, vec![path]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--fp16`: fp16 weights, float32 I/O, external data as cn_clip stores its fp16 files.
#[test]
fn fp16_variant() {
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let dir = out_dir("fp16");
    let options = OnnxOptions {
        fp16: true,
        ..Default::default()
    };
    for tower in [Tower::Vision, Tower::Text] {
        let path = onnx::file_name(&dir.join("m"), tower, true);
        assert!(path.to_string_lossy().ends_with(".fp16.onnx"));
        let written = onnx::export(&model, tower, &path, &options).unwrap();
        assert_eq!(written.len(), 2);
        let m = read_model(&path);
        assert_well_formed(&m);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(dims(&g.output[0]).0, data_type::FLOAT);
        for t in &g.initializer {
            assert!(
                t.data_type == data_type::FLOAT16 || t.data_type == data_type::INT64,
                "{} is {}",
                t.name,
                t.data_type
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn context_length_beyond_positions_is_refused() {
    let model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let options = OnnxOptions {
        context_length: 65,
        ..Default::default()
    };
    let msg = onnx::build(&model, Tower::Text, &options)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("65") && msg.contains("64"), "{msg}");
}

/// The graph holds the base weights only, so a model with a live adapter is refused.
#[test]
fn live_adapter_is_refused() {
    #[derive(Debug)]
    struct Shift;
    impl cnclip_model::model::LinearDelta for Shift {
        fn forward(&self, x: &Tensor, _train: bool) -> Option<Tensor> {
            Some(x.ones_like())
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }
    let mut model = load_pt("tiny_vit.pt", "tiny-vit.json");
    let site = "bert.encoder.layer.1.attention.self.query";
    model.set_linear_delta(site, Some(Box::new(Shift))).unwrap();
    let msg = onnx::build(&model, Tower::Vision, &OnnxOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains(site) && msg.contains("merge"), "{msg}");
}

/// Runs `check_onnx.py` with the reference venv: `onnx.checker` and ONNX Runtime on our exports
/// of the ViT and RN50 fixtures, fp32 within [`FP32_TOLERANCE`] of our features and of
/// cn_clip's, fp16 within [`FP16_TOLERANCE`] of ours.
/// Opt-in: `CNCLIP_REF_PYTHON=/root/.cache/cnclip-ref/venv/bin/python cargo test -p cnclip-model
/// --test onnx_export -- --ignored`.
#[test]
#[ignore = "needs the reference Python venv with onnx and onnxruntime (CNCLIP_REF_PYTHON)"]
fn onnxruntime_features_equal_ours_and_cn_clip() {
    let python = std::env::var("CNCLIP_REF_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/cnclip-ref/venv/bin/python".into());
    let script = fixtures().join("onnx/check_onnx.py");
    for (name, vision) in [
        ("tiny_vit", "tiny-vit.json"),
        ("tiny_rn50", "tiny-rn50.json"),
    ] {
        let model = load_pt(&format!("{name}.pt"), vision);
        let io_path = fixtures().join(format!("model/{name}.io.safetensors"));
        let io: BTreeMap<String, Tensor> = Tensor::read_safetensors(&io_path)
            .unwrap()
            .into_iter()
            .collect();
        let dir = out_dir(name);
        let ours = dir.join("ours.safetensors");
        let (img, txt) = tch::no_grad(|| {
            (
                model.encode_image(&io["image"]).to_kind(Kind::Float),
                model.encode_text(&io["text"]).to_kind(Kind::Float),
            )
        });
        Tensor::write_safetensors(&[("image_features", &img), ("text_features", &txt)], &ours)
            .unwrap();
        for (fp16, tolerance) in [(false, FP32_TOLERANCE), (true, FP16_TOLERANCE)] {
            let options = OnnxOptions {
                fp16,
                ..Default::default()
            };
            let prefix = dir.join(name);
            let img_path = onnx::file_name(&prefix, Tower::Vision, fp16);
            let txt_path = onnx::file_name(&prefix, Tower::Text, fp16);
            onnx::export(&model, Tower::Vision, &img_path, &options).unwrap();
            onnx::export(&model, Tower::Text, &txt_path, &options).unwrap();
            let out = std::process::Command::new(&python)
                .arg(&script)
                .args([&img_path, &txt_path, &io_path, &ours])
                .arg(tolerance.to_string())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            eprintln!("{name} fp16={fp16}: {stdout}");
            assert!(
                out.status.success(),
                "{name} fp16={fp16}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
