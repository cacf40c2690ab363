//! Image and text features, as cn_clip's `extract_features.py`, with the same flags and output
//! files (jsonl, byte-identical formatting), plus a native feature file that `predict` reads.
//!
//! ```text
//! cargo run --release --example extract_features -- --extract-image-feats --extract-text-feats \
//!     --image-data LMDB/valid/imgs --text-data DATA/valid_texts.jsonl --resume clip_cn_vit-b-16.pt \
//!     --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese [--nproc-per-node 8]
//! ```
//! An official `.pt`'s architecture is read from its shapes unless `--vision-model`/`--text-model`.
//! `--precision amp|fp32`: cn_clip's fp32 path; `fp16` its GPU fp16 path; `bf16` ours. Sharded
//! (`--nproc-per-node N`, torchrun, srun): each rank encodes a run of whole batches into
//! `<output>.<key>.shards/` (reused by a rerun); rank 0 merges them into the files one process
//! writes, byte for byte. The pipeline, decoding ahead on other threads, is `cnclip_extract`'s.

use anyhow::{Result, bail};
use clap::Parser;
use cnclip::data::{PRODUCT_PROMPT, TextPipeline};
use cnclip::extract::{ExtractOptions, ImageSource, ShardJob, ShardOutcome, Written, progress_bar};
use cnclip::model::{Precision, preprocess::Preprocessor};
use cnclip::torch_ext::parse_device;
use cnclip::train::{config::LaunchArgs, ddp::DistEnv};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Extract image/text features like cn_clip's extract_features.py")]
struct Args {
    #[arg(long)]
    extract_image_feats: bool,
    #[arg(long)]
    extract_text_feats: bool,
    /// LMDB `imgs` directory of a split.
    #[arg(long, default_value = "../Multimodal_Retrieval/lmdb/test/imgs")]
    image_data: PathBuf,
    /// `{split}_texts.jsonl`.
    #[arg(long, default_value = "../Multimodal_Retrieval/test_texts.jsonl")]
    text_data: String,
    #[arg(long)]
    image_feat_output_path: Option<PathBuf>,
    #[arg(long)]
    text_feat_output_path: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    img_batch_size: usize,
    #[arg(long, default_value_t = 64)]
    text_batch_size: usize,
    #[arg(long, default_value_t = 52)]
    context_length: usize,
    /// Official `.pt`, Hugging Face directory or native `.safetensors` checkpoint.
    #[arg(long)]
    resume: PathBuf,
    #[arg(long, default_value = "amp", value_parser = ["amp", "fp32", "fp16", "bf16"])]
    precision: String,
    /// A shipped vision config name or a JSON file in cn_clip's schema [default: the checkpoint's].
    #[arg(long)]
    vision_model: Option<String>,
    /// A shipped text config name, or a path to a JSON file in cn_clip's schema.
    #[arg(long)]
    text_model: Option<String>,
    /// Prefix every text with the product prompt `这是一张图片，里面存在商品：` (training's too).
    #[arg(long)]
    text_prompt: bool,
    /// Also write `<output>.safetensors` native feature files (ids + L2-normalised matrix).
    #[arg(long)]
    native: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Sharded runs: how long rank 0 waits for the other ranks' shards, in seconds.
    #[arg(long, default_value_t = 1800)]
    shard_timeout: u64,
    #[command(flatten)]
    launch: LaunchArgs,
    /// Accepted for compatibility with cn_clip's script; has no effect.
    #[arg(long)]
    debug: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.extract_image_feats && !args.extract_text_feats {
        bail!("--extract-image-feats and --extract-text-feats cannot both be false");
    }
    if cnclip::train::ddp::launch::relaunch_self(&args.launch)? {
        return Ok(());
    }
    let dist = DistEnv::from_env()?;
    // First: loading libtorch's CUDA half must precede other torch calls.
    let device = DistEnv::rank_device(dist.as_ref(), parse_device(&args.device)?);
    let towers = (args.vision_model.as_deref(), args.text_model.as_deref());
    let precision = Precision::from_cn_clip_flag(&args.precision).unwrap_or(Precision::Fp32);
    let model = cnclip::extract::load_model(&args.resume, towers, precision, device)?;
    let name = cnclip::extract::model_name(towers, model.config(), &args.resume);
    let native = args.native.then_some(name.as_str());
    let world = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
    let job = ShardJob::new(&args.resume, precision, world)?
        .with_timeout(std::time::Duration::from_secs(args.shard_timeout));
    println!("=> loaded checkpoint '{}'", args.resume.display());
    if args.extract_text_feats {
        let stem = args.text_data.strip_suffix(".jsonl");
        let default = format!("{}.txt_feat.jsonl", stem.unwrap_or(&args.text_data));
        let output = args.text_feat_output_path.clone().unwrap_or(default.into());
        let prompt = args.text_prompt.then_some(PRODUCT_PROMPT);
        let pipeline = TextPipeline::new(args.context_length)?.with_prompt(prompt);
        let options = ExtractOptions::new(args.text_batch_size);
        let path = Path::new(&args.text_data);
        let progress = &mut progress_bar("texts", true);
        let (done, outcome, n) =
            job.texts_file(&model, path, &pipeline, &options, &output, native, progress)?;
        if n == 0 {
            let (data, out) = (&args.text_data, output.display());
            eprintln!("warning: {data} holds no texts; {out} will be empty");
        }
        report(&job, outcome, done, "text", &output);
    }
    if args.extract_image_feats {
        let stem = args.text_data.replace("_texts.jsonl", "_imgs");
        let output = (args.image_feat_output_path.clone())
            .unwrap_or(format!("{stem}.img_feat.jsonl").into());
        let images = ImageSource::lmdb(&args.image_data)?;
        let prep = Preprocessor::new(u32::try_from(model.config().vision.image_resolution)?)?;
        let options = ExtractOptions::new(args.img_batch_size);
        let progress = &mut progress_bar("images", true);
        let (done, outcome) =
            job.images(&model, &images, &prep, &options, &output, native, progress)?;
        report(&job, outcome, done, "image", &output);
    }
    Ok(())
}

/// Says what happened to this rank's shard and what rank 0 (or a single process) wrote.
fn report(
    job: &ShardJob,
    outcome: ShardOutcome,
    written: Option<Written>,
    what: &str,
    output: &Path,
) {
    if outcome != ShardOutcome::Alone {
        println!(
            "rank {} of {}: {what} shard {outcome:?}",
            job.rank(),
            job.world()
        );
    }
    if let Some(Written { rows, native }) = written {
        if let Some(path) = native {
            println!("native features: {}", path.display());
        }
        println!("{rows} {what} features are stored in {}", output.display());
    }
}
