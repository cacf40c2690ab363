//! Where images come from: a cn_clip LMDB split, a MUGE `{split}_imgs.tsv`, or a folder of image
//! files. Each gives its ids in a fixed order (the order features are computed and ranked in, so
//! ties break as in cn_clip's scripts), the file bytes of one id or of a batch, and an identity
//! string that changes when its content does (a feature cache's key).
//!
//! | source | ids | order |
//! |---|---|---|
//! | LMDB (`imgs/` or the split directory holding it) | the stored keys | key order, as `extract_features.py` |
//! | `*.tsv` | the first column | file order |
//! | folder (not recursive) | file stems when all are distinct integers, else 0, 1, … | sorted file names |
//! | ImageFolder ([`ImageSource::image_folder`]: class sub-directories) | 0, 1, … | classes in sorted order, files sorted in each |
//!
//! A TSV is not loaded into memory: its lines are indexed by byte offset once (a MUGE split is
//! hundreds of MB of base64) and an image is read on request.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use muge_data::files::{BadRecordPolicy, ImageTsvReader, python_strip};
use muge_data::{LmdbError, LmdbImages};

use crate::error::{ExtractError, io_err, source_err};
use crate::identity::{Fnv, file_stamp};

/// File extensions a folder source takes (the content is sniffed when decoded).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// What the pipeline reads images through: `(name, file bytes)` of a batch of ids (an id the
/// store does not hold is an error naming it).
pub trait FetchImages: Sync {
    fn fetch(&self, ids: &[i64]) -> Result<Vec<(String, Vec<u8>)>, ExtractError>;
}

impl FetchImages for ImageSource {
    fn fetch(&self, ids: &[i64]) -> Result<Vec<(String, Vec<u8>)>, ExtractError> {
        ImageSource::fetch(self, ids)
    }
}

/// An LMDB `imgs` environment already open (a split's, as training validation holds it): one
/// read transaction per batch.
impl FetchImages for LmdbImages {
    fn fetch(&self, ids: &[i64]) -> Result<Vec<(String, Vec<u8>)>, ExtractError> {
        let reader = self.reader()?;
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            let bytes = reader.image_bytes(*id, &format!("image {id}"))?;
            items.push((format!("image {id} in {}", self.path().display()), bytes));
        }
        Ok(items)
    }
}

/// An image store with a fixed id order.
#[derive(Debug)]
pub struct ImageSource {
    path: PathBuf,
    ids: Vec<i64>,
    store: Store,
}

#[derive(Debug)]
enum Store {
    Lmdb(LmdbImages),
    /// id → byte range of its line.
    Tsv(HashMap<i64, (u64, u64)>),
    Folder(HashMap<i64, PathBuf>),
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(e))
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, ExtractError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        entries.push(entry.map_err(io_err(dir))?.path());
    }
    entries.sort();
    Ok(entries)
}

