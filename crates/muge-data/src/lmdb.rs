//! cn_clip's LMDB layout, written and read byte-compatibly.
//!
//! `build_lmdb_dataset.py` turns a split's TSV and JSONL into two LMDB environments under
//! `{lmdb_dir}/{split}/`:
//!
//! * `pairs/`: keys `"0"`, `"1"`, … (decimal, no padding), one per (text, image) pair in JSONL
//!   order and image-list order; values `pickle.dumps((image_id, text_id, text))`; plus
//!   `b"num_samples"` → the pair count as decimal text. Commits every 5,000 puts.
//! * `imgs/`: keys the image ids as text, values the base64 *text* of the image file (decoded only
//!   when a sample is read); plus `b"num_images"` → the count. Commits every 1,000 puts.
//!
//! [`build_split`] writes the same keys and values with the same environment settings (1 TiB map,
//! the unnamed database) and the same commit cadence, so for valid input the `data.mdb` files are
//! byte-identical to cn_clip's (the tests compare them). It differs from the script where the
//! script is unsafe: input is checked before anything is written (duplicate ids, missing image
//! references, malformed lines; see [`crate::files`]), the split is built in a temporary
//! directory and moved into place only when complete, and an old split is replaced rather than
//! overwritten key by key (the script leaves stale keys of a larger old split behind).
//!
//! [`LmdbSplit`] reads a split as cn_clip's `LMDBDataset` does (sample `i` is pair `i % N`, its
//! image looked up by `str(image_id)` and decoded with the lenient base64 of [`crate::base64`]);
//! [`LmdbImages`] reads an `imgs/` environment alone, in key order, as `EvalImgDataset` does.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, WithoutTls};

use crate::base64::{Base64Error, decode_cn_clip};
use crate::files::{
    BadRecordPolicy, FileError, ImageTsvReader, KnownImages, ReadReport, TextJsonlReader,
};
use crate::pickle::{PickleError, PickledPair, dumps_pair, loads_pair};

/// `lmdb.open(path, map_size=1024**4)`: the map size recorded in cn_clip's files.
pub const MAP_SIZE: usize = 1 << 40;
/// Pairs are committed every this many puts (`write_idx % 5000 == 0`).
pub const PAIRS_COMMIT_EVERY: u64 = 5000;
/// Images are committed every this many puts (`write_idx % 1000 == 0`).
pub const IMAGES_COMMIT_EVERY: u64 = 1000;
/// The key holding the number of pairs.
pub const NUM_SAMPLES_KEY: &[u8] = b"num_samples";
/// The key holding the number of images.
pub const NUM_IMAGES_KEY: &[u8] = b"num_images";

