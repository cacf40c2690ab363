//! Adapter files: one safetensors file holding only the adapters (plus the base weights the run
//! let train), whose metadata carries the LoRA config as JSON and the base model's config, so the
//! file alone says what it adapts. See the crate doc for the layout.

use crate::LoraError;
use crate::adapter::{self, a_key, b_key, covered, delta_weight, parse_key, rows};
use crate::config::{LoraConfig, site_of_adapter};
use cnclip_model::model::delta::linear_sites;
use cnclip_model::model::{LinearSite, WeightLayout};
use cnclip_model::weights::{self, StateDict};
use cnclip_model::{Clip, ClipConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Metadata key naming the format; its value is [`ADAPTER_FORMAT`].
pub const ADAPTER_FORMAT_KEY: &str = "cnclip.format";
pub const ADAPTER_FORMAT: &str = "cnclip-lora";
pub const ADAPTER_VERSION_KEY: &str = "cnclip.format_version";
pub const ADAPTER_VERSION: &str = "1";
/// Metadata key of the [`LoraConfig`] JSON.
pub const LORA_CONFIG_KEY: &str = "cnclip.lora";
/// Metadata key of the base model's config (cn_clip's schema), as in native model files.
pub const BASE_CONFIG_KEY: &str = weights::NATIVE_CONFIG_KEY;

/// An adapter file read into memory.
#[derive(Debug)]
pub struct AdapterFile {
    pub config: LoraConfig,
    /// The config of the model the adapters were trained on; any base with the same site shapes
    /// accepts them.
    pub base_config: ClipConfig,
    /// `{adapter}.lora_A.weight` `[rank, in]`, `{adapter}.lora_B.weight` `[out, rank]`, and the
    /// trained base weights under their cn_clip keys.
    pub tensors: StateDict,
    pub path: PathBuf,
}

/// One adapter of a file.
#[derive(Debug)]
pub struct AdapterPair<'a> {
    pub name: &'a str,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
}

impl AdapterFile {
    /// The adapter pairs, by name.
    pub fn adapters(&self) -> Vec<AdapterPair<'_>> {
        let mut out = Vec::new();
        for key in self.tensors.keys() {
            if let Some((name, true)) = parse_key(key)
                && let (Some(a), Some(b)) = (self.tensors.get(key), self.tensors.get(&b_key(name)))
            {
                out.push(AdapterPair { name, a, b });
            }
        }
        out
    }

    /// The base weights stored with the adapters (`logit_scale`, LayerNorms).
    pub fn base_weights(&self) -> Vec<(&str, &Tensor)> {
        self.tensors
            .iter()
            .filter(|(k, _)| parse_key(k).is_none())
            .collect()
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> LoraError {
        LoraError::Mismatch {
            path: self.path.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Checks every tensor against the base config's sites: each `A` has its `B`, the names are
    /// sites (or q/k/v parts of a fused `in_proj`), shapes fit the site and the rank, and the
    /// stored base weights are ones the config trains.
    fn validate(&self) -> Result<(), LoraError> {
        self.config
            .validate()
            .map_err(|e| self.bad(LORA_CONFIG_KEY, e.to_string()))?;
        let sites = sites_by_name(&self.base_config);
        let r = self.config.rank;
        for (key, tensor) in &self.tensors {
            match parse_key(key) {
                Some((name, is_a)) => {
                    let partner = if is_a { b_key(name) } else { a_key(name) };
                    if !self.tensors.contains_key(&partner) {
                        return Err(self.bad(key, format!("has no partner {partner}")));
                    }
                    let (site, part) = site_of_adapter(name);
                    let site = sites.get(site).ok_or_else(|| {
                        self.bad(key, "not an adapter of any linear map of the base model")
                    })?;
                    let (_, len) = rows(site, part);
                    let expected = if is_a {
                        vec![r, site.input]
                    } else {
                        vec![len, r]
                    };
                    if tensor.size() != expected {
                        return Err(self.bad(
                            key,
                            format!("shape {:?}, expected {expected:?}", tensor.size()),
                        ));
                    }
                }
                None if self.config.trains_base_key(key) => {}
                None => {
                    return Err(self.bad(
                        key,
                        "neither an adapter tensor nor a base weight this config trains",
                    ));
                }
            }
        }
        if self.adapters().is_empty() {
            return Err(self.bad("", "the file holds no adapters"));
        }
        Ok(())
    }
}

fn sites_by_name(config: &ClipConfig) -> BTreeMap<String, LinearSite> {
    linear_sites(config)
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect()
}

/// The metadata of an adapter file of `model`'s adapters, plus `extra` entries.
fn metadata(
    config: &LoraConfig,
    base: &ClipConfig,
    extra: HashMap<String, String>,
) -> Result<HashMap<String, String>, LoraError> {
    let lora = serde_json::to_string(config)
        .map_err(|e| LoraError::Config(format!("cannot encode the LoRA config: {e}")))?;
    let mut meta = HashMap::from([
        (ADAPTER_FORMAT_KEY.to_string(), ADAPTER_FORMAT.to_string()),
        (ADAPTER_VERSION_KEY.to_string(), ADAPTER_VERSION.to_string()),
        (LORA_CONFIG_KEY.to_string(), lora),
        (BASE_CONFIG_KEY.to_string(), base.to_json()),
        ("format".to_string(), "pt".to_string()),
    ]);
    meta.extend(extra);
    Ok(meta)
}

/// Writes `model`'s adapters (and the base weights its config trains) to `path`, atomically.
pub fn save_adapter(model: &Clip, path: impl AsRef<Path>) -> Result<(), LoraError> {
    save_adapter_with(model, path, HashMap::new())
}

/// [`save_adapter`] with extra metadata entries (training checkpoints add their id).
pub fn save_adapter_with(
    model: &Clip,
    path: impl AsRef<Path>,
    extra: HashMap<String, String>,
) -> Result<(), LoraError> {
    let (config, tensors) = adapter::adapter_state_dict(model)?;
    let cpu: StateDict = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_device(Device::Cpu)))
        .collect();
    let meta = metadata(&config, model.config(), extra)?;
    weights::save_safetensors(path, &cpu, meta)?;
    Ok(())
}

