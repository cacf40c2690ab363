//! Zero-shot classification of an image folder against Chinese labels, like cn_clip's
//! `zeroshot_evaluation.py` (same flags, same scoring: `softmax(100 · image · class)`).
//!
//! ```sh
//! # ImageFolder layout (class sub-directories 000/, 001/, … in label-file order): top-1 accuracy
//! cargo run --release --example zero_shot -- --datapath data/test --label-file label_cn.txt \
//!     --resume clip_cn_vit-b-16.pt   # a .pt's architecture is read from its shapes
//! # A flat folder of images: each image's most likely labels
//! cargo run --release --example zero_shot -- --datapath photos/ --label-file labels.txt --resume model.safetensors
//! ```
//! The templates are cn_clip's for `--dataset` (its own list for fgvc-aircraft-2013b-variants102,
//! food-101, oxford-flower-102, eurosat_clip, resisc45_clip and country211; `openai_templates` for
//! any other name, ImageNet included); `--templates FILE` (one per line, `{}` for the label) takes
//! any other set. `--index FILE` (a JSON list of row numbers, as `zeroshot_eval.sh` passes it)
//! reorders the saved predictions as cn_clip does; the accuracy is computed before.

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::extract::{ExtractOptions, ImageSource, classify, load_model};
use cnclip::model::tokenizer::Tokenizer;
use cnclip::model::zeroshot::{Templates, classifier, parse_index, predictions_json};
use cnclip::model::zeroshot::{top_labels, top1_accuracy};
use cnclip::model::{Precision, preprocess::Preprocessor};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Zero-shot image classification with Chinese labels (cn_clip's zeroshot_evaluation.py)"
)]
struct Args {
    /// An ImageFolder (class sub-directories, sorted = label order) or a flat folder of images.
    #[arg(long)]
    datapath: PathBuf,
    /// One Chinese class name per line.
    #[arg(long = "label-file")]
    label_file: PathBuf,
    /// Prompt templates, one per line with `{}` for the label (default: cn_clip's for `--dataset`).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Official `.pt`, Hugging Face directory or native `.safetensors`.
    #[arg(long)]
    resume: PathBuf,
    /// A shipped vision config name or a JSON file (default: read from the checkpoint; an
    /// official `.pt`'s architecture is inferred from its tensor shapes).
    #[arg(long = "vision-model")]
    vision_model: Option<String>,
    #[arg(long = "text-model")]
    text_model: Option<String>,
    /// cn_clip's `amp` here is exact fp32 (on CPU cn_clip's `load_from_name` rounds the weights to
    /// fp16 and computes in fp32, `cn_clip/clip/utils.py:209-215`); fp16/bf16 run reduced precision.
    #[arg(long, default_value = "amp", value_parser = ["amp", "fp32", "fp16", "bf16"])]
    precision: String,
    /// Names the output file and picks cn_clip's templates for the data set.
    #[arg(long, default_value = "imagenet")]
    dataset: String,
    /// cn_clip's `--index`: a JSON file with a list of row numbers; the saved predictions are
    /// `predictions[index]` (empty: none, as `zeroshot_eval.sh` passes it without a 7th argument).
    #[arg(long, default_value = "")]
    index: String,
    /// Where `{dataset}.json` with every image's probabilities goes (none if empty).
    #[arg(long = "save-dir", default_value = "")]
    save_dir: String,
    #[arg(long = "img-batch-size", default_value_t = 64)]
    img_batch_size: usize,
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: usize,
    /// Accepted for compatibility with cn_clip's script (images are decoded ahead on rayon's pool).
    #[arg(long = "num-workers", default_value_t = 4)]
    num_workers: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    let labels: Vec<String> = std::fs::read_to_string(&args.label_file)
        .with_context(|| format!("cannot read the label file {}", args.label_file.display()))?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if labels.is_empty() {
        bail!("{}: no labels", args.label_file.display());
    }
    let templates = match &args.templates {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Templates::from_lines(&text, &path.display().to_string())?
        }
        None => {
            let (templates, own) = Templates::for_dataset(&args.dataset);
            let which = if own { "its own" } else { "openai_templates" };
            println!("--dataset {}: cn_clip's templates ({which})", args.dataset);
            templates
        }
    };
    let (images, targets) = ImageSource::image_folder(&args.datapath, labels.len())?;
    let towers = (args.vision_model.as_deref(), args.text_model.as_deref());
    let precision = Precision::from_cn_clip_flag(&args.precision).unwrap_or(Precision::Fp32);
    let model = load_model(&args.resume, towers, precision, device)
        .with_context(|| format!("loading {}", args.resume.display()))?;
    let tokenizer = Tokenizer::new();
    let weights = classifier(&model, &tokenizer, &labels, &templates, args.context_length)?;
    println!(
        "{} classes × {} templates; {} images",
        labels.len(),
        templates.len(),
        images.len()
    );

    let size = u32::try_from(model.config().vision.image_resolution).context("image resolution")?;
    let options = ExtractOptions::new(args.img_batch_size);
    let prep = Preprocessor::new(size)?;
    let mut rows = classify(&model, &images, &weights, &prep, &options, &mut |_| {})?;
    if let Some(targets) = &targets {
        let accuracy = top1_accuracy(&rows, targets);
        println!("Result: zeroshot-top1: {accuracy:.2}");
    } else {
        for (id, row) in images.ids().iter().zip(&rows) {
            let path = images.file(*id).unwrap_or(images.path());
            println!("{}: {}", path.display(), top_labels(row, &labels, 3));
        }
    }
    if !args.index.is_empty() {
        let text = std::fs::read_to_string(&args.index)
            .with_context(|| format!("cannot read the --index file {}", args.index))?;
        let order = parse_index(&text, rows.len(), &args.index)?;
        rows = order.iter().map(|&i| rows[i].clone()).collect();
        println!("rows rearranged by {} ({} rows)", args.index, rows.len());
    }
    if !args.save_dir.is_empty() {
        let dir = PathBuf::from(&args.save_dir);
        std::fs::create_dir_all(&dir)?;
        let out = dir.join(format!("{}.json", args.dataset));
        let json = predictions_json(&model, args.vision_model.as_deref(), &args.dataset, &rows);
        std::fs::write(&out, serde_json::to_string(&json)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("predictions written to {}", out.display());
    }
    Ok(())
}
