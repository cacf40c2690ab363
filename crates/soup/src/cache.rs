//! Per-checkpoint cache of validation results, so that a soup run never encodes the same weights
//! twice and its report can be regenerated without running a model.
//!
//! An entry is a directory named by a 64-bit FNV-1a hash of its key and holds `key.txt` (the full
//! key, compared on every read, so a hash collision is a miss, never a wrong score), the image and
//! text features as native feature files (`retrieval::write_native`) and `score.json`.
//!
//! Keys: a candidate file is identified by canonical path, size and modification time (hashing the
//! contents of multi-gigabyte checkpoints would cost as much as scoring them is meant to save); a
//! merge by its members' identities and exact weights; both together with the validation data's
//! identity and the settings that change features (prompt, context length, precision).

use crate::error::{SoupError, io_err};
use crate::strategy::score_serde;
use eval::{GroundTruth, Score};
use retrieval::{FeatureKind, FeatureView, NativeFeatures};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[derive(Serialize, Deserialize)]
struct ScoreFile {
    #[serde(with = "score_serde")]
    score: Score,
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Cache {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of `key`'s entry (which may not exist).
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{:016x}", fnv1a64(key.as_bytes())))
    }

    fn key_matches(&self, key: &str) -> bool {
        std::fs::read_to_string(self.entry_dir(key).join("key.txt")).is_ok_and(|k| k == key)
    }

    /// The cached score of `key`, if any.
    pub fn score(&self, key: &str) -> Result<Option<Score>, SoupError> {
        if !self.key_matches(key) {
            return Ok(None);
        }
        let path = self.entry_dir(key).join("score.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SoupError::Io { path, source }),
        };
        let file: ScoreFile =
            serde_json::from_str(&text).map_err(|source| SoupError::Json { path, source })?;
        Ok(Some(file.score))
    }

    /// Scores `key` again from its cached features (no model): for entries whose `score.json` is
    /// missing, or to re-check one. `None` when the features are not cached.
    pub fn rescore(
        &self,
        key: &str,
        ground_truth: &GroundTruth,
        device: tch::Device,
    ) -> Result<Option<Score>, SoupError> {
        if !self.key_matches(key) {
            return Ok(None);
        }
        let dir = self.entry_dir(key);
        let (ip, tp) = (dir.join("image.safetensors"), dir.join("text.safetensors"));
        if !ip.is_file() || !tp.is_file() {
            return Ok(None);
        }
        let image = NativeFeatures::open(&ip)?;
        let text = NativeFeatures::open(&tp)?;
        let score = retrieval::muge::muge_score(&text.view(), &image.view(), ground_truth, device)?;
        self.write_score(key, &score)?;
        Ok(Some(score))
    }

    fn write_score(&self, key: &str, score: &Score) -> Result<(), SoupError> {
        let path = self.entry_dir(key).join("score.json");
        let json =
            serde_json::to_string_pretty(&ScoreFile { score: *score }).map_err(|source| {
                SoupError::Json {
                    path: path.clone(),
                    source,
                }
            })?;
        write_atomic(&path, json.as_bytes())
    }

    /// Stores an entry: key, features, then the score (last, so an interrupted write is a miss).
    pub fn put(
        &self,
        key: &str,
        image: &FeatureView<'_>,
        text: &FeatureView<'_>,
        score: &Score,
    ) -> Result<PathBuf, SoupError> {
        let dir = self.entry_dir(key);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let _ = std::fs::remove_file(dir.join("score.json"));
        write_atomic(&dir.join("key.txt"), key.as_bytes())?;
        retrieval::write_native(
            dir.join("image.safetensors"),
            image,
            FeatureKind::Image,
            None,
        )?;
        retrieval::write_native(dir.join("text.safetensors"), text, FeatureKind::Text, None)?;
        self.write_score(key, score)?;
        Ok(dir)
    }
}

/// Temporary file, then rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SoupError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }
}
