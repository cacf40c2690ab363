//! Writes mini-MUGE: rendered product photos and Chinese queries in MUGE's file layout
//! (`{split}_imgs.tsv`, `{split}_texts.jsonl`), deterministic for a seed. `cargo xtask demo` uses it
//! so the whole pipeline runs without downloading MUGE.
//!
//! ```sh
//! cargo run --release --example mini_muge -- --out datasets/mini-muge
//! cargo run --release --example build_lmdb -- --data_dir datasets/mini-muge --splits train,valid,test
//! ```

use anyhow::Result;
use clap::Parser;
use cnclip::data::synth::{COMBINATIONS, MiniMugeConfig, write_mini_muge};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Generate the mini-MUGE dataset (product photos + Chinese queries, MUGE layout)")]
struct Args {
    /// Output directory for the TSV/JSONL files.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 2022)]
    seed: u64,
    #[arg(long = "image-size", default_value_t = 64)]
    image_size: u32,
    /// Train queries (the combinations not used by valid/test, at most).
    #[arg(long = "train-queries", default_value_t = COMBINATIONS - 60)]
    train_queries: usize,
    #[arg(long = "valid-queries", default_value_t = 30)]
    valid_queries: usize,
    #[arg(long = "test-queries", default_value_t = 30)]
    test_queries: usize,
    #[arg(long = "train-images-per-query", default_value_t = 6)]
    train_images_per_query: usize,
    #[arg(long = "eval-images-per-query", default_value_t = 4)]
    eval_images_per_query: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = MiniMugeConfig {
        seed: args.seed,
        image_size: args.image_size,
        valid_queries: args.valid_queries,
        test_queries: args.test_queries,
        train_queries: args.train_queries,
        train_images_per_query: args.train_images_per_query,
        eval_images_per_query: args.eval_images_per_query,
        ..MiniMugeConfig::default()
    };
    for split in write_mini_muge(&args.out, &config)? {
        let [r1, r5, r10, mean] = split.chance_recall;
        println!(
            "{:<5} {:>4} queries {:>5} images  chance R@1/5/10 {r1:.1}/{r5:.1}/{r10:.1} (mean {mean:.1})  {}",
            split.split,
            split.queries,
            split.images,
            split.texts_jsonl.display()
        );
    }
    Ok(())
}
