//! Converts Chinese-CLIP weights between formats: an official cn_clip `.pt`, a Hugging Face
//! `ChineseCLIPModel` directory or a native file in; a native file (safetensors + config, what the
//! other tools load fastest) or an official-layout `.pt` (loadable by cn_clip's scripts) out.
//!
//! ```sh
//! # the architecture of an official .pt is read from its tensor shapes (ViT-B-16@RoBERTa-…-base)
//! cargo run --release --example convert -- --input clip_cn_vit-b-16.pt --output vit-b-16.safetensors
//! cargo run --release --example convert -- --input OFA-Sys/chinese-clip-vit-base-patch16 --output b16.safetensors
//! cargo run --release --example convert -- --input soup.safetensors --output soup.pt --format pt
//! ```
//! The conversion is checked: the written file is read back and compared tensor by tensor.

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::model::weights::PtHeader;
use cnclip::model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Convert Chinese-CLIP weights: official .pt / Hugging Face / native → native or .pt"
)]
struct Args {
    /// Official `.pt`, Hugging Face directory or native `.safetensors`.
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// native (safetensors with the config inside) or pt (cn_clip's checkpoint layout).
    #[arg(long, default_value = "native", value_parser = ["native", "pt"])]
    format: String,
    /// For an official `.pt` whose shapes match no shipped model (a shipped name or a JSON file in
    /// cn_clip's schema); otherwise read from the weights.
    #[arg(long = "vision-model")]
    vision_model: Option<String>,
    #[arg(long = "text-model")]
    text_model: Option<String>,
    /// The `name` written into a `.pt` header.
    #[arg(long, default_value = "cnclip")]
    name: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let format = WeightFormat::detect(&args.input)?;
    // A .pt carries no config: without the flags its architecture is read from its shapes.
    let config = ClipConfig::from_optional_tower_args(
        args.vision_model.as_deref(),
        args.text_model.as_deref(),
    )?;
    let options = LoadOptions {
        config,
        ..Default::default()
    };
    let model = Clip::load(&args.input, &options, tch::Device::Cpu)
        .with_context(|| format!("loading {}", args.input.display()))?;
    if args.output.exists() && args.output.canonicalize()? == args.input.canonicalize()? {
        bail!("--output must differ from --input");
    }
    match args.format.as_str() {
        "pt" => model.export_pt(
            &args.output,
            &PtHeader {
                epoch: 0,
                step: 0,
                name: args.name.clone(),
            },
        )?,
        _ => model.save_native(&args.output)?,
    }
    // Read the result back the way every other tool will and compare.
    let check_options = LoadOptions {
        config: Some(model.config().clone()),
        ..Default::default()
    };
    let back = Clip::load(&args.output, &check_options, tch::Device::Cpu)
        .with_context(|| format!("reading back {}", args.output.display()))?;
    let (a, b) = (model.named_tensors(), back.named_tensors());
    for (key, tensor) in &a {
        let other = b
            .get(key)
            .with_context(|| format!("{} lacks {key}", args.output.display()))?;
        if !tensor.equal(other) {
            bail!(
                "{}: {key} differs after the round trip",
                args.output.display()
            );
        }
    }
    let numbers: usize = a.values().map(|t| t.numel()).sum();
    println!(
        "{} ({:?}) → {} ({}): {} tensors, {numbers} numbers, verified",
        args.input.display(),
        format,
        args.output.display(),
        args.format,
        a.len()
    );
    Ok(())
}
