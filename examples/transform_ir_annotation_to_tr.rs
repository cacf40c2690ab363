//! `python -m cn_clip.eval.transform_ir_annotation_to_tr --input X.jsonl` in Rust: turns text→image
//! ground truth (`{"text_id", "image_ids"}` per line) into image→text ground truth
//! (`{"image_id", "text_ids"}`), written where cn_clip writes it — the input path with every
//! `.jsonl` removed, plus `.tr.jsonl` — byte for byte as the script writes it. Its output feeds
//! `evaluate --image-to-text`.
//!
//! ```sh
//! cargo run --example transform_ir_annotation_to_tr -- --input datasets/MUGE/valid_texts.jsonl
//! # writes datasets/MUGE/valid_texts.tr.jsonl
//! ```
//!
//! A malformed line is an error naming the file and line (cn_clip stops with a Python traceback).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use cnclip::eval::{tr_annotation_path, transform_ir_annotation_to_tr, write_tr_annotation};

#[derive(Parser)]
#[command(
    about = "Text-to-image annotation to image-to-text (cn_clip's transform_ir_annotation_to_tr.py)"
)]
struct Args {
    /// Input path of text-to-image Jsonl annotation file.
    #[arg(long)]
    input: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let out = tr_annotation_path(&args.input).with_context(|| {
        format!(
            "{}: the path is not UTF-8, so cn_clip's output name cannot be derived",
            args.input.display()
        )
    })?;
    let records = transform_ir_annotation_to_tr(&args.input)?;
    write_tr_annotation(&out, &records)?;
    eprintln!("{} images written to {}", records.len(), out.display());
    println!("Done!");
    Ok(())
}
