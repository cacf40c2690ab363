//! The images a service searches: a cn_clip LMDB split, a MUGE `{split}_imgs.tsv`, or a folder of
//! image files. Each gives its ids in a fixed order (the order features are computed and ranked
//! in, so ties break as in cn_clip's scripts), the file bytes of one id, and an identity string that
//! changes when its content does (the feature cache's key).
//!
//! | source | ids | order |
//! |---|---|---|
//! | LMDB (`imgs/` or the split directory holding it) | the stored keys | key order, as `extract_features.py` |
//! | `*.tsv` | the first column | file order |
//! | folder (not recursive) | file stems when all are distinct integers, else 0, 1, … | sorted file names |
//!
//! A TSV is not loaded into memory: its lines are indexed by byte offset once (a MUGE split is
//! hundreds of MB of base64) and an image is read and decoded on request.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use muge_data::files::{BadRecordPolicy, ImageTsvReader, python_strip};
use muge_data::{LmdbError, LmdbImages};

use crate::error::ServeError;

/// File extensions a folder gallery takes (the content is sniffed again when served).
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// An image store with a fixed id order.
#[derive(Debug)]
pub struct Gallery {
    path: PathBuf,
    ids: Vec<i64>,
    source: Source,
}

#[derive(Debug)]
enum Source {
    Lmdb(LmdbImages),
    /// id → byte range of its line.
    Tsv(HashMap<i64, (u64, u64)>),
    Folder(HashMap<i64, PathBuf>),
}

