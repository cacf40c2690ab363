//! `cargo xtask soup`: score every candidate checkpoint on the validation split, merge them by the
//! chosen strategy, write the soup and a report (Markdown + JSON) of every candidate and merge.
//!
//! ```text
//! cargo xtask soup --candidates runs/a/checkpoints/epoch3.safetensors runs/b/checkpoints/epoch3.safetensors \
//!     --val-data LMDB/valid --text-prompt --strategy pairwise --out soup
//! ```
//! Scores (and features) are cached per checkpoint and per merge under `--cache-dir`; a second run
//! recomputes nothing, and `--report-only` regenerates the report from the cache alone.

use anyhow::{Context, Result};
use clap::Parser;
use cnclip_model::{ClipConfig, Precision};
use indicatif::{ProgressBar, ProgressStyle};
use soup::run::{Event, SoupConfig, default_cache_dir, run};
use soup::score::{Progress, ScoreOptions, ValOptions};
use soup::strategy::{Accept, PairwiseOptions, Strategy};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cargo xtask soup",
    bin_name = "cargo xtask soup",
    about = "Merge fine-tuned checkpoints into a model soup, scored on the validation split",
    long_about = "Scores every candidate on the validation split (image features of every image in \
                  the LMDB, text features of its queries, top-10 through retrieval, Recall@1/5/10 \
                  and their mean through eval; cached per checkpoint), runs the strategy, writes the \
                  soup (<out>/soup.safetensors, native) and <out>/report.md, <out>/report.json."
)]
struct Args {
    /// Checkpoints to merge: native .safetensors (training runs write these), official .pt
    /// (architecture inferred from the shapes, or --vision-model/--text-model), Hugging Face
    /// directories, or LoRA adapter files (with --lora-base).
    #[arg(long, num_args = 1.., required = true)]
    candidates: Vec<PathBuf>,
    /// The weights the LoRA adapters among the candidates were trained on.
    #[arg(long = "lora-base")]
    lora_base: Option<PathBuf>,
    /// Validation LMDB split directory (cn_clip's --val-data: imgs/ and pairs/).
    #[arg(long = "val-data")]
    val_data: PathBuf,
    /// `valid_texts.jsonl`: queries and ground truth from it instead of the LMDB's pairs/.
    #[arg(long = "val-texts")]
    val_texts: Option<PathBuf>,
    /// pairwise (merge the best two while a merge helps), greedy (Wortsman) or uniform (Wortsman).
    #[arg(long, default_value = "pairwise")]
    strategy: Strategy,
    /// Output directory: soup.safetensors (the soup), report.md, report.json.
    #[arg(long, default_value = "soup")]
    out: PathBuf,
    /// Score and feature cache per checkpoint and merge [default: OUT/cache]; share one between
    /// runs over the same candidates (other strategies) to reuse their scores.
    #[arg(long = "cache-dir")]
    cache_dir: Option<PathBuf>,
    /// Regenerate the report from the cache only: no model runs, no soup is written.
    #[arg(long = "report-only")]
    report_only: bool,
    /// Prefix every query with the product prompt `这是一张图片，里面存在商品：` (use the setting the
    /// checkpoints were trained with).
    #[arg(long = "text-prompt")]
    text_prompt: bool,
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: usize,
    #[arg(long = "img-batch-size", default_value_t = 64)]
    img_batch_size: usize,
    #[arg(long = "text-batch-size", default_value_t = 64)]
    text_batch_size: usize,
    /// fp32 (cn_clip's evaluation), fp16 or bf16 (GPU).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    precision: String,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Architecture of official .pt candidates: a shipped vision config name or a JSON file
    /// (default: inferred from the tensor shapes).
    #[arg(long = "vision-model")]
    vision_model: Option<String>,
    /// Architecture of official .pt candidates: a shipped text config name or a JSON file.
    #[arg(long = "text-model")]
    text_model: Option<String>,
    /// Pairwise: keep a merge that beats either member (the default) or only one that beats both.
    #[arg(long, default_value = "either", value_parser = ["either", "both"])]
    accept: String,
    /// Pairwise: at most this many merges.
    #[arg(long = "max-rounds", default_value_t = 64)]
    max_rounds: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // First: loading libtorch's CUDA half must precede other torch calls.
    let device = torch_ext_device(&args.device)?;
    let pt_config = match (&args.vision_model, &args.text_model) {
        (Some(v), Some(t)) => Some(ClipConfig::from_tower_args(v, t)?),
        (None, None) => None,
        _ => anyhow::bail!("--vision-model and --text-model go together"),
    };
    let config = SoupConfig {
        candidates: args.candidates.clone(),
        lora_base: args.lora_base.clone(),
        pt_config,
        val_data: args.val_data.clone(),
        val: ValOptions {
            texts: args.val_texts.clone(),
            text_prompt: args.text_prompt,
            context_length: args.context_length,
        },
        score: ScoreOptions {
            img_batch_size: args.img_batch_size,
            text_batch_size: args.text_batch_size,
            precision: match args.precision.as_str() {
                "fp16" => Precision::Fp16,
                "bf16" => Precision::Bf16,
                _ => Precision::Fp32,
            },
            device,
        },
        strategy: args.strategy,
        pairwise: PairwiseOptions {
            accept: if args.accept == "both" {
                Accept::BeatsBoth
            } else {
                Accept::BeatsEither
            },
            max_rounds: args.max_rounds,
        },
        out: args.out.clone(),
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(|| default_cache_dir(&args.out)),
        report_only: args.report_only,
    };
    let mut bar: Option<ProgressBar> = None;
    let summary = run(&config, &mut |event| match event {
        Event::Stage(line) => match &bar {
            Some(b) => b.println(format!("soup: {line}")),
            None => println!("soup: {line}"),
        },
        Event::Progress(Progress::Start { what, total }) => {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(&format!(
                "{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"
            )) {
                b.set_style(style);
            }
            bar = Some(b);
        }
        Event::Progress(Progress::Advance(n)) => {
            if let Some(b) = &bar {
                b.inc(n);
            }
        }
        Event::Progress(Progress::Finish) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    })
    .context("soup failed")?;
    println!("{}", summary.report.to_markdown());
    println!(
        "soup: {} scored, {} from the cache; report: {} and {}",
        summary.computed,
        summary.cached,
        summary.markdown.display(),
        summary.json.display()
    );
    Ok(())
}

fn torch_ext_device(spec: &str) -> Result<tch::Device> {
    Ok(torch_ext::parse_device(spec)?)
}
