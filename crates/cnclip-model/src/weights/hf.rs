//! Hugging Face `ChineseCLIPModel` directories: `config.json` plus `model.safetensors` (or its
//! sharded index, or `pytorch_model.bin`), mapped onto cn_clip's config and key names — the reverse
//! of HF's `convert_chinese_clip_original_pytorch_to_hf.py` — and written back ([`export_hf`], with
//! the tokenizer and image-processor files `ChineseCLIPProcessor` loads) through the same tables.

use super::{StateDict, WeightsError, io_err, read_pt, read_safetensors};
use crate::config::{ClipConfig, TextConfig, VisionConfig, VisionLayers};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

fn missing(path: &Path, field: impl Into<String>) -> WeightsError {
    WeightsError::HfConfigMissing {
        path: path.to_path_buf(),
        field: field.into(),
    }
}

fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> WeightsError {
    WeightsError::HfConfigInvalid {
        path: path.to_path_buf(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// One sub-config (`text_config` / `vision_config`), with HF's `*_config_dict` overrides merged in.
struct Section<'a> {
    path: &'a Path,
    name: &'static str,
    map: Map<String, Value>,
}

impl Section<'_> {
    fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    /// A field, or HF's class default when the file omits it (as `from_pretrained` does).
    fn get<'v>(&'v self, key: &str, default: &'v Value) -> &'v Value {
        match self.map.get(key) {
            Some(Value::Null) | None => default,
            Some(v) => v,
        }
    }

    fn int(&self, key: &str, default: i64) -> Result<i64, WeightsError> {
        let d = Value::from(default);
        let v = self.get(key, &d);
        match v.as_i64() {
            Some(i) if i > 0 => Ok(i),
            _ => Err(invalid(
                self.path,
                self.field(key),
                format!("expected a positive integer, found {v}"),
            )),
        }
    }

    fn float(&self, key: &str, default: f64) -> Result<f64, WeightsError> {
        let d = Value::from(default);
        let v = self.get(key, &d);
        v.as_f64().ok_or_else(|| {
            invalid(
                self.path,
                self.field(key),
                format!("expected a number, found {v}"),
            )
        })
    }

    fn string(&self, key: &str, default: &str) -> Result<String, WeightsError> {
        let d = Value::from(default);
        let v = self.get(key, &d);
        v.as_str().map(str::to_string).ok_or_else(|| {
            invalid(
                self.path,
                self.field(key),
                format!("expected a string, found {v}"),
            )
        })
    }

    /// `image_size` / `patch_size`: an int or a square `[n, n]`.
    fn square(&self, key: &str, default: i64) -> Result<i64, WeightsError> {
        let d = Value::from(default);
        let v = self.get(key, &d);
        let n = match v {
            Value::Array(items) => match items.as_slice() {
                [a, b] if a == b => a.as_i64(),
                _ => None,
            },
            v => v.as_i64(),
        };
        match n {
            Some(n) if n > 0 => Ok(n),
            _ => Err(invalid(
                self.path,
                self.field(key),
                format!("expected a positive integer or a square pair, found {v}"),
            )),
        }
    }

    fn require_eps(&self, expected: f64) -> Result<(), WeightsError> {
        let eps = self.float("layer_norm_eps", expected)?;
        if (eps - expected).abs() > expected * 1e-6 {
            return Err(invalid(
                self.path,
                self.field("layer_norm_eps"),
                format!(
                    "{eps:e}: cn_clip's {} tower uses {expected:e}",
                    self.name.trim_end_matches("_config")
                ),
            ));
        }
        Ok(())
    }
}

fn section<'a>(
    path: &'a Path,
    root: &Map<String, Value>,
    name: &'static str,
) -> Result<Section<'a>, WeightsError> {
    let dict_name = format!("{name}_dict");
    let mut map = match root.get(name) {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::Null) | None => Map::new(),
        Some(other) => {
            return Err(invalid(
                path,
                name,
                format!("expected an object, found {other}"),
            ));
        }
    };
    match root.get(&dict_name) {
        Some(Value::Object(m)) => map.extend(m.clone()),
        Some(Value::Null) | None if !map.is_empty() || root.contains_key(name) => {}
        Some(Value::Null) | None => return Err(missing(path, name)),
        Some(other) => {
            return Err(invalid(
                path,
                dict_name,
                format!("expected an object, found {other}"),
            ));
        }
    }
    Ok(Section { path, name, map })
}

