//! ONNX export of both towers with cn_clip's deployment contract (`cn_clip/deploy/pytorch_to_onnx.py`,
//! read by `cn_clip/eval/extract_features_onnx.py` and `onnx_to_tensorrt.py`):
//!
//! * files `{prefix}.img.fp32.onnx` / `{prefix}.txt.fp32.onnx`, and `.fp16.onnx` variants whose
//!   weights live in `{file}.extra_file` (external data) as cn_clip stores them;
//! * inputs `image` float32 `[batch, 3, R, R]` and `text` int64 `[batch, context_length]`, outputs
//!   `unnorm_image_features` / `unnorm_text_features` float32 `[batch, embed_dim]` (un-normalised;
//!   callers L2-normalise). Unlike cn_clip's export (batch fixed at 1) the batch axis is dynamic.
//!   The fp16 variants keep float32 inputs and outputs (`keep_io_types=True`) and cast inside.
//!
//! The graphs are written from our model definition (the same computation as [`crate::Clip`]'s
//! `encode_image` / `encode_text`, with its weights under cn_clip's names), opset 17 (ONNX
//! Runtime ≥ 1.13, TensorRT 8.6 / 10): `LayerNormalization` is a single op, attention is plain
//! MatMul/Softmax, GELU is written with `Erf` (a `Gelu` op needs opset 20).
//!
//! Weights are exported as the model holds them. cn_clip's own fp32 export goes through
//! `create_model(...).float()` and so rounds the converted weights to fp16 and back; call
//! `Clip::set_precision(Precision::Fp32Fp16Rounded)` first to get that.
//!
//! A graph whose serialisation would exceed protobuf's 2 GiB limit (ViT-H-14 in fp32) is written
//! with its tensors of 1 KiB and more in `{file}.extra_file`, as `onnx.save_model(...,
//! save_as_external_data=True, size_threshold=1024)` does.

mod graph;
pub mod proto;

use crate::Clip;
use crate::config::VisionLayers;
use graph::{Attr, Graph, value_info};
use prost::Message;
use proto::{
    DATA_LOCATION_EXTERNAL, ModelProto, OperatorSetIdProto, StringStringEntryProto, data_type,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The default operator set: supported by ONNX Runtime ≥ 1.13 and TensorRT 8.6/10's parser.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17 (ONNX 1.12).
pub const IR_VERSION: i64 = 8;
/// Protobuf refuses messages of 2 GiB and more.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// cn_clip's `size_threshold=1024`: smaller tensors stay inside the `.onnx` file.
pub const EXTERNAL_SIZE_THRESHOLD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("the model has no tensor {key} (the graph needs it)")]
    MissingWeight { key: String },
    #[error("reading tensor {key}: {source}")]
    Tensor { key: String, source: tch::TchError },
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--context-length {0} is outside 1..={1} (the text model's max_position_embeddings)")]
    ContextLength(i64, i64),
    #[error(
        "{site} carries an adapter delta, which the graph would leave out: merge it into the \
         weights first (cnclip_lora::unload(model, true), as convert does)"
    )]
    LiveAdapter { site: String },
}

/// Which tower a graph holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Vision,
    Text,
}

#[derive(Debug, Clone, Copy)]
pub struct OnnxOptions {
    /// Fixed text length of the `text` input (cn_clip's `--context-length`, default 52).
    pub context_length: i64,
    /// Write fp16 weights and compute (float32 inputs/outputs, cast inside), else fp32.
    pub fp16: bool,
    /// Serialised size from which tensors go to external data: [`PROTOBUF_LIMIT`]; lowered only
    /// by tests.
    pub protobuf_limit: u64,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        Self {
            context_length: 52,
            fp16: false,
            protobuf_limit: PROTOBUF_LIMIT,
        }
    }
}

/// `{prefix}.img.fp32.onnx`, `{prefix}.txt.fp16.onnx`, … as cn_clip names them.
pub fn file_name(prefix: &Path, tower: Tower, fp16: bool) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(match tower {
        Tower::Vision => ".img",
        Tower::Text => ".txt",
    });
    name.push(if fp16 { ".fp16.onnx" } else { ".fp32.onnx" });
    PathBuf::from(name)
}

/// Builds the graph of `tower` and writes it to `path` (plus `{path}.extra_file` when the
/// weights go to external data). Returns the files written.
pub fn export(
    model: &Clip,
    tower: Tower,
    path: &Path,
    options: &OnnxOptions,
) -> Result<Vec<PathBuf>, OnnxError> {
    let proto = build(model, tower, options)?;
    // cn_clip stores its fp16 variants with external data whatever their size.
    let external = options.fp16 || proto.encoded_len() as u64 > options.protobuf_limit;
    save(proto, path, external)
}

