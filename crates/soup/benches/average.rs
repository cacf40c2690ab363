//! Averaging two checkpoints versus reading them.
//!
//! ```sh
//! cargo bench -p soup --bench average            # ViT-B-16 (two 0.75 GB files)
//! SOUP_BENCH_MODEL=RN50 SOUP_BENCH_DIR=/tmp/x cargo bench -p soup --bench average
//! ```
//! Two random checkpoints of the model are written once; every measurement runs with the files in
//! the page cache (one untimed pass first). `SOUP_BENCH_REPS` rounds (default 7) of all five
//! measurements in turn; medians of the times and of each round's ratio to `read both`:
//! * `read both`: `std::fs::read` of both files (the bytes, nothing else);
//! * `load_native both`: both files read into tensors (what averaging in memory would start with);
//! * `average → file`: the streamed average written as a native file (fsync + rename included),
//!   and the same without the fsync (what the disk's write speed adds);
//! * `average → model`: the streamed average copied into a model's variables (how merges are
//!   scored; building the model is not timed).

use cnclip_model::weights::NativeReader;
use cnclip_model::{Clip, ClipConfig};
use soup::average::{average, plan};
use soup::sink::{FileSink, ModelSink};
use std::path::PathBuf;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let name = std::env::var("SOUP_BENCH_MODEL").unwrap_or_else(|_| "ViT-B-16".into());
    let reps: usize = std::env::var("SOUP_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let dir = std::env::var_os("SOUP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("cnclip-soup-bench"));
    std::fs::create_dir_all(&dir)?;
    let config = ClipConfig::from_name(&name)?;
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| dir.join(format!("{name}-{i}.safetensors")))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        if !p.is_file() {
            tch::manual_seed(i as i64);
            Clip::new(&config, tch::Device::Cpu).save_native(p)?;
        }
    }
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    let out = dir.join("avg.safetensors");

    let read = || {
        for p in &paths {
            std::hint::black_box(std::fs::read(p).ok());
        }
    };
    let load = || {
        for p in &paths {
            std::hint::black_box(cnclip_model::weights::load_native(p).ok());
        }
    };
    let to_file = |durable: bool| {
        let opened: Vec<NativeReader> = paths
            .iter()
            .filter_map(|p| NativeReader::open(p).ok())
            .collect();
        let members: Vec<(&NativeReader, f64)> = opened.iter().map(|c| (c, 0.5)).collect();
        let mut sink = FileSink::new(&out, Vec::new()).durable(durable);
        let result = match plan(&members) {
            Ok(plan) => average(&members, &plan, &mut sink, &mut |_| {}),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            eprintln!("{e}");
        }
    };
    // Into a model's variables (how a merge is scored): the model is built before the clock
    // starts, as its initialisation is not part of averaging.
    let to_model = || {
        let opened: Vec<NativeReader> = paths
            .iter()
            .filter_map(|p| NativeReader::open(p).ok())
            .collect();
        let members: Vec<(&NativeReader, f64)> = opened.iter().map(|c| (c, 0.5)).collect();
        let Ok(plan) = plan(&members) else {
            return f64::NAN;
        };
        let mut sink = ModelSink::new(&plan, tch::Device::Cpu, &paths[0]);
        timed(|| {
            let _ = average(&members, &plan, &mut sink, &mut |_| {});
        })
    };
    // Warm-up: files in the page cache, output file's blocks recycled.
    read();
    to_file(true);
    // Round robin, so that a change in the machine's load hits every measurement alike; the
    // ratios are taken per round.
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); 5];
    for _ in 0..reps {
        let t = [
            timed(read),
            timed(load),
            timed(|| to_file(true)),
            timed(|| to_file(false)),
            to_model(),
        ];
        for (row, t) in rows.iter_mut().zip(t) {
            row.push(t);
        }
    }
    let gb = bytes as f64 / 1e9;
    println!(
        "{name}: two checkpoints, {gb:.2} GB in all, {} threads, median of {reps} rounds",
        rayon::current_num_threads()
    );
    let names = [
        "read both",
        "load_native both",
        "average -> file",
        "  without fsync",
        "average -> model",
    ];
    for (what, row) in names.iter().zip(&rows) {
        let ratio = median(row.iter().zip(&rows[0]).map(|(t, r)| t / r).collect());
        let t = median(row.clone());
        println!(
            "  {what:<18} {t:>7.3} s  {:>6.2} GB/s  {ratio:>5.2}x read",
            gb / t
        );
    }
    let _ = std::fs::remove_file(&out);
    Ok(())
}
