//! `python -m cn_clip.preprocess.build_lmdb_dataset` in Rust: the same flags, the same LMDB files
//! (byte for byte for valid input), with a progress bar and input checks the script lacks.
//!
//! ```sh
//! cargo run --release --example build_lmdb -- --data_dir datasets/MUGE --splits train,valid,test
//! cargo run --release --example build_lmdb -- --data_dir D --splits train --lmdb_dir L --on-error skip
//! ```
//!
//! For each split it reads `{data_dir}/{split}_imgs.tsv` and `{split}_texts.jsonl` and writes
//! `{lmdb_dir}/{split}/imgs` and `.../pairs` (`lmdb_dir` defaults to `{data_dir}/lmdb`). Malformed
//! lines, duplicate ids and texts referencing images the TSV lacks stop the build with the file and
//! line (`--on-error fail`, the default) or are skipped and counted (`--on-error skip`); either way
//! an existing split is only replaced once the new one is complete.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cnclip::data::augment::{OfflinePolicy, multiply_rare_images_in_files};
use cnclip::data::files::BadRecordPolicy;
use cnclip::data::lmdb::{BuildOptions, BuildProgress, Stage, build_split_with, parse_splits};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(about = "Serialize MUGE-style TSV/JSONL splits into cn_clip's LMDB layout")]
struct Args {
    /// The directory which stores the image TSV files and the text JSONL annotations.
    #[arg(long = "data_dir", alias = "data-dir")]
    data_dir: PathBuf,
    /// The dataset splits to process, concatenated by comma (e.g. train,valid,test).
    #[arg(long)]
    splits: String,
    /// The directory which stores the output LMDB files (default: {data_dir}/lmdb).
    #[arg(long = "lmdb_dir", alias = "lmdb-dir")]
    lmdb_dir: Option<PathBuf>,
    /// What to do with bad records: fail (stop, naming file and line) or skip (count and report).
    #[arg(long = "on-error", default_value = "fail")]
    on_error: BadRecordPolicy,
    /// Offline augmentation of the train split: every image of a training query with
    /// at most --offline-max-images images gets N augmented copies (0 = off). The augmented
    /// TSV/JSONL are written to {lmdb_dir}/offline-augmented/ and built from there.
    #[arg(long = "offline-augment", default_value_t = 0)]
    offline_augment: usize,
    #[arg(long = "offline-max-images", default_value_t = 2)]
    offline_max_images: usize,
    /// Side of the augmented copies (the training resolution).
    #[arg(long = "offline-size", default_value_t = 224)]
    offline_size: u32,
    #[arg(long = "offline-seed", default_value_t = 0)]
    offline_seed: u64,
    /// Decode every image while building: one that does not decode stops the build naming its
    /// line and id (--on-error fail) or is left out with its pairs and counted (--on-error skip),
    /// instead of ending a training run when the loader reaches it.
    #[arg(long = "check-images")]
    check_images: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.data_dir.is_dir(),
        "the data_dir {} does not exist; please check the input args",
        args.data_dir.display()
    );
    let splits = parse_splits(&args.splits)?;
    println!("Dataset splits to be processed: {}", splits.join(", "));
    let lmdb_dir = args.lmdb_dir.unwrap_or_else(|| args.data_dir.join("lmdb"));

    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
    )
    .context("progress bar template")?
    .progress_chars("=> ");
    for split in &splits {
        let mut bar: Option<ProgressBar> = None;
        let mut on_progress = |p: BuildProgress<'_>| match p {
            BuildProgress::Start {
                split,
                stage,
                total_bytes,
                ..
            } => {
                let b = ProgressBar::new(total_bytes).with_style(style.clone());
                b.set_prefix(format!("{split} {}", stage_name(stage)));
                b.enable_steady_tick(Duration::from_millis(200));
                bar = Some(b);
            }
            BuildProgress::Advance { bytes, records, .. } => {
                if let Some(b) = &bar {
                    b.set_position(bytes);
                    b.set_message(format!("{records} written"));
                }
            }
            BuildProgress::Finish { records, .. } => {
                if let Some(b) = bar.take() {
                    b.set_position(b.length().unwrap_or(0));
                    b.finish_with_message(format!("{records} written"));
                }
            }
        };
        let mut source = args.data_dir.clone();
        if args.offline_augment > 0 && split == "train" {
            let out = lmdb_dir.join("offline-augmented");
            let policy = OfflinePolicy {
                max_images: args.offline_max_images,
                copies: args.offline_augment,
                size: args.offline_size,
                seed: args.offline_seed,
                ..OfflinePolicy::default()
            };
            let done =
                multiply_rare_images_in_files(&args.data_dir, split, &out, &policy, args.on_error)
                    .context("offline augmentation of the train split")?;
            println!(
                "Offline augmentation: {} queries with at most {} images, {} images × {} copies = {} new images → {}",
                done.queries_multiplied,
                args.offline_max_images,
                done.source_images,
                args.offline_augment,
                done.new_images,
                out.display()
            );
            source = out;
        }
        let options = BuildOptions {
            policy: args.on_error,
            check_images: args.check_images,
        };
        let summary = build_split_with(&source, split, &lmdb_dir, &options, &mut on_progress)
            .with_context(|| format!("building the {split} split"))?;
        if summary.replaced_existing {
            println!("Replaced the existing LMDB files {}", summary.dir.display());
        }
        println!(
            "Finished serializing {} {split} split pairs into {}.",
            summary.pairs,
            summary.dir.join("pairs").display()
        );
        println!(
            "Finished serializing {} {split} split images into {}.",
            summary.images,
            summary.dir.join("imgs").display()
        );
        if summary.texts_without_image_list > 0 {
            println!(
                "{} of {} texts have no image list and contribute no pairs.",
                summary.texts_without_image_list, summary.texts
            );
        }
        for (what, report) in [
            ("images", &summary.images_report),
            ("texts", &summary.texts_report),
        ] {
            if report.total_skipped() > 0 {
                println!("Skipped {what}: {report}");
            }
        }
    }
    println!("done!");
    Ok(())
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Images => "imgs",
        Stage::Pairs => "pairs",
    }
}