/// The ONNX model of `tower` (in memory, weights inline).
pub fn build(model: &Clip, tower: Tower, options: &OnnxOptions) -> Result<ModelProto, OnnxError> {
    if let Some(site) = model
        .linear_sites()
        .into_iter()
        .find(|s| model.linear_delta(&s.name).is_some())
    {
        return Err(OnnxError::LiveAdapter { site: site.name });
    }
    let weights = model.named_tensors();
    let mut g = Graph::new(&weights, options.fp16);
    let float = data_type::FLOAT;
    let embed_dim = model.config().vision.embed_dim;
    let (graph_name, input, output) = match tower {
        Tower::Vision => {
            let r = model.config().vision.image_resolution;
            let mut x = "image".to_string();
            if options.fp16 {
                x = g.node(
                    "Cast",
                    &[&x],
                    &[("to", Attr::Int(data_type::FLOAT16 as i64))],
                );
            }
            let features = vision(&mut g, model, &x)?;
            (
                "cnclip_image",
                value_info("image", float, &[None, Some(3), Some(r), Some(r)]),
                finish_output(&mut g, &features, "unnorm_image_features", options.fp16),
            )
        }
        Tower::Text => {
            let max = model.config().text.text_max_position_embeddings;
            if options.context_length < 1 || options.context_length > max {
                return Err(OnnxError::ContextLength(options.context_length, max));
            }
            let features = text(&mut g, model)?;
            (
                "cnclip_text",
                value_info(
                    "text",
                    data_type::INT64,
                    &[None, Some(options.context_length)],
                ),
                finish_output(&mut g, &features, "unnorm_text_features", options.fp16),
            )
        }
    };
    let output_info = value_info(&output, float, &[None, Some(embed_dim)]);
    let graph = g.finish(graph_name, vec![input], vec![output_info]);
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "cnclip".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "Chinese-CLIP {} tower, cn_clip's ONNX contract; config: {}",
            match tower {
                Tower::Vision => "vision",
                Tower::Text => "text",
            },
            model.config().to_json()
        ),
        graph: Some(graph),
    })
}

fn finish_output(g: &mut Graph, features: &str, name: &str, fp16: bool) -> String {
    let mut y = features.to_string();
    if fp16 {
        y = g.node("Cast", &[&y], &[("to", Attr::Int(data_type::FLOAT as i64))]);
    }
    g.output(&y, name);
    name.to_string()
}

fn vision(g: &mut Graph, model: &Clip, image: &str) -> Result<String, OnnxError> {
    let c = &model.config().vision;
    match c.vision_layers {
        VisionLayers::Transformer(layers) => vit(g, model, image, layers),
        VisionLayers::ResNet(blocks) => resnet(g, model, image, blocks),
    }
}