/// An error building or reading a cn_clip LMDB; each names the environment and key involved.
#[derive(Debug, thiserror::Error)]
pub enum LmdbError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("LMDB {}: {source}", path.display())]
    Lmdb {
        path: PathBuf,
        #[source]
        source: heed::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{} does not exist or is not a directory (expected {what})", path.display())]
    MissingDir { path: PathBuf, what: &'static str },
    #[error(
        "{} is a split directory (it holds imgs/ and pairs/), not an LMDB: give its {part} directory, {}",
        path.display(),
        path.join(part).display()
    )]
    SplitNotPart { path: PathBuf, part: &'static str },
    #[error(
        "LMDB {}: data.mdb is truncated: its meta page records {needed} bytes of pages, the file has {found} (an interrupted copy?)",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        needed: u64,
        found: u64,
    },
    #[error(
        "LMDB {}: data.mdb shrank from {needed} to {found} bytes while it was open (truncated or \
         overwritten in place by another program): LMDB maps the file into memory, so reading on \
         would crash the process; stop whatever rewrites it and restart",
        path.display()
    )]
    ShrankWhileOpen {
        path: PathBuf,
        needed: u64,
        found: u64,
    },
    #[error("invalid split name {name:?}: {reason}")]
    SplitName { name: String, reason: &'static str },
    #[error("LMDB {} has no key {key:?}; it was not written by cn_clip's build_lmdb_dataset.py or by build_split", path.display())]
    MissingCount { path: PathBuf, key: &'static str },
    #[error("LMDB {}: key {key:?} holds {value:?}, expected a decimal count", path.display())]
    BadCount {
        path: PathBuf,
        key: &'static str,
        value: String,
    },
    #[error("LMDB {} has no pair {index} although num_samples is {num_samples}", path.display())]
    MissingPair {
        path: PathBuf,
        index: u64,
        num_samples: u64,
    },
    #[error("LMDB {}, pair {index}: {source}", path.display())]
    BadPair {
        path: PathBuf,
        index: u64,
        #[source]
        source: PickleError,
    },
    #[error("LMDB {} has no image {image_id}{context}", path.display())]
    MissingImage {
        path: PathBuf,
        image_id: i64,
        /// e.g. " (pair 12, text 8428)".
        context: String,
    },
    #[error("LMDB {}: key {key:?} is not an integer image id (cn_clip's EvalImgDataset calls int(key))", path.display())]
    BadImageKey { path: PathBuf, key: String },
    #[error("LMDB {}, image {image_id}{context}: the base64 value does not decode: {source}", path.display())]
    Base64 {
        path: PathBuf,
        image_id: i64,
        /// Where the image was wanted (e.g. ` (pair 3, text 7)`), or empty.
        context: String,
        #[source]
        source: Base64Error,
    },
    #[error("LMDB {} was replaced (rebuilt) while this process still holds a reader of the old one; drop the old LmdbSplit/LmdbImages/LmdbPairs before opening it again", path.display())]
    Replaced { path: PathBuf },
    #[error("the data set {} has no pairs, so sample {index} does not exist", path.display())]
    Empty { path: PathBuf, index: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LmdbError + '_ {
    move |source| LmdbError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lmdb_err(path: &Path) -> impl FnOnce(heed::Error) -> LmdbError + '_ {
    move |source| LmdbError::Lmdb {
        path: path.to_path_buf(),
        source,
    }
}

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

/// Where a build is, for progress bars: bytes of the input file read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildProgress<'a> {
    /// Reading `file` (`total_bytes` long) into the environment `stage`.
    Start {
        split: &'a str,
        stage: Stage,
        file: &'a Path,
        total_bytes: u64,
    },
    /// `bytes` of the file read, `records` written.
    Advance {
        split: &'a str,
        stage: Stage,
        bytes: u64,
        records: u64,
    },
    /// The stage finished with `records` written.
    Finish {
        split: &'a str,
        stage: Stage,
        records: u64,
    },
}

/// The two environments of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `imgs/` from `{split}_imgs.tsv`.
    Images,
    /// `pairs/` from `{split}_texts.jsonl`.
    Pairs,
}

/// What [`build_split`] wrote.
#[derive(Debug)]
pub struct SplitSummary {
    pub split: String,
    /// `{lmdb_dir}/{split}`.
    pub dir: PathBuf,
    /// `num_images`: images written.
    pub images: u64,
    /// `num_samples`: (text, image) pairs written.
    pub pairs: u64,
    /// Texts read.
    pub texts: u64,
    /// Texts without an image list (they contribute no pairs; Tianchi's test queries).
    pub texts_without_image_list: u64,
    /// Whether an existing `{lmdb_dir}/{split}` was replaced.
    pub replaced_existing: bool,
    pub images_report: ReadReport,
    pub texts_report: ReadReport,
}

/// Checks that a split name is one directory component, as the script's `os.path.join` needs.
fn check_split_name(split: &str) -> Result<(), LmdbError> {
    let bad = |reason| {
        Err(LmdbError::SplitName {
            name: split.to_string(),
            reason,
        })
    };
    if split.is_empty() {
        return bad("it is empty");
    }
    if split.contains('/') || split.contains('\\') || split == "." || split == ".." {
        return bad("it must be a plain directory name");
    }
    if split.starts_with('.') {
        return bad("names starting with '.' are reserved for temporary build directories");
    }
    Ok(())
}

/// An environment opened for writing with py-lmdb's settings and its unnamed database.
fn open_for_write(path: &Path) -> Result<Env<WithoutTls>, LmdbError> {
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE);
    // SAFETY: the directory was just created inside our private temporary build directory, so
    // no other process or environment maps this file while we write it.
    unsafe { options.open(path) }.map_err(lmdb_err(path))
}

