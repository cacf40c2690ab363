//! Converts Chinese-CLIP weights between formats: an official cn_clip `.pt`, a Hugging Face
//! `ChineseCLIPModel` directory, a native file or a LoRA adapter (merged onto `--lora-base`) in;
//! a native file (safetensors + config, what the other tools load fastest), an official-layout
//! `.pt` (loadable by cn_clip's scripts), a Hugging Face directory (`transformers`'
//! `ChineseCLIPModel` + `ChineseCLIPProcessor`), a PEFT adapter directory, or ONNX graphs of
//! both towers with cn_clip's deployment contract (`{prefix}.img.fp32.onnx`, `{prefix}.txt.fp32.onnx`,
//! `.fp16.onnx` with `--fp16`; what `extract_features_onnx.py` and `onnx_to_tensorrt.py` read) out.
//!
//! ```sh
//! # the architecture of an official .pt is read from its tensor shapes (ViT-B-16@RoBERTa-…-base)
//! cargo run --release --example convert -- --input clip_cn_vit-b-16.pt --output vit-b-16.safetensors
//! cargo run --release --example convert -- --input OFA-Sys/chinese-clip-vit-base-patch16 --output b16.safetensors
//! cargo run --release --example convert -- --input soup.safetensors --output soup.pt --format pt
//! cargo run --release --example convert -- --input epoch3.safetensors --output my-clip --format hf
//! cargo run --release --example convert -- --input logs/lora/checkpoints/epoch3.safetensors --lora-base b16.safetensors \
//!     --output my-adapter --format peft
//! cargo run --release --example convert -- --input clip_cn_vit-b-16.pt --vision-model ViT-B-16 \
//!     --text-model RoBERTa-wwm-ext-base-chinese --format onnx --output deploy/vit-b-16 --fp16
//! ```
//! The weight conversions are checked: the written model is read back and compared tensor by
//! tensor. The ONNX graphs are checked by `tests/onnx_export.rs` (ONNX Runtime against ours).

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
    /// adapter directory for the hf export of --lora-base) or onnx (`--output` is a prefix:
    /// `{prefix}.img.fp32.onnx` and `{prefix}.txt.fp32.onnx`, cn_clip's deployment files).
    #[arg(long, default_value = "native", value_parser = ["native", "pt", "hf", "peft", "onnx"])]
    format: String,
    /// onnx: the fixed text length of the `text` input ([CLS] and [SEP] included).
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: i64,
    /// onnx: also write the fp16 variants (`.fp16.onnx` with weights in `.fp16.onnx.extra_file`,
    /// float32 inputs and outputs), as cn_clip's pytorch_to_onnx.py does.
    #[arg(long)]
    fp16: bool,
    /// onnx: export the text tower (with neither --convert-text nor --convert-vision, both).
    #[arg(long = "convert-text")]
    convert_text: bool,
    /// onnx: export the vision tower (with neither --convert-text nor --convert-vision, both).
    #[arg(long = "convert-vision")]
    convert_vision: bool,
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
    if args.format == "onnx" {
        return export_onnx(&model, &args);
    }
    if args.fp16 || args.convert_text || args.convert_vision || args.context_length != 52 {
        bail!(
            "--fp16, --convert-text, --convert-vision and --context-length are for --format onnx"
        );
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

/// `--format onnx`: the requested towers in fp32, and in fp16 with `--fp16`, each timed.
fn export_onnx(model: &Clip, args: &Args) -> Result<()> {
    use cnclip::model::onnx::{self, OnnxOptions, Tower};
    let both = !args.convert_text && !args.convert_vision;
    let mut towers = Vec::new();
    if args.convert_vision || both {
        towers.push(Tower::Vision);
    }
    if args.convert_text || both {
        towers.push(Tower::Text);
    }
    let variants: &[bool] = if args.fp16 { &[false, true] } else { &[false] };
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for &fp16 in variants {
        for &tower in &towers {
            let options = OnnxOptions {
                context_length: args.context_length,
                fp16,
                ..Default::default()
            };
            let path = onnx::file_name(&args.output, tower, fp16);
            let start = std::time::Instant::now();
            let written = onnx::export(model, tower, &path, &options)
                .with_context(|| format!("exporting {}", path.display()))?;
            let bytes: u64 = written
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            println!(
                "{} → {} ({:.1} MB, {:.2} s)",
                args.input.display(),
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
                bytes as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
