//! What unmerged adapters cost at inference, and what merging gives back: ViT-B-16 +
//! RoBERTa-base (random weights) encoding a batch of images and texts, plain, with `all` adapters
//! of rank 8 attached, and with them merged.
//!
//! ```text
//! cargo bench -p cnclip-lora --bench overhead -- [BATCH] [ITERS] [TARGETS]
//! ```
//! CPU only (the crate does not load CUDA). Prints the median seconds per batch of each variant.

use cnclip_lora::LoraConfig;
use cnclip_model::{Clip, ClipConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(model: &Clip, images: &Tensor, ids: &Tensor) -> f64 {
    let t = Instant::now();
    tch::no_grad(|| {
        let _ = (model.encode_image(images), model.encode_text(ids));
    });
    t.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let batch: i64 = args.first().map_or(Ok(8), |a| a.parse())?;
    let iters: usize = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let targets = args.get(2).map_or("all", String::as_str).to_string();
    let config = ClipConfig::from_name("ViT-B-16")?;
    tch::manual_seed(0);
    let plain = Clip::new(&config, Device::Cpu);
    let mut adapted = Clip::new(&config, Device::Cpu);
    adapted.load_named(plain.state_dict().iter(), false)?;
    let lora = LoraConfig {
        rank: 8,
        targets: targets.split(',').map(str::to_string).collect(),
        ..Default::default()
    };
    cnclip_lora::inject(&mut adapted, &lora)?;
    let images = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(672, 8000, [batch, 52], (Kind::Int64, Device::Cpu));
    println!(
        "ViT-B-16, batch {batch} images + {batch} texts of 52 tokens, {} CPU threads, \
         `{targets}` adapters of rank 8, median of {iters} rounds (variants interleaved)",
        tch::get_num_threads()
    );
    // Warm-up, then rounds of plain / attached / merged, so that load on the machine hits all three.
    let _ = time(&plain, &images, &ids);
    let _ = time(&adapted, &images, &ids);
    let (mut p, mut a, mut m) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        p.push(time(&plain, &images, &ids));
        a.push(time(&adapted, &images, &ids));
        cnclip_lora::merge(&adapted)?;
        m.push(time(&adapted, &images, &ids));
        cnclip_lora::unmerge(&adapted)?;
    }
    let (p, a, m) = (median(p), median(a), median(m));
    println!("plain model        {p:.3} s");
    println!(
        "adapters attached  {a:.3} s  ({:+.1} %)",
        100.0 * (a / p - 1.0)
    );
    println!(
        "adapters merged    {m:.3} s  ({:+.1} %)",
        100.0 * (m / p - 1.0)
    );
    Ok(())
}