impl ImageSource {
    /// Opens `path`, deciding the kind by what is there: a file is a TSV, a directory with
    /// `data.mdb` (or `imgs/data.mdb`) an LMDB, any other directory a folder of images.
    pub fn open(path: impl AsRef<Path>) -> Result<ImageSource, ExtractError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(source_err(path, "does not exist"));
        }
        if path.is_file() {
            return Self::tsv(path);
        }
        if path.join("data.mdb").is_file() {
            return Self::lmdb(path);
        }
        if path.join("imgs").join("data.mdb").is_file() {
            return Self::lmdb(path.join("imgs"));
        }
        Self::folder(path)
    }

    /// The `imgs` LMDB environment of a cn_clip split (ids in key order).
    pub fn lmdb(path: impl AsRef<Path>) -> Result<ImageSource, ExtractError> {
        let images = LmdbImages::open(path.as_ref())?;
        Ok(Self::from_lmdb(images)?)
    }

    /// An LMDB environment already open.
    pub fn from_lmdb(images: LmdbImages) -> Result<ImageSource, LmdbError> {
        let ids = images.ids_in_key_order()?;
        Ok(ImageSource {
            path: images.path().to_path_buf(),
            ids,
            store: Store::Lmdb(images),
        })
    }

    /// A MUGE `{split}_imgs.tsv` (`id<TAB>base64` lines), indexed by byte offset.
    pub fn tsv(path: impl AsRef<Path>) -> Result<ImageSource, ExtractError> {
        let path = path.as_ref();
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
        Ok(ImageSource {
            path: path.to_path_buf(),
            ids,
            store: Store::Tsv(ranges),
        })
    }

    /// The image files directly in `path` (by extension, sorted by name).
    pub fn folder(path: impl AsRef<Path>) -> Result<ImageSource, ExtractError> {
        let path = path.as_ref();
        let files: Vec<PathBuf> = sorted_entries(path)?
            .into_iter()
            .filter(|f| is_image(f) && f.is_file())
            .collect();
        if files.is_empty() {
            return Err(source_err(
                path,
                "is neither an LMDB (data.mdb or imgs/data.mdb), nor a .tsv, nor a folder with \
                 .jpg/.jpeg/.png/.webp/.gif/.bmp/.tif/.tiff files",
            ));
        }
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
        Ok(Self::from_files(path, ids, files))
    }

    /// torchvision's `ImageFolder` when `root` has sub-directories (class `i` = the `i`-th in sorted
    /// order; at most `classes` of them), with each image's class; else the flat folder's images
    /// and no classes. Ids are 0, 1, … in listing order.
    pub fn image_folder(
        root: impl AsRef<Path>,
        classes: usize,
    ) -> Result<(ImageSource, Option<Vec<usize>>), ExtractError> {
        let root = root.as_ref();
        let entries = sorted_entries(root)?;
        let dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
        let (files, targets) = if dirs.is_empty() {
            let files: Vec<PathBuf> = entries
                .iter()
                .filter(|p| is_image(p) && p.is_file())
                .cloned()
                .collect();
            if files.is_empty() {
                let known = IMAGE_EXTENSIONS.join(", ");
                return Err(source_err(root, format!("no images ({known})")));
            }
            (files, None)
        } else {
            if dirs.len() > classes {
                return Err(source_err(
                    root,
                    format!(
                        "has {} class folders but the label file has {classes} labels",
                        dirs.len()
                    ),
                ));
            }
            let (mut files, mut targets) = (Vec::new(), Vec::new());
            for (class, dir) in dirs.iter().enumerate() {
                for path in sorted_entries(dir)? {
                    if is_image(&path) && path.is_file() {
                        files.push(path);
                        targets.push(class);
                    }
                }
            }
            if files.is_empty() {
                return Err(source_err(root, "the class folders hold no images"));
            }
            (files, Some(targets))
        };
        let ids = (0..files.len() as i64).collect();
        Ok((Self::from_files(root, ids, files), targets))
    }

    fn from_files(path: &Path, ids: Vec<i64>, files: Vec<PathBuf>) -> ImageSource {
        let by_id = ids.iter().copied().zip(files).collect();
        ImageSource {
            path: path.to_path_buf(),
            ids,
            store: Store::Folder(by_id),
        }
    }

    /// Where it was opened from (an LMDB split resolves to its `imgs/`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids in the source's order.
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
        match self.store {
            Store::Lmdb(_) => "lmdb",
            Store::Tsv(_) => "tsv",
            Store::Folder(_) => "folder",
        }
    }

    /// The file of `id` in a folder source.
    pub fn file(&self, id: i64) -> Option<&Path> {
        match &self.store {
            Store::Folder(files) => files.get(&id).map(PathBuf::as_path),
            _ => None,
        }
    }

    /// How errors name image `id`: its file for a folder, else `image {id} in {path}`.
    pub fn name(&self, id: i64) -> String {
        match self.file(id) {
            Some(file) => file.display().to_string(),
            None => format!("image {id} in {}", self.path.display()),
        }
    }

    /// The image file bytes of `id`, or `None` when the source has no such id.
    pub fn image_bytes(&self, id: i64) -> Result<Option<Vec<u8>>, ExtractError> {
        match &self.store {
            Store::Lmdb(images) => match images.image_bytes(id) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(LmdbError::MissingImage { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Store::Tsv(ranges) => {
                let Some(&(start, end)) = ranges.get(&id) else {
                    return Ok(None);
                };
                self.tsv_image(id, start, end).map(Some)
            }
            Store::Folder(files) => match files.get(&id) {
                Some(file) => std::fs::read(file).map(Some).map_err(io_err(file)),
                None => Ok(None),
            },
        }
    }

    /// `(name, bytes)` of each of `ids` (one read transaction for an LMDB); an id the source does
    /// not hold is an error.
    pub fn fetch(&self, ids: &[i64]) -> Result<Vec<(String, Vec<u8>)>, ExtractError> {
        if let Store::Lmdb(images) = &self.store {
            return images.fetch(ids);
        }
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            let bytes = self
                .image_bytes(*id)?
                .ok_or_else(|| source_err(&self.path, format!("has no image {id}")))?;
            items.push((self.name(*id), bytes));
        }
        Ok(items)
    }

    fn tsv_image(&self, id: i64, start: u64, end: u64) -> Result<Vec<u8>, ExtractError> {
        let mut file = File::open(&self.path).map_err(io_err(&self.path))?;
        file.seek(SeekFrom::Start(start))
            .map_err(io_err(&self.path))?;
        let mut chunk = Vec::with_capacity((end - start) as usize);
        file.take(end - start)
            .read_to_end(&mut chunk)
            .map_err(io_err(&self.path))?;
        // The range may start with blank lines the reader passed over; the record is the line
        // that begins with the id and a tab.
        let prefix = format!("{id}\t");
        let text = String::from_utf8_lossy(&chunk);
        let line = text
            .split(['\n', '\r'])
            .find(|l| python_strip(l).starts_with(&prefix))
            .ok_or_else(|| {
                source_err(
                    &self.path,
                    format!(
                        "image {id} is no longer at bytes {start}..{end}; was the file changed?"
                    ),
                )
            })?;
        let b64 = &python_strip(line).as_bytes()[prefix.len()..];
        muge_data::base64::decode_cn_clip(b64)
            .map_err(|e| source_err(&self.path, format!("image {id}: {e}")))
    }

    /// A string that changes whenever the source's content may have: the kind, the path, the
    /// number of ids, and the size and modification time of the files behind it.
    pub fn identity(&self) -> Result<String, ExtractError> {
        let canonical = self.path.canonicalize().map_err(io_err(&self.path))?;
        let stamp = match &self.store {
            Store::Lmdb(_) => file_stamp(&self.path.join("data.mdb"))?,
            Store::Tsv(_) => file_stamp(&self.path)?,
            Store::Folder(files) => {
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