/// Maps a `ChineseCLIPConfig` (the parsed `config.json`) onto cn_clip's config. Fields the file omits
/// take transformers' defaults, as `from_pretrained` would; anything cn_clip's architecture cannot
/// express (another activation, LayerNorm epsilon, MLP ratio, position embedding type, channel
/// count) is an error naming the field.
pub fn hf_config_to_clip(config: &Value, path: &Path) -> Result<ClipConfig, WeightsError> {
    let root = config
        .as_object()
        .ok_or_else(|| invalid(path, "config.json", "not a JSON object"))?;
    match root.get("model_type").and_then(Value::as_str) {
        Some("chinese_clip") => {}
        Some(other) => {
            return Err(invalid(
                path,
                "model_type",
                format!("{other:?}: only \"chinese_clip\" (ChineseCLIPModel) is supported"),
            ));
        }
        None => return Err(missing(path, "model_type")),
    }
    let projection_dim = match root.get("projection_dim") {
        None | Some(Value::Null) => 512,
        Some(v) => v.as_i64().filter(|&n| n > 0).ok_or_else(|| {
            invalid(
                path,
                "projection_dim",
                format!("expected a positive integer, found {v}"),
            )
        })?,
    };

    let v = section(path, root, "vision_config")?;
    let width = v.int("hidden_size", 768)?;
    let layers = v.int("num_hidden_layers", 12)?;
    let heads = v.int("num_attention_heads", 12)?;
    if width % heads != 0 {
        return Err(invalid(
            path,
            v.field("num_attention_heads"),
            format!("{heads} does not divide hidden_size {width}"),
        ));
    }
    let mlp = v.int("intermediate_size", 3072)?;
    if mlp != 4 * width {
        return Err(invalid(
            path,
            v.field("intermediate_size"),
            format!(
                "{mlp}: cn_clip's ViT MLP is 4 × hidden_size = {}",
                4 * width
            ),
        ));
    }
    let act = v.string("hidden_act", "quick_gelu")?;
    if act != "quick_gelu" {
        return Err(invalid(
            path,
            v.field("hidden_act"),
            format!("{act:?}: cn_clip's ViT uses \"quick_gelu\""),
        ));
    }
    v.require_eps(1e-5)?;
    let channels = v.int("num_channels", 3)?;
    if channels != 3 {
        return Err(invalid(
            path,
            v.field("num_channels"),
            format!("{channels}: cn_clip takes RGB images (3)"),
        ));
    }
    let vision = VisionConfig {
        embed_dim: projection_dim,
        image_resolution: v.square("image_size", 224)?,
        vision_layers: VisionLayers::Transformer(layers),
        vision_width: width,
        vision_patch_size: Some(v.square("patch_size", 32)?),
        vision_head_width: width / heads,
    };

    let t = section(path, root, "text_config")?;
    let act = t.string("hidden_act", "gelu")?;
    if act != "gelu" {
        return Err(invalid(
            path,
            t.field("hidden_act"),
            format!("{act:?}: cn_clip's BERT uses \"gelu\" (erf)"),
        ));
    }
    t.require_eps(1e-12)?;
    let pos = t.string("position_embedding_type", "absolute")?;
    if pos != "absolute" {
        return Err(invalid(
            path,
            t.field("position_embedding_type"),
            format!("{pos:?}: cn_clip's BERT uses \"absolute\""),
        ));
    }
    let text = TextConfig {
        vocab_size: t.int("vocab_size", 30522)?,
        text_attention_probs_dropout_prob: t.float("attention_probs_dropout_prob", 0.1)?,
        text_hidden_act: act,
        text_hidden_dropout_prob: t.float("hidden_dropout_prob", 0.1)?,
        text_hidden_size: t.int("hidden_size", 768)?,
        text_initializer_range: t.float("initializer_range", 0.02)?,
        text_intermediate_size: t.int("intermediate_size", 3072)?,
        text_max_position_embeddings: t.int("max_position_embeddings", 512)?,
        text_num_attention_heads: t.int("num_attention_heads", 12)?,
        text_num_hidden_layers: t.int("num_hidden_layers", 12)?,
        text_type_vocab_size: t.int("type_vocab_size", 2)?,
    };
    let config = ClipConfig { vision, text };
    // Run cn_clip's own validation (divisibility, patch size, …).
    ClipConfig::from_json_str(&config.to_json(), &path.display().to_string()).map_err(|source| {
        WeightsError::Config {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// cn_clip's ViT + BERT keys and shapes for `config`, in cn_clip's state-dict order.
fn expected_shapes(c: &ClipConfig) -> Vec<(String, Vec<i64>)> {
    let (w, e, h, i) = (
        c.vision.vision_width,
        c.vision.embed_dim,
        c.text.text_hidden_size,
        c.text.text_intermediate_size,
    );
    let p = c.vision.vision_patch_size.unwrap_or(0);
    let g = c.vision.grid();
    let mut out: Vec<(String, Vec<i64>)> = Vec::new();
    let mut add = |k: String, s: &[i64]| out.push((k, s.to_vec()));
    add("text_projection".into(), &[h, e]);
    add("logit_scale".into(), &[]);
    add("visual.class_embedding".into(), &[w]);
    add("visual.positional_embedding".into(), &[g * g + 1, w]);
    add("visual.proj".into(), &[w, e]);
    add("visual.conv1.weight".into(), &[w, 3, p, p]);
    add("visual.ln_pre.weight".into(), &[w]);
    add("visual.ln_pre.bias".into(), &[w]);
    let layers = match c.vision.vision_layers {
        VisionLayers::Transformer(n) => n,
        VisionLayers::ResNet(_) => 0,
    };
    for l in 0..layers {
        let b = format!("visual.transformer.resblocks.{l}");
        add(format!("{b}.attn.in_proj_weight"), &[3 * w, w]);
        add(format!("{b}.attn.in_proj_bias"), &[3 * w]);
        add(format!("{b}.attn.out_proj.weight"), &[w, w]);
        add(format!("{b}.attn.out_proj.bias"), &[w]);
        add(format!("{b}.ln_1.weight"), &[w]);
        add(format!("{b}.ln_1.bias"), &[w]);
        add(format!("{b}.mlp.c_fc.weight"), &[4 * w, w]);
        add(format!("{b}.mlp.c_fc.bias"), &[4 * w]);
        add(format!("{b}.mlp.c_proj.weight"), &[w, 4 * w]);
        add(format!("{b}.mlp.c_proj.bias"), &[w]);
        add(format!("{b}.ln_2.weight"), &[w]);
        add(format!("{b}.ln_2.bias"), &[w]);
    }
    add("visual.ln_post.weight".into(), &[w]);
    add("visual.ln_post.bias".into(), &[w]);
    add(
        "bert.embeddings.word_embeddings.weight".into(),
        &[c.text.vocab_size, h],
    );
    add(
        "bert.embeddings.position_embeddings.weight".into(),
        &[c.text.text_max_position_embeddings, h],
    );
    add(
        "bert.embeddings.token_type_embeddings.weight".into(),
        &[c.text.text_type_vocab_size, h],
    );
    add("bert.embeddings.LayerNorm.weight".into(), &[h]);
    add("bert.embeddings.LayerNorm.bias".into(), &[h]);
    for l in 0..c.text.text_num_hidden_layers {
        let b = format!("bert.encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            add(format!("{b}.attention.self.{m}.weight"), &[h, h]);
            add(format!("{b}.attention.self.{m}.bias"), &[h]);
        }
        add(format!("{b}.attention.output.dense.weight"), &[h, h]);
        add(format!("{b}.attention.output.dense.bias"), &[h]);
        add(format!("{b}.attention.output.LayerNorm.weight"), &[h]);
        add(format!("{b}.attention.output.LayerNorm.bias"), &[h]);
        add(format!("{b}.intermediate.dense.weight"), &[i, h]);
        add(format!("{b}.intermediate.dense.bias"), &[i]);
        add(format!("{b}.output.dense.weight"), &[h, i]);
        add(format!("{b}.output.dense.bias"), &[h]);
        add(format!("{b}.output.LayerNorm.weight"), &[h]);
        add(format!("{b}.output.LayerNorm.bias"), &[h]);
    }
    out
}

enum Mapped {
    To(String),
    Transposed(String),
    /// One of q/k/v (index 0/1/2) of a ViT block's fused `in_proj_{weight,bias}`.
    Qkv {
        target: String,
        part: usize,
    },
    Drop,
}

// The key mapping, as tables read in both directions: [`map_key`] (HF → cn_clip, import),
// [`hf_keys`] (cn_clip → HF, export) and [`hf_module_name`] (modules, PEFT export).

/// Whole keys renamed: (HF key, cn_clip key, whether HF stores the matrix transposed).
const RENAMED: &[(&str, &str, bool)] = &[
    ("logit_scale", "logit_scale", false),
    ("text_projection.weight", "text_projection", true),
    ("visual_projection.weight", "visual.proj", true),
    (
        "vision_model.embeddings.class_embedding",
        "visual.class_embedding",
        false,
    ),
    (
        "vision_model.embeddings.patch_embedding.weight",
        "visual.conv1.weight",
        false,
    ),
    (
        "vision_model.embeddings.position_embedding.weight",
        "visual.positional_embedding",
        false,
    ),
];

/// HF buffers with no cn_clip counterpart: dropped on import, never written.
const DROPPED: &[&str] = &[
    "text_model.embeddings.position_ids",
    "text_model.embeddings.token_type_ids",
    "vision_model.embeddings.position_ids",
];
/// HF's text pooler (cn_clip's BERT has none; `ChineseCLIPModel` does not build it either).
const DROPPED_PREFIX: &str = "text_model.pooler.";

/// Prefixes renamed as a whole: (HF, cn_clip).
const PREFIXES: &[(&str, &str)] = &[
    ("text_model.", "bert."),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
];

const HF_LAYERS: &str = "vision_model.encoder.layers.";
const CN_BLOCKS: &str = "visual.transformer.resblocks.";

/// The modules of a ViT block: (HF, cn_clip). cn_clip fuses q/k/v into `attn.in_proj`; its row
/// blocks are named `attn.in_proj.{q,k,v}` (the LoRA adapters' names).
const BLOCK_MODULES: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn.in_proj.q"),
    ("self_attn.k_proj", "attn.in_proj.k"),
    ("self_attn.v_proj", "attn.in_proj.v"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
];
const QKV_PARTS: [&str; 3] = ["q", "k", "v"];

/// Where HF's `key` goes in cn_clip's state dict (`None`: no counterpart).
fn map_key(key: &str) -> Option<Mapped> {
    use Mapped::*;
    if DROPPED.contains(&key) || key.starts_with(DROPPED_PREFIX) {
        return Some(Drop);
    }
    if let Some(&(_, cn, transposed)) = RENAMED.iter().find(|(hf, _, _)| *hf == key) {
        return Some(if transposed {
            Transposed(cn.into())
        } else {
            To(cn.into())
        });
    }
    for (hf, cn) in PREFIXES {
        if let Some(rest) = key.strip_prefix(hf) {
            return Some(To(format!("{cn}{rest}")));
        }
    }
    let rest = key.strip_prefix(HF_LAYERS)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let (_, cn) = BLOCK_MODULES.iter().find(|(hf, _)| *hf == module)?;
    let block = format!("{CN_BLOCKS}{layer}");
    Some(match cn.strip_prefix("attn.in_proj.") {
        Some(part) => Qkv {
            target: format!("{block}.attn.in_proj_{param}"),
            part: QKV_PARTS.iter().position(|p| *p == part)?,
        },
        None => To(format!("{block}.{cn}.{param}")),
    })
}

/// The HF key(s) holding cn_clip's `key` (three for a fused `in_proj`, in q/k/v order): the same
/// tables as [`map_key`], read the other way. How each is derived (transposed, a row block) is
/// left to [`map_key`], so the two directions cannot disagree.
fn hf_keys(key: &str) -> Option<Vec<String>> {
    if let Some((hf, _, _)) = RENAMED.iter().find(|(_, cn, _)| *cn == key) {
        return Some(vec![hf.to_string()]);
    }
    for (hf, cn) in PREFIXES {
        if let Some(rest) = key.strip_prefix(cn) {
            return Some(vec![format!("{hf}{rest}")]);
        }
    }
    let rest = key.strip_prefix(CN_BLOCKS)?;
    let (layer, rest) = rest.split_once('.')?;
    let _: usize = layer.parse().ok()?;
    let block = format!("{HF_LAYERS}{layer}");
    let hf_module = |cn: &str| {
        BLOCK_MODULES
            .iter()
            .find(|(_, c)| *c == cn)
            .map(|(hf, _)| *hf)
    };
    if let Some(param) = rest.strip_prefix("attn.in_proj_") {
        return QKV_PARTS
            .iter()
            .map(|p| {
                Some(format!(
                    "{block}.{}.{param}",
                    hf_module(&format!("attn.in_proj.{p}"))?
                ))
            })
            .collect();
    }
    let (module, param) = rest.rsplit_once('.')?;
    Some(vec![format!("{block}.{}.{param}", hf_module(module)?)])
}

/// The `ChineseCLIPModel` module holding cn_clip module `module`'s weights: the reverse of
/// [`import_hf`]'s key mapping, by module. A ViT block's fused `attn.in_proj` has no HF module;
/// its parts `attn.in_proj.q|k|v` name HF's separate `self_attn.{q,k,v}_proj`. Used to export
/// adapters in PEFT's layout.
pub fn hf_module_name(module: &str) -> Option<String> {
    // `visual.proj` / `text_projection` are parameters in cn_clip, `.weight`s of modules in HF.
    if let Some((hf, _, _)) = RENAMED.iter().find(|(_, cn, _)| *cn == module) {
        return hf.strip_suffix(".weight").map(str::to_string);
    }
    match hf_keys(&format!("{module}.weight"))?.as_slice() {
        [one] => one.strip_suffix(".weight").map(str::to_string),
        _ => None,
    }
}

/// Reads the weights of an HF directory, in whichever of its formats it has.
pub(crate) fn read_hf_weights(dir: &Path) -> Result<(PathBuf, StateDict), WeightsError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((single.clone(), read_safetensors(&single)?.0));
    }
    for (index, is_safetensors) in [
        ("model.safetensors.index.json", true),
        ("pytorch_model.bin.index.json", false),
    ] {
        let index = dir.join(index);
        if !index.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| WeightsError::HfWeights {
            path: index.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| WeightsError::HfWeights {
                path: index.clone(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (key, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != "..")
                .ok_or_else(|| WeightsError::HfWeights {
                    path: index.clone(),
                    reason: format!("weight_map entry {key} is not a file name"),
                })?;
            files.insert(file.to_string());
        }
        let mut all = StateDict::new();
        for file in files {
            let shard = dir.join(&file);
            let sd = if is_safetensors {
                read_safetensors(&shard)?.0
            } else {
                read_pt(&shard)?.state_dict
            };
            for (k, t) in sd {
                all.insert(k, t);
            }
        }
        return Ok((index, all));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok((bin.clone(), read_pt(&bin)?.state_dict));
    }
    Err(WeightsError::HfWeights {
        path: dir.to_path_buf(),
        reason: "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json".into(),
    })
}

/// Imports a Hugging Face `ChineseCLIPModel` directory: its config mapped onto cn_clip's schema and
/// its weights onto cn_clip's key names (q/k/v fused into `in_proj`, projections transposed,
/// `text_model.*` → `bert.*`; `position_ids` buffers and the text pooler dropped). Weights are
/// checked against the config: an unknown key, a missing one or a wrong shape is an error.
/// The state dict comes in cn_clip's order.
pub fn import_hf(dir: impl AsRef<Path>) -> Result<(ClipConfig, StateDict), WeightsError> {
    let dir = dir.as_ref();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| invalid(&config_path, "config.json", format!("not valid JSON: {e}")))?;
    let config = hf_config_to_clip(&json, &config_path)?;
    let (weights_path, hf) = read_hf_weights(dir)?;
    let fail = |reason: String| WeightsError::HfWeights {
        path: weights_path.clone(),
        reason,
    };

    let mut mapped: HashMap<String, Tensor> = HashMap::new();
    let mut qkv: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (key, tensor) in hf {
        let Some(m) = map_key(&key) else {
            return Err(WeightsError::UnknownHfKey {
                path: weights_path.clone(),
                key,
            });
        };
        let (target, tensor) = match m {
            Mapped::Drop => continue,
            Mapped::To(t) => (t, tensor),
            Mapped::Transposed(t) => {
                if tensor.dim() != 2 {
                    return Err(fail(format!(
                        "{key} has shape {:?}, expected a matrix",
                        tensor.size()
                    )));
                }
                (t, tensor.transpose(0, 1).contiguous())
            }
            Mapped::Qkv { target, part } => {
                qkv.entry(target).or_default()[part] = Some(tensor);
                continue;
            }
        };
        mapped.insert(target, tensor);
    }
    for (target, parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(fail(format!(
                "{target}: one of the q/k/v projections is missing"
            )));
        };
        let fused = Tensor::f_cat(&[q, k, v], 0).map_err(|source| WeightsError::Torch {
            path: weights_path.clone(),
            key: target.clone(),
            source,
        })?;
        mapped.insert(target, fused);
    }

    let expected = expected_shapes(&config);
    let known: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut unexpected: Vec<&String> = mapped
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    unexpected.sort();
    if let Some(k) = unexpected.first() {
        return Err(WeightsError::UnknownHfKey {
            path: weights_path.clone(),
            key: format!("{k} (after mapping to cn_clip names)"),
        });
    }
    let mut out = StateDict::with_capacity(expected.len());
    for (key, shape) in expected {
        let tensor = mapped
            .remove(&key)
            .ok_or_else(|| fail(format!("no weight for cn_clip's {key}")))?;
        if tensor.size() != shape {
            return Err(fail(format!(
                "{key} has shape {:?}, the config implies {shape:?}",
                tensor.size()
            )));
        }
        out.insert(key, tensor);
    }
    Ok((config, out))
}

/// The `transformers` release whose `ChineseCLIPConfig`, tokenizer and image-processor layout
/// [`export_hf`] writes (the version the reference tests load the export with).
pub const HF_TRANSFORMERS_VERSION: &str = "5.24.0";

fn export_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::HfExport {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// cn_clip's config as a `ChineseCLIPConfig` (`config.json`), field names as transformers writes
/// them; [`hf_config_to_clip`] reads it back to the same config. `logit_scale` is recorded as
/// `logit_scale_init_value` (the weight itself is in `model.safetensors`). A ResNet vision tower
/// is refused: transformers has no ChineseCLIP ResNet. `path` names the output in errors.
pub fn clip_to_hf_config(
    config: &ClipConfig,
    logit_scale: f64,
    dtype: &str,
    path: &Path,
) -> Result<Value, WeightsError> {
    let v = &config.vision;
    let layers = match v.vision_layers {
        VisionLayers::Transformer(n) => n,
        VisionLayers::ResNet(_) => {
            return Err(export_err(
                path,
                "transformers has no ChineseCLIP ResNet vision tower (RN50): only ViT models \
                 (ViT-B-16, ViT-L-14, ViT-H-14, …) can be exported; use --format native or pt",
            ));
        }
    };
    let patch = v
        .vision_patch_size
        .ok_or_else(|| export_err(path, "a ViT config without vision_patch_size"))?;
    let t = &config.text;
    if t.text_hidden_act != "gelu" {
        return Err(export_err(
            path,
            format!(
                "text_hidden_act {:?}: ChineseCLIPModel's BERT is exported with \"gelu\" only",
                t.text_hidden_act
            ),
        ));
    }
    Ok(serde_json::json!({
        "architectures": ["ChineseCLIPModel"],
        "model_type": "chinese_clip",
        "dtype": dtype,
        "projection_dim": v.embed_dim,
        "logit_scale_init_value": logit_scale,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "text_config": {
            "model_type": "chinese_clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.text_hidden_size,
            "num_hidden_layers": t.text_num_hidden_layers,
            "num_attention_heads": t.text_num_attention_heads,
            "intermediate_size": t.text_intermediate_size,
            "hidden_act": t.text_hidden_act,
            "hidden_dropout_prob": t.text_hidden_dropout_prob,
            "attention_probs_dropout_prob": t.text_attention_probs_dropout_prob,
            "max_position_embeddings": t.text_max_position_embeddings,
            "type_vocab_size": t.text_type_vocab_size,
            "initializer_range": t.text_initializer_range,
            "initializer_factor": 1.0,
            "layer_norm_eps": 1e-12,
            "pad_token_id": crate::tokenizer::PAD_ID,
        },
        "vision_config": {
            "model_type": "chinese_clip_vision_model",
            "hidden_size": v.vision_width,
            "intermediate_size": 4 * v.vision_width,
            "projection_dim": v.embed_dim,
            "num_hidden_layers": layers,
            "num_attention_heads": v.vision_width / v.vision_head_width,
            "num_channels": 3,
            "image_size": v.image_resolution,
            "patch_size": patch,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
        },
        "transformers_version": HF_TRANSFORMERS_VERSION,
    }))
}

/// `preprocessor_config.json`: cn_clip's `image_transform(S)` in `ChineseCLIPImageProcessor`'s
/// terms — resize straight to S×S (no aspect-preserving resize, no crop) with bicubic (PIL's
/// `BICUBIC` = 3), `/255`, CLIP mean/std. cn_clip converts to RGB after the resize and
/// transformers before it, which differs only for palette and alpha images.
fn image_processor_config(resolution: i64) -> Value {
    use crate::preprocess::{CLIP_MEAN_F64, CLIP_STD_F64};
    serde_json::json!({
        "image_processor_type": "ChineseCLIPImageProcessor",
        "processor_class": "ChineseCLIPProcessor",
        "do_resize": true,
        "size": {"height": resolution, "width": resolution},
        "resample": 3,
        "do_center_crop": false,
        "crop_size": {"height": resolution, "width": resolution},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": CLIP_MEAN_F64,
        "image_std": CLIP_STD_F64,
        "do_convert_rgb": true,
    })
}

/// `tokenizer_config.json`: cn_clip's `FullTokenizer` settings in `BertTokenizer`'s terms
/// (lower-case, accents stripped with it, CJK characters split, WordPiece over cn_clip's vocab)
/// and cn_clip's context length as `model_max_length`, so `padding="max_length",
/// truncation=True` gives `clip.tokenize`'s rows.
fn tokenizer_config() -> Value {
    serde_json::json!({
        "tokenizer_class": "BertTokenizer",
        "processor_class": "ChineseCLIPProcessor",
        "do_lower_case": true,
        "do_basic_tokenize": true,
        "tokenize_chinese_chars": true,
        "strip_accents": null,
        "never_split": null,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": crate::tokenizer::DEFAULT_CONTEXT_LENGTH,
        "clean_up_tokenization_spaces": true,
    })
}

/// The state dict in HF's key layout, checked against `config` (every key present with its
/// shape, nothing else): q/k/v split out of `in_proj`, projections transposed, `bert.*` →
/// `text_model.*`. Tensors keep their dtype, so `import_hf` of the result gives the same bits.
pub fn hf_state_dict(
    config: &ClipConfig,
    state_dict: &StateDict,
    path: &Path,
) -> Result<StateDict, WeightsError> {
    let expected = expected_shapes(config);
    let known: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    if let Some((key, _)) = state_dict.iter().find(|(k, _)| !known.contains(k)) {
        return Err(export_err(
            path,
            format!("{key} is not a weight of the configured model"),
        ));
    }
    let mut out = StateDict::new();
    for (key, shape) in &expected {
        let tensor = state_dict
            .get(key)
            .ok_or_else(|| export_err(path, format!("no weight for {key}")))?;
        if &tensor.size() != shape {
            return Err(export_err(
                path,
                format!(
                    "{key} has shape {:?}, the config implies {shape:?}",
                    tensor.size()
                ),
            ));
        }
        let torch = |source| WeightsError::Torch {
            path: path.to_path_buf(),
            key: key.clone(),
            source,
        };
        let names = hf_keys(key)
            .ok_or_else(|| export_err(path, format!("{key} has no ChineseCLIPModel weight")))?;
        for (i, name) in names.into_iter().enumerate() {
            let t = match map_key(&name) {
                Some(Mapped::To(t)) if &t == key => tensor.shallow_clone(),
                Some(Mapped::Transposed(t)) if &t == key => tensor
                    .f_transpose(0, 1)
                    .and_then(|t| t.f_contiguous())
                    .map_err(torch)?,
                Some(Mapped::Qkv { target, part }) if &target == key && part == i => tensor
                    .f_chunk(3, 0)
                    .map_err(torch)?
                    .swap_remove(part)
                    .f_contiguous()
                    .map_err(torch)?,
                _ => {
                    return Err(export_err(
                        path,
                        format!("{key} → {name} is not the reverse of the import mapping"),
                    ));
                }
            };
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Writes a Hugging Face `ChineseCLIPModel` directory that `ChineseCLIPModel.from_pretrained` and
/// `ChineseCLIPProcessor.from_pretrained` load: `config.json` ([`clip_to_hf_config`]),
/// `model.safetensors` ([`hf_state_dict`]), `vocab.txt` (cn_clip's), `tokenizer_config.json`,
/// `special_tokens_map.json` and `preprocessor_config.json` (cn_clip's preprocessing).
///
/// `dir` must not exist or be empty. Everything is written into a sibling temporary directory
/// that is renamed to `dir` at the end, so a failed export leaves nothing behind.
pub fn export_hf(
    dir: impl AsRef<Path>,
    config: &ClipConfig,
    state_dict: &StateDict,
) -> Result<(), WeightsError> {
    let dir = dir.as_ref();
    let logit_scale = state_dict
        .get("logit_scale")
        .ok_or_else(|| export_err(dir, "no weight for logit_scale"))?;
    let dtype = match logit_scale.kind() {
        tch::Kind::Float => "float32",
        tch::Kind::Half => "float16",
        tch::Kind::BFloat16 => "bfloat16",
        other => return Err(export_err(dir, format!("logit_scale is {other:?}"))),
    };
    let hf_config = clip_to_hf_config(config, logit_scale.double_value(&[]), dtype, dir)?;
    let vocab = crate::tokenizer::Tokenizer::new().vocab_size();
    if config.text.vocab_size < vocab as i64 {
        return Err(export_err(
            dir,
            format!(
                "vocab_size {} is smaller than cn_clip's vocab.txt ({vocab} tokens), whose ids \
                 the exported tokenizer produces",
                config.text.vocab_size
            ),
        ));
    }
    let tensors = hf_state_dict(config, state_dict, dir)?;

    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
        if entries.next().is_some() {
            return Err(export_err(
                dir,
                "the output directory exists and is not empty",
            ));
        }
        std::fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    let name = dir
        .file_name()
        .ok_or_else(|| export_err(dir, "not a directory path"))?;
    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<(), WeightsError> {
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let json = |file: &str, value: &Value| -> Result<(), WeightsError> {
            let path = tmp.join(file);
            let text = serde_json::to_string_pretty(value)
                .map_err(|e| export_err(&path, format!("cannot encode JSON: {e}")))?;
            std::fs::write(&path, text + "\n").map_err(io_err(&path))
        };
        json("config.json", &hf_config)?;
        json("tokenizer_config.json", &tokenizer_config())?;
        json(
            "special_tokens_map.json",
            &serde_json::json!({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                "cls_token": "[CLS]", "mask_token": "[MASK]"}),
        )?;
        json(
            "preprocessor_config.json",
            &image_processor_config(config.vision.image_resolution),
        )?;
        let vocab_path = tmp.join("vocab.txt");
        std::fs::write(&vocab_path, crate::tokenizer::cn_clip_vocab_txt())
            .map_err(io_err(&vocab_path))?;
        super::save_safetensors(
            tmp.join("model.safetensors"),
            &tensors,
            HashMap::from([("format".to_string(), "pt".to_string())]),
        )?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_mapping_reverses_hf_converter() {
        let to = |k: &str| match map_key(k) {
            Some(Mapped::To(t)) | Some(Mapped::Transposed(t)) => t,
            Some(Mapped::Qkv { target, part }) => format!("{target}#{part}"),
            Some(Mapped::Drop) => "DROP".into(),
            None => "UNKNOWN".into(),
        };
        assert_eq!(
            to("text_model.encoder.layer.3.attention.self.query.weight"),
            "bert.encoder.layer.3.attention.self.query.weight"
        );
        assert_eq!(
            to("vision_model.encoder.layers.2.self_attn.k_proj.bias"),
            "visual.transformer.resblocks.2.attn.in_proj_bias#1"
        );
        assert_eq!(
            to("vision_model.encoder.layers.0.mlp.fc2.weight"),
            "visual.transformer.resblocks.0.mlp.c_proj.weight"
        );
        assert_eq!(to("visual_projection.weight"), "visual.proj");
        assert_eq!(to("text_model.pooler.dense.weight"), "DROP");
        assert_eq!(to("vision_model.embeddings.position_ids"), "DROP");
        assert_eq!(
            to("vision_model.encoder.layers.0.self_attn.rotary.weight"),
            "UNKNOWN"
        );
        assert_eq!(to("vision_model.head.weight"), "UNKNOWN");
    }

    #[test]
    fn module_names_invert_the_key_mapping() {
        for (module, key) in [
            (
                "visual.transformer.resblocks.1.attn.in_proj.k",
                "visual.transformer.resblocks.1.attn.in_proj_weight#1",
            ),
            (
                "visual.transformer.resblocks.0.attn.out_proj",
                "visual.transformer.resblocks.0.attn.out_proj.weight",
            ),
            (
                "visual.transformer.resblocks.3.mlp.c_fc",
                "visual.transformer.resblocks.3.mlp.c_fc.weight",
            ),
            (
                "visual.transformer.resblocks.3.mlp.c_proj",
                "visual.transformer.resblocks.3.mlp.c_proj.weight",
            ),
            (
                "visual.transformer.resblocks.2.ln_2",
                "visual.transformer.resblocks.2.ln_2.weight",
            ),
            ("visual.proj", "visual.proj"),
            ("text_projection", "text_projection"),
            ("visual.ln_pre", "visual.ln_pre.weight"),
            (
                "bert.encoder.layer.1.output.dense",
                "bert.encoder.layer.1.output.dense.weight",
            ),
        ] {
            let hf = hf_module_name(module).unwrap();
            let back = match map_key(&format!("{hf}.weight")) {
                Some(Mapped::To(t)) | Some(Mapped::Transposed(t)) => t,
                Some(Mapped::Qkv { target, part }) => format!("{target}#{part}"),
                _ => "NONE".into(),
            };
            assert_eq!(back, key, "{module} -> {hf}");
        }
        assert_eq!(
            hf_module_name("visual.transformer.resblocks.0.attn.in_proj"),
            None
        );
        assert_eq!(hf_module_name("visual.conv9"), None);
    }

    /// Every shipped ViT pairing survives cn_clip config → config.json → cn_clip config, and every
    /// key of it goes to HF and back to itself through the one set of tables.
    #[test]
    fn export_mapping_inverts_the_import_mapping() {
        let path = Path::new("out");
        for (vision, text) in [
            ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
            ("ViT-L-14", "RoBERTa-wwm-ext-large-chinese"),
            ("ViT-L-14-336", "RoBERTa-wwm-ext-large-chinese"),
            ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
            ("ViT-B-32", "RoBERTa-wwm-ext-base-chinese"),
        ] {
            let c = ClipConfig::from_tower_args(vision, text).unwrap();
            let json = clip_to_hf_config(&c, 4.6, "float32", path).unwrap();
            assert_eq!(hf_config_to_clip(&json, path).unwrap(), c, "{vision}");
            let mut hf_seen = BTreeSet::new();
            for (key, _) in expected_shapes(&c) {
                let names = hf_keys(&key).unwrap_or_else(|| panic!("{key}"));
                let fused = key.contains(".attn.in_proj_");
                assert_eq!(names.len(), if fused { 3 } else { 1 }, "{key}");
                for (i, name) in names.iter().enumerate() {
                    let back = match map_key(name) {
                        Some(Mapped::To(t)) | Some(Mapped::Transposed(t)) => t,
                        Some(Mapped::Qkv { target, part }) if part == i => target,
                        _ => "NONE".into(),
                    };
                    assert_eq!(back, key, "{name}");
                    assert!(hf_seen.insert(name.clone()), "{name} twice");
                }
            }
        }
        let rn = ClipConfig::from_tower_args("RN50", "RBT3-chinese").unwrap();
        let err = clip_to_hf_config(&rn, 4.6, "float32", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("RN50") && err.contains("ViT"), "{err}");
    }

    #[test]
    fn config_defaults_and_rejections() {
        let path = Path::new("config.json");
        let json: Value = serde_json::from_str(
            r#"{"model_type":"chinese_clip","projection_dim":8,
                "text_config":{"vocab_size":50,"hidden_size":16,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":32,"max_position_embeddings":20},
                "vision_config":{"hidden_size":16,"intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":2,"image_size":32,"patch_size":8}}"#,
        )
        .unwrap();
        let c = hf_config_to_clip(&json, path).unwrap();
        assert_eq!(c.vision.embed_dim, 8);
        assert_eq!(c.vision.vision_head_width, 8);
        assert_eq!(c.vision.grid(), 4);
        assert_eq!(c.text.text_type_vocab_size, 2);

        let mut bad = json.clone();
        bad["vision_config"]["hidden_act"] = "gelu".into();
        let err = hf_config_to_clip(&bad, path).unwrap_err().to_string();
        assert!(
            err.contains("vision_config.hidden_act") && err.contains("quick_gelu"),
            "{err}"
        );
        let mut bad = json.clone();
        bad["text_config"]["layer_norm_eps"] = 1e-5.into();
        let err = hf_config_to_clip(&bad, path).unwrap_err().to_string();
        assert!(err.contains("text_config.layer_norm_eps"), "{err}");
        let mut bad = json.clone();
        bad["vision_config"]["intermediate_size"] = 48.into();
        assert!(
            hf_config_to_clip(&bad, path)
                .unwrap_err()
                .to_string()
                .contains("intermediate_size")
        );
        let mut bad = json.clone();
        bad.as_object_mut().unwrap().remove("text_config");
        let err = hf_config_to_clip(&bad, path).unwrap_err().to_string();
        assert!(err.contains("text_config is missing"), "{err}");
        let mut bad = json;
        bad["model_type"] = "clip".into();
        assert!(
            hf_config_to_clip(&bad, path)
                .unwrap_err()
                .to_string()
                .contains("model_type")
        );
    }
}
