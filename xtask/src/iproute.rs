//! `ip` (iproute2), which the two-node training test (`tests/two_nodes.rs`) uses to join two network
//! namespaces by a veth pair. Minimal container images lack it; setup installs it as it installs
//! nasm (`jpeg.rs`) when it runs as root, the only case in which the test can create namespaces at
//! all (elsewhere the test skips and says why).

use crate::system_package::{self, Package, is_root};
use anyhow::{Result, bail};
use std::process::Command;

const IPROUTE2: Package = Package {
    name: "iproute2",
    rpm_name: "iproute",
    brew: false,
};

fn ip_works() -> bool {
    Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
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
    let Some((_, commands)) = system_package::install_commands(&IPROUTE2) else {
        println!(
            "setup: `ip` (iproute2) not found and no known package manager: the two-node test \
             will be skipped"
        );
        return Ok(());
    };
    println!("setup: `ip` not found; installing iproute2 (for the two-node training test)");
    system_package::run(&commands, "iproute2 for the two-node test", "")?;
    if !ip_works() {
        bail!("iproute2 was installed, but `ip -V` still does not run: is it on PATH?");
    }
    Ok(())
}
