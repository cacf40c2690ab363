//! Exact top-k at MUGE size (5,004 text queries × 30,399 images, d = 512 and 1024, k = 10) and a
//! 1M-image gallery (d = 512, 1,000 queries), fp32 and int8 scans, on random unit features.
//!
//! The `shards` group times the same MUGE-size int8 search with the gallery in memory (`search`)
//! against the gallery as 1 and 4 native shard files (`search_shards`: one shard at a time, opened,
//! memory-mapped and merged per query; files in the page cache).
//!
//! `cargo bench -p retrieval --bench topk` (about 6 minutes on 2 cores);
//! `-- muge`, `-- 1m` or `-- shards` picks a group. `RAYON_NUM_THREADS` and libtorch's threads follow the
//! machine; pin both with `taskset`/`OMP_NUM_THREADS` to compare with FAISS
//! (`scripts/bench/retrieval_faiss.py` times FAISS and cn_clip on the same features).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use retrieval::{
    FeatureKind, FeatureView, ScanPrecision, SearchOptions, Shards, search, search_shards,
    write_native,
};

/// splitmix64 → uniform in [-1, 1); rows normalised. Deterministic.
fn unit_rows(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let mut s = seed;
    let mut v: Vec<f32> = (0..n * d)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // sum of two uniforms: a bell shape, cheaper than Box-Muller
            let a = (z >> 40) as f32 / (1u64 << 24) as f32;
            let b = (z & 0xFF_FFFF) as f32 / (1u64 << 24) as f32;
            a + b - 1.0
        })
        .collect();
    for row in v.chunks_exact_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn run_group(c: &mut Criterion, name: &str, nq: usize, ng: usize, dims: &[usize]) {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    for &d in dims {
        let q = unit_rows(1, nq, d);
        let g = unit_rows(2, ng, d);
        let qi: Vec<i64> = (0..nq as i64).collect();
        let gi: Vec<i64> = (0..ng as i64).collect();
        let (Ok(qv), Ok(gv)) = (FeatureView::new(&qi, &q, d), FeatureView::new(&gi, &g, d)) else {
            return;
        };
        group.throughput(Throughput::Elements((nq * ng * d * 2) as u64));
        for precision in [ScanPrecision::Int8, ScanPrecision::Fp32] {
            let opts = SearchOptions {
                precision,
                ..SearchOptions::default()
            };
            group.bench_with_input(BenchmarkId::new(format!("{precision:?}"), d), &d, |b, _| {
                b.iter(|| search(&qv, &gv, &opts).map(|h| h.len()).unwrap_or(0));
            });
        }
    }
    group.finish();
}

fn muge(c: &mut Criterion) {
    run_group(c, "muge", 5004, 30399, &[512, 1024]);
}

fn one_million(c: &mut Criterion) {
    run_group(c, "1m", 1000, 1_000_000, &[512]);
}

/// In-memory gallery vs the same gallery in 1 and 4 native shards (MUGE size, d = 512, int8).
fn shards(c: &mut Criterion) {
    let (nq, ng, d) = (5004, 30399, 512);
    let q = unit_rows(1, nq, d);
    let g = unit_rows(2, ng, d);
    let qi: Vec<i64> = (0..nq as i64).collect();
    let gi: Vec<i64> = (0..ng as i64).collect();
    let (Ok(qv), Ok(gv)) = (FeatureView::new(&qi, &q, d), FeatureView::new(&gi, &g, d)) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("cnclip-bench-shards-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let write = |n: usize| -> Option<Shards> {
        let per = ng.div_ceil(n);
        let paths: Vec<_> = (0..n)
            .map(|s| dir.join(format!("g{n}.{s}.safetensors")))
            .collect();
        for (s, path) in paths.iter().enumerate() {
            let rows = gv.rows(s * per, (s + 1) * per);
            write_native(path, &rows, FeatureKind::Image, None).ok()?;
        }
        Shards::new(paths, FeatureKind::Image).ok()
    };
    let (Some(one), Some(four)) = (write(1), write(4)) else {
        return;
    };
    let opts = SearchOptions::default();
    let mut group = c.benchmark_group("shards");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements((nq * ng * d * 2) as u64));
    group.bench_function("in-memory", |b| {
        b.iter(|| search(&qv, &gv, &opts).map(|h| h.len()).unwrap_or(0));
    });
    for (name, set) in [("1-shard", &one), ("4-shards", &four)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                search_shards(&qv, set, &opts)
                    .map(|h| h.hits.len())
                    .unwrap_or(0)
            });
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, muge, one_million, shards);
criterion_main!(benches);
