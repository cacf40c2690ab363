//! `cargo xtask soup …`: makes sure libtorch is set up, then runs the release build of the
//! `cnclip-soup` binary (crates/soup) with the same arguments. xtask itself never links tch; the
//! work happens in that binary, which cargo builds on first use (a few minutes) and reuses after.

use crate::libtorch;
use crate::setup::{self, SetupArgs};
use anyhow::{Result, bail};
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// The cargo invocation that builds and runs the soup binary with `args`.
pub fn command(root: &Path, cargo: OsString, args: &[OsString]) -> Command {
    let mut cmd = Command::new(cargo);
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "soup",
        "--bin",
        "cnclip-soup",
        "--",
    ])
    .args(args)
    .current_dir(root);
    cmd
}

pub fn run(root: &Path, args: &[OsString]) -> Result<()> {
    // A libtorch the checkout already uses (CPU or CUDA, from `setup [--cuda]` or the user's
    // LIBTORCH) is kept; otherwise provision the CPU one.
    let linked = std::env::var_os("LIBTORCH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join(".libtorch"));
    if libtorch::check(&linked, false).is_err() {
        setup::run(root, &SetupArgs::default())?;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = command(root, cargo, args).status()?;
    if !status.success() {
        bail!("xtask soup: cnclip-soup exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_every_argument_to_the_release_binary() {
        let args: Vec<OsString> = ["--candidates", "a.safetensors", "--help"]
            .iter()
            .map(OsString::from)
            .collect();
        let cmd = command(Path::new("/repo"), "cargo".into(), &args);
        let got: Vec<&std::ffi::OsStr> = cmd.get_args().collect();
        assert_eq!(
            got,
            [
                "run",
                "--release",
                "--quiet",
                "--package",
                "soup",
                "--bin",
                "cnclip-soup",
                "--",
                "--candidates",
                "a.safetensors",
                "--help"
            ]
        );
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/repo")));
    }
}
