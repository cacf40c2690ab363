//! `cargo xtask setup [--cuda]`: libtorch 2.11.0 from PyPI into a cache shared by every checkout, and a
//! `.libtorch` link in this checkout that `.cargo/config.toml` hands to torch-sys as `LIBTORCH`.
//!
//! PyPI is the only source: the PyTorch download site is unreachable from our machines and Debian's
//! libtorch is 1.13. The CPU variant installs the smallest wheel set that still loads (torch's `+cu130`
//! wheel needs `libcudart.so.13` and CUPTI even for CPU work); `--cuda` installs torch with all its
//! dependencies plus the two header-only NCCL build wheels torch does not pull in.
//!
//! It also provides `nasm`, which the JPEG decoder's SIMD build needs (see `jpeg.rs`), and, as root,
//! `ip` for the two-node test (see `iproute.rs`).

use crate::libtorch::{self, TORCH_VERSION};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Install the full CUDA wheel set (about 2.7 GB) instead of the minimal CPU set (about 540 MB).
    #[arg(long)]
    pub cuda: bool,
}

/// One way of getting libtorch from PyPI.
struct Variant {
    name: &'static str,
    /// Install with `--no-deps`: only the listed wheels.
    no_deps: bool,
    wheels: &'static [&'static str],
}

const CPU: Variant = Variant {
    name: "cpu",
    no_deps: true,
    wheels: &[
        "torch==2.11.0",
        "nvidia-cuda-runtime==13.0.96",
        "nvidia-cuda-cupti==13.0.85",
    ],
};

const CUDA: Variant = Variant {
    name: "cuda",
    no_deps: false,
    wheels: &[
        "torch==2.11.0",
        "nvidia-cuda-crt==13.0.88",
        "nvidia-cuda-cccl==13.0.85",
    ],
};

impl Variant {
    /// The text written to the completion stamp: a change of wheel set invalidates the cache.
    fn stamp(&self) -> String {
        format!("no_deps={}\n{}\n", self.no_deps, self.wheels.join("\n"))
    }
}

pub fn run(root: &Path, args: &SetupArgs) -> Result<()> {
    crate::jpeg::ensure_simd_build(root)?;
    crate::iproute::ensure_ip()?;
    let variant = if args.cuda { &CUDA } else { &CPU };
    let link = root.join(".libtorch");

    // `.cargo/config.toml` sets LIBTORCH to our own link for every process cargo starts (this one too);
    // any other value came from the user and wins, so check it and leave the checkout alone.
    if let Some(user) = std::env::var_os("LIBTORCH").map(PathBuf::from)
        && user != link
    {
        let version = libtorch::check(&user, args.cuda)
            .with_context(|| format!("checking LIBTORCH={}", user.display()))?;
        println!(
            "setup: using your LIBTORCH={} (PyTorch {version}); nothing provisioned",
            user.display()
        );
        return Ok(());
    }

    let home = cache_dir()?.join(format!("libtorch-{TORCH_VERSION}-{}", variant.name));
    let torch = match installed_torch(&home, variant) {
        Some(torch) => {
            println!(
                "setup: libtorch {TORCH_VERSION} ({}) already in {}",
                variant.name,
                home.display()
            );
            torch
        }
        None => install(&home, variant)?,
    };
    let version = libtorch::check(&torch, args.cuda)
        .with_context(|| format!("checking the provisioned libtorch in {}", torch.display()))?;

    if point_link(&link, &torch)? {
        println!(
            "setup: {} -> {} (PyTorch {version})",
            link.display(),
            torch.display()
        );
    } else {
        println!(
            "setup: {} already points there; nothing changed",
            link.display()
        );
    }
    Ok(())
}

/// `$CNCLIP_CACHE_DIR`, else `$XDG_CACHE_HOME/cnclip`, else `~/.cache/cnclip`.
fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CNCLIP_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("cnclip"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("cnclip")),
        None => bail!(
            "neither CNCLIP_CACHE_DIR, XDG_CACHE_HOME nor HOME is set: no place for the libtorch cache"
        ),
    }
}

/// The `torch/` directory of a complete earlier install with the same wheel set, if there is one.
fn installed_torch(home: &Path, variant: &Variant) -> Option<PathBuf> {
    let stamp = fs::read_to_string(home.join("COMPLETE")).ok()?;
    if stamp != variant.stamp() {
        return None;
    }
    find_torch(&home.join("venv")).ok()
}

