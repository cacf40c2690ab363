//! Converts Chinese-CLIP weights between formats: an official cn_clip `.pt`, a Hugging Face
//! `ChineseCLIPModel` directory, a native file or a LoRA adapter (merged onto `--lora-base`) in;
//! a native file (safetensors + config, what the other tools load fastest), an official-layout
//! `.pt` (loadable by cn_clip's scripts), a Hugging Face directory (`transformers`'
//! `ChineseCLIPModel` + `ChineseCLIPProcessor`) or a PEFT adapter directory out.
//!
//! ```sh
//! # the architecture of an official .pt is read from its tensor shapes (ViT-B-16@RoBERTa-…-base)
//! cargo run --release --example convert -- --input clip_cn_vit-b-16.pt --output vit-b-16.safetensors
//! cargo run --release --example convert -- --input OFA-Sys/chinese-clip-vit-base-patch16 --output b16.safetensors
//! cargo run --release --example convert -- --input soup.safetensors --output soup.pt --format pt
//! cargo run --release --example convert -- --input epoch3.safetensors --output my-clip --format hf
//! cargo run --release --example convert -- --input logs/lora/checkpoints/epoch3.safetensors --lora-base b16.safetensors \
//!     --output my-adapter --format peft
//! ```
//! The conversion is checked: the written model is read back and compared tensor by tensor.

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::lora;
use cnclip::model::weights::PtHeader;
use cnclip::model::{Clip, ClipConfig, LoadOptions, WeightFormat};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Convert Chinese-CLIP weights: official .pt / Hugging Face / native / LoRA adapter → native, .pt, Hugging Face or PEFT"
)]
struct Args {
    /// Official `.pt`, Hugging Face directory, native `.safetensors` or LoRA adapter file.
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// native (safetensors with the config inside), pt (cn_clip's checkpoint layout), hf (a
    /// transformers ChineseCLIPModel directory, ViT models only) or peft (a LoRA adapter as a PEFT
    /// adapter directory for the hf export of --lora-base).
    #[arg(long, default_value = "native", value_parser = ["native", "pt", "hf", "peft"])]
    format: String,
    /// The weights a LoRA adapter `--input` was trained on (any format read here).
    #[arg(long = "lora-base")]
    lora_base: Option<PathBuf>,
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
    // A .pt carries no config: without the flags its architecture is read from its shapes.
    let config = ClipConfig::from_optional_tower_args(
        args.vision_model.as_deref(),
        args.text_model.as_deref(),
    )?;
    let load = |path: &PathBuf| -> Result<Clip> {
        let options = LoadOptions {
            config: config.clone(),
            ..Default::default()
        };
        Clip::load(path, &options, tch::Device::Cpu)
            .with_context(|| format!("loading {}", path.display()))
    };
    let is_adapter = WeightFormat::detect(&args.input)? == WeightFormat::Native
        && lora::is_adapter_file(&args.input)?;
    if args.lora_base.is_some() && !is_adapter {
        bail!(
            "--lora-base is for a LoRA adapter --input; {} is a model",
            args.input.display()
        );
    }
    if args.output.exists() && args.output.canonicalize()? == args.input.canonicalize()? {
        bail!("--output must differ from --input");
    }
    if args.format == "peft" {
        if !is_adapter {
            bail!(
                "--format peft exports a LoRA adapter file; {} is a model",
                args.input.display()
            );
        }
        let base = args.lora_base.as_ref().context(
            "--format peft exports a LoRA adapter: give --lora-base, the weights it was trained on",
        )?;
        let file = lora::read_adapter(&args.input)?;
        if !file.base_weights().is_empty() {
            bail!(
                "{}: its run also trained LayerNorms / logit_scale ({} tensors), which PEFT's LoRA \
                 adapter format cannot hold; share the merged model instead: --format hf --lora-base {}",
                args.input.display(),
                file.base_weights().len(),
                base.display()
            );
        }
        lora::export_peft_for(&mut load(base)?, &file, &args.output).with_context(|| {
            format!("exporting {} for {}", args.input.display(), base.display())
        })?;
        println!(
            "{} → {} (peft): {} LoRA adapters of rank {}, for the hf export of {}",
            args.input.display(),
            args.output.display(),
            file.adapters().len(),
            file.config.rank,
            base.display()
        );
        return Ok(());
    }
    let model = if is_adapter {
        let base = args.lora_base.as_ref().with_context(|| {
            format!(
                "{} is a LoRA adapter: give --lora-base, the weights it was trained on, to merge it",
                args.input.display()
            )
        })?;
        let mut model = load(base)?;
        lora::load_adapter(&mut model, &args.input)
            .with_context(|| format!("{} does not fit {}", args.input.display(), base.display()))?;
        lora::unload(&mut model, true)?;
        model
    } else {
        load(&args.input)?
    };
    match args.format.as_str() {
        "pt" => model.export_pt(
            &args.output,
            &PtHeader {
                epoch: 0,
                step: 0,
                name: args.name.clone(),
            },
        )?,
        "hf" => model.export_hf(&args.output)?,
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
        "{} → {} ({}): {} tensors, {numbers} numbers, verified",
        args.input.display(),
        args.output.display(),
        args.format,
        a.len()
    );
    Ok(())
}
