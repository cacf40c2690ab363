//! Loader throughput on the CPU: base64 JPEG in cn_clip's LMDB → normalised `[B,3,S,S]` tensor and
//! token ids, without augmentation, for comparison with cn_clip's `LMDBDataset`
//! (`scripts/bench/cnclip_loader.py` on the same LMDB; `scripts/bench/compare_loader_cpu.sh` runs
//! both).
//!
//! `cargo bench --bench loader -- --lmdb DIR/lmdb/train [--resolution 224] [--samples 2000]
//! [--batch 32] [--workers 1,2]`
//!
//! For each worker count it loads the first `samples` indices once (after a warm-up pass over the
//! same samples, so both sides read from the page cache) and prints one JSON line. Samples per
//! second per core divides by the worker count (0 workers: the calling thread, one core).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use cnclip::data::lmdb::LmdbSplit;
use cnclip::data::loader::{Loader, LoaderConfig};
use cnclip::data::sampler::EpochPlan;
use cnclip::data::text::TextPipeline;
use cnclip::model::preprocess::Preprocessor;

struct Args {
    lmdb: String,
    resolution: u32,
    samples: u64,
    batch: usize,
    workers: Vec<usize>,
    stages: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        lmdb: String::new(),
        resolution: 224,
        samples: 2000,
        batch: 32,
        workers: vec![1],
        stages: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--lmdb" => args.lmdb = value()?,
            "--resolution" => args.resolution = value()?.parse()?,
            "--samples" => args.samples = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--workers" => {
                args.workers = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--stages" => args.stages = true,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        !args.lmdb.is_empty(),
        "--lmdb DIR (an LMDB split with pairs/ and imgs/) is required"
    );
    Ok(args)
}

fn run(
    split: &Arc<LmdbSplit>,
    transform: &Arc<Preprocessor>,
    plan: &EpochPlan,
    batch: usize,
    workers: usize,
) -> anyhow::Result<u64> {
    let config = LoaderConfig {
        batch_size: batch,
        workers,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(
        split.clone(),
        transform.clone(),
        TextPipeline::new(52)?,
        plan,
        config,
    )?;
    let mut n = 0u64;
    for b in loader {
        n += b?.len() as u64;
    }
    Ok(n)
}

/// Seconds per stage over `n` samples on one thread: where a sample's time goes.
fn stages(split: &LmdbSplit, resolution: u32, n: u64) -> anyhow::Result<()> {
    use cnclip::model::preprocess::decode_named;
    let reader = split.reader()?;
    let text = TextPipeline::new(52)?;
    let s = resolution as usize;
    let mut out = vec![0f32; 3 * s * s];
    let mut row = vec![0i64; 52];
    let mut t = [0f64; 5];
    for i in 0..n {
        let t0 = Instant::now();
        let sample = reader.sample(i)?;
        let t1 = Instant::now();
        let decoded = decode_named(&sample.image, "bench")?;
        let t2 = Instant::now();
        let rgb = decoded.resize_rgb(s, s)?;
        let t3 = Instant::now();
        rgb.normalize_into(&mut out);
        let t4 = Instant::now();
        text.encode_into(&sample.text, &mut row);
        let t5 = Instant::now();
        for (k, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]
            .iter()
            .enumerate()
        {
            t[k] += (*b - *a).as_secs_f64();
        }
    }
    let us = |x: f64| x / n as f64 * 1e6;
    println!(
        "{{\"impl\": \"ours\", \"mode\": \"stages\", \"samples\": {n}, \"us_per_sample\": {{\"lmdb_pickle_base64\": {:.1}, \"decode\": {:.1}, \"resize_rgb\": {:.1}, \"normalize\": {:.1}, \"tokenize\": {:.1}}}}}",
        us(t[0]),
        us(t[1]),
        us(t[2]),
        us(t[3]),
        us(t[4])
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    tch::set_num_threads(1);
    let split =
        Arc::new(LmdbSplit::open(&args.lmdb).with_context(|| format!("opening {}", args.lmdb))?);
    let transform = Arc::new(Preprocessor::new(args.resolution)?);
    let n = args.samples.min(split.num_samples());
    let plan = EpochPlan {
        epoch: 0,
        offset: 0,
        indices: (0..n).collect(),
    };
    // Warm-up: page cache, tokenizer vocabulary, allocator.
    run(&split, &transform, &plan, args.batch, 1)?;
    if args.stages {
        stages(&split, args.resolution, n)?;
    }
    for &workers in &args.workers {
        let start = Instant::now();
        let seen = run(&split, &transform, &plan, args.batch, workers)?;
        let secs = start.elapsed().as_secs_f64();
        let per_s = seen as f64 / secs;
        println!(
            "{{\"impl\": \"ours\", \"mode\": \"loader\", \"workers\": {workers}, \"batch\": {}, \"resolution\": {}, \"samples\": {seen}, \"seconds\": {secs:.3}, \"samples_per_s\": {per_s:.1}, \"samples_per_s_per_core\": {:.1}}}",
            args.batch,
            args.resolution,
            per_s / workers.max(1) as f64
        );
    }
    Ok(())
}