/// LMDB creates its files owner-only (heed passes mode 0600); data sets are usually shared, and
/// py-lmdb's default mode (0755) makes them readable by everyone, so the files get 0644.
fn make_readable(env_dir: &Path) -> Result<(), LmdbError> {
    use std::os::unix::fs::PermissionsExt;
    for name in ["data.mdb", "lock.mdb"] {
        let path = env_dir.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Puts keys and values in transactions of `commit_every` puts, as the script does; the counter
/// key goes into the last transaction.
struct CadencedWriter<'e> {
    env: &'e Env<WithoutTls>,
    path: &'e Path,
    db: Database<Bytes, Bytes>,
    txn: Option<heed::RwTxn<'e>>,
    puts: u64,
    commit_every: u64,
}

impl<'e> CadencedWriter<'e> {
    fn new(env: &'e Env<WithoutTls>, path: &'e Path, commit_every: u64) -> Result<Self, LmdbError> {
        let mut txn = env.write_txn().map_err(lmdb_err(path))?;
        // The unnamed database exists in every environment; opening it inside the first data
        // transaction adds no commit of its own (py-lmdb opens it without writing either).
        let db = env
            .create_database::<Bytes, Bytes>(&mut txn, None)
            .map_err(lmdb_err(path))?;
        Ok(CadencedWriter {
            env,
            path,
            db,
            txn: Some(txn),
            puts: 0,
            commit_every,
        })
    }

    fn txn(&mut self) -> Result<&mut heed::RwTxn<'e>, LmdbError> {
        if self.txn.is_none() {
            self.txn = Some(self.env.write_txn().map_err(lmdb_err(self.path))?);
        }
        match self.txn.as_mut() {
            Some(t) => Ok(t),
            None => unreachable!("transaction was just created"),
        }
    }

    fn put_record(&mut self, key: &[u8], value: &[u8]) -> Result<(), LmdbError> {
        let db = self.db;
        db.put(self.txn()?, key, value)
            .map_err(lmdb_err(self.path))?;
        self.puts += 1;
        if self.puts.is_multiple_of(self.commit_every)
            && let Some(txn) = self.txn.take()
        {
            txn.commit().map_err(lmdb_err(self.path))?;
        }
        Ok(())
    }

    /// Writes the count under `key` and commits.
    fn finish(mut self, key: &[u8], count: u64) -> Result<(), LmdbError> {
        let db = self.db;
        db.put(self.txn()?, key, count.to_string().as_bytes())
            .map_err(lmdb_err(self.path))?;
        if let Some(txn) = self.txn.take() {
            txn.commit().map_err(lmdb_err(self.path))?;
        }
        Ok(())
    }
}

/// Removes `.{split}.building-PID` and `.{split}.old-PID` directories left by a build that was
/// killed (kill -9, power loss): they are never read, but a MUGE-sized one holds gigabytes. Only
/// directories whose process is gone are removed, so a concurrent build of the same split keeps
/// its own; where liveness cannot be checked (no `/proc`), nothing is removed.
fn remove_stale_build_dirs(lmdb_dir: &Path, split: &str) -> Result<(), LmdbError> {
    if !Path::new("/proc/self").exists() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(lmdb_dir) else {
        return Ok(());
    };
    let prefixes = [format!(".{split}.building-"), format!(".{split}.old-")];
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = prefixes
            .iter()
            .find_map(|p| name.strip_prefix(p.as_str()))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Builds `{lmdb_dir}/{split}/imgs` and `.../pairs` from `{data_dir}/{split}_imgs.tsv` and
/// `{data_dir}/{split}_texts.jsonl`, as `build_lmdb_dataset.py` does for one split.
///
/// Every image a text references must be in the TSV (checked while writing pairs, so the TSV is
/// read first). With [`BadRecordPolicy::Skip`], bad lines and bad references are left out and
/// counted in the summary's reports instead of stopping the build. Nothing under
/// `{lmdb_dir}/{split}` changes unless the whole split was built.
pub fn build_split(
    data_dir: &Path,
    split: &str,
    lmdb_dir: &Path,
    policy: BadRecordPolicy,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<SplitSummary, LmdbError> {
    let options = BuildOptions {
        policy,
        check_images: false,
    };
    build_split_with(data_dir, split, lmdb_dir, &options, progress)
}

/// How [`build_split_with`] treats its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    pub policy: BadRecordPolicy,
    /// Decode every image while building ([`ImageTsvReader::with_image_check`]): a picture that
    /// does not decode is then a bad record of the TSV (an error naming line and id, or skipped
    /// with its pairs under [`BadRecordPolicy::Skip`]) instead of a loader error mid-training.
    /// cn_clip's script stores images unchecked, which is also our default.
    pub check_images: bool,
}

/// [`build_split`] with [`BuildOptions`].
pub fn build_split_with(
    data_dir: &Path,
    split: &str,
    lmdb_dir: &Path,
    options: &BuildOptions,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<SplitSummary, LmdbError> {
    let policy = options.policy;
    check_split_name(split)?;
    if !data_dir.is_dir() {
        return Err(LmdbError::MissingDir {
            path: data_dir.to_path_buf(),
            what: "the directory with {split}_imgs.tsv and {split}_texts.jsonl",
        });
    }
    let tsv_path = data_dir.join(format!("{split}_imgs.tsv"));
    let jsonl_path = data_dir.join(format!("{split}_texts.jsonl"));
    // Open both inputs before creating anything, so a missing file leaves no trace.
    let images = ImageTsvReader::open(&tsv_path, policy)?.with_image_check(options.check_images);
    let texts = TextJsonlReader::open(&jsonl_path, policy)?;

    std::fs::create_dir_all(lmdb_dir).map_err(io_err(lmdb_dir))?;
    let final_dir = lmdb_dir.join(split);
    let tmp_dir = lmdb_dir.join(format!(".{split}.building-{}", std::process::id()));
    remove_stale_build_dirs(lmdb_dir, split)?;
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
    }
    let built = build_into(&tmp_dir, split, images, texts, progress);
    let mut summary = match built {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return Err(e);
        }
    };
    let replaced_existing = final_dir.exists();
    if replaced_existing {
        let old = lmdb_dir.join(format!(".{split}.old-{}", std::process::id()));
        std::fs::rename(&final_dir, &old).map_err(io_err(&final_dir))?;
        std::fs::rename(&tmp_dir, &final_dir).map_err(io_err(&final_dir))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        std::fs::rename(&tmp_dir, &final_dir).map_err(io_err(&final_dir))?;
    }
    summary.dir = final_dir;
    summary.replaced_existing = replaced_existing;
    Ok(summary)
}

