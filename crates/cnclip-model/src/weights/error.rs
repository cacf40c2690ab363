use std::path::PathBuf;

/// Everything that can go wrong reading or writing weight files. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: not a PyTorch checkpoint (not a zip archive: {reason})", path.display())]
    NotZip { path: PathBuf, reason: String },

    #[error(
        "{}: legacy (pre-1.6) torch.save format is not supported: re-save with torch>=1.6 \
         (torch.save(torch.load(f), f))",
        path.display()
    )]
    LegacyFormat { path: PathBuf },

    #[error("{}: zip archive has no entry ending in data.pkl; not a torch.save checkpoint", path.display())]
    MissingDataPkl { path: PathBuf },

    #[error("{}: zip entry {entry} is compressed ({method}); torch.save stores entries uncompressed", path.display())]
    CompressedEntry {
        path: PathBuf,
        entry: String,
        method: String,
    },

    #[error("{}: zip entry {entry} is corrupt: CRC-32 {computed:08x} does not match the recorded {stored:08x}", path.display())]
    Crc {
        path: PathBuf,
        entry: String,
        stored: u32,
        computed: u32,
    },

    #[error("{}: unsupported pickle opcode {name} (0x{code:02x}) at offset {offset} of {entry}", path.display())]
    UnsupportedOpcode {
        path: PathBuf,
        entry: String,
        name: &'static str,
        code: u8,
        offset: usize,
    },

    #[error("{}: malformed pickle at offset {offset} of {entry}: {reason}", path.display())]
    Pickle {
        path: PathBuf,
        entry: String,
        offset: usize,
        reason: String,
    },

    #[error(
        "{}: pickle uses unknown global {module}.{name} (only plain containers, numbers, strings and \
         tensors are allowed, as with torch.load(weights_only=True))",
        path.display()
    )]
    UnknownGlobal {
        path: PathBuf,
        module: String,
        name: String,
    },

    #[error("{}: storage {key} is referenced by the pickle but the archive has no record {entry}", path.display())]
    MissingStorage {
        path: PathBuf,
        key: String,
        entry: String,
    },

    #[error("{}: storage {key} ({entry}) is truncated: expected {expected} bytes, found {found}", path.display())]
    TruncatedStorage {
        path: PathBuf,
        key: String,
        entry: String,
        expected: u64,
        found: u64,
    },

    #[error("{}: {what}: unsupported dtype {dtype}", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        what: String,
        dtype: String,
    },

    /// A structurally valid file whose content is not what it should be (no state dict, a view
    /// outside its storage, big-endian data, …).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    #[error("{}: Hugging Face config field {field} is missing", path.display())]
    HfConfigMissing { path: PathBuf, field: String },

    #[error("{}: Hugging Face config field {field} is invalid: {reason}", path.display())]
    HfConfigInvalid {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("{}: unknown Hugging Face weight {key}: cn_clip's model has no counterpart for it", path.display())]
    UnknownHfKey { path: PathBuf, key: String },

    /// Hugging Face weights that do not fit their config (missing tensor, wrong shape).
    #[error("{}: {reason}", path.display())]
    HfWeights { path: PathBuf, reason: String },

    /// A model or state dict a Hugging Face `ChineseCLIPModel` directory cannot hold.
    #[error("{}: cannot write a Hugging Face ChineseCLIPModel: {reason}", path.display())]
    HfExport { path: PathBuf, reason: String },

    #[error("{}: invalid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },

    #[error(
        "{}: safetensors metadata has no {key} entry: not a cnclip native weight file (metadata keys: {found})",
        path.display()
    )]
    MissingNativeConfig {
        path: PathBuf,
        key: &'static str,
        found: String,
    },

    #[error("{}: model config: {source}", path.display())]
    Config {
        path: PathBuf,
        source: crate::config::ConfigError,
    },

    #[error("{}: tensor {key}: {source}", path.display())]
    Torch {
        path: PathBuf,
        key: String,
        source: tch::TchError,
    },
}
