//! `python -m cn_clip.eval.make_topk_predictions` (and `_tr` with `--image-to-text`) in Rust, with
//! the same flags and the same prediction jsonl.
//!
//! ```sh
//! cargo run --release --example predict -- --image-feats valid_imgs.img_feat.jsonl \
//!     --text-feats valid_texts.txt_feat.jsonl --top-k 10 --output valid_predictions.jsonl
//! cargo run --release --example predict -- --image-to-text --image-feats imgs.safetensors \
//!     --text-feats texts.safetensors --output valid_tr_predictions.jsonl
//! ```
//!
//! Feature files may be cn_clip jsonl or native `.safetensors` (memory-mapped). `--eval-batch-size`
//! is the gallery block, as in cn_clip. Ties are ranked by file order, as cn_clip's stable sort does;
//! scores are exact (see `retrieval::search`), so `--precision` and `--device` change speed only.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::retrieval::{
    Direction, FeatureKind, ScanPrecision, SearchOptions, load_features, search, write_predictions,
};

#[derive(Parser)]
#[command(about = "Top-k predictions exactly as cn_clip's make_topk_predictions(.py|_tr.py)")]
struct Args {
    /// Image features (cn_clip jsonl or native .safetensors).
    #[arg(long)]
    image_feats: PathBuf,
    /// Text features (cn_clip jsonl or native .safetensors).
    #[arg(long)]
    text_feats: PathBuf,
    /// Hits per query.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Gallery rows per block (cn_clip's image-side batch).
    #[arg(long, default_value_t = 32768)]
    eval_batch_size: usize,
    /// Prediction jsonl to write.
    #[arg(long)]
    output: PathBuf,
    /// Images query texts (`make_topk_predictions_tr.py`).
    #[arg(long)]
    image_to_text: bool,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Scan precision: int8 (CPU default) or fp32; the ids are the same.
    #[arg(long, default_value = "int8")]
    precision: String,
    /// Queries per GEMM block.
    #[arg(long, default_value_t = 1024)]
    query_block: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    let precision = match args.precision.as_str() {
        "int8" => ScanPrecision::Int8,
        "fp32" => ScanPrecision::Fp32,
        other => bail!("--precision must be int8 or fp32, not {other:?}"),
    };
    let t0 = Instant::now();
    let images = load_features(&args.image_feats, FeatureKind::Image)
        .with_context(|| format!("loading {}", args.image_feats.display()))?;
    let texts = load_features(&args.text_feats, FeatureKind::Text)
        .with_context(|| format!("loading {}", args.text_feats.display()))?;
    let (iv, tv) = (images.view(), texts.view());
    // cn_clip's script writes an empty file for no queries and fails on no gallery; say why.
    for (view, path, what) in [
        (&iv, &args.image_feats, "image"),
        (&tv, &args.text_feats, "text"),
    ] {
        if view.is_empty() {
            let role = if (what == "text") != args.image_to_text {
                "queries: the predictions file will be empty"
            } else {
                "gallery: there is nothing to search"
            };
            eprintln!(
                "warning: {} holds no {what} features (an empty file?); they are the {role}",
                path.display()
            );
        }
    }
    let (queries, gallery, direction) = if args.image_to_text {
        (iv, tv, Direction::ImageToText)
    } else {
        (tv, iv, Direction::TextToImage)
    };
    let loaded = t0.elapsed();
    let opts = SearchOptions {
        k: args.top_k,
        query_block: args.query_block,
        gallery_block: args.eval_batch_size,
        precision,
        device,
    };
    let t1 = Instant::now();
    // The search names a bad row by its id; say which files the queries and gallery came from.
    let (query_file, gallery_file) = if args.image_to_text {
        (&args.image_feats, &args.text_feats)
    } else {
        (&args.text_feats, &args.image_feats)
    };
    let hits = search(&queries, &gallery, &opts).with_context(|| {
        format!(
            "searching queries of {} against the gallery of {}",
            query_file.display(),
            gallery_file.display()
        )
    })?;
    let searched = t1.elapsed();
    write_predictions(&args.output, direction, &queries, &gallery, &hits)?;
    eprintln!(
        "{} queries x {} gallery (d={}) on {device:?}, {precision:?}: load {:.3} s, search {:.3} s",
        queries.len(),
        gallery.len(),
        gallery.dim(),
        loaded.as_secs_f64(),
        searched.as_secs_f64()
    );
    println!(
        "Top-{} predictions are saved in {}",
        args.top_k,
        args.output.display()
    );
    Ok(())
}