fn build_into(
    dir: &Path,
    split: &str,
    mut images: ImageTsvReader,
    texts: TextJsonlReader,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<SplitSummary, LmdbError> {
    // Progress is reported about every this many input bytes.
    const PROGRESS_BYTES: u64 = 1 << 20;

    // imgs/
    let imgs_path = dir.join("imgs");
    let tsv_path = images.path().to_path_buf();
    let env = open_for_write(&imgs_path)?;
    let mut writer = CadencedWriter::new(&env, &imgs_path, IMAGES_COMMIT_EVERY)?;
    progress(BuildProgress::Start {
        split,
        stage: Stage::Images,
        file: &tsv_path,
        total_bytes: images.file_len(),
    });
    let mut n_images = 0u64;
    let mut reported = 0u64;
    while let Some(record) = images.next() {
        let record = record?;
        writer.put_record(
            record.image_id.to_string().as_bytes(),
            record.base64.as_bytes(),
        )?;
        n_images += 1;
        if images.bytes_read() - reported >= PROGRESS_BYTES {
            reported = images.bytes_read();
            progress(BuildProgress::Advance {
                split,
                stage: Stage::Images,
                bytes: reported,
                records: n_images,
            });
        }
    }
    writer.finish(NUM_IMAGES_KEY, n_images)?;
    drop(env);
    make_readable(&imgs_path)?;
    progress(BuildProgress::Finish {
        split,
        stage: Stage::Images,
        records: n_images,
    });
    let known: HashSet<i64> = images.image_ids().collect();
    let images_report = images.into_report();

    // pairs/
    let pairs_path = dir.join("pairs");
    let jsonl_path = texts.path().to_path_buf();
    let mut texts = texts.with_known_images(KnownImages {
        ids: known,
        source: tsv_path.display().to_string(),
    });
    let env = open_for_write(&pairs_path)?;
    let mut writer = CadencedWriter::new(&env, &pairs_path, PAIRS_COMMIT_EVERY)?;
    progress(BuildProgress::Start {
        split,
        stage: Stage::Pairs,
        file: &jsonl_path,
        total_bytes: texts.file_len(),
    });
    let (mut n_pairs, mut n_texts, mut without_list) = (0u64, 0u64, 0u64);
    reported = 0;
    while let Some(record) = texts.next() {
        let record = record?;
        n_texts += 1;
        let Some(image_ids) = &record.image_ids else {
            without_list += 1;
            continue;
        };
        for &image_id in image_ids {
            let value = dumps_pair(image_id, record.text_id, &record.text);
            writer.put_record(n_pairs.to_string().as_bytes(), &value)?;
            n_pairs += 1;
        }
        if texts.bytes_read() - reported >= PROGRESS_BYTES / 16 {
            reported = texts.bytes_read();
            progress(BuildProgress::Advance {
                split,
                stage: Stage::Pairs,
                bytes: reported,
                records: n_pairs,
            });
        }
    }
    writer.finish(NUM_SAMPLES_KEY, n_pairs)?;
    drop(env);
    make_readable(&pairs_path)?;
    progress(BuildProgress::Finish {
        split,
        stage: Stage::Pairs,
        records: n_pairs,
    });
    Ok(SplitSummary {
        split: split.to_string(),
        dir: dir.to_path_buf(),
        images: n_images,
        pairs: n_pairs,
        texts: n_texts,
        texts_without_image_list: without_list,
        replaced_existing: false,
        images_report,
        texts_report: texts.into_report(),
    })
}

/// The script's `--splits` handling: comma-separated, surrounding whitespace of the whole
/// argument stripped, duplicates removed. The script's `set` makes its order arbitrary; here the
/// first occurrence wins, so builds are reproducible.
pub fn parse_splits(arg: &str) -> Result<Vec<String>, LmdbError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in crate::files::python_strip(arg).split(',') {
        check_split_name(s)?;
        if seen.insert(s.to_string()) {
            out.push(s.to_string());
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Reading
// ------------------------------------------------------------------------------------------

/// An environment opened read-only as cn_clip opens it (`readonly=True, lock=False,
/// readahead=False`), with its unnamed database.
struct ReadEnv {
    path: PathBuf,
    env: Env<WithoutTls>,
    db: Database<Bytes, Bytes>,
    /// The mapped `data.mdb` (the same inode as the mapping) and the bytes its pages need.
    file: std::fs::File,
    needed: u64,
}

impl ReadEnv {
    /// LMDB's contract is that nobody truncates a file it has mapped: a read of a page past the
    /// new end is a SIGBUS that kills the process, not an error. A file replaced by rename keeps
    /// the old inode mapped and is harmless; one cut or rewritten in place is caught here, by one
    /// `fstat` of the mapped inode before each read (microseconds, against a JPEG decode's
    /// milliseconds). A truncation racing between this check and the read is still LMDB's crash.
    fn check_intact(&self) -> Result<(), LmdbError> {
        let found = self.file.metadata().map_err(io_err(&self.path))?.len();
        if found < self.needed {
            return Err(LmdbError::ShrankWhileOpen {
                path: self.path.clone(),
                needed: self.needed,
                found,
            });
        }
        Ok(())
    }
}

/// heed refuses to open one path twice in a process, so read-only environments are shared:
/// opening a split that is already open (another loader, another test) reuses it. Entries remember
/// which `data.mdb` file they mapped, so a split rebuilt since is not served from the old mapping.
static OPEN_ENVS: Mutex<Option<OpenEnvs>> = Mutex::new(None);

/// Canonical environment path → the shared environment and the `data.mdb` it mapped.
type OpenEnvs = HashMap<PathBuf, (Weak<ReadEnv>, FileId)>;

/// Device and inode of a file: changes when a build replaces the directory.
type FileId = (u64, u64);

fn file_id(path: &Path) -> Result<FileId, LmdbError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io_err(path))?;
    Ok((m.dev(), m.ino()))
}

/// A split directory (`lmdb/valid`) given where one of its LMDBs (`lmdb/valid/imgs`) belongs.
fn not_a_split(path: &Path, part: &'static str) -> Result<(), LmdbError> {
    if !path.join("data.mdb").is_file() && path.join(part).join("data.mdb").is_file() {
        return Err(LmdbError::SplitNotPart {
            path: path.to_path_buf(),
            part,
        });
    }
    Ok(())
}

fn open_read(path: &Path, what: &'static str) -> Result<Arc<ReadEnv>, LmdbError> {
    if !path.join("data.mdb").is_file() {
        return Err(LmdbError::MissingDir {
            path: path.to_path_buf(),
            what,
        });
    }
    let canonical = path.canonicalize().map_err(io_err(path))?;
    let id = file_id(&canonical.join("data.mdb"))?;
    let mut guard = OPEN_ENVS.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    map.retain(|_, (w, _)| w.strong_count() > 0);
    if let Some((weak, open_id)) = map.get(&canonical)
        && let Some(env) = weak.upgrade()
    {
        if *open_id == id {
            return Ok(env);
        }
        return Err(LmdbError::Replaced {
            path: path.to_path_buf(),
        });
    }
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    // SAFETY: read-only and without LMDB's lock file, exactly as cn_clip's LMDBDataset opens
    // these environments. The caller must not modify a data set while reading it (the same
    // contract as cn_clip's); builds here never modify a split in place, they replace it.
    let env = unsafe {
        options.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK | EnvFlags::NO_READ_AHEAD);
        options.open(&canonical)
    }
    .map_err(lmdb_err(path))?;
    // LMDB maps the file and trusts its meta page: a page past the end of a cut file would be a
    // SIGBUS on first touch, not an error. Both meta pages were read by `open`, so this is safe.
    let file = std::fs::File::open(canonical.join("data.mdb")).map_err(io_err(path))?;
    let found = file.metadata().map_err(io_err(path))?.len();
    let needed = (env.info().last_page_number as u64 + 1) * u64::from(env.stat().page_size);
    if found < needed {
        return Err(LmdbError::Truncated {
            path: path.to_path_buf(),
            needed,
            found,
        });
    }
    let txn = env.read_txn().map_err(lmdb_err(path))?;
    let db = env
        .open_database::<Bytes, Bytes>(&txn, None)
        .map_err(lmdb_err(path))?
        .ok_or_else(|| LmdbError::MissingDir {
            path: path.to_path_buf(),
            what,
        })?;
    drop(txn);
    let env = Arc::new(ReadEnv {
        path: path.to_path_buf(),
        env,
        db,
        file,
        needed,
    });
    map.insert(canonical, (Arc::downgrade(&env), id));
    Ok(env)
}

