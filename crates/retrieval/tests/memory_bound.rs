//! Search over a gallery larger than the memory it may use: a memory-mapped native feature file of
//! 153.6 MB (300,000 × 128 fp32) is searched while a sampler records the process's anonymous
//! memory (`RssAnon`, which excludes the mapped file's pages: those are page cache the kernel can
//! drop). The growth must stay far below the gallery's size — the scan holds one gallery block
//! (`gallery_block` rows, quantised) and one score block at a time, plus the per-query candidates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use retrieval::{FeatureKind, FeatureView, NativeFeatures, SearchOptions, search, write_native};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

fn rss_anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Deterministic pseudo-random unit-ish vectors (an LCG: no dependency, fast in debug builds).
fn vectors(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n * d)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

#[test]
#[cfg(target_os = "linux")]
fn searching_a_mapped_gallery_keeps_anonymous_memory_bounded() {
    let (n, d) = (300_000usize, 128usize);
    let dir = std::env::temp_dir().join(format!("retrieval-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gallery.safetensors");
    {
        let ids: Vec<i64> = (0..n as i64).collect();
        let data = vectors(n, d, 7);
        write_native(
            &path,
            &FeatureView::new(&ids, &data, d).unwrap(),
            FeatureKind::Image,
            None,
        )
        .unwrap();
    } // the in-memory copy is freed here
    let gallery_bytes = (n * d * 4) as u64;
    let query_ids: Vec<i64> = (0..16).collect();
    let query_data = vectors(16, d, 11);
    let queries = FeatureView::new(&query_ids, &query_data, d).unwrap();
    let gallery = NativeFeatures::open(&path).unwrap();

    let baseline = rss_anon_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let opts = SearchOptions {
        gallery_block: 8192,
        ..SearchOptions::default()
    };
    let hits = search(&queries, &gallery.view(), &opts).unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(hits.len(), 16);
    assert!(hits.iter().all(|h| h.len() == 10));

    let growth_kib = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "anonymous memory grew by {:.1} MB while searching a {:.1} MB mapped gallery",
        growth_kib as f64 / 1024.0,
        gallery_bytes as f64 / 1e6
    );
    assert!(
        growth_kib * 1024 < gallery_bytes / 4,
        "anonymous memory grew by {growth_kib} KiB, a quarter of the gallery is {} KiB",
        gallery_bytes / 4 / 1024
    );
    drop(gallery);
    std::fs::remove_dir_all(&dir).unwrap();
}