/// cn_clip's `VisualTransformer` (see `model::vit`).
fn vit(g: &mut Graph, model: &Clip, image: &str, layers: i64) -> Result<String, OnnxError> {
    let c = &model.config().vision;
    let (width, patch, heads) = (c.vision_width, c.vision_patch_size.unwrap_or(1), c.heads());
    let conv = g.weight("visual.conv1.weight")?;
    let x = g.node(
        "Conv",
        &[image, &conv],
        &[
            ("kernel_shape", Attr::Ints(vec![patch, patch])),
            ("strides", Attr::Ints(vec![patch, patch])),
        ],
    );
    let flat = g.ints(&[0, width, -1]);
    let x = g.node("Reshape", &[&x, &flat], &[]);
    let x = g.node("Transpose", &[&x], &[("perm", Attr::Ints(vec![0, 2, 1]))]);
    // The class token, broadcast to [N, 1, width].
    let cls = g.get("visual.class_embedding")?.view([1, 1, width]);
    let cls = g.constant("visual.class_embedding", &cls)?;
    let batch = g.node(
        "Shape",
        &[&x],
        &[("start", Attr::Int(0)), ("end", Attr::Int(1))],
    );
    let rest = g.ints(&[1, width]);
    let shape = g.node("Concat", &[&batch, &rest], &[("axis", Attr::Int(0))]);
    let cls = g.node("Expand", &[&cls, &shape], &[]);
    let x = g.node("Concat", &[&cls, &x], &[("axis", Attr::Int(1))]);
    let pos = g.weight("visual.positional_embedding")?;
    let x = g.node("Add", &[&x, &pos], &[]);
    let mut x = g.layer_norm(&x, "visual.ln_pre", 1e-5)?;
    for i in 0..layers {
        let p = format!("visual.transformer.resblocks.{i}");
        let h = g.layer_norm(&x, &format!("{p}.ln_1"), 1e-5)?;
        // The fused in_proj split into q, k, v maps (rows 0..w, w..2w, 2w..3w).
        let w = g.get(&format!("{p}.attn.in_proj_weight"))?;
        let b = g.get(&format!("{p}.attn.in_proj_bias"))?;
        let mut qkv = Vec::new();
        for (j, part) in ["q", "k", "v"].iter().enumerate() {
            let wj = w.narrow(0, j as i64 * width, width);
            let bj = b.narrow(0, j as i64 * width, width);
            let wj = g.weight_transposed(&format!("{p}.attn.{part}_proj.weight"), &wj)?;
            let bj = g.constant(&format!("{p}.attn.{part}_proj.bias"), &bj)?;
            let y = g.node("MatMul", &[&h, &wj], &[]);
            qkv.push(g.node("Add", &[&y, &bj], &[]));
        }
        let a = g.attention(&qkv[0], &qkv[1], &qkv[2], heads, width, None)?;
        let a = g.linear(&a, &format!("{p}.attn.out_proj"))?;
        x = g.node("Add", &[&x, &a], &[]);
        let h = g.layer_norm(&x, &format!("{p}.ln_2"), 1e-5)?;
        let h = g.linear(&h, &format!("{p}.mlp.c_fc"))?;
        // QuickGELU: h · sigmoid(1.702 h).
        let k = g.scalar(1.702)?;
        let s = g.node("Mul", &[&h, &k], &[]);
        let s = g.node("Sigmoid", &[&s], &[]);
        let h = g.node("Mul", &[&h, &s], &[]);
        let h = g.linear(&h, &format!("{p}.mlp.c_proj"))?;
        x = g.node("Add", &[&x, &h], &[]);
    }
    let zero = g.ints(&[0]);
    let zero = g.node("Squeeze", &[&zero], &[]);
    let cls = g.node("Gather", &[&x, &zero], &[("axis", Attr::Int(1))]);
    let pooled = g.layer_norm(&cls, "visual.ln_post", 1e-5)?;
    let proj = g.weight("visual.proj")?;
    Ok(g.node("MatMul", &[&pooled, &proj], &[]))
}

fn conv(
    g: &mut Graph,
    x: &str,
    key: &str,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> Result<String, OnnxError> {
    let w = g.weight(&format!("{key}.weight"))?;
    Ok(g.node(
        "Conv",
        &[x, &w],
        &[
            ("kernel_shape", Attr::Ints(vec![kernel, kernel])),
            ("strides", Attr::Ints(vec![stride, stride])),
            ("pads", Attr::Ints(vec![padding; 4])),
        ],
    ))
}

/// `BatchNorm2d` in inference mode (running statistics, eps 1e-5).
fn batch_norm(g: &mut Graph, x: &str, key: &str) -> Result<String, OnnxError> {
    let mut inputs = vec![x.to_string()];
    for name in ["weight", "bias", "running_mean", "running_var"] {
        inputs.push(g.weight(&format!("{key}.{name}"))?);
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    Ok(g.node(
        "BatchNormalization",
        &inputs,
        &[("epsilon", Attr::Float(1e-5))],
    ))
}

/// `avg_pool2d(k, k)` without padding (`ceil_mode=False`); identity for `k ≤ 1`.
fn avg_pool(g: &mut Graph, x: &str, k: i64) -> String {
    if k <= 1 {
        return x.to_string();
    }
    g.node(
        "AveragePool",
        &[x],
        &[
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![k, k])),
        ],
    )
}