fn read_count(env: &ReadEnv, key: &'static [u8]) -> Result<u64, LmdbError> {
    let name = match std::str::from_utf8(key) {
        Ok(s) => s,
        Err(_) => unreachable!("count keys are ASCII"),
    };
    env.check_intact()?;
    let txn = env.env.read_txn().map_err(lmdb_err(&env.path))?;
    let value = env
        .db
        .get(&txn, key)
        .map_err(lmdb_err(&env.path))?
        .ok_or_else(|| LmdbError::MissingCount {
            path: env.path.clone(),
            key: name,
        })?;
    // Python's int() of the decoded text: surrounding whitespace is allowed.
    let text = String::from_utf8_lossy(value);
    crate::files::python_strip(&text)
        .parse()
        .map_err(|_| LmdbError::BadCount {
            path: env.path.clone(),
            key: name,
            value: text.into_owned(),
        })
}

/// A split's `imgs/` environment: image id → base64 text.
#[derive(Clone)]
pub struct LmdbImages {
    env: Arc<ReadEnv>,
    num_images: u64,
}

impl std::fmt::Debug for LmdbImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbImages")
            .field("path", &self.env.path)
            .field("num_images", &self.num_images)
            .finish()
    }
}

impl LmdbImages {
    /// Opens an `imgs/` directory (cn_clip's `--image-data`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LmdbError> {
        not_a_split(path.as_ref(), "imgs")?;
        let env = open_read(
            path.as_ref(),
            "an LMDB imgs directory (data.mdb) built by build_lmdb_dataset.py",
        )?;
        let num_images = read_count(&env, NUM_IMAGES_KEY)?;
        Ok(LmdbImages { env, num_images })
    }

    pub fn path(&self) -> &Path {
        &self.env.path
    }

    /// `num_images` as stored (the script counts TSV lines, duplicates included).
    pub fn num_images(&self) -> u64 {
        self.num_images
    }

    /// A read transaction for many lookups (one per worker thread).
    pub fn reader(&self) -> Result<ImagesReader<'_>, LmdbError> {
        // Starting a transaction reads the meta pages.
        self.env.check_intact()?;
        Ok(ImagesReader {
            images: self,
            txn: self.env.env.read_txn().map_err(lmdb_err(&self.env.path))?,
        })
    }

    /// The decoded image file bytes of `image_id`.
    pub fn image_bytes(&self, image_id: i64) -> Result<Vec<u8>, LmdbError> {
        self.reader()?.image_bytes(image_id, "")
    }

    /// All image ids, in key order (bytewise order of their decimal text, as cn_clip's
    /// `EvalImgDataset` walks them and `extract_features` writes them).
    pub fn ids_in_key_order(&self) -> Result<Vec<i64>, LmdbError> {
        let reader = self.reader()?;
        reader.iter()?.map(|r| r.map(|(id, _)| id)).collect()
    }
}

