//! Shared helpers of the integration tests: fixture paths and self-cleaning temporary directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tests/fixtures/muge_tiny`: the small split in the Chinese-CLIP form.
pub fn tiny_data() -> PathBuf {
    fixtures().join("muge_tiny")
}

/// The LMDB cn_clip's build_lmdb_dataset.py built from `muge_tiny`.
pub fn cnclip_lmdb() -> PathBuf {
    fixtures().join("cnclip_lmdb")
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "muge-data-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The reference Python (cn_clip 1.6.0 venv) for opt-in cross-checks: `MUGE_DATA_REF_PYTHON`.
/// Returns `None` after printing why the check is skipped.
pub fn ref_python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("MUGE_DATA_REF_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "{test}: skipped (set MUGE_DATA_REF_PYTHON to the python of the cn_clip reference venv, \
                 e.g. $(bash ../shared/tools/ref-venv.sh), to run it)"
            );
            None
        }
    }
}
