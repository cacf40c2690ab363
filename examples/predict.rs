//! `python -m cn_clip.eval.make_topk_predictions` (and `_tr` with `--image-to-text`) in Rust, with
//! the same flags and the same prediction jsonl.
//!
//! ```sh
//! cargo run --release --example predict -- --image-feats valid_imgs.img_feat.jsonl \
//!     --text-feats valid_texts.txt_feat.jsonl --top-k 10 --output valid_predictions.jsonl
//! cargo run --release --example predict -- --image-to-text --image-feats imgs.safetensors \
//!     --text-feats texts.safetensors --output valid_tr_predictions.jsonl
//! # a gallery (or query set) in shards: searched one file at a time, merged exactly
//! cargo run --release --example predict -- --image-feats imgs.0.safetensors imgs.1.safetensors \
//!     --text-feats texts.safetensors --output valid_predictions.jsonl
//! ```
//!
//! Feature files may be cn_clip jsonl or native `.safetensors` (memory-mapped). Several files after
//! `--image-feats` or `--text-feats` are shards: the result equals one file holding their rows in
//! the order given (ties too: `retrieval::shard`); an id in two shards is an error. `--eval-batch-size`
//! is the gallery block, as in cn_clip. Ties are ranked by file order, as cn_clip's stable sort does;
//! scores are exact (see `retrieval::search`), so `--precision` and `--device` change speed only.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cnclip::retrieval::{
    Direction, FeatureKind, ScanPrecision, SearchOptions, Shards, predict_shards,
};

#[derive(Parser)]
#[command(about = "Top-k predictions exactly as cn_clip's make_topk_predictions(.py|_tr.py)")]
struct Args {
    /// Image features (cn_clip jsonl or native .safetensors): one file, or several shards.
    #[arg(long, num_args = 1.., required = true)]
    image_feats: Vec<PathBuf>,
    /// Text features (cn_clip jsonl or native .safetensors): one file, or several shards.
    #[arg(long, num_args = 1.., required = true)]
    text_feats: Vec<PathBuf>,
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
    let images = Shards::new(args.image_feats.clone(), FeatureKind::Image)?;
    let texts = Shards::new(args.text_feats.clone(), FeatureKind::Text)?;
    let (queries, gallery, direction) = if args.image_to_text {
        (&images, &texts, Direction::ImageToText)
    } else {
        (&texts, &images, Direction::TextToImage)
    };
    let opts = SearchOptions {
        k: args.top_k,
        query_block: args.query_block,
        gallery_block: args.eval_batch_size,
        precision,
        device,
    };
    let list = |s: &Shards| {
        let names: Vec<String> = s.paths().iter().map(|p| p.display().to_string()).collect();
        names.join(" ")
    };
    // The search names a bad row by its id (and shard); say which files the two sides came from.
    let done =
        predict_shards(&args.output, direction, queries, gallery, &opts).with_context(|| {
            format!(
                "searching queries of {} against the gallery of {}",
                list(queries),
                list(gallery)
            )
        })?;
    // cn_clip's script writes an empty file for no queries; say why.
    for path in &done.empty {
        let what = if images.paths().contains(path) {
            "image"
        } else {
            "text"
        };
        let role = match queries.paths().contains(path) {
            true => "queries: they have no lines in the predictions file",
            false => "gallery: that shard adds no rows",
        };
        eprintln!(
            "warning: {} holds no {what} features (an empty file?); it is part of the {role}",
            path.display()
        );
    }
    eprintln!(
        "{} queries x {} gallery (d={}) in {}+{} files on {device:?}, {precision:?}: \
         search {:.3} s, total {:.3} s",
        done.queries,
        done.gallery,
        done.dim,
        queries.paths().len(),
        gallery.paths().len(),
        done.search.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "Top-{} predictions are saved in {}",
        args.top_k,
        args.output.display()
    );
    Ok(())
}
