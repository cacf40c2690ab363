//! Training throughput: optimizer steps per second of the Trainer (forward, contrastive loss,
//! backward, AdamW) on random data, for comparison with `scripts/bench/cnclip_train_step.py`
//! (cn_clip's model with its loss, parameter groups and precision handling, same shapes).
//!
//! `cargo bench --bench train_step -- [--model ViT-B-16] [--batch 32] [--iters 5] [--device cpu]
//!  [--precision fp32|amp|bf16|fp16] [--grad-checkpointing] [--threads 2]`

use cnclip::model::{Clip, ClipConfig};
use cnclip::train::freeze::Freeze;
use cnclip::train::optim::AdamWConfig;
use cnclip::train::schedule::CosineSchedule;
use cnclip::train::trainer::{TrainPrecision, Trainer, TrainerConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let mut model_name = "ViT-B-16".to_string();
    let (mut batch, mut iters, mut threads) = (32i64, 5u32, 2i32);
    let (mut device_arg, mut precision_arg, mut checkpointing) =
        ("cpu".to_string(), "fp32".to_string(), false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--model" => model_name = value()?,
            "--batch" => batch = value()?.parse()?,
            "--iters" => iters = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--device" => device_arg = value()?,
            "--precision" => precision_arg = value()?,
            "--grad-checkpointing" => checkpointing = true,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // Resolve the device first: loading libtorch's CUDA half must precede other torch calls.
    let device = cnclip::torch_ext::parse_device(&device_arg)?;
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let precision = match precision_arg.as_str() {
        "fp32" => TrainPrecision::Fp32,
        "amp" => TrainPrecision::Amp,
        "bf16" => TrainPrecision::Bf16,
        "fp16" => TrainPrecision::Fp16,
        other => anyhow::bail!("--precision {other}: expected fp32, amp, bf16 or fp16"),
    };
    let config = ClipConfig::from_name(&model_name)?;
    let model = Clip::new(&config, device);
    let trainer_config = TrainerConfig {
        schedule: CosineSchedule {
            base_lr: 5e-5,
            warmup: 1,
            total_steps: u64::from(iters) + 1,
        },
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.001,
        },
        accum_freq: 1,
        freeze: Freeze::NONE,
        dropout_seed: None,
        grad_checkpointing: checkpointing,
        precision,
        mask_ratio: 0.0,
    };
    let mut trainer = Trainer::new(model, trainer_config);
    let res = config.vision.image_resolution;
    let images = Tensor::randn([batch, 3, res, res], (Kind::Float, device));
    let texts = Tensor::randint_low(672, 8000, [batch, 52], (Kind::Int64, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    trainer.train_batch(&images, &texts)?; // warm-up
    sync();
    let start = Instant::now();
    for _ in 0..iters {
        trainer.train_batch(&images, &texts)?;
    }
    sync();
    let seconds = start.elapsed().as_secs_f64() / f64::from(iters);
    println!(
        "{{\"impl\":\"cnclip\",\"model\":\"{model_name}\",\"device\":\"{device_arg}\",\"precision\":\"{precision_arg}\",\"grad_checkpointing\":{checkpointing},\"batch\":{batch},\"threads\":{threads},\"steps_per_s\":{:.4},\"samples_per_s\":{:.2}}}",
        1.0 / seconds,
        batch as f64 / seconds
    );
    Ok(())
}
