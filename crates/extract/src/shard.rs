//! Sharded extraction: `world` processes (ranks; GPUs, machines) split a list of ids into
//! contiguous runs of whole batches, each encodes its run and writes a shard file, and the shards
//! concatenated in rank order are the single-process result bit for bit (a batch's rows depend only
//! on the batch, and the batches are the same).
//!
//! A shard file is written beside its final name and renamed over it once complete (after
//! `fsync`), so its existence marks completion; a rerun with the same key and ids reuses it. The
//! format is private to this module: a magic line, the key, the kind, the dimension, the ids (i64
//! LE) and the rows (f32 LE) exactly as computed — not renormalised, unlike a native feature file.

use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use retrieval::{FeatureKind, Features};

use crate::error::{ExtractError, io_err};

const MAGIC: &[u8; 16] = b"cnclip-shard v1\n";

/// The items of `rank` among `world` ranks when `n` items are encoded in batches of `batch`:
/// batches are dealt out in contiguous runs, the first `batches % world` ranks taking one more.
pub fn shard_range(n: usize, batch: usize, rank: usize, world: usize) -> Range<usize> {
    let batch = batch.max(1);
    let world = world.max(1);
    let batches = n.div_ceil(batch);
    let (base, extra) = (batches / world, batches % world);
    let first = |r: usize| r * base + r.min(extra);
    let start = (first(rank) * batch).min(n);
    let end = (first(rank + 1) * batch).min(n);
    start..end.max(start)
}

/// Where rank `rank`'s shard of `kind` goes in `dir`.
pub fn shard_path(dir: &Path, kind: FeatureKind, rank: usize, world: usize) -> PathBuf {
    dir.join(format!("{}-{rank:05}-of-{world:05}.shard", kind.as_str()))
}

/// Writes `features` as a shard under `key`, atomically (temporary file, `fsync`, rename).
pub fn write_shard(path: &Path, features: &Features, key: &str) -> Result<(), ExtractError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shard".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(MAGIC)?;
        w.write_all(&(key.len() as u64).to_le_bytes())?;
        w.write_all(key.as_bytes())?;
        w.write_all(&[u8::from(features.kind == FeatureKind::Text)])?;
        w.write_all(&(features.dim as u64).to_le_bytes())?;
        w.write_all(&(features.ids.len() as u64).to_le_bytes())?;
        for id in &features.ids {
            w.write_all(&id.to_le_bytes())?;
        }
        for v in &features.data {
            w.write_all(&v.to_le_bytes())?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io_err(path))
}

/// The shard at `path` when it is complete and was written under `key`; `None` when there is
/// none yet. A shard under another key is an error (another run's directory).
pub fn read_shard(path: &Path, key: &str) -> Result<Option<Features>, ExtractError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let bad = |message: String| ExtractError::Shard {
        path: path.to_path_buf(),
        message,
    };
    let mut r: &[u8] = &bytes;
    let mut magic = [0u8; 16];
    let take_u64 = |r: &mut &[u8]| -> Result<u64, ExtractError> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)
            .map_err(|_| bad("truncated header".into()))?;
        Ok(u64::from_le_bytes(b))
    };
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(bad("not a cnclip shard file".into()));
    }
    let key_len = take_u64(&mut r)? as usize;
    if key_len > r.len() {
        return Err(bad("truncated key".into()));
    }
    let (stored_key, rest) = r.split_at(key_len);
    if stored_key != key.as_bytes() {
        return Err(bad(format!(
            "was written for another extraction ({}), not this one ({key}); remove it or use another output",
            String::from_utf8_lossy(stored_key)
        )));
    }
    r = rest;
    let Some((&kind, rest)) = r.split_first() else {
        return Err(bad("truncated kind".into()));
    };
    r = rest;
    let kind = if kind == 1 {
        FeatureKind::Text
    } else {
        FeatureKind::Image
    };
    let dim = take_u64(&mut r)? as usize;
    let n = take_u64(&mut r)? as usize;
    let expected = n
        .checked_mul(8 + dim * 4)
        .ok_or_else(|| bad("impossible size".into()))?;
    if r.len() != expected {
        return Err(bad(format!(
            "{} bytes of rows for {n} rows of dimension {dim} (expected {expected})",
            r.len()
        )));
    }
    let (id_bytes, data_bytes) = r.split_at(n * 8);
    let mut features = Features::new(kind, dim);
    features.ids = id_bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    features.data = data_bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Some(features))
}

/// Waits until every shard of `kind` is complete (polling, at most `timeout`), then concatenates
/// them in rank order; fails when the ids are not `ids`.
pub fn merge_shards(
    dir: &Path,
    kind: FeatureKind,
    world: usize,
    key: &str,
    ids: &[i64],
    timeout: Duration,
) -> Result<Features, ExtractError> {
    let started = Instant::now();
    let mut merged: Option<Features> = None;
    for rank in 0..world {
        let path = shard_path(dir, kind, rank, world);
        let shard = loop {
            if let Some(shard) = read_shard(&path, key)? {
                break shard;
            }
            if started.elapsed() > timeout {
                return Err(ExtractError::Shard {
                    path,
                    message: format!("not complete after {} s", timeout.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        match &mut merged {
            None => merged = Some(shard),
            Some(m) => {
                m.ids.extend_from_slice(&shard.ids);
                m.data.extend_from_slice(&shard.data);
            }
        }
    }
    let merged = merged.unwrap_or_else(|| Features::new(kind, 0));
    if merged.ids != ids {
        return Err(ExtractError::Shard {
            path: dir.to_path_buf(),
            message: format!(
                "the shards hold {} {} ids, not the {} expected in order",
                merged.ids.len(),
                kind.as_str(),
                ids.len()
            ),
        });
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shards_are_whole_batches_covering_everything_once() {
        for (n, batch, world) in [(10, 3, 2), (10, 3, 4), (7, 64, 2), (0, 4, 3), (64, 8, 3)] {
            let ranges: Vec<_> = (0..world)
                .map(|r| shard_range(n, batch, r, world))
                .collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[world - 1].end, n);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{n} {batch} {world}: {ranges:?}");
            }
            for r in &ranges[..world - 1] {
                assert!(r.end == n || (r.end - r.start) % batch == 0, "{ranges:?}");
            }
        }
        assert_eq!(shard_range(10, 3, 0, 2), 0..6);
        assert_eq!(shard_range(10, 3, 1, 2), 6..10);
    }

    #[test]
    fn shard_round_trip_and_key_check() {
        let dir = std::env::temp_dir().join(format!("cnclip-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = shard_path(&dir, FeatureKind::Image, 0, 1);
        assert!(read_shard(&path, "k").unwrap().is_none());
        let mut f = Features::new(FeatureKind::Image, 2);
        f.push(5, &[0.6, -0.8]).unwrap();
        f.push(-1, &[f32::MIN_POSITIVE, 1.0]).unwrap();
        write_shard(&path, &f, "k").unwrap();
        let back = read_shard(&path, "k").unwrap().unwrap();
        assert_eq!(back, f);
        assert!(read_shard(&path, "other").is_err());
        let merged =
            merge_shards(&dir, FeatureKind::Image, 1, "k", &[5, -1], Duration::ZERO).unwrap();
        assert_eq!(merged, f);
        assert!(merge_shards(&dir, FeatureKind::Image, 1, "k", &[5], Duration::ZERO).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