/// A read transaction on an `imgs/` environment.
pub struct ImagesReader<'a> {
    images: &'a LmdbImages,
    txn: RoTxn<'a, WithoutTls>,
}

impl ImagesReader<'_> {
    /// The stored base64 text of `image_id`; `context` is appended to the not-found error (e.g.
    /// " (pair 12, text 8428)").
    pub fn base64(&self, image_id: i64, context: &str) -> Result<&[u8], LmdbError> {
        let env = &self.images.env;
        env.check_intact()?;
        env.db
            .get(&self.txn, image_id.to_string().as_bytes())
            .map_err(lmdb_err(&env.path))?
            .ok_or_else(|| LmdbError::MissingImage {
                path: env.path.clone(),
                image_id,
                context: context.to_string(),
            })
    }

    /// The image file bytes of `image_id` (`urlsafe_b64decode` of the stored text).
    pub fn image_bytes(&self, image_id: i64, context: &str) -> Result<Vec<u8>, LmdbError> {
        decode_cn_clip(self.base64(image_id, context)?).map_err(|source| LmdbError::Base64 {
            path: self.images.env.path.clone(),
            image_id,
            context: context.to_owned(),
            source,
        })
    }

    /// Whether `image_id` is stored.
    pub fn contains(&self, image_id: i64) -> Result<bool, LmdbError> {
        let env = &self.images.env;
        env.check_intact()?;
        Ok(env
            .db
            .get(&self.txn, image_id.to_string().as_bytes())
            .map_err(lmdb_err(&env.path))?
            .is_some())
    }

    /// `(image_id, base64)` in key order, skipping the `num_images` key; a key that is not an
    /// integer is an error (cn_clip's `int(key)` would raise).
    pub fn iter(&self) -> Result<impl Iterator<Item = Result<(i64, &[u8]), LmdbError>>, LmdbError> {
        let env = &self.images.env;
        env.check_intact()?;
        let mut iter = env.db.iter(&self.txn).map_err(lmdb_err(&env.path))?;
        let mut stopped = false;
        // Checked before every step of the cursor, which is what touches the mapped pages.
        Ok(std::iter::from_fn(move || {
            loop {
                if stopped {
                    return None;
                }
                if let Err(e) = env.check_intact() {
                    stopped = true;
                    return Some(Err(e));
                }
                let (key, value) = match iter.next()? {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(lmdb_err(&env.path)(e))),
                };
                if key == NUM_IMAGES_KEY {
                    continue;
                }
                // int(key.tobytes().decode()) accepts surrounding whitespace and a sign.
                let text = String::from_utf8_lossy(key);
                return Some(
                    crate::files::python_strip(&text)
                        .parse::<i64>()
                        .map(|id| (id, value))
                        .map_err(|_| LmdbError::BadImageKey {
                            path: env.path.clone(),
                            key: text.into_owned(),
                        }),
                );
            }
        }))
    }
}