/// Whether the file at `path` is an adapter file (by its metadata; reads only the header).
pub fn is_adapter_file(path: impl AsRef<Path>) -> Result<bool, LoraError> {
    let meta = weights::read_safetensors_metadata(path)?;
    Ok(meta.get(ADAPTER_FORMAT_KEY).map(String::as_str) == Some(ADAPTER_FORMAT))
}

/// Reads and checks an adapter file: its LoRA config, base config and tensors.
pub fn read_adapter(path: impl AsRef<Path>) -> Result<AdapterFile, LoraError> {
    let path = path.as_ref();
    let (tensors, meta) = weights::read_safetensors(path)?;
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| LoraError::File {
            path: path.to_path_buf(),
            reason: format!("no {key} in the metadata: not a cnclip adapter file"),
        })
    };
    let format = field(ADAPTER_FORMAT_KEY)?;
    if format != ADAPTER_FORMAT {
        return Err(LoraError::File {
            path: path.to_path_buf(),
            reason: format!("{ADAPTER_FORMAT_KEY} is {format:?}, expected {ADAPTER_FORMAT:?}"),
        });
    }
    let version = field(ADAPTER_VERSION_KEY)?;
    if version != ADAPTER_VERSION {
        return Err(LoraError::File {
            path: path.to_path_buf(),
            reason: format!("format version {version}; this build reads {ADAPTER_VERSION}"),
        });
    }
    let config: LoraConfig =
        serde_json::from_str(field(LORA_CONFIG_KEY)?).map_err(|e| LoraError::File {
            path: path.to_path_buf(),
            reason: format!("{LORA_CONFIG_KEY} is not a valid LoRA config: {e}"),
        })?;
    let base_config =
        ClipConfig::from_json_str(field(BASE_CONFIG_KEY)?, &path.display().to_string()).map_err(
            |e| LoraError::File {
                path: path.to_path_buf(),
                reason: format!("{BASE_CONFIG_KEY}: {e}"),
            },
        )?;
    let file = AdapterFile {
        config,
        base_config,
        tensors,
        path: path.to_path_buf(),
    };
    file.validate()?;
    Ok(file)
}

/// Puts the adapters of the file at `path` onto `model`: injects them with the file's config
/// when the model has none, or fills the attached ones when their config is the same (a resumed
/// run), then copies every tensor. The model must have a site of the right shape for every
/// adapter. Returns the config.
pub fn load_adapter(model: &mut Clip, path: impl AsRef<Path>) -> Result<LoraConfig, LoraError> {
    let file = read_adapter(path)?;
    apply_file(model, &file)?;
    Ok(file.config)
}

