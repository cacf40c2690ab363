//! Cache identities of files: what a feature cache (serve's gallery cache, the soup's score cache,
//! a resumable extraction shard) keys on, so that a changed file is never served from a stale
//! cache. One definition: path, size and modification time.

use crate::error::{ExtractError, io_err};
use std::path::Path;
use std::time::UNIX_EPOCH;

/// `size N, mtime S.NNNNNNNNN` of a file (or directory).
pub fn file_stamp(path: &Path) -> Result<String, ExtractError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|| "unknown".into());
    Ok(format!("size {}, mtime {mtime}", meta.len()))
}

/// A file's identity: `canonical path (size N, mtime S.NNNNNNNNN)`; for a directory (a Hugging
/// Face checkpoint), the stamp of every file directly inside it, sorted by name.
pub fn file_identity(path: &Path) -> Result<String, ExtractError> {
    let canonical = path.canonicalize().map_err(io_err(path))?;
    if canonical.is_dir() {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&canonical).map_err(io_err(&canonical))? {
            let file = entry.map_err(io_err(&canonical))?.path();
            if file.is_file() {
                entries.push(format!(
                    "{}: {}",
                    file.file_name().unwrap_or_default().to_string_lossy(),
                    file_stamp(&file)?
                ));
            }
        }
        entries.sort();
        return Ok(format!("{} [{}]", canonical.display(), entries.join("; ")));
    }
    Ok(format!(
        "{} ({})",
        canonical.display(),
        file_stamp(&canonical)?
    ))
}

/// FNV-1a, 64 bits: a hash that is the same in every build, for cache file names.
#[derive(Debug, Clone)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Adds `bytes` and a separator, so that ("ab", "c") and ("a", "bc") differ.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identity_changes_with_content_and_hash_is_stable() {
        let dir = std::env::temp_dir().join(format!("cnclip-extract-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.bin");
        std::fs::write(&file, b"one").unwrap();
        let first = file_identity(&file).unwrap();
        assert!(first.contains("size 3"), "{first}");
        std::fs::write(&file, b"three").unwrap();
        assert_ne!(file_identity(&file).unwrap(), first);
        assert!(file_identity(&dir).unwrap().contains("a.bin: size 5"));
        std::fs::remove_dir_all(&dir).unwrap();
        // FNV-1a of "" then the separator byte: fixed by the algorithm, never by the build.
        let mut h = Fnv::new();
        h.write(b"");
        assert_eq!(
            h.finish(),
            (0xcbf2_9ce4_8422_2325u64 ^ 0xff).wrapping_mul(0x0100_0000_01b3)
        );
    }
}
