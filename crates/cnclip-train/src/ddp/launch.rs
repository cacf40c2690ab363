//! Our own `--nproc-per-node N`: spawn `N` workers of a program with torchrun's environment and
//! supervise them. When one fails, the others are killed at once and the launcher returns that
//! worker's error (its exit status and last lines of stderr), so a crash never leaves the others
//! blocked in a collective. Multi-node: run the same command on every node with `--nnodes` and
//! `--node-rank` and the same master address and port.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Set in every worker's environment, so a worker running the same command line does not launch
/// again.
pub const LAUNCHED_VAR: &str = "CNCLIP_LAUNCHED";

/// Lines of a failed worker's stderr kept for the error.
const TAIL_LINES: usize = 20;

#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start worker {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for worker {rank} failed: {source}")]
    Wait { rank: usize, source: std::io::Error },
    #[error(
        "worker {rank} (local rank {local_rank}) failed with {status}; the other workers were stopped.{tail}"
    )]
    WorkerFailed {
        rank: usize,
        local_rank: usize,
        status: ExitStatus,
        /// Its last lines of stderr, each on its own line.
        tail: String,
    },
    #[error("--node-rank {node_rank} is not below --nnodes {nnodes}, or a count is zero")]
    Layout { node_rank: usize, nnodes: usize },
    #[error(
        "--nproc-per-node launches workers itself; it cannot run under torchrun or srun, which \
         already set RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS)"
    )]
    Nested,
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
}

struct Worker {
    rank: usize,
    local_rank: usize,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    forwarder: Option<std::thread::JoinHandle<()>>,
}

/// Runs the workers to completion: `Ok` when all exit successfully, otherwise the first failure.
pub fn launch(config: &LaunchConfig) -> Result<(), LaunchError> {
    if config.nnodes == 0 || config.nproc_per_node == 0 || config.node_rank >= config.nnodes {
        return Err(LaunchError::Layout {
            node_rank: config.node_rank,
            nnodes: config.nnodes,
        });
    }
    let world_size = config.nnodes * config.nproc_per_node;
    let mut workers: Vec<Worker> = Vec::with_capacity(config.nproc_per_node);
    for local_rank in 0..config.nproc_per_node {
        let rank = config.node_rank * config.nproc_per_node + local_rank;
        let spawned = Command::new(&config.program)
            .args(&config.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_WORLD_SIZE", config.nproc_per_node.to_string())
            .env("GROUP_RANK", config.node_rank.to_string())
            .env("MASTER_ADDR", &config.master_addr)
            .env("MASTER_PORT", config.master_port.to_string())
            .env(LAUNCHED_VAR, "1")
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                stop_all(&mut workers);
                return Err(LaunchError::Spawn {
                    rank,
                    program: config.program.clone(),
                    source,
                });
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let forwarder = child.stderr.take().map(|stderr| {
            let tail = tail.clone();
            std::thread::spawn(move || forward(stderr, &tail))
        });
        workers.push(Worker {
            rank,
            local_rank,
            child,
            tail,
            forwarder,
        });
    }
    supervise(workers)
}

/// Copies a worker's stderr to ours, keeping its last lines.
fn forward(stderr: impl std::io::Read, tail: &Mutex<VecDeque<String>>) {
    let mut err = std::io::stderr();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(err, "{line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

fn supervise(mut workers: Vec<Worker>) -> Result<(), LaunchError> {
    let mut running = workers.len();
    let mut done = vec![false; workers.len()];
    while running > 0 {
        for i in 0..workers.len() {
            if done[i] {
                continue;
            }
            let status = match workers[i].child.try_wait() {
                Ok(status) => status,
                Err(source) => {
                    let rank = workers[i].rank;
                    stop_all(&mut workers);
                    return Err(LaunchError::Wait { rank, source });
                }
            };
            let Some(status) = status else { continue };
            done[i] = true;
            running -= 1;
            if !status.success() {
                let mut failed = workers.swap_remove(i);
                stop_all(&mut workers);
                if let Some(handle) = failed.forwarder.take() {
                    let _ = handle.join();
                }
                let tail = failed
                    .tail
                    .lock()
                    .map(|t| t.iter().map(|l| format!("\n  {l}")).collect::<String>())
                    .unwrap_or_default();
                let tail = if tail.is_empty() {
                    tail
                } else {
                    format!(" Its last stderr lines:{tail}")
                };
                return Err(LaunchError::WorkerFailed {
                    rank: failed.rank,
                    local_rank: failed.local_rank,
                    status,
                    tail,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in &mut workers {
        if let Some(handle) = w.forwarder.take() {
            let _ = handle.join();
        }
    }
    Ok(())
}

/// Kills and reaps every worker still running.
fn stop_all(workers: &mut [Worker]) {
    for w in workers.iter_mut() {
        if matches!(w.child.try_wait(), Ok(None)) {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
    for w in workers.iter_mut() {
        if let Some(handle) = w.forwarder.take() {
            let _ = handle.join();
        }
    }
}

/// What a program given [`cnclip_train_config::LaunchArgs`] does first: with `--nproc-per-node`
/// and not yet a launched worker, re-runs its own command line as the workers (free local port
/// unless `--master-port`, 29500 across nodes) and returns `Ok(true)` once they all finished;
/// otherwise `Ok(false)`, and the caller does the work itself (alone or as the rank its
/// environment names).
pub fn relaunch_self(args: &cnclip_train_config::LaunchArgs) -> Result<bool, LaunchError> {
    let launched = std::env::var_os(LAUNCHED_VAR).is_some();
    let Some(nproc) = args.nproc_per_node.filter(|_| !launched) else {
        return Ok(false);
    };
    if matches!(super::DistEnv::from_env(), Ok(Some(_))) {
        return Err(LaunchError::Nested);
    }
    let master_port = match (args.master_port, args.nnodes) {
        (Some(port), _) => port,
        (None, 1) => free_port().map_err(|source| LaunchError::Setup {
            what: "cannot find a free local port for the rendezvous",
            source,
        })?,
        (None, _) => super::env::DEFAULT_MASTER_PORT,
    };
    let program = std::env::current_exe().map_err(|source| LaunchError::Setup {
        what: "cannot find this program to launch workers",
        source,
    })?;
    launch(&LaunchConfig {
        program,
        args: std::env::args_os().skip(1).collect(),
        nproc_per_node: nproc,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port,
    })?;
    Ok(true)
}

/// A port that was free a moment ago on `127.0.0.1` (for single-node runs without `MASTER_PORT`).
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}