/// A split's `pairs/` environment: pair index → `(image_id, text_id, text)`.
#[derive(Clone)]
pub struct LmdbPairs {
    env: Arc<ReadEnv>,
    num_samples: u64,
}

impl std::fmt::Debug for LmdbPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbPairs")
            .field("path", &self.env.path)
            .field("num_samples", &self.num_samples)
            .finish()
    }
}

impl LmdbPairs {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LmdbError> {
        not_a_split(path.as_ref(), "pairs")?;
        let env = open_read(
            path.as_ref(),
            "an LMDB pairs directory (data.mdb) built by build_lmdb_dataset.py",
        )?;
        let num_samples = read_count(&env, NUM_SAMPLES_KEY)?;
        Ok(LmdbPairs { env, num_samples })
    }

    pub fn path(&self) -> &Path {
        &self.env.path
    }

    /// `num_samples`: the number of (text, image) pairs.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }

    pub fn reader(&self) -> Result<PairsReader<'_>, LmdbError> {
        self.env.check_intact()?;
        Ok(PairsReader {
            pairs: self,
            txn: self.env.env.read_txn().map_err(lmdb_err(&self.env.path))?,
        })
    }

    /// Pair `index` (`< num_samples`).
    pub fn pair(&self, index: u64) -> Result<PickledPair, LmdbError> {
        self.reader()?.pair(index)
    }
}

/// A read transaction on a `pairs/` environment.
pub struct PairsReader<'a> {
    pairs: &'a LmdbPairs,
    txn: RoTxn<'a, WithoutTls>,
}