/// cn_clip's `ModifiedResNet` (see `model::resnet`).
fn resnet(g: &mut Graph, model: &Clip, image: &str, blocks: [i64; 4]) -> Result<String, OnnxError> {
    let c = &model.config().vision;
    let width = c.vision_width;
    let mut x = image.to_string();
    for (i, stride) in [(1, 2), (2, 1), (3, 1)] {
        x = conv(g, &x, &format!("visual.conv{i}"), 3, stride, 1)?;
        x = batch_norm(g, &x, &format!("visual.bn{i}"))?;
        x = g.node("Relu", &[&x], &[]);
    }
    x = avg_pool(g, &x, 2);
    let mut inplanes = width;
    for (index, &count) in blocks.iter().enumerate() {
        let planes = width << index;
        for b in 0..count {
            let stride = if b == 0 && index > 0 { 2 } else { 1 };
            let p = format!("visual.layer{}.{b}", index + 1);
            let out = conv(g, &x, &format!("{p}.conv1"), 1, 1, 0)?;
            let out = batch_norm(g, &out, &format!("{p}.bn1"))?;
            let out = g.node("Relu", &[&out], &[]);
            let out = conv(g, &out, &format!("{p}.conv2"), 3, 1, 1)?;
            let out = batch_norm(g, &out, &format!("{p}.bn2"))?;
            let out = g.node("Relu", &[&out], &[]);
            let out = avg_pool(g, &out, stride);
            let out = conv(g, &out, &format!("{p}.conv3"), 1, 1, 0)?;
            let out = batch_norm(g, &out, &format!("{p}.bn3"))?;
            let identity = if stride > 1 || inplanes != planes * 4 {
                let d = avg_pool(g, &x, stride);
                let d = conv(g, &d, &format!("{p}.downsample.0"), 1, 1, 0)?;
                batch_norm(g, &d, &format!("{p}.downsample.1"))?
            } else {
                x.clone()
            };
            let sum = g.node("Add", &[&out, &identity], &[]);
            x = g.node("Relu", &[&sum], &[]);
            inplanes = planes * 4;
        }
    }
    // AttentionPool2d: tokens [N, hw, C], the mean token first, positions, then attention with
    // the mean token as the only query.
    let embed = width * 32;
    let flat = g.ints(&[0, embed, -1]);
    let x = g.node("Reshape", &[&x, &flat], &[]);
    let x = g.node("Transpose", &[&x], &[("perm", Attr::Ints(vec![0, 2, 1]))]);
    let mean = g.node(
        "ReduceMean",
        &[&x],
        &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
    );
    let x = g.node("Concat", &[&mean, &x], &[("axis", Attr::Int(1))]);
    let pos = g.weight("visual.attnpool.positional_embedding")?;
    let x = g.node("Add", &[&x, &pos], &[]);
    let (s0, s1, ax) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[1]));
    let first = g.node("Slice", &[&x, &s0, &s1, &ax], &[]);
    let q = g.linear(&first, "visual.attnpool.q_proj")?;
    let k = g.linear(&x, "visual.attnpool.k_proj")?;
    let v = g.linear(&x, "visual.attnpool.v_proj")?;
    let out = g.attention(&q, &k, &v, c.heads(), embed, None)?;
    let zero = g.ints(&[0]);
    let zero = g.node("Squeeze", &[&zero], &[]);
    let out = g.node("Gather", &[&out, &zero], &[("axis", Attr::Int(1))]);
    g.linear(&out, "visual.attnpool.c_proj")
}

