//! Gradient all-reduce cost of DDP over Gloo: two ranks as two processes on 127.0.0.1 (this binary
//! re-executes itself), each syncing a gradient set shaped like a model's parameters through
//! [`cnclip_train::ddp::BucketedAllReduce`] at several bucket sizes, and a plain
//! `ProcessGroup::all_reduce` of one flat buffer of the same size for comparison.
//!
//! ```text
//! cargo bench -p cnclip-train --bench allreduce -- [MODEL] [ITERS]     # default ViT-B-16 3
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result};
use cnclip_model::{Clip, ClipConfig};
use cnclip_train::ddp::{Ddp, DistEnv, GatherMode};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use torch_ext::dist::{Backend, ReduceOp};

fn worker(model: &str, iters: usize) -> Result<()> {
    let env = DistEnv::from_env()?.context("no RANK/WORLD_SIZE")?;
    let shapes: Vec<Vec<i64>> = {
        let config = ClipConfig::from_name(model)?;
        let clip = tch::no_grad(|| Clip::new(&config, Device::Cpu));
        clip.named_tensors().values().map(Tensor::size).collect()
    };
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu)))
        .collect();
    let numel: i64 = grads.iter().map(Tensor::numel).sum::<usize>() as i64;
    let mb = numel as f64 * 4.0 / 1e6;
    let timeout = Duration::from_secs(600);
    let report = |what: &str, times: &[f64]| {
        if env.rank == 0 {
            let best = times.iter().copied().fold(f64::INFINITY, f64::min);
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            println!(
                "{model} | {} tensors, {mb:.0} MB | {what:<28} | best {best:.3} s, mean {mean:.3} s | {:.0} MB/s",
                grads.len(),
                mb / best
            );
        }
    };
    let mut ddp = Ddp::init(&env, Backend::Gloo, timeout, GatherMode::Aggregate)?;
    for (label, bytes) in [
        ("buckets of 1 MB", 1 << 20),
        ("buckets of 25 MB (default)", 25 << 20),
        ("buckets of 100 MB", 100 << 20),
        ("one collective per tensor", 1),
    ] {
        ddp = ddp.with_bucket_bytes(bytes);
        let sync = ddp.gradient_sync();
        let mut times = Vec::new();
        for _ in 0..iters {
            ddp.barrier()?;
            let start = Instant::now();
            sync.sync(&grads)?;
            times.push(start.elapsed().as_secs_f64());
        }
        report(label, &times);
    }
    let flat = Tensor::ones([numel], (Kind::Float, Device::Cpu));
    let mut times = Vec::new();
    for _ in 0..iters {
        ddp.barrier()?;
        let start = Instant::now();
        ddp.group().all_reduce(&[&flat], ReduceOp::Sum)?;
        times.push(start.elapsed().as_secs_f64());
    }
    report("one flat all_reduce (bound)", &times);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let model = args.first().cloned().unwrap_or_else(|| "ViT-B-16".into());
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    if std::env::var_os("RANK").is_some() {
        return worker(&model, iters);
    }
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut children = Vec::new();
    for rank in 0..2 {
        children.push(
            Command::new(&exe)
                .args([&model, &iters.to_string()])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("OMP_NUM_THREADS", "1")
                .spawn()?,
        );
    }
    for mut c in children {
        anyhow::ensure!(c.wait()?.success(), "a worker failed");
    }
    Ok(())
}
