//! Image- and text-encoding throughput on the CPU, fp32 and bf16, for comparison with cn_clip
//! (`scripts/bench/cnclip_encode.py` measures the reference on the same shapes and threads).
//!
//! `cargo bench --bench encode -- [--model ViT-B-16] [--batch 16] [--threads 2] [--iters 3] [--device cpu|cuda]`
//! Weights are random: speed does not depend on their values. Prints one JSON line per measurement.

use cnclip::model::config::ClipConfig;
use cnclip::model::model::{Clip, Precision};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

struct Args {
    model: String,
    batch: i64,
    threads: i32,
    iters: u32,
    device: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: "ViT-B-16".into(),
        batch: 16,
        threads: 2,
        iters: 3,
        device: "cpu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--model" => args.model = value()?,
            "--batch" => args.batch = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--iters" => args.iters = value()?.parse()?,
            "--device" => args.device = value()?,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Mean seconds per call after one warm-up; `sync` waits for queued GPU work so the clock is honest.
fn timed(iters: u32, sync: impl Fn(), mut f: impl FnMut()) -> f64 {
    f();
    sync();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync();
    start.elapsed().as_secs_f64() / f64::from(iters)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Resolve the device first: loading libtorch's CUDA half must precede every other torch call.
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    tch::set_num_threads(args.threads);
    tch::manual_seed(0);
    let config = ClipConfig::from_name(&args.model)?;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut model = Clip::new(&config, device);
    let res = config.vision.image_resolution;
    let images = Tensor::randn([args.batch, 3, res, res], (Kind::Float, device));
    let mut ids = vec![
        101i64, 6821, 3221, 671, 2476, 1745, 4275, 8024, 7027, 7481, 2100, 1762, 1555, 1501, 8038,
    ];
    ids.extend([1957, 1894, 1909, 1075, 3173, 3621, 6825, 6132, 6170, 102]);
    ids.resize(52, 0);
    let texts = Tensor::from_slice(&ids)
        .view([1, 52])
        .repeat([args.batch, 1])
        .to_device(device);
    let modes: &[(&str, Precision)] = if device == Device::Cpu {
        &[("fp32", Precision::Fp32), ("bf16", Precision::Bf16)]
    } else {
        &[
            ("fp32", Precision::Fp32),
            ("fp16", Precision::Fp16),
            ("bf16", Precision::Bf16),
        ]
    };
    let _guard = tch::no_grad_guard();
    for &(mode, precision) in modes {
        model.set_precision(precision);
        let report = |what: &str, seconds: f64| {
            println!(
                "{{\"impl\":\"cnclip\",\"model\":\"{}\",\"device\":\"{}\",\"what\":\"{what}\",\"mode\":\"{mode}\",\"batch\":{},\"threads\":{},\"per_s\":{:.3},\"s_per_batch\":{:.4}}}",
                args.model,
                args.device,
                args.batch,
                args.threads,
                args.batch as f64 / seconds,
                seconds
            );
        };
        report(
            "image",
            timed(args.iters, sync, || drop(model.encode_image(&images))),
        );
        report(
            "text",
            timed(args.iters, sync, || drop(model.encode_text(&texts))),
        );
    }
    Ok(())
}
