//! `python -m cn_clip.eval.evaluation GT PRED OUT` in Rust: MUGE Recall@1/5/10 and their mean,
//! written to OUT as the same JSON, byte for byte (see the `eval` crate for the few inputs where the
//! error text differs).
//!
//! ```sh
//! cargo run --example evaluate -- valid_texts.jsonl valid_predictions.jsonl output.json
//! cargo run --example evaluate -- --image-to-text valid_texts.tr.jsonl valid_tr_predictions.jsonl output.json
//! ```
//!
//! `--image-to-text` is `evaluation_tr.py` (`image_id` / `text_ids`). Standard output carries
//! cn_clip's lines; a failure also prints a message naming the file, line and query to standard
//! error. Unlike cn_clip, which exits 0 after writing a failed score file, this exits 1 then, so
//! scripts can stop on it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cnclip::eval::{Direction, Validation, run_cn_clip_evaluation};

#[derive(Parser)]
#[command(about = "MUGE recall exactly as cn_clip's evaluation.py / evaluation_tr.py")]
struct Args {
    /// Ground truth jsonl (`{"text_id", "image_ids"}`; Tianchi's `query_id`/`item_ids` too).
    standard_path: PathBuf,
    /// Predictions jsonl (`{"text_id", "image_ids": [k ranked ids]}`).
    submit_path: PathBuf,
    /// Where the score JSON is written.
    out_path: PathBuf,
    /// Image→text, as `evaluation_tr.py` (`image_id` / `text_ids`).
    #[arg(long)]
    image_to_text: bool,
    /// Ids required per query.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Also refuse predictions for unknown queries and queries on several lines (cn_clip ignores the
    /// first and keeps the last of the second).
    #[arg(long)]
    strict: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let direction = if args.image_to_text {
        Direction::ImageToText
    } else {
        Direction::TextToImage
    };
    let base = if args.strict {
        Validation::strict()
    } else {
        Validation::cn_clip()
    };
    let validation = Validation {
        k: args.top_k,
        ..base
    };
    println!("Read standard from {}", args.standard_path.display());
    println!("Read user submit file from {}", args.submit_path.display());
    let outcome = run_cn_clip_evaluation(
        &args.standard_path,
        &args.submit_path,
        &args.out_path,
        direction,
        &validation,
    )?;
    match outcome {
        Ok(evaluation) => {
            println!("The evaluation finished successfully.");
            if !evaluation.unknown_queries.is_empty() {
                eprintln!(
                    "note: ignored predictions for {} queries not in the ground truth",
                    evaluation.unknown_queries.len()
                );
            }
            if !evaluation.repeated_queries.is_empty() {
                eprintln!(
                    "note: {} queries were predicted on several lines; the last line counted",
                    evaluation.repeated_queries.len()
                );
            }
            let s = evaluation.score;
            eprintln!(
                "mean recall {:.2} (R@1 {:.2}, R@5 {:.2}, R@10 {:.2}) over {} queries",
                s.mean_recall, s.r1, s.r5, s.r10, evaluation.queries
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let detail = err.cn_clip_detail();
            let shown = detail
                .as_str()
                .map_or_else(|| detail.to_string(), str::to_owned);
            println!("The evaluation failed: {shown}");
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}