/// cn_clip's BERT text tower and head (see `model::bert` and `Clip::encode_text`): mask
/// `text != 0` (pad id 0), post-LN layers with erf GELU, `[CLS]` times `text_projection`.
fn text(g: &mut Graph, model: &Clip) -> Result<String, OnnxError> {
    let c = &model.config().text;
    let (hidden, heads) = (c.text_hidden_size, c.text_num_attention_heads);
    let eps = 1e-12;
    let words = g.weight("bert.embeddings.word_embeddings.weight")?;
    let x = g.node("Gather", &[&words, "text"], &[("axis", Attr::Int(0))]);
    let positions = g.weight("bert.embeddings.position_embeddings.weight")?;
    let len = g.node(
        "Shape",
        &["text"],
        &[("start", Attr::Int(1)), ("end", Attr::Int(2))],
    );
    let (zero, axis0) = (g.ints(&[0]), g.ints(&[0]));
    let positions = g.node("Slice", &[&positions, &zero, &len, &axis0], &[]);
    let x = g.node("Add", &[&x, &positions], &[]);
    let token_type = g
        .get("bert.embeddings.token_type_embeddings.weight")?
        .get(0);
    let token_type = g.constant(
        "bert.embeddings.token_type_embeddings.weight.0",
        &token_type,
    )?;
    let x = g.node("Add", &[&x, &token_type], &[]);
    let mut x = g.layer_norm(&x, "bert.embeddings.LayerNorm", eps)?;
    // cn_clip's additive key mask: (1 − (text ≠ 0)) · −10000 = (text = 0) · −10000.
    let pad = g.ints(&[0]);
    let is_pad = g.node("Equal", &["text", &pad], &[]);
    let is_pad = g.node(
        "Cast",
        &[&is_pad],
        &[("to", Attr::Int(g.float_type() as i64))],
    );
    let big = g.scalar(-10000.0)?;
    let mask = g.node("Mul", &[&is_pad, &big], &[]);
    let axes = g.ints(&[1, 2]);
    let mask = g.node("Unsqueeze", &[&mask, &axes], &[]);
    let (half, one, rsqrt2) = (
        g.scalar(0.5)?,
        g.scalar(1.0)?,
        g.scalar(std::f64::consts::FRAC_1_SQRT_2)?,
    );
    for j in 0..c.text_num_hidden_layers {
        let p = format!("bert.encoder.layer.{j}");
        let q = g.linear(&x, &format!("{p}.attention.self.query"))?;
        let k = g.linear(&x, &format!("{p}.attention.self.key"))?;
        let v = g.linear(&x, &format!("{p}.attention.self.value"))?;
        let a = g.attention(&q, &k, &v, heads, hidden, Some(&mask))?;
        let a = g.linear(&a, &format!("{p}.attention.output.dense"))?;
        let a = g.node("Add", &[&a, &x], &[]);
        let attended = g.layer_norm(&a, &format!("{p}.attention.output.LayerNorm"), eps)?;
        let h = g.linear(&attended, &format!("{p}.intermediate.dense"))?;
        // Exact GELU: 0.5 · h · (1 + erf(h / √2)).
        let e = g.node("Mul", &[&h, &rsqrt2], &[]);
        let e = g.node("Erf", &[&e], &[]);
        let e = g.node("Add", &[&e, &one], &[]);
        let h = g.node("Mul", &[&h, &e], &[]);
        let h = g.node("Mul", &[&h, &half], &[]);
        let h = g.linear(&h, &format!("{p}.output.dense"))?;
        let h = g.node("Add", &[&h, &attended], &[]);
        x = g.layer_norm(&h, &format!("{p}.output.LayerNorm"), eps)?;
    }
    let zero = g.ints(&[0]);
    let zero = g.node("Squeeze", &[&zero], &[]);
    let cls = g.node("Gather", &[&x, &zero], &[("axis", Attr::Int(1))]);
    let proj = g.weight("text_projection")?;
    Ok(g.node("MatMul", &[&cls, &proj], &[]))
}

/// Writes `model` to `path`; with `external`, every tensor of at least
/// [`EXTERNAL_SIZE_THRESHOLD`] bytes goes to `{file name}.extra_file` next to it (one file,
/// offsets aligned to 4 KiB so that runtimes can map it), as cn_clip's fp16 exports do.
pub fn save(mut model: ModelProto, path: &Path, external: bool) -> Result<Vec<PathBuf>, OnnxError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OnnxError::Io { path, source }
    };
    let mut written = Vec::new();
    if external {
        let file_name = path
            .file_name()
            .map(|n| format!("{}.extra_file", n.to_string_lossy()))
            .unwrap_or_else(|| "model.onnx.extra_file".into());
        let data_path = path.with_file_name(&file_name);
        let file = std::fs::File::create(&data_path).map_err(io(&data_path))?;
        let mut out = std::io::BufWriter::new(file);
        let mut offset = 0u64;
        if let Some(graph) = model.graph.as_mut() {
            for t in &mut graph.initializer {
                if t.raw_data.len() < EXTERNAL_SIZE_THRESHOLD {
                    continue;
                }
                let aligned = offset.div_ceil(4096) * 4096;
                out.write_all(&vec![0u8; (aligned - offset) as usize])
                    .map_err(io(&data_path))?;
                out.write_all(&t.raw_data).map_err(io(&data_path))?;
                let length = t.raw_data.len() as u64;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: k.into(),
                    value: v,
                };
                t.external_data = vec![
                    entry("location", file_name.clone()),
                    entry("offset", aligned.to_string()),
                    entry("length", length.to_string()),
                ];
                t.data_location = DATA_LOCATION_EXTERNAL;
                t.raw_data = Vec::new();
                offset = aligned + length;
            }
        }
        out.flush().map_err(io(&data_path))?;
        written.push(data_path);
    }
    std::fs::write(path, model.encode_to_vec()).map_err(io(path))?;
    written.insert(0, path.to_path_buf());
    Ok(written)
}
