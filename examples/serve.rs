//! Puts a checkpoint behind a search box: text→image and image→image search, zero-shot
//! classification and a small web page, over an image gallery (see the `cnclip-serve` crate).
//!
//! ```text
//! cargo run --release --example serve -- --checkpoint target/demo/best.safetensors \
//!     --gallery target/demo/lmdb/valid --text-prompt
//! # then open http://127.0.0.1:8080/  or  curl 'http://127.0.0.1:8080/api/search?q=红色连衣裙&k=5'
//! ```
//! The first start encodes the gallery (progress bar) and caches the features next to it (or in
//! `--cache-dir`); later starts with the same checkpoint and gallery reuse them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use cnclip::model::Precision;
use cnclip::serve::{FeatureOrigin, Limits, ServeConfig, features::CacheOutcome};

#[derive(Parser)]
#[command(
    about = "Serve a Chinese-CLIP checkpoint: search page and JSON API over an image gallery"
)]
struct Args {
    /// Official `.pt`, Hugging Face directory or native `.safetensors` checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// cn_clip LMDB split (or its `imgs/`), a `{split}_imgs.tsv`, or a folder of images.
    #[arg(long)]
    gallery: Option<PathBuf>,
    /// Native image feature files to search instead of encoding the gallery: one, or several shards.
    #[arg(long, num_args = 1..)]
    features: Vec<PathBuf>,
    /// Where the gallery feature cache goes (default: next to the gallery).
    #[arg(long = "cache-dir")]
    cache_dir: Option<PathBuf>,
    /// Vision config name or JSON file (default: an official `.pt`'s architecture is inferred
    /// from its tensor shapes; other formats carry their config).
    #[arg(long = "vision-model")]
    vision_model: Option<String>,
    /// Text config name or JSON file (default: inferred, as --vision-model).
    #[arg(long = "text-model")]
    text_model: Option<String>,
    #[arg(long = "context-length", default_value_t = 52)]
    context_length: usize,
    /// Prefix queries with the product prompt `这是一张图片，里面存在商品：` unless a request says
    /// `prompt=0` (use it for a model fine-tuned with `--text-prompt`).
    #[arg(long = "text-prompt")]
    text_prompt: bool,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    precision: String,
    /// Gallery images per encoder call when computing features.
    #[arg(long = "img-batch-size", default_value_t = 32)]
    img_batch_size: usize,
    /// Most text queries encoded together.
    #[arg(long = "max-batch", default_value_t = 32)]
    max_batch: usize,
    /// How long a text batch waits for more queries, in milliseconds.
    #[arg(long = "batch-window-ms", default_value_t = 2)]
    batch_window_ms: u64,
    /// Largest upload, in bytes.
    #[arg(long = "max-upload-bytes", default_value_t = LIMITS.max_upload_bytes)]
    max_upload_bytes: usize,
    /// Requests running longer are answered 408.
    #[arg(long = "timeout-secs", default_value_t = LIMITS.request_timeout.as_secs())]
    timeout_secs: u64,
    /// Largest uploaded image in pixels (width × height, from its header); larger: 413.
    #[arg(long = "max-image-pixels", default_value_t = LIMITS.max_image_pixels)]
    max_image_pixels: u64,
    /// Uploaded images decoded at once (with --max-image-pixels, bounds decoding memory).
    #[arg(long = "max-concurrent-decodes", default_value_t = LIMITS.max_concurrent_decodes)]
    max_concurrent_decodes: usize,
    /// Upload requests read at once (bounds buffered bodies to this × --max-upload-bytes).
    #[arg(long = "max-concurrent-uploads", default_value_t = LIMITS.max_concurrent_uploads)]
    max_concurrent_uploads: usize,
    /// A request header must arrive within this; idle keep-alive connections close after it.
    #[arg(long = "header-timeout-secs", default_value_t = LIMITS.header_read_timeout.as_secs())]
    header_timeout_secs: u64,
    /// Open connections at most (keep it below `ulimit -n`); more wait in the listen backlog.
    #[arg(long = "max-connections", default_value_t = LIMITS.max_connections)]
    max_connections: usize,
    /// On Ctrl-C/SIGTERM, requests in flight get this long before connections are closed.
    #[arg(long = "shutdown-timeout-secs", default_value_t = LIMITS.shutdown_timeout.as_secs())]
    shutdown_timeout_secs: u64,
    /// Most request header lines; more: 431.
    #[arg(long = "max-headers", default_value_t = LIMITS.max_headers)]
    max_headers: usize,
    /// Most bytes of request target and headers; more: 431.
    #[arg(long = "max-header-bytes", default_value_t = LIMITS.max_header_bytes)]
    max_header_bytes: usize,
}

/// Defaults of the limit flags.
const LIMITS: Limits = Limits::DEFAULT;

fn main() -> Result<()> {
    let args = Args::parse();
    // First: loading libtorch's CUDA half must precede other torch calls.
    let device = cnclip::torch_ext::parse_device(&args.device)?;
    let mut config = ServeConfig::new(&args.checkpoint, args.gallery.clone());
    config.model.vision_model = args.vision_model;
    config.model.text_model = args.text_model;
    config.model.context_length = args.context_length;
    config.device = device;
    config.precision = match args.precision.as_str() {
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        _ => Precision::Fp32,
    };
    config.features = args.features;
    config.cache.dir = args.cache_dir;
    config.cache.batch_size = args.img_batch_size;
    config.cache.progress = true;
    config.engine.max_batch = args.max_batch;
    config.engine.batch_window = Duration::from_millis(args.batch_window_ms);
    config.limits.max_upload_bytes = args.max_upload_bytes;
    config.limits.request_timeout = Duration::from_secs(args.timeout_secs);
    config.limits.max_image_pixels = args.max_image_pixels;
    config.limits.max_concurrent_decodes = args.max_concurrent_decodes;
    config.limits.max_concurrent_uploads = args.max_concurrent_uploads;
    config.limits.header_read_timeout = Duration::from_secs(args.header_timeout_secs);
    config.limits.max_connections = args.max_connections;
    config.limits.shutdown_timeout = Duration::from_secs(args.shutdown_timeout_secs);
    config.limits.max_headers = args.max_headers;
    config.limits.max_header_bytes = args.max_header_bytes;
    config.text_prompt = args.text_prompt;

    eprintln!("loading {} …", args.checkpoint.display());
    cnclip::serve::run(&config, &args.addr, |addr, app| {
        match app.feature_origin() {
            FeatureOrigin::Files(paths) => eprintln!("features: {paths:?}"),
            FeatureOrigin::Cache(CacheOutcome::Reused(path)) => {
                eprintln!("features: reused cache {}", path.display())
            }
            FeatureOrigin::Cache(CacheOutcome::Computed(path)) => {
                eprintln!("features: computed and cached in {}", path.display())
            }
        }
        eprintln!(
            "serving {} images on http://{addr}/ (Ctrl-C to stop)",
            app.images()
        );
    })?;
    eprintln!("stopped");
    Ok(())
}