impl Gallery {
    /// Opens `path`, deciding the kind by what is there (see the module doc).
    pub fn open(path: impl AsRef<Path>) -> Result<Gallery, ServeError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(gallery_err(path, "does not exist"));
        }
        if path.is_file() {
            return Self::open_tsv(path);
        }
        if path.join("data.mdb").is_file() {
            return Self::open_lmdb(path);
        }
        if path.join("imgs").join("data.mdb").is_file() {
            return Self::open_lmdb(&path.join("imgs"));
        }
        Self::open_folder(path)
    }

    fn open_lmdb(path: &Path) -> Result<Gallery, ServeError> {
        let images = LmdbImages::open(path)?;
        let ids = images.ids_in_key_order()?;
        Ok(Gallery {
            path: path.to_path_buf(),
            ids,
            source: Source::Lmdb(images),
        })
    }

    fn open_tsv(path: &Path) -> Result<Gallery, ServeError> {
        let mut reader = ImageTsvReader::open(path, BadRecordPolicy::Fail)?;
        let mut ids = Vec::new();
        let mut ranges = HashMap::new();
        loop {
            let start = reader.bytes_read();
            let Some(record) = reader.next() else { break };
            let record = record?;
            ranges.insert(record.image_id, (start, reader.bytes_read()));
            ids.push(record.image_id);
        }
        Ok(Gallery {
            path: path.to_path_buf(),
            ids,
            source: Source::Tsv(ranges),
        })
    }

    fn open_folder(path: &Path) -> Result<Gallery, ServeError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(ServeError::io(path))? {
            let entry = entry.map_err(ServeError::io(path))?;
            let file = entry.path();
            let is_image = file.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                IMAGE_EXTENSIONS
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(e))
            });
            if is_image && file.is_file() {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Err(gallery_err(
                path,
                "is neither an LMDB (data.mdb or imgs/data.mdb), nor a .tsv, nor a folder with \
                 .jpg/.jpeg/.png/.webp/.gif/.bmp/.tif/.tiff files",
            ));
        }
        files.sort();
        let stems: Option<Vec<i64>> = files
            .iter()
            .map(|f| {
                f.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(muge_data::files::parse_canonical_id)
            })
            .collect();
        let ids: Vec<i64> = match stems {
            Some(stems) if distinct(&stems) => stems,
            _ => (0..files.len() as i64).collect(),
        };
        let by_id = ids.iter().copied().zip(files).collect();
        Ok(Gallery {
            path: path.to_path_buf(),
            ids,
            source: Source::Folder(by_id),
        })
    }

    /// Where it was opened from (an LMDB split resolves to its `imgs/`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids in the gallery's order.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `lmdb`, `tsv` or `folder`.
    pub fn kind(&self) -> &'static str {
        match self.source {
            Source::Lmdb(_) => "lmdb",
            Source::Tsv(_) => "tsv",
            Source::Folder(_) => "folder",
        }
    }

    /// The image file bytes of `id`, or `None` when the gallery has no such id.
    pub fn image_bytes(&self, id: i64) -> Result<Option<Vec<u8>>, ServeError> {
        match &self.source {
            Source::Lmdb(images) => match images.image_bytes(id) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(LmdbError::MissingImage { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Source::Tsv(ranges) => {
                let Some(&(start, end)) = ranges.get(&id) else {
                    return Ok(None);
                };
                self.tsv_image(id, start, end).map(Some)
            }
            Source::Folder(files) => match files.get(&id) {
                Some(file) => std::fs::read(file).map(Some).map_err(ServeError::io(file)),
                None => Ok(None),
            },
        }
    }

    fn tsv_image(&self, id: i64, start: u64, end: u64) -> Result<Vec<u8>, ServeError> {
        let io = ServeError::io(&self.path);
        let mut file = File::open(&self.path).map_err(ServeError::io(&self.path))?;
        file.seek(SeekFrom::Start(start))
            .map_err(ServeError::io(&self.path))?;
        let mut chunk = Vec::with_capacity((end - start) as usize);
        file.take(end - start).read_to_end(&mut chunk).map_err(io)?;
        // The range may start with blank lines the reader passed over; the record is the line
        // that begins with the id and a tab.
        let prefix = format!("{id}\t");
        let text = String::from_utf8_lossy(&chunk);
        let line = text
            .split(['\n', '\r'])
            .find(|l| python_strip(l).starts_with(&prefix))
            .ok_or_else(|| {
                gallery_err(
                    &self.path,
                    format!(
                        "image {id} is no longer at bytes {start}..{end}; was the file changed?"
                    ),
                )
            })?;
        let b64 = &python_strip(line).as_bytes()[prefix.len()..];
        muge_data::base64::decode_cn_clip(b64)
            .map_err(|e| gallery_err(&self.path, format!("image {id}: {e}")))
    }

    /// A string that changes whenever the gallery's content may have: the path, the kind, the
    /// number of ids, and the size and modification time of the files behind it.
    pub fn identity(&self) -> Result<String, ServeError> {
        let canonical = self
            .path
            .canonicalize()
            .map_err(ServeError::io(&self.path))?;
        let stamp = match &self.source {
            Source::Lmdb(_) => file_stamp(&self.path.join("data.mdb"))?,
            Source::Tsv(_) => file_stamp(&self.path)?,
            Source::Folder(files) => {
                let mut hash = Fnv::new();
                for id in &self.ids {
                    if let Some(file) = files.get(id) {
                        hash.write(file.as_os_str().as_encoded_bytes());
                        hash.write(file_stamp(file)?.as_bytes());
                    }
                }
                format!("files {:016x}", hash.finish())
            }
        };
        Ok(format!(
            "{} {} ({} images, {stamp})",
            self.kind(),
            canonical.display(),
            self.ids.len()
        ))
    }
}

fn distinct(ids: &[i64]) -> bool {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).all(|w| w[0] != w[1])
}

fn gallery_err(path: &Path, message: impl Into<String>) -> ServeError {
    ServeError::Gallery {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `size N, mtime S.NNNNNNNNN` of a file (or directory).
pub(crate) fn file_stamp(path: &Path) -> Result<String, ServeError> {
    let meta = std::fs::metadata(path).map_err(ServeError::io(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|| "unknown".into());
    Ok(format!("size {}, mtime {mtime}", meta.len()))
}

/// FNV-1a, 64 bits: a hash that is the same in every build, for cache file names.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}