/// `venv/lib/python3.X/site-packages/torch`, whatever the Python minor version.
fn find_torch(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))?;
    for entry in entries.flatten() {
        let torch = entry.path().join("site-packages").join("torch");
        if torch.join("lib").is_dir() {
            return Ok(torch);
        }
    }
    bail!(
        "no site-packages/torch with a lib/ directory under {}",
        lib.display()
    )
}

fn install(home: &Path, variant: &Variant) -> Result<PathBuf> {
    let python = find_python()?;
    let venv = home.join("venv");
    let stamp = home.join("COMPLETE");
    // An install that was interrupted left no stamp: start it again from nothing.
    let _ = fs::remove_file(&stamp);
    if venv.exists() {
        fs::remove_dir_all(&venv)
            .with_context(|| format!("removing the incomplete {}", venv.display()))?;
    }
    fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;

    println!("setup: creating a venv in {}", venv.display());
    run_logged(
        Command::new(&python).arg("-m").arg("venv").arg(&venv),
        "create a Python venv (Debian/Ubuntu: apt-get install python3-venv)",
    )?;

    let pip = venv.join("bin").join("pip");
    let mut cmd = Command::new(&pip);
    cmd.args([
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
    ]);
    if variant.no_deps {
        cmd.arg("--no-deps");
    }
    cmd.args(variant.wheels);
    println!(
        "setup: installing libtorch {TORCH_VERSION} ({}) from PyPI: {} (this downloads {})",
        variant.name,
        variant.wheels.join(" "),
        if variant.no_deps {
            "about 540 MB"
        } else {
            "about 2.7 GB"
        }
    );
    run_logged(&mut cmd, "install the libtorch wheels from PyPI")?;

    let torch = find_torch(&venv)?;
    fs::write(&stamp, variant.stamp()).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(torch)
}

fn find_python() -> Result<PathBuf> {
    for name in ["python3", "python"] {
        if let Ok(out) = Command::new(name).arg("--version").output()
            && out.status.success()
        {
            return Ok(PathBuf::from(name));
        }
    }
    bail!(
        "no python3 found on PATH: setup uses pip to fetch libtorch {TORCH_VERSION} from PyPI; install \
         Python 3.10+ with venv (Debian/Ubuntu: apt-get install python3 python3-venv), or set LIBTORCH \
         to a PyTorch {TORCH_VERSION} install of your own"
    )
}

/// Runs `cmd` capturing its output; on failure the error shows the command line and everything it
/// printed, since pip's reasons (no network, no wheel for this Python) are only in its output.
fn run_logged(cmd: &mut Command, what: &str) -> Result<()> {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{line}` to {what}"))?;
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "failed to {what}: `{line}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Makes `link` a symlink to `target`. Returns false when it already was one.
fn point_link(link: &Path, target: &Path) -> Result<bool> {
    if let Ok(current) = fs::read_link(link) {
        if current == target {
            return Ok(false);
        }
        fs::remove_file(link).with_context(|| format!("replacing the link {}", link.display()))?;
    } else if link.exists() {
        bail!(
            "{} exists and is not a symlink: move it away so setup can link it to libtorch",
            link.display()
        );
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_is_created_then_left_alone_then_repointed() {
        let dir = std::env::temp_dir().join(format!("xtask-link-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::create_dir_all(dir.join("b")).unwrap();
        let link = dir.join(".libtorch");
        assert!(point_link(&link, &dir.join("a")).unwrap());
        assert!(!point_link(&link, &dir.join("a")).unwrap());
        assert!(point_link(&link, &dir.join("b")).unwrap());
        assert_eq!(fs::read_link(&link).unwrap(), dir.join("b"));
    }

    #[test]
    fn a_real_directory_in_the_way_is_refused() {
        let dir = std::env::temp_dir().join(format!("xtask-link-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join(".libtorch")).unwrap();
        let err = point_link(&dir.join(".libtorch"), &dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a symlink"), "{err}");
    }

    #[test]
    fn a_changed_wheel_set_invalidates_the_cache() {
        let home = std::env::temp_dir().join(format!("xtask-stamp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&home);
        fs::create_dir_all(home.join("venv/lib/python3.11/site-packages/torch/lib")).unwrap();
        fs::write(home.join("COMPLETE"), CUDA.stamp()).unwrap();
        assert!(installed_torch(&home, &CPU).is_none());
        fs::write(home.join("COMPLETE"), CPU.stamp()).unwrap();
        assert_eq!(
            installed_torch(&home, &CPU).unwrap(),
            home.join("venv/lib/python3.11/site-packages/torch")
        );
    }
}
