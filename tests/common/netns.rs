//! Two "machines" on one host for multi-node tests: two network namespaces joined by a veth pair,
//! `10.77.0.1/24` and `10.77.0.2/24`, `lo` up in each. Commands run in node `k` through
//! `ip netns exec`; they share the file system, so both nodes see the same data and output paths.
//! [`NodePair`] deletes its namespaces (and with them the veth pair) when dropped, also when the
//! test panics.
#![allow(dead_code)]

use std::process::Command;

/// The two nodes' addresses on the veth link.
pub const ADDRESSES: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

/// Two network namespaces linked by a veth pair.
#[derive(Debug)]
pub struct NodePair {
    namespaces: [String; 2],
    interfaces: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NodePair {
    /// Creates the pair, named after `tag` and this process. `Err(reason)` when this machine cannot
    /// create network namespaces at all (no `ip`, not root, no CAP_SYS_ADMIN): the caller skips.
    /// Any failure after the namespaces exist is a broken setup and panics (after cleaning up).
    pub fn create(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let namespaces = [0, 1].map(|k| format!("cnclip-{tag}-{id}-{k}"));
        // Interface names are at most 15 bytes.
        let interfaces = [0, 1].map(|k| format!("cnv{}{k}", id % 10_000_000));
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("`ip` (iproute2) is not installed; `cargo xtask setup` installs it".into());
        }
        ip(&["netns", "add", &namespaces[0]])
            .map_err(|e| format!("cannot create network namespaces (root needed): {e}"))?;
        // From here on Drop cleans up whatever exists.
        let pair = Self {
            namespaces,
            interfaces,
        };
        if let Err(e) = pair.link() {
            panic!("setting up the namespace pair failed: {e}");
        }
        Ok(pair)
    }

    fn link(&self) -> Result<(), String> {
        let [n0, n1] = &self.namespaces;
        let [i0, i1] = &self.interfaces;
        ip(&["netns", "add", n1])?;
        ip(&[
            "link", "add", i0, "netns", n0, "type", "veth", "peer", "name", i1, "netns", n1,
        ])?;
        for ((ns, iface), address) in self.namespaces.iter().zip(&self.interfaces).zip(ADDRESSES) {
            let cidr = format!("{address}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", iface])?;
            ip(&["-n", ns, "link", "set", iface, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Node `k`'s address.
    pub fn address(&self, k: usize) -> &'static str {
        ADDRESSES[k]
    }

    /// Node `k`'s end of the veth pair (e.g. for `GLOO_SOCKET_IFNAME`).
    pub fn interface(&self, k: usize) -> &str {
        &self.interfaces[k]
    }

    /// `program` to run in node `k` (`ip netns exec NS program`); add arguments and environment
    /// as for any command.
    pub fn command(&self, k: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespaces[k]])
            .arg(program);
        cmd
    }
}

impl Drop for NodePair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of the veth pair, which destroys the other end.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
