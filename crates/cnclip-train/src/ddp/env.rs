//! Who this process is in a distributed run, from the launcher's environment: torchrun (and our
//! own [`super::launch`]) set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`; Slurm's `srun` sets `SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID` and the node list. torchrun's variables win when both are present (torchrun
//! started inside an allocation).

use std::net::Ipv4Addr;
use torch_ext::dist::GlooDevice;

/// Port torch.distributed uses when none is given.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`), so
    /// rank 0 only connects to it.
    pub agent_store: bool,
    /// `GLOO_SOCKET_IFNAME`: the interface Gloo binds to (multi-node runs with several NICs).
    pub gloo_interface: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {name}={value:?} is not {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("environment variable {0} is required for a distributed run but not set")]
    Missing(&'static str),
    #[error("rank {rank} is outside the world of {world_size} (from {source_vars})")]
    Rank {
        rank: usize,
        world_size: usize,
        source_vars: &'static str,
    },
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, EnvError> {
    match get(name) {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| EnvError::Invalid {
                name,
                value,
                expected,
            }),
    }
}

impl DistEnv {
    /// The distributed run this process belongs to, or `None` when no launcher set one up.
    pub fn from_env() -> Result<Option<Self>, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (tests, `env -i` style launches).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, EnvError> {
        let count = "a non-negative integer";
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let gloo_interface = get("GLOO_SOCKET_IFNAME").filter(|v| !v.is_empty());
        let port = parse::<u16>(&get, "MASTER_PORT", "a port number")?;
        let env = if let Some(rank) = parse::<usize>(&get, "RANK", count)? {
            let world_size = parse::<usize>(&get, "WORLD_SIZE", count)?
                .ok_or(EnvError::Missing("WORLD_SIZE"))?;
            let local_rank = parse::<usize>(&get, "LOCAL_RANK", count)?.unwrap_or(rank);
            let local_world_size =
                parse::<usize>(&get, "LOCAL_WORLD_SIZE", count)?.unwrap_or(world_size);
            let master_addr = get("MASTER_ADDR").ok_or(EnvError::Missing("MASTER_ADDR"))?;
            let master_port = port.ok_or(EnvError::Missing("MASTER_PORT"))?;
            Self::checked(
                DistEnv {
                    rank,
                    world_size,
                    local_rank,
                    local_world_size,
                    master_addr,
                    master_port,
                    agent_store,
                    gloo_interface,
                },
                "RANK/WORLD_SIZE",
            )?
        } else if let (Some(rank), Some(world_size)) = (
            parse::<usize>(&get, "SLURM_PROCID", count)?,
            parse::<usize>(&get, "SLURM_NTASKS", count)?,
        ) {
            if world_size <= 1 {
                return Ok(None);
            }
            let local_rank = parse::<usize>(&get, "SLURM_LOCALID", count)?.unwrap_or(0);
            // "4" or "4(x2)": tasks on each node.
            let local_world_size = get("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split('(').next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(world_size);
            let master_addr = match get("MASTER_ADDR") {
                Some(addr) => addr,
                None => get("SLURM_JOB_NODELIST")
                    .or_else(|| get("SLURM_NODELIST"))
                    .and_then(|list| first_host(&list))
                    .ok_or(EnvError::Missing("MASTER_ADDR (or SLURM_JOB_NODELIST)"))?,
            };
            Self::checked(
                DistEnv {
                    rank,
                    world_size,
                    local_rank,
                    local_world_size,
                    master_addr,
                    master_port: port.unwrap_or(DEFAULT_MASTER_PORT),
                    agent_store: false,
                    gloo_interface,
                },
                "SLURM_PROCID/SLURM_NTASKS",
            )?
        } else {
            return Ok(None);
        };
        Ok(Some(env))
    }

    fn checked(env: DistEnv, source_vars: &'static str) -> Result<DistEnv, EnvError> {
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(EnvError::Rank {
                rank: env.rank,
                world_size: env.world_size,
                source_vars,
            });
        }
        Ok(env)
    }

    /// This rank's device for a requested `device`: a CUDA device becomes `cuda:LOCAL_RANK` (one
    /// GPU per local rank, torchrun's convention); the CPU stays the CPU.
    pub fn rank_device(dist: Option<&DistEnv>, device: tch::Device) -> tch::Device {
        match (dist, device) {
            (Some(env), tch::Device::Cuda(_)) => tch::Device::Cuda(env.local_rank),
            (_, device) => device,
        }
    }

    /// Where Gloo binds: `GLOO_SOCKET_IFNAME` when set; loopback when the master is local (all
    /// ranks on this host); otherwise this host's name, as torch.distributed does.
    pub fn gloo_device(&self) -> GlooDevice {
        if let Some(interface) = &self.gloo_interface {
            return GlooDevice::Interface(interface.clone());
        }
        let loopback = self.master_addr == "localhost"
            || self
                .master_addr
                .parse::<Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback());
        if loopback {
            GlooDevice::Hostname("127.0.0.1".into())
        } else {
            GlooDevice::Default
        }
    }
}

/// The first host of a Slurm node list: `node[03-05,9],gpu1` → `node03`.
fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first = inner.split([',', '-', ']']).next()?;
        Some(format!("{prefix}{first}"))
    } else if prefix.is_empty() {
        None
    } else {
        Some(prefix.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() {
        let env = DistEnv::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (3, 8, 1));
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("10.0.0.1", 29400)
        );
        assert!(env.agent_store);
        assert_eq!(env.gloo_device(), GlooDevice::Default);
    }

    #[test]
    fn slurm_variables() {
        let env = DistEnv::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08],cpu1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (5, 8, 1));
        assert_eq!(env.local_world_size, 4);
        assert_eq!(env.master_addr, "gpu07");
        assert_eq!(env.master_port, DEFAULT_MASTER_PORT);
    }

    #[test]
    fn none_without_a_launcher_and_errors_name_the_variable() {
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            DistEnv::from_vars(vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(),
            None
        );
        let err = DistEnv::from_vars(vars(&[("RANK", "x")])).unwrap_err();
        assert!(err.to_string().contains("RANK=\"x\""), "{err}");
        let err = DistEnv::from_vars(vars(&[("RANK", "0")])).unwrap_err();
        assert_eq!(err, EnvError::Missing("WORLD_SIZE"));
        let err = DistEnv::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(matches!(err, EnvError::Rank { rank: 2, .. }), "{err}");
    }

    #[test]
    fn loopback_masters_bind_gloo_to_loopback() {
        let env = DistEnv::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(env.gloo_device(), GlooDevice::Hostname("127.0.0.1".into()));
        assert_eq!(first_host("node1"), Some("node1".into()));
    }
}
