//! LoRA runs enter a soup as the full models they stand for: the adapter merged into its base
//! (`cnclip_lora::merge_file_into`), then averaged like any other checkpoint.

use crate::error::SoupError;
use cnclip_model::load::read_weights;
use cnclip_model::weights::StateDict;
use cnclip_model::{ClipConfig, LoadOptions};
use std::path::Path;

fn lora_err(path: &Path, e: cnclip_lora::LoraError) -> SoupError {
    SoupError::Lora(format!("{}: {e}", path.display()))
}

/// Whether `path` is a cnclip LoRA adapter file (reads the header only).
pub fn is_adapter(path: &Path) -> Result<bool, SoupError> {
    cnclip_lora::is_adapter_file(path).map_err(|e| lora_err(path, e))
}

/// The base's weights with the adapter merged in, and the base's config. An official `.pt` base
/// (the only kind without a config of its own) without one in `options` takes the one the
/// adapter file records.
pub fn merged(
    base: &Path,
    options: &LoadOptions,
    adapter: &Path,
) -> Result<(ClipConfig, StateDict), SoupError> {
    let file = cnclip_lora::read_adapter(adapter).map_err(|e| lora_err(adapter, e))?;
    let mut options = options.clone();
    if options.config.is_none() {
        options.config = Some(file.base_config.clone());
    }
    let (config, base_weights) = read_weights(base, &options)?;
    let merged = cnclip_lora::file::merge_file_into(&base_weights, &file)
        .map_err(|e| lora_err(adapter, e))?;
    Ok((config, merged))
}
