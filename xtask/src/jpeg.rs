//! The JPEG decoder's SIMD code. mozjpeg-sys builds libjpeg-turbo from source and, on x86, only
//! assembles its SIMD kernels when `nasm` is on PATH; without it the build silently falls back to
//! the C code paths (same pixels, about 1.6× slower decode, docs/BENCHMARKS.md "Data"). Its build
//! script never reruns when nasm appears later, so a build made before nasm stays slow. setup
//! therefore provides nasm the way it provides libtorch, rebuilds what was built without it, and
//! `demo`/`test` say which decoder they built.

use crate::system_package::{self, Package, is_root};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What mozjpeg-sys's build script writes when it builds without SIMD (`cargo:warning=` lines in
/// its `output` file).
const NO_SIMD_MARKERS: [&str; 2] = ["NASM not installed", "Installed NASM is outdated"];

/// Set to build without SIMD on purpose (no nasm, no system package manager at hand).
pub const ALLOW_SLOW_ENV: &str = "CNCLIP_ALLOW_SLOW_JPEG";

const NASM: Package = Package {
    name: "nasm",
    rpm_name: "nasm",
    brew: true,
};

/// Only x86 needs an assembler of its own; aarch64/arm SIMD is plain C intrinsics and GNU as.
fn needs_nasm() -> bool {
    cfg!(any(target_arch = "x86_64", target_arch = "x86"))
}

/// `nasm -v`'s first line, if a nasm is on PATH.
fn nasm_version() -> Option<String> {
    let out = Command::new("nasm").arg("-v").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes sure the next build of libjpeg-turbo gets its SIMD kernels: installs nasm through the
/// system package manager when this process may (root, or Homebrew), otherwise stops with the one
/// command to run. Builds made without SIMD are removed so that cargo rebuilds them.
pub fn ensure_simd_build(root: &Path) -> Result<()> {
    if !needs_nasm() {
        return Ok(());
    }
    let version = match nasm_version() {
        Some(version) => version,
        None if std::env::var_os(ALLOW_SLOW_ENV).is_some() => {
            println!(
                "setup: nasm not found and {ALLOW_SLOW_ENV} is set: the JPEG decoder builds \
                 without SIMD (about 1.6× slower decode)"
            );
            return Ok(());
        }
        None => install_nasm()?,
    };
    let stale = builds_without_simd(&crate::examples::target_dir(root));
    if !stale.is_empty() {
        println!(
            "setup: {version} found; removing {} libjpeg-turbo build(s) made without it so they \
             rebuild with SIMD",
            stale.len()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["clean", "--package", "mozjpeg-sys"])
            .current_dir(root)
            .status()
            .context("running `cargo clean --package mozjpeg-sys`")?;
        if !status.success() {
            bail!("`cargo clean --package mozjpeg-sys` exited with {status}");
        }
    }
    Ok(())
}

fn install_nasm() -> Result<String> {
    let manager = system_package::install_commands(&NASM);
    let may_install = match &manager {
        Some((name, _)) => *name == "brew" || is_root(),
        None => false,
    };
    let Some((name, commands)) = manager.filter(|_| may_install) else {
        let how = match system_package::install_commands(&NASM) {
            Some((_, commands)) => commands
                .iter()
                .map(|c| format!("sudo {}", c.join(" ")))
                .collect::<Vec<_>>()
                .join(" && "),
            None => "install nasm (https://www.nasm.us) with your system's package manager".into(),
        };
        bail!(
            "nasm is missing: libjpeg-turbo (the JPEG decoder) needs it for its SIMD kernels, \
             without which decoding is about 1.6× slower. Run:\n    {how}\nthen rerun this \
             command (or set {ALLOW_SLOW_ENV}=1 to build the slower decoder on purpose)"
        );
    };
    println!("setup: nasm not found; installing it with {name} (for libjpeg-turbo's SIMD decoder)");
    system_package::run(
        &commands,
        "nasm for the SIMD JPEG decoder",
        &format!(
            "\nInstall nasm yourself and rerun (or set {ALLOW_SLOW_ENV}=1 to build without SIMD)"
        ),
    )?;
    nasm_version().with_context(|| {
        format!("{name} reported success, but `nasm -v` still does not run: is it on PATH?")
    })
}

/// Build-script outputs of mozjpeg-sys under `target` (every profile) that report a build
/// without SIMD.
fn builds_without_simd(target: &Path) -> Vec<PathBuf> {
    build_outputs(target, None)
        .into_iter()
        .filter(|output| built_without_simd(output).unwrap_or(false))
        .collect()
}

/// The `output` files of mozjpeg-sys's build script runs, in `profile` (`debug`, `release`) or
/// in every profile.
fn build_outputs(target: &Path, profile: Option<&str>) -> Vec<PathBuf> {
    let profiles: Vec<PathBuf> = match profile {
        Some(p) => vec![target.join(p)],
        None => fs::read_dir(target)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default(),
    };
    let mut found = Vec::new();
    for dir in profiles {
        let Ok(entries) = fs::read_dir(dir.join("build")) else {
            continue;
        };
        for entry in entries.flatten() {
            let output = entry.path().join("output");
            let is_mozjpeg = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("mozjpeg-sys-"));
            if is_mozjpeg && output.is_file() {
                found.push(output);
            }
        }
    }
    found
}

fn built_without_simd(output: &Path) -> Result<bool> {
    let text = fs::read_to_string(output)?;
    Ok(NO_SIMD_MARKERS.iter().any(|m| text.contains(m)))
}

/// One line saying which JPEG decoder the last build in `profile` linked.
pub fn decoder_report(root: &Path, profile: &str) -> String {
    let newest = build_outputs(&crate::examples::target_dir(root), Some(profile))
        .into_iter()
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    match newest {
        None => format!("JPEG decoder: no libjpeg-turbo build found in target/{profile}"),
        Some((_, output)) => match built_without_simd(&output) {
            Ok(false) if needs_nasm() => {
                format!("JPEG decoder: libjpeg-turbo with SIMD ({profile} build, nasm)")
            }
            Ok(false) => format!("JPEG decoder: libjpeg-turbo with SIMD ({profile} build)"),
            Ok(true) => format!(
                "JPEG decoder: libjpeg-turbo WITHOUT SIMD ({profile} build; about 1.6× slower \
                 decode — install nasm and rerun `cargo xtask setup`)"
            ),
            Err(e) => format!("JPEG decoder: unknown ({}: {e})", output.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_build(target: &Path, profile: &str, hash: &str, output: &str) {
        let dir = target
            .join(profile)
            .join("build")
            .join(format!("mozjpeg-sys-{hash}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("output"), output).unwrap();
    }

    #[test]
    fn builds_without_simd_are_found_in_every_profile() {
        let target = std::env::temp_dir().join(format!("xtask-jpeg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&target);
        fake_build(
            &target,
            "debug",
            "aa",
            "cargo:warning=NASM not installed. Mozjpeg's SIMD won't be enabled: No such file\n",
        );
        fake_build(&target, "debug", "bb", "cargo:lib_version=62\n");
        fake_build(
            &target,
            "release",
            "cc",
            "cargo:warning=Installed NASM is outdated and useless. Mozjpeg's SIMD won't be enabled: 0.98\n",
        );
        let mut stale = builds_without_simd(&target);
        stale.sort();
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale[0].to_string_lossy().contains("mozjpeg-sys-aa"));
        assert!(stale[1].to_string_lossy().contains("mozjpeg-sys-cc"));
        let _ = fs::remove_dir_all(&target);
    }
}
