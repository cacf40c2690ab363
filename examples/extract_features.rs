//! Image and text features, as cn_clip's `extract_features.py`, with the same flags and output
//! files (jsonl, byte-identical formatting), plus a native feature file that `predict` reads.
//!
//! ```text
//! cargo run --release --example extract_features -- --extract-image-feats --extract-text-feats \
//!     --image-data LMDB/valid/imgs --text-data DATA/valid_texts.jsonl --resume clip_cn_vit-b-16.pt \
//!     --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese
//! ```
//! Without `--vision-model`/`--text-model`, an official `.pt`'s architecture is read from its
//! tensor shapes (the shipped config they match); the other formats carry their config.
//! `--precision amp|fp32` is cn_clip's fp32 path; `fp16` its GPU fp16 path; `bf16` ours. Images are
//! decoded and preprocessed on a separate thread while the previous batch is encoded.

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::data::files::BadRecordPolicy;
use cnclip::data::{LmdbImages, TextPipeline};
use cnclip::model::preprocess::Preprocessor;
use cnclip::model::{Clip, ClipConfig, LoadOptions, Precision};
use cnclip::retrieval::{FeatureKind, Features, write_jsonl, write_native};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Parser)]
#[command(about = "Extract image/text features like cn_clip's extract_features.py")]
struct Args {
    #[arg(long = "extract-image-feats")]
    extract_image_feats: bool,
    #[arg(long = "extract-text-feats")]
    extract_text_feats: bool,
    /// LMDB `imgs` directory of a split.
    #[arg(
        long = "image-data",
        default_value = "../Multimodal_Retrieval/lmdb/test/imgs"
    )]
    image_data: PathBuf,
    /// `{split}_texts.jsonl`.
    #[arg(
        long = "text-data",
        default_value = "../Multimodal_Retrieval/test_texts.jsonl"
    )]
    text_data: String,
    #[arg(long = "image-feat-output-path")]
    image_feat_output_path: Option<PathBuf>,
    #[arg(long = "text-feat-output-path")]
    text_feat_output_path: Option<PathBuf>,
    #[arg(long = "img-batch-size", default_value_t = 64)]
    img_batch_size: usize,
    #[arg(long = "text-batch-size", default_value_t = 64)]
    text_batch_size: usize,
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: usize,
    /// Official `.pt`, Hugging Face directory or native `.safetensors` checkpoint.
    #[arg(long)]
    resume: PathBuf,
    #[arg(long, default_value = "amp", value_parser = ["amp", "fp32", "fp16", "bf16"])]
    precision: String,
    /// A shipped vision config name, or a path to a JSON file in cn_clip's schema (default: read
    /// from the checkpoint).
    #[arg(long = "vision-model")]
    vision_model: Option<String>,
    /// A shipped text config name, or a path to a JSON file in cn_clip's schema.
    #[arg(long = "text-model")]
    text_model: Option<String>,
    /// Prefix every text with the product prompt `这是一张图片，里面存在商品：` (as in training with
    /// `--text-prompt`).
    #[arg(long = "text-prompt")]
    text_prompt: bool,
    /// Also write `<output>.safetensors` native feature files (ids + L2-normalised matrix).
    #[arg(long = "native")]
    native: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Accepted for compatibility with cn_clip's script; has no effect.
    #[arg(long)]
    debug: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // First: loading libtorch's CUDA half must precede other torch calls.
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    if !args.extract_image_feats && !args.extract_text_feats {
        bail!("--extract-image-feats and --extract-text-feats cannot both be false");
    }
    let config = ClipConfig::from_optional_tower_args(
        args.vision_model.as_deref(),
        args.text_model.as_deref(),
    )?;
    // The other formats carry their config (checked against the flags when given).
    let options = LoadOptions {
        config,
        ..Default::default()
    };
    let mut model = Clip::load(&args.resume, &options, device)?;
    model.set_precision(match args.precision.as_str() {
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        _ => Precision::Fp32,
    });
    println!("=> loaded checkpoint '{}'", args.resume.display());
    let _guard = tch::no_grad_guard();

    if args.extract_text_feats {
        let output = args.text_feat_output_path.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{}.txt_feat.jsonl",
                args.text_data
                    .strip_suffix(".jsonl")
                    .unwrap_or(&args.text_data)
            ))
        });
        let mut pipeline = TextPipeline::new(args.context_length)?;
        if args.text_prompt {
            pipeline = pipeline.with_product_prompt();
        }
        let encoded = pipeline.encode_texts_file(&args.text_data, BadRecordPolicy::Fail)?;
        if encoded.text_ids.is_empty() {
            eprintln!(
                "warning: {} holds no texts; {} will be empty",
                args.text_data,
                output.display()
            );
        }
        let dim = model.config().vision.embed_dim as usize;
        let mut features = Features::new(FeatureKind::Text, dim);
        let n = encoded.text_ids.len();
        let bar = progress(n as u64, "texts");
        for start in (0..n).step_by(args.text_batch_size.max(1)) {
            let len = args.text_batch_size.min(n - start);
            let ids = encoded.ids.narrow(0, start as i64, len as i64);
            let feats = model.text_features(&ids);
            push_rows(&mut features, &encoded.text_ids[start..start + len], &feats)?;
            bar.inc(len as u64);
        }
        bar.finish();
        write_outputs(
            &features,
            &output,
            FeatureKind::Text,
            args.native,
            &args,
            model.config(),
        )?;
        println!("{n} text features are stored in {}", output.display());
    }

    if args.extract_image_feats {
        let output = args.image_feat_output_path.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{}.img_feat.jsonl",
                args.text_data.replace("_texts.jsonl", "_imgs")
            ))
        });
        let images = LmdbImages::open(&args.image_data)?;
        let ids = images.ids_in_key_order()?;
        let size =
            u32::try_from(model.config().vision.image_resolution).context("image resolution")?;
        let preprocessor = Preprocessor::new(size)?;
        let dim = model.config().vision.embed_dim as usize;
        let mut features = Features::new(FeatureKind::Image, dim);
        let bar = progress(ids.len() as u64, "images");
        let batch = args.img_batch_size.max(1);
        std::thread::scope(|scope| -> Result<()> {
            // Decoding runs one batch ahead of the encoder.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(Vec<i64>, Tensor)>>(1);
            let images = &images;
            let preprocessor = &preprocessor;
            let ids = &ids;
            scope.spawn(move || {
                for chunk in ids.chunks(batch) {
                    let item = (|| -> Result<(Vec<i64>, Tensor)> {
                        let reader = images.reader()?;
                        let mut items = Vec::with_capacity(chunk.len());
                        for id in chunk {
                            let bytes = reader.image_bytes(*id, &format!("image {id}"))?;
                            items.push((
                                format!("image {id} in {}", images.path().display()),
                                bytes,
                            ));
                        }
                        Ok((chunk.to_vec(), preprocessor.preprocess_batch(&items)?))
                    })();
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            });
            for received in rx {
                let (chunk, pixels) = received?;
                let feats = model.image_features(&pixels);
                push_rows(&mut features, &chunk, &feats)?;
                bar.inc(chunk.len() as u64);
            }
            Ok(())
        })?;
        bar.finish();
        if features.view().len() != ids.len() {
            bail!(
                "only {} of {} images were encoded",
                features.view().len(),
                ids.len()
            );
        }
        write_outputs(
            &features,
            &output,
            FeatureKind::Image,
            args.native,
            &args,
            model.config(),
        )?;
        println!(
            "{} image features are stored in {}",
            ids.len(),
            output.display()
        );
    }
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}

/// Appends normalised feature rows (as f32, on the CPU) under their ids.
fn push_rows(features: &mut Features, ids: &[i64], rows: &Tensor) -> Result<()> {
    let rows = rows
        .to_kind(tch::Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let data = Vec::<f32>::try_from(rows.flatten(0, -1))?;
    let dim = features.view().dim();
    for (id, row) in ids.iter().zip(data.chunks_exact(dim)) {
        features.push(*id, row)?;
    }
    Ok(())
}

fn write_outputs(
    features: &Features,
    output: &Path,
    kind: FeatureKind,
    native: bool,
    args: &Args,
    config: &ClipConfig,
) -> Result<()> {
    write_jsonl(output, &features.view(), kind)?;
    if native {
        let path = output.with_extension("safetensors");
        let model = match (&args.vision_model, &args.text_model, config.shipped_pair()) {
            (Some(v), Some(t), _) => format!("{v}@{t}"),
            (_, _, Some((v, t))) => format!("{v}@{t}"),
            _ => args.resume.display().to_string(),
        };
        write_native(&path, &features.view(), kind, Some(&model))?;
        println!("native features: {}", path.display());
    }
    Ok(())
}
