//! `ip` (iproute2), which the two-node training test (`tests/two_nodes.rs`) uses to join two network
//! namespaces by a veth pair. Minimal container images lack it; setup installs it as it installs
//! nasm (`jpeg.rs`) when it runs as root, the only case in which the test can create namespaces at
//! all (elsewhere the test skips and says why).

use anyhow::{Context, Result, bail};
use std::process::Command;

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ip_works() -> bool {
    Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The package manager's commands that install iproute2.
fn install_commands() -> Option<Vec<Vec<&'static str>>> {
    if has("apt-get") {
        Some(vec![
            vec!["apt-get", "update"],
            vec![
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "iproute2",
            ],
        ])
    } else if has("dnf") {
        Some(vec![vec!["dnf", "install", "-y", "iproute"]])
    } else if has("yum") {
        Some(vec![vec!["yum", "install", "-y", "iproute"]])
    } else if has("apk") {
        Some(vec![vec!["apk", "add", "iproute2"]])
    } else if has("pacman") {
        Some(vec![vec![
            "pacman",
            "-S",
            "--noconfirm",
            "--needed",
            "iproute2",
        ]])
    } else if has("zypper") {
        Some(vec![vec![
            "zypper",
            "--non-interactive",
            "install",
            "iproute2",
        ]])
    } else {
        None
    }
}

/// Installs `ip` on Linux when it is missing and this process is root.
pub fn ensure_ip() -> Result<()> {
    if !cfg!(target_os = "linux") || ip_works() {
        return Ok(());
    }
    if !is_root() {
        println!(
            "setup: `ip` (iproute2) not found and not root: the two-node test will be skipped \
             (it needs root for network namespaces)"
        );
        return Ok(());
    }
    let Some(commands) = install_commands() else {
        println!(
            "setup: `ip` (iproute2) not found and no known package manager: the two-node test \
             will be skipped"
        );
        return Ok(());
    };
    println!("setup: `ip` not found; installing iproute2 (for the two-node training test)");
    for command in &commands {
        let out = Command::new(command[0])
            .args(&command[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("starting `{}`", command.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`{}` exited with {} while installing iproute2 for the two-node test:\n{}",
                command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
    }
    if !ip_works() {
        bail!("iproute2 was installed, but `ip -V` still does not run: is it on PATH?");
    }
    Ok(())
}