/// [`load_adapter`] for a file already read.
pub fn apply_file(model: &mut Clip, file: &AdapterFile) -> Result<(), LoraError> {
    // Check every adapter against this model's sites before touching the model.
    let sites = sites_by_name(model.config());
    let r = file.config.rank;
    for pair in file.adapters() {
        let (site, part) = site_of_adapter(pair.name);
        let site = sites.get(site).ok_or_else(|| {
            file.bad(
                pair.name,
                "the model has no such linear map (another architecture?)",
            )
        })?;
        let (_, len) = rows(site, part);
        for (key, t, expected) in [
            (a_key(pair.name), pair.a, [r, site.input]),
            (b_key(pair.name), pair.b, [len, r]),
        ] {
            if t.size() != expected {
                return Err(file.bad(
                    &key,
                    format!(
                        "shape {:?}, the model's linear map needs {expected:?} (another architecture?)",
                        t.size()
                    ),
                ));
            }
        }
    }
    match adapter::config_of(model) {
        None => {
            adapter::inject(model, &file.config)?;
        }
        Some(c) if c == file.config => {}
        Some(c) => {
            return Err(file.bad(
                LORA_CONFIG_KEY,
                format!(
                    "the file's adapters have config {}, but the model already carries adapters \
                     of config {}",
                    serde_json::to_string(&file.config).unwrap_or_default(),
                    serde_json::to_string(&c).unwrap_or_default()
                ),
            ));
        }
    }
    let vars = model.named_tensors();
    let expected: Vec<&String> = vars
        .keys()
        .filter(|k| parse_key(k).is_some() || file.config.trains_base_key(k))
        .collect();
    for key in &expected {
        if !file.tensors.contains_key(key) {
            return Err(file.bad(key, "the model has this adapter, the file does not"));
        }
    }
    tch::no_grad(|| {
        for (key, value) in &file.tensors {
            let mut var = vars
                .get(key)
                .ok_or_else(|| {
                    file.bad(key, "the file has this adapter, the model's sites do not")
                })?
                .shallow_clone();
            if var.size() != value.size() {
                return Err(file.bad(
                    key,
                    format!("shape {:?}, the model has {:?}", value.size(), var.size()),
                ));
            }
            var.f_copy_(value)
                .map_err(|e| file.bad(key, format!("cannot copy: {e}")))?;
        }
        Ok(())
    })
}

/// The base state dict with the adapters of the file at `adapter_file` merged in: every adapted
/// weight becomes `W + (alpha / rank) · B · A` (fused `in_proj` parts in their row blocks,
/// `[in, out]` projections transposed), the base weights stored in the file replace the base's,
/// and all other keys are the base's tensors unchanged. Merged weights keep the base's dtype;
/// the sum is computed in fp32.
pub fn merged_state_dict(base: &StateDict, adapter_file: &Path) -> Result<StateDict, LoraError> {
    let file = read_adapter(adapter_file)?;
    merge_file_into(base, &file)
}

/// [`merged_state_dict`] for a file already read.
pub fn merge_file_into(base: &StateDict, file: &AdapterFile) -> Result<StateDict, LoraError> {
    let sites = sites_by_name(&file.base_config);
    let scaling = file.config.scaling();
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for pair in file.adapters() {
        let (site_name, part) = site_of_adapter(pair.name);
        let site = sites
            .get(site_name)
            .ok_or_else(|| file.bad(pair.name, "no such linear map in the base config"))?;
        let weight = base.get(&site.weight_key).ok_or_else(|| {
            file.bad(
                &site.weight_key,
                "the base state dict has no such key (is it the same architecture?)",
            )
        })?;
        let expected = match site.layout {
            WeightLayout::OutIn => vec![site.output, site.input],
            WeightLayout::InOut => vec![site.input, site.output],
        };
        if weight.size() != expected {
            return Err(file.bad(
                &site.weight_key,
                format!(
                    "the base weight has shape {:?}, the adapter expects {expected:?}",
                    weight.size()
                ),
            ));
        }
        let target = merged
            .entry(site.weight_key.clone())
            .or_insert_with(|| weight.to_kind(Kind::Float).to_device(Device::Cpu).copy());
        let (offset, len) = rows(site, part);
        let dw = delta_weight(pair.a, pair.b, scaling, site.layout);
        tch::no_grad(|| {
            let mut block = covered(target, site.layout, offset, len);
            let _ = block.g_add_(&dw);
        });
    }
    for (key, value) in file.base_weights() {
        let weight = base
            .get(key)
            .ok_or_else(|| file.bad(key, "the base state dict has no such key"))?;
        if weight.size() != value.size() {
            return Err(file.bad(
                key,
                format!("shape {:?}, the base has {:?}", value.size(), weight.size()),
            ));
        }
        merged.insert(key.to_string(), value.to_kind(Kind::Float));
    }
    let mut out = StateDict::with_capacity(base.len());
    for (key, tensor) in base {
        let value = match merged.remove(key) {
            Some(m) => m.to_kind(tensor.kind()).to_device(tensor.device()),
            None => tensor.shallow_clone(),
        };
        out.insert(key, value);
    }
    Ok(out)
}