impl PairsReader<'_> {
    pub fn pair(&self, index: u64) -> Result<PickledPair, LmdbError> {
        let env = &self.pairs.env;
        env.check_intact()?;
        let value = env
            .db
            .get(&self.txn, index.to_string().as_bytes())
            .map_err(lmdb_err(&env.path))?
            .ok_or_else(|| LmdbError::MissingPair {
                path: env.path.clone(),
                index,
                num_samples: self.pairs.num_samples,
            })?;
        loads_pair(value).map_err(|source| LmdbError::BadPair {
            path: env.path.clone(),
            index,
            source,
        })
    }
}

/// One sample as cn_clip's `LMDBDataset.__getitem__` reads it, before the transforms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// The index asked for (may exceed the pair count: padding wraps).
    pub index: u64,
    /// `index % num_samples`: the pair's key.
    pub pair_index: u64,
    pub image_id: i64,
    pub text_id: i64,
    pub text: String,
    /// The image file's bytes (base64-decoded).
    pub image: Vec<u8>,
}

/// A split directory `{lmdb_dir}/{split}` with `pairs/` and `imgs/`, read as `LMDBDataset`.
#[derive(Debug, Clone)]
pub struct LmdbSplit {
    dir: PathBuf,
    pairs: LmdbPairs,
    images: LmdbImages,
}

impl LmdbSplit {
    /// Opens `dir` (cn_clip's `--train-data` / `--val-data`), which must hold `pairs/` and
    /// `imgs/` (cn_clip asserts the same).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LmdbError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(LmdbError::MissingDir {
                path: dir,
                what: "an LMDB split directory with pairs/ and imgs/",
            });
        }
        let pairs = LmdbPairs::open(dir.join("pairs"))?;
        let images = LmdbImages::open(dir.join("imgs"))?;
        Ok(LmdbSplit { dir, pairs, images })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pairs(&self) -> &LmdbPairs {
        &self.pairs
    }

    pub fn images(&self) -> &LmdbImages {
        &self.images
    }

    /// `number_samples`: the unpadded data set length.
    pub fn num_samples(&self) -> u64 {
        self.pairs.num_samples
    }

    pub fn num_images(&self) -> u64 {
        self.images.num_images
    }

    /// Read transactions on both environments, for many samples (one per loader worker).
    pub fn reader(&self) -> Result<SplitReader<'_>, LmdbError> {
        Ok(SplitReader {
            split: self,
            pairs: self.pairs.reader()?,
            images: self.images.reader()?,
        })
    }

    /// Sample `index` (wrapping modulo the pair count).
    pub fn sample(&self, index: u64) -> Result<RawSample, LmdbError> {
        self.reader()?.sample(index)
    }

    /// Checks that every pair decodes and references a stored image; returns the pairs whose
    /// image is missing, as `(pair_index, text_id, image_id)`. cn_clip's script does not check
    /// this, so an LMDB built by it may fail only when training reaches the pair.
    pub fn missing_images(&self) -> Result<Vec<(u64, i64, i64)>, LmdbError> {
        let reader = self.reader()?;
        let mut missing = Vec::new();
        for index in 0..self.num_samples() {
            let pair = reader.pairs.pair(index)?;
            if !reader.images.contains(pair.image_id)? {
                missing.push((index, pair.text_id, pair.image_id));
            }
        }
        Ok(missing)
    }
}

/// Read transactions on a split.
pub struct SplitReader<'a> {
    split: &'a LmdbSplit,
    pairs: PairsReader<'a>,
    images: ImagesReader<'a>,
}

impl SplitReader<'_> {
    /// `LMDBDataset.__getitem__(index)` up to the image bytes and the raw text.
    pub fn sample(&self, index: u64) -> Result<RawSample, LmdbError> {
        let n = self.split.num_samples();
        if n == 0 {
            return Err(LmdbError::Empty {
                path: self.split.dir.clone(),
                index,
            });
        }
        let pair_index = index % n;
        let pair = self.pairs.pair(pair_index)?;
        let context = format!(" (pair {pair_index}, text {})", pair.text_id);
        let image = self.images.image_bytes(pair.image_id, &context)?;
        Ok(RawSample {
            index,
            pair_index,
            image_id: pair.image_id,
            text_id: pair.text_id,
            text: pair.text,
            image,
        })
    }

    pub fn pairs(&self) -> &PairsReader<'_> {
        &self.pairs
    }

    pub fn images(&self) -> &ImagesReader<'_> {
        &self.images
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            parse_splits(" train,valid,train ").unwrap(),
            ["train", "valid"]
        );
        for bad in ["", "a/b", "..", ".hidden", "train,,valid"] {
            assert!(parse_splits(bad).is_err(), "{bad:?}");
        }
    }
}
