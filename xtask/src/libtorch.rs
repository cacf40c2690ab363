//! What a usable libtorch is for this project: PyTorch 2.11.0 (the version tch 0.24.0 is generated
//! against), either a pip `torch/` package directory or an unpacked libtorch zip.

use anyhow::{Context, Result, bail};
use std::fs;
use std::path::Path;

/// The PyTorch release tch 0.24.0 binds; any other version fails to link or misbehaves at run time.
pub const TORCH_VERSION: &str = "2.11.0";

/// Reads the PyTorch version of a libtorch directory: `version.py` in a pip `torch/` package
/// (`__version__ = '2.11.0+cu130'`), `build-version` in a libtorch zip (`2.11.0+cpu`).
pub fn read_version(dir: &Path) -> Result<String> {
    let version_py = dir.join("version.py");
    if version_py.is_file() {
        let text = fs::read_to_string(&version_py)
            .with_context(|| format!("reading {}", version_py.display()))?;
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("__version__") {
                let value = rest
                    .trim_start()
                    .trim_start_matches([':', ' '])
                    .trim_start();
                let value = value.strip_prefix("str").unwrap_or(value);
                let value = value.trim_start_matches(['=', ' ']);
                let version = value.trim().trim_matches(['\'', '"']);
                if !version.is_empty() {
                    return Ok(version.to_string());
                }
            }
        }
        bail!(
            "{}: no `__version__ = '…'` line found",
            version_py.display()
        );
    }
    let build_version = dir.join("build-version");
    if build_version.is_file() {
        let text = fs::read_to_string(&build_version)
            .with_context(|| format!("reading {}", build_version.display()))?;
        return Ok(text.trim().to_string());
    }
    bail!(
        "cannot tell which PyTorch {} is: it has neither version.py (a pip `torch/` directory) nor \
         build-version (an unpacked libtorch zip)",
        dir.display()
    )
}

/// Checks that `dir` is a PyTorch 2.11.0 libtorch with its shared libraries (and CUDA ones if asked).
pub fn check(dir: &Path, need_cuda: bool) -> Result<String> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let version = read_version(dir)?;
    if !version_matches(&version) {
        bail!(
            "{} is PyTorch {version}, but tch 0.24.0 needs PyTorch {TORCH_VERSION}: point LIBTORCH at a \
             {TORCH_VERSION} install, or unset it and let `cargo xtask setup` provision one",
            dir.display()
        );
    }
    let mut required = vec![
        "lib/libtorch_cpu.so",
        "lib/libc10.so",
        "include/torch/csrc/api/include/torch/torch.h",
    ];
    if need_cuda {
        required.extend(["lib/libtorch_cuda.so", "lib/libc10_cuda.so"]);
    }
    for rel in required {
        if !dir.join(rel).exists() {
            bail!("{} (PyTorch {version}) lacks {rel}", dir.display());
        }
    }
    Ok(version)
}

/// `2.11.0`, `2.11.0+cpu` and `2.11.0+cu130` all match; `2.11.1` or `2.1.0` do not.
pub fn version_matches(version: &str) -> bool {
    let release = version.split('+').next().unwrap_or_default();
    release == TORCH_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-libtorch-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn version_rules() {
        assert!(version_matches("2.11.0"));
        assert!(version_matches("2.11.0+cu130"));
        assert!(version_matches("2.11.0+cpu"));
        assert!(!version_matches("2.11.1"));
        assert!(!version_matches("2.1.0"));
        assert!(!version_matches("2.9.0+cu128"));
    }

    #[test]
    fn reads_pip_version_py() {
        let dir = temp_dir("pip");
        fs::write(
            dir.join("version.py"),
            "from typing import Optional\n__all__ = ['__version__']\n__version__ = '2.11.0+cu130'\ndebug = False\n",
        )
        .unwrap();
        assert_eq!(read_version(&dir).unwrap(), "2.11.0+cu130");
        // Newer wheels annotate the type.
        fs::write(dir.join("version.py"), "__version__: str = \"2.11.0\"\n").unwrap();
        assert_eq!(read_version(&dir).unwrap(), "2.11.0");
    }

    #[test]
    fn reads_zip_build_version() {
        let dir = temp_dir("zip");
        fs::write(dir.join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(read_version(&dir).unwrap(), "2.11.0+cpu");
    }

    #[test]
    fn wrong_version_names_the_expected_one() {
        let dir = temp_dir("old");
        fs::write(dir.join("build-version"), "2.9.0+cpu\n").unwrap();
        let err = check(&dir, false).unwrap_err().to_string();
        assert!(err.contains("PyTorch 2.9.0+cpu"), "{err}");
        assert!(err.contains("needs PyTorch 2.11.0"), "{err}");
    }

    #[test]
    fn missing_libraries_are_named() {
        let dir = temp_dir("nolib");
        fs::write(dir.join("build-version"), "2.11.0+cpu\n").unwrap();
        let err = check(&dir, false).unwrap_err().to_string();
        assert!(err.contains("lacks lib/libtorch_cpu.so"), "{err}");
    }

    #[test]
    fn unknown_layout_is_explained() {
        let dir = temp_dir("empty");
        let err = read_version(&dir).unwrap_err().to_string();
        assert!(err.contains("neither version.py"), "{err}");
    }
}
