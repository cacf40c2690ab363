//! The gallery's image features: read from a cache file when one matches, else computed once
//! (with a progress bar) and written for the next start.
//!
//! The cache is a native feature file (the `retrieval` crate's format). Its `model` metadata field
//! holds the full cache key, so a file is reused only for the same checkpoint (path, size and
//! modification time), the same gallery ([`Gallery::identity`]), resolution and precision; the
//! file name carries a hash of that key, so caches of several checkpoints live side by side.

use std::path::{Path, PathBuf};

use cnclip_extract::identity::Fnv;
use cnclip_extract::{ExtractOptions, Progress};
use cnclip_model::Precision;
use indicatif::{ProgressBar, ProgressStyle};
use retrieval::{FeatureKind, Features, NativeFeatures, write_native};

use crate::encoder::Encoder;
use crate::error::ServeError;
use crate::gallery::Gallery;

/// Bumped when the way features are computed changes, so older caches are not reused.
const CACHE_VERSION: u32 = 1;

/// Where a gallery's feature cache goes and when to show progress.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Directory for the cache file; `None`: next to the gallery.
    pub dir: Option<PathBuf>,
    /// Images per encoder call.
    pub batch_size: usize,
    /// Draw a progress bar on stderr while computing.
    pub progress: bool,
}

/// An identity of the checkpoint for the cache key: its path, and the size and modification time
/// of the file (of every file, for a Hugging Face directory).
pub fn checkpoint_identity(path: &Path) -> Result<String, ServeError> {
    Ok(cnclip_extract::file_identity(path)?)
}

/// The full key stored in the cache file.
pub fn cache_key(checkpoint: &str, gallery: &str, resolution: u32, precision: Precision) -> String {
    format!(
        "cnclip-serve image features v{CACHE_VERSION}; checkpoint {checkpoint}; gallery {gallery}; \
         resolution {resolution}; precision {precision:?}"
    )
}

/// The cache file for `key` in `dir` (default: the gallery's parent directory).
pub fn cache_path(gallery: &Gallery, dir: Option<&Path>, key: &str) -> PathBuf {
    let mut hash = Fnv::new();
    hash.write(key.as_bytes());
    let gallery_path = gallery.path();
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| {
        gallery_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let name = gallery_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gallery".into());
    dir.join(format!(
        "{name}.cnclip-serve.{:016x}.safetensors",
        hash.finish()
    ))
}

/// What [`gallery_features`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    Reused(PathBuf),
    Computed(PathBuf),
}

/// The gallery's features from the cache at [`cache_path`], computing and writing them first when
/// the cache is missing or its key differs.
pub fn gallery_features(
    encoder: &Encoder,
    gallery: &Gallery,
    key: &str,
    options: &CacheOptions,
) -> Result<(NativeFeatures, CacheOutcome), ServeError> {
    let path = cache_path(gallery, options.dir.as_deref(), key);
    if path.is_file() {
        match NativeFeatures::open(&path) {
            Ok(f) if f.model() == Some(key) && f.view().ids() == gallery.ids() => {
                return Ok((f, CacheOutcome::Reused(path)));
            }
            // A stale or unreadable cache is recomputed (and overwritten), never trusted.
            Ok(_) | Err(_) => {}
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ServeError::io(dir))?;
    }
    let features = compute(encoder, gallery, options)?;
    let tmp = path.with_extension("safetensors.tmp");
    write_native(&tmp, &features.view(), FeatureKind::Image, Some(key))?;
    std::fs::rename(&tmp, &path).map_err(ServeError::io(&path))?;
    Ok((NativeFeatures::open(&path)?, CacheOutcome::Computed(path)))
}

/// Encodes every gallery image (`cnclip-extract`'s pipeline: the next batch is decoded on other
/// threads meanwhile).
fn compute(
    encoder: &Encoder,
    gallery: &Gallery,
    options: &CacheOptions,
) -> Result<Features, ServeError> {
    let bar = if options.progress {
        let bar = ProgressBar::new(gallery.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} gallery images encoded ({per_sec}, eta {eta})",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let features = cnclip_extract::image_features(
        encoder.clip(),
        gallery,
        gallery.ids(),
        encoder.preprocessor(),
        &ExtractOptions::new(options.batch_size),
        &mut |p| {
            if let Progress::Advance(n) = p {
                bar.inc(n);
            }
        },
    )?;
    bar.finish_and_clear();
    Ok(features)
}
