//! DDP training-step time over Gloo, torch's reducer (all-reduce from autograd hooks, overlapping
//! the backward pass) against the post-backward bucketed all-reduce it replaced: two ranks as two
//! processes on 127.0.0.1 (this binary re-executes itself), one intra-op thread each, the same
//! model, batch and trainer; only the gradient synchronisation differs. The old synchronisation
//! lives on here only, as the baseline: after backward, the gradients in reverse parameter order
//! are flattened into persistent ~25 MB buffers, each all-reduced (sum) and divided by the world
//! size back into the gradients.
//!
//! ```text
//! cargo bench -p cnclip-train --bench ddp_step -- [MODEL] [BATCH] [STEPS] [ROUNDS]
//!     # default ViT-B-16 2 4 1: 2 images+texts per rank, STEPS steps (the first not timed),
//!     # each engine ROUNDS times, alternating
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result};
use cnclip_model::{Clip, ClipConfig};
use cnclip_train::ddp::{Ddp, DistEnv, GatherMode};
use cnclip_train::freeze::Freeze;
use cnclip_train::optim::AdamWConfig;
use cnclip_train::schedule::CosineSchedule;
use cnclip_train::trainer::{GradientSync, TrainPrecision, Trainer, TrainerConfig};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use torch_ext::dist::{Backend, DistError, ProcessGroup, ReduceOp};

const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The replaced engine: bucketed all-reduce after the whole backward pass.
struct PostBackward {
    group: Arc<ProcessGroup>,
    params: Vec<Tensor>,
    buffers: Mutex<Vec<Tensor>>,
}

impl GradientSync for PostBackward {
    fn before_backward(&self, _: bool, _: Option<&[&Tensor]>) -> Result<(), DistError> {
        Ok(())
    }

    fn after_backward(&self) -> Result<(), DistError> {
        let grads: Vec<Tensor> = self.params.iter().rev().map(Tensor::grad).collect();
        let mut buckets: Vec<Vec<Tensor>> = Vec::new();
        let mut size = 0;
        for g in grads.iter().filter(|g| g.defined()) {
            let bytes = g.numel() * g.kind().elt_size_in_bytes();
            if buckets.is_empty() || size + bytes > BUCKET_BYTES {
                buckets.push(Vec::new());
                size = 0;
            }
            size += bytes;
            buckets.last_mut().unwrap().push(g.shallow_clone());
        }
        let mut buffers = self.buffers.lock().unwrap();
        let world = self.group.size() as f64;
        for (i, bucket) in buckets.iter().enumerate() {
            let numel: usize = bucket.iter().map(Tensor::numel).sum();
            if buffers.get(i).is_none_or(|b| b.numel() != numel) {
                let fresh = Tensor::empty([numel as i64], (Kind::Float, Device::Cpu));
                match buffers.get_mut(i) {
                    Some(slot) => *slot = fresh,
                    None => buffers.push(fresh),
                }
            }
            let flat = &buffers[i];
            tch::no_grad(|| {
                let parts: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
                let _ = Tensor::cat_out(flat, &parts, 0);
            });
            self.group.all_reduce(&[flat], ReduceOp::Sum)?;
            tch::no_grad(|| {
                let mut offset = 0;
                for g in bucket {
                    let n = g.numel() as i64;
                    let _ = flat
                        .narrow(0, offset, n)
                        .view(g.size().as_slice())
                        .div_scalar_out(g, world);
                    offset += n;
                }
            });
        }
        Ok(())
    }
}

fn worker(engine: &str, model: &str, batch: i64, steps: usize) -> Result<()> {
    tch::set_num_threads(1);
    let env = DistEnv::from_env()?.context("no RANK/WORLD_SIZE")?;
    let ddp = Ddp::init(
        &env,
        Backend::Gloo,
        Duration::from_secs(1200),
        GatherMode::Aggregate,
    )?;
    tch::manual_seed(1);
    let config = ClipConfig::from_name(model)?;
    let clip = Clip::new(&config, Device::Cpu);
    ddp.broadcast_model(&clip)?;
    let trainer_config = TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 1e-5,
            warmup: 0,
            total_steps: 1000,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.001,
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: Some(1),
        grad_checkpointing: false,
        precision: TrainPrecision::Fp32,
        mask_ratio: 0.0,
    };
    let mut trainer = Trainer::with_gather(clip, trainer_config, ddp.gather());
    let sync: Box<dyn GradientSync> = match engine {
        "reducer" => ddp.gradient_sync(trainer.model())?,
        _ => Box::new(PostBackward {
            group: ddp.process_group(),
            params: trainer.model().var_store().trainable_variables(),
            buffers: Mutex::new(Vec::new()),
        }),
    };
    trainer.set_gradient_sync(sync);
    let side = config.vision.image_resolution;
    tch::manual_seed(2 + env.rank as i64);
    let images = Tensor::randn([batch, 3, side, side], (Kind::Float, Device::Cpu));
    let texts = Tensor::randint_low(1, 1000, [batch, 52], (Kind::Int64, Device::Cpu));
    let mut times = Vec::new();
    for _ in 0..steps {
        ddp.barrier()?;
        let start = Instant::now();
        trainer.train_batch(&images, &texts)?;
        times.push(start.elapsed().as_secs_f64());
    }
    if env.rank == 0 {
        let timed = &mut times[1..];
        timed.sort_by(f64::total_cmp);
        let median = timed[timed.len() / 2];
        println!("RESULT {engine} {median:.3} {timed:?}");
    }
    Ok(())
}

fn run_pair(engine: &str, args: &[String]) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let port = cnclip_train::ddp::launch::free_port()?;
    let children: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .arg("worker")
                .arg(engine)
                .args(args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut median = None;
    for child in children {
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "a {engine} worker failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(rest) = line.strip_prefix("RESULT ") {
                println!("  {rest}");
                median = rest.split(' ').nth(1).and_then(|m| m.parse().ok());
            }
        }
    }
    median.context("rank 0 reported no result")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("worker") {
        let engine = args.get(1).context("engine")?;
        let model = args.get(2).context("model")?;
        let batch = args.get(3).context("batch")?.parse()?;
        let steps: usize = args.get(4).context("steps")?.parse()?;
        anyhow::ensure!(
            steps >= 2,
            "STEPS must be at least 2 (the first is not timed)"
        );
        return worker(engine, model, batch, steps);
    }
    let model = args.first().cloned().unwrap_or_else(|| "ViT-B-16".into());
    let batch = args.get(1).cloned().unwrap_or_else(|| "2".into());
    let steps = args.get(2).cloned().unwrap_or_else(|| "4".into());
    let rounds: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let pass = [model.clone(), batch.clone(), steps.clone()];
    let mut results: Vec<(&str, f64)> = Vec::new();
    for _ in 0..rounds {
        for engine in ["post-backward", "reducer"] {
            let median = run_pair(engine, &pass)?;
            println!("{model}, batch {batch}/rank, {engine}: median step {median:.3} s");
            results.push((engine, median));
        }
    }
    let mean = |e: &str| {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == e).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "reducer / post-backward step time: {:.3}",
        mean("reducer") / mean("post-backward")
    );
    Ok(())
}
