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
use cnclip::model::preprocess::Preprocessor;
use cnclip::model::tokenizer::Tokenizer;
use cnclip::model::zeroshot::{Templates, classifier, parse_index, probabilities};
use cnclip::model::{Clip, ClipConfig, LoadOptions, Precision};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

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
    /// Accepted for compatibility with cn_clip's script (decoding runs on this thread).
    #[arg(long = "num-workers", default_value_t = 4)]
    num_workers: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

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
    let (images, targets) = list_images(&args.datapath, labels.len())?;
    let model = load_model(&args, device)?;
    let tokenizer = Tokenizer::new();
    let weights = classifier(&model, &tokenizer, &labels, &templates, args.context_length)?;
    println!(
        "{} classes × {} templates; {} images",
        labels.len(),
        templates.len(),
        images.len()
    );

    let size = u32::try_from(model.config().vision.image_resolution).context("image resolution")?;
    let preprocessor = Preprocessor::new(size)?;
    let _guard = tch::no_grad_guard();
    let mut all = Vec::with_capacity(images.len());
    for chunk in images.chunks(args.img_batch_size.max(1)) {
        let pixels = preprocessor.preprocess_files(chunk)?.to_device(device);
        let probs = probabilities(&model.image_features(&pixels), &weights).to_kind(Kind::Float);
        all.push(probs.to_device(tch::Device::Cpu));
    }
    let probs = Tensor::cat(&all, 0);
    let mut rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&probs).context("probabilities")?;

    if let Some(targets) = &targets {
        let correct = rows
            .iter()
            .zip(targets)
            .filter(|(row, t)| argmax(row) == **t)
            .count();
        println!(
            "Result: zeroshot-top1: {:.2}",
            100.0 * correct as f64 / rows.len().max(1) as f64
        );
    } else {
        for (path, row) in images.iter().zip(&rows) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let top: Vec<String> = order
                .iter()
                .take(3)
                .map(|&i| format!("{} {:.3}", labels[i], row[i]))
                .collect();
            println!("{}: {}", path.display(), top.join(", "));
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
        let predictions: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&p| (f64::from(p) * 1e6).round() / 1e6)
                    .collect()
            })
            .collect();
        let vision = match (&args.vision_model, model.config().shipped_pair()) {
            (Some(v), _) => v.clone(),
            (None, Some((v, _))) => v.to_string(),
            (None, None) => "custom".to_string(),
        };
        let tensors = model.named_tensors();
        let count = |visual: bool| -> usize {
            tensors
                .iter()
                .filter(|(k, _)| !visual || k.starts_with("visual."))
                .map(|(_, t)| t.numel())
                .sum()
        };
        // cn_clip's keys and shape: `predictions` is a list holding the one [N, C] matrix.
        let json = serde_json::json!({
            "model_name": format!("CN-CLIP-{vision}"),
            "dataset_name": args.dataset,
            "num_trainable_params": 0,
            "num_params": count(false),
            "num_visual_params": count(true),
            "num_backbone_params": count(false),
            "n_shot": 0,
            "rnd_seeds": [123],
            "predictions": [predictions],
        });
        std::fs::write(&out, serde_json::to_string(&json)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("predictions written to {}", out.display());
    }
    Ok(())
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// Images and, for an ImageFolder, their class indices (sub-directories in sorted order, as
/// torchvision's ImageFolder numbers them).
fn list_images(root: &Path, classes: usize) -> Result<(Vec<PathBuf>, Option<Vec<usize>>)> {
    let entries = sorted_entries(root)?;
    let dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    if dirs.is_empty() {
        let images: Vec<PathBuf> = entries.into_iter().filter(|p| is_image(p)).collect();
        if images.is_empty() {
            bail!(
                "{}: no images ({})",
                root.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        return Ok((images, None));
    }
    if dirs.len() > classes {
        bail!(
            "{} has {} class folders but the label file has {classes} labels",
            root.display(),
            dirs.len()
        );
    }
    let (mut images, mut targets) = (Vec::new(), Vec::new());
    for (class, dir) in dirs.iter().enumerate() {
        for path in sorted_entries(dir)? {
            if is_image(&path) {
                images.push(path);
                targets.push(class);
            }
        }
    }
    if images.is_empty() {
        bail!("{}: the class folders hold no images", root.display());
    }
    Ok((images, Some(targets)))
}

fn load_model(args: &Args, device: tch::Device) -> Result<Clip> {
    let options = LoadOptions {
        config: ClipConfig::from_optional_tower_args(
            args.vision_model.as_deref(),
            args.text_model.as_deref(),
        )?,
        ..Default::default()
    };
    let mut model = Clip::load(&args.resume, &options, device)
        .with_context(|| format!("loading {}", args.resume.display()))?;
    model.set_precision(match args.precision.as_str() {
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        _ => Precision::Fp32,
    });
    Ok(model)
}
