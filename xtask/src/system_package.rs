//! Installing a tool through the system package manager (apt-get, dnf, yum, apk, pacman, zypper,
//! optionally Homebrew), non-interactively: how setup provides nasm (`jpeg.rs`) and iproute2
//! (`iproute.rs`).

use anyhow::{Context, Result, bail};
use std::process::Command;

/// A package's names across package managers.
pub struct Package {
    /// The name on apt-get, apk, pacman and zypper.
    pub name: &'static str,
    /// The name on dnf and yum.
    pub rpm_name: &'static str,
    /// Whether Homebrew is asked too (it needs no root).
    pub brew: bool,
}

/// Whether `tool` is on PATH.
pub fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The first package manager on PATH that can install `package` non-interactively, with the
/// commands to run.
pub fn install_commands(package: &Package) -> Option<(&'static str, Vec<Vec<&'static str>>)> {
    let Package {
        name,
        rpm_name,
        brew,
    } = *package;
    if has("apt-get") {
        Some((
            "apt-get",
            vec![
                vec!["apt-get", "update"],
                vec!["apt-get", "install", "-y", "--no-install-recommends", name],
            ],
        ))
    } else if has("dnf") {
        Some(("dnf", vec![vec!["dnf", "install", "-y", rpm_name]]))
    } else if has("yum") {
        Some(("yum", vec![vec!["yum", "install", "-y", rpm_name]]))
    } else if has("apk") {
        Some(("apk", vec![vec!["apk", "add", name]]))
    } else if has("pacman") {
        Some((
            "pacman",
            vec![vec!["pacman", "-S", "--noconfirm", "--needed", name]],
        ))
    } else if has("zypper") {
        Some((
            "zypper",
            vec![vec!["zypper", "--non-interactive", "install", name]],
        ))
    } else if brew && has("brew") {
        Some(("brew", vec![vec!["brew", "install", name]]))
    } else {
        None
    }
}

/// Runs `commands` in order; a failing one stops with its stderr, saying it was installing
/// `purpose`, followed by `hint`.
pub fn run(commands: &[Vec<&str>], purpose: &str, hint: &str) -> Result<()> {
    for command in commands {
        let out = Command::new(command[0])
            .args(&command[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("starting `{}`", command.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{}` exited with {} while installing {purpose}:\n{}{hint}",
                command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
    Ok(())
}
