//! Building and running the workspace's release examples from xtask, which cannot link libtorch
//! itself: every step prints the exact command, so a user can rerun or adapt it by hand.

use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// Set by `--prebuilt DIR`: run the binaries cargo already built into DIR (e.g. `target/debug`,
/// as `cargo test` leaves them) instead of building release ones. The demo's integration test
/// uses this, since a nested cargo build inside `cargo test` would wait on cargo's own lock.
static PREBUILT: OnceLock<PathBuf> = OnceLock::new();

pub fn use_prebuilt(dir: PathBuf) {
    let _ = PREBUILT.set(dir);
}

pub fn prebuilt() -> Option<&'static Path> {
    PREBUILT.get().map(PathBuf::as_path)
}

/// The cargo that runs xtask (so toolchain overrides carry over).
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// `cargo build --release --example …` for `names`, plus the soup binary when `soup_bin`: one
/// cargo invocation, so shared dependencies are built once with the same features.
pub fn build(root: &Path, names: &[&str], soup_bin: bool) -> Result<()> {
    if prebuilt().is_some() {
        return Ok(());
    }
    let mut args: Vec<String> = ["build", "--release", "--locked", "--package", "cnclip"]
        .map(String::from)
        .to_vec();
    if soup_bin {
        args.extend(["--package", "soup", "--bin", "cnclip-soup"].map(String::from));
    }
    for name in names {
        args.push("--example".into());
        args.push((*name).into());
    }
    let mut cmd = Command::new(cargo());
    cmd.args(&args).current_dir(root);
    run(&mut cmd, &format!("cargo {}", args.join(" ")))
}

/// Where cargo put the release example `name`.
pub fn path(root: &Path, name: &str) -> PathBuf {
    if let Some(dir) = prebuilt() {
        return dir.join("examples").join(name);
    }
    target_dir(root).join("release").join("examples").join(name)
}

/// `CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
}

/// A command for the built example `name`.
pub fn command(root: &Path, name: &str) -> Command {
    let mut cmd = Command::new(path(root, name));
    cmd.current_dir(root);
    cmd
}

/// Prints `$ shown`, runs `cmd` with the terminal attached, fails on a non-zero exit.
pub fn run(cmd: &mut Command, shown: &str) -> Result<()> {
    println!("\n$ {shown}");
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    println!("  ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The command line of `cmd`, relative to `root`, for printing.
pub fn shown(root: &Path, cmd: &Command) -> String {
    let program = PathBuf::from(cmd.get_program());
    let program = program
        .strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or(program);
    let mut parts = vec![program.display().to_string()];
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        let arg = arg
            .strip_prefix(&format!("{}/", root.display()))
            .map(str::to_string)
            .unwrap_or_else(|| arg.to_string());
        if arg.contains(' ') || arg.is_empty() {
            parts.push(format!("'{arg}'"));
        } else {
            parts.push(arg);
        }
    }
    parts.join(" ")
}

/// Runs the built example with `args`, printing it.
pub fn run_example(root: &Path, name: &str, args: &[OsString]) -> Result<()> {
    let mut cmd = command(root, name);
    cmd.args(args);
    let shown = shown(root, &cmd);
    run(&mut cmd, &shown)
}
