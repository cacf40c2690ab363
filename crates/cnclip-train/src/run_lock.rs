//! One run per run directory. Two runs started on the same `--logs/--name` would interleave their
//! metrics and overwrite each other's checkpoints while both exit 0, so a run holds an exclusive
//! lock on `RUN_DIR/.lock` for its whole life. The lock is the operating system's (`flock`), so a
//! crashed or killed run releases it with its process, and holding it means no other run can be
//! writing into the directory — which also makes every temporary file found there at start the
//! leftover of a dead writer, safe to remove.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    #[error(
        "{dir} is in use by another run ({holder}): two runs on the same --logs/--name would \
         overwrite each other's checkpoints and metrics; wait for it, stop it, or choose another \
         --name"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// The held lock of a run directory; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RunDirLock {
    _file: File,
    path: PathBuf,
}

impl RunDirLock {
    /// Takes the lock of `run_dir` (created if needed) without waiting: another live holder is an
    /// error naming its process id.
    pub fn acquire(run_dir: &Path) -> Result<Self, RunLockError> {
        let io = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| RunLockError::Io { path, what, source }
        };
        std::fs::create_dir_all(run_dir).map_err(io(run_dir, "cannot create the run directory"))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path, "cannot open the run lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not written its id yet".to_string(),
                    text => text.to_string(),
                };
                return Err(RunLockError::Busy {
                    dir: run_dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(&path, "cannot lock the run lock")(e)),
        }
        let me = format!("pid {} on {}", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| file.write_all(me.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(io(&path, "cannot write the run lock"))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this host".into())
}

/// Removes the temporary files that atomic writes leave when their writer is killed mid-write
/// (`.NAME.tmp-…`, cnclip-model's atomic safetensors writer) from `dir`, and returns them. Only
/// call it while holding `dir`'s run lock: then no live writer can own them.
pub fn remove_stale_temporaries(
    _lock: &RunDirLock,
    dir: &Path,
) -> Result<Vec<PathBuf>, RunLockError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RunLockError::Io {
                path: dir.to_path_buf(),
                what: "cannot list",
                source,
            });
        }
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') && name.contains(".tmp-") && entry.path().is_file() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| RunLockError::Io {
                path: path.clone(),
                what: "cannot remove a dead writer's temporary file",
                source,
            })?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cnclip-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = temp("busy");
        let first = RunDirLock::acquire(&dir).unwrap();
        let err = RunDirLock::acquire(&dir).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RunLockError::Busy { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        RunDirLock::acquire(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn temporaries_of_dead_writers_are_removed_and_nothing_else() {
        let dir = temp("tmp");
        let lock = RunDirLock::acquire(&dir).unwrap();
        let ckpt = dir.join("checkpoints");
        std::fs::create_dir_all(&ckpt).unwrap();
        for name in [
            ".epoch_latest.safetensors.tmp-4242-0",
            ".epoch_latest.state.safetensors.tmp-4242-1",
            "epoch_latest.safetensors",
            "epoch1.safetensors",
        ] {
            std::fs::write(ckpt.join(name), b"x").unwrap();
        }
        let removed = remove_stale_temporaries(&lock, &ckpt).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        let mut left: Vec<_> = std::fs::read_dir(&ckpt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["epoch1.safetensors", "epoch_latest.safetensors"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
