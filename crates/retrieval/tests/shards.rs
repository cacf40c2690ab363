#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Sharded search equals unsharded search: the same gallery rows, the same score bits, the same tie
//! order — including exact ties whose rows sit in different shards — for text→image and
//! image→text, jsonl and native shards, both scan precisions, the batch search, the prediction file
//! and the resident index. Plus the errors a set of shards can have.
//!
//! No tolerance anywhere: the claim is bit equality (canonical scores do not depend on the shard).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use retrieval::{
    Direction, FeatureKind, FeatureView, Hit, NativeFeatures, ResidentIndex, RetrievalError,
    ScanPrecision, SearchOptions, Shards, load_features, predict_shards, search, search_shards,
    write_jsonl, write_native,
};
use tch::Device;

const D: usize = 16;

/// splitmix64, so the test needs no rand crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn value(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("cnclip-shards-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Shard sizes: an empty shard, a one-row shard, and boundaries that cut through tied groups.
const SIZES: [usize; 6] = [97, 0, 1, 60, 59, 83];

/// Rows that duplicate `TIE_SOURCE`, placed on both sides of shard boundaries (96|97, 97|98,
/// 157|158) and inside shards: every query equal to that row ties them all at its top.
const TIES: [usize; 6] = [40, 96, 97, 157, 158, 299];
const TIE_SOURCE: usize = 12;

/// 300 gallery rows (ids descending, so "lower id" and "earlier row" differ) and 9 queries, two of
/// them copies of the tied row, one a copy of a row near a shard boundary.
fn data() -> (Vec<i64>, Vec<f32>, Vec<i64>, Vec<f32>) {
    let n: usize = SIZES.iter().sum();
    let mut rng = Rng(7);
    let mut g: Vec<f32> = (0..n * D).map(|_| rng.value()).collect();
    let src = g[TIE_SOURCE * D..(TIE_SOURCE + 1) * D].to_vec();
    for &t in &TIES {
        g[t * D..(t + 1) * D].copy_from_slice(&src);
    }
    // A second tied pair across the 157|158 boundary region: rows 156 and 200 equal row 210.
    let other = g[210 * D..211 * D].to_vec();
    g[156 * D..157 * D].copy_from_slice(&other);
    g[200 * D..201 * D].copy_from_slice(&other);
    let gids: Vec<i64> = (0..n as i64).map(|i| 90_000 - 3 * i).collect();
    let mut q: Vec<f32> = (0..9 * D).map(|_| rng.value()).collect();
    q[..D].copy_from_slice(&src);
    q[4 * D..5 * D].copy_from_slice(&src);
    q[7 * D..8 * D].copy_from_slice(&other);
    let qids: Vec<i64> = (0..9).map(|i| 500 + i).collect();
    (gids, g, qids, q)
}

/// Writes `view` whole (`{stem}.all.{ext}`) and in the shards of `SIZES` (`{stem}.{s}.{ext}`).
fn write_sets(
    dir: &Dir,
    stem: &str,
    view: &FeatureView<'_>,
    kind: FeatureKind,
    native: bool,
) -> (PathBuf, Vec<PathBuf>) {
    let ext = if native { "safetensors" } else { "jsonl" };
    let write = |path: &Path, v: &FeatureView<'_>| {
        if native {
            write_native(path, v, kind, None).unwrap();
        } else {
            write_jsonl(path, v, kind).unwrap();
        }
    };
    let whole = dir.join(&format!("{stem}.all.{ext}"));
    write(&whole, view);
    let mut shards = Vec::new();
    let mut start = 0;
    for (s, &len) in SIZES.iter().enumerate() {
        let path = dir.join(&format!("{stem}.{s}.{ext}"));
        write(&path, &view.rows(start, start + len));
        shards.push(path);
        start += len;
    }
    (whole, shards)
}

fn bits(hits: &[Vec<Hit>]) -> Vec<Vec<(usize, u32)>> {
    hits.iter()
        .map(|l| l.iter().map(|h| (h.index, h.score.to_bits())).collect())
        .collect()
}

fn options(k: usize, precision: ScanPrecision, gallery_block: usize) -> SearchOptions {
    SearchOptions {
        k,
        query_block: 4,
        gallery_block,
        precision,
        device: Device::Cpu,
    }
}

/// `search_shards` over the shards == `search` over the whole file, for every k, precision and
/// block size, jsonl and native, both directions (the gallery is images or texts).
#[test]
fn sharded_search_equals_unsharded() {
    let dir = Dir::new("search");
    let (gids, g, qids, q) = data();
    let gallery = FeatureView::new(&gids, &g, D).unwrap();
    for gkind in [FeatureKind::Image, FeatureKind::Text] {
        for native in [false, true] {
            let stem = format!("{}-{native}", gkind.as_str());
            let (whole, shards) = write_sets(&dir, &stem, &gallery, gkind, native);
            let whole = load_features(&whole, gkind).unwrap();
            let whole = whole.view();
            let shards = Shards::new(shards, gkind).unwrap();
            // Native rows are normalised on write; the queries are used as given either way.
            let queries = FeatureView::new(&qids, &q, D).unwrap();
            for precision in [ScanPrecision::Int8, ScanPrecision::Fp32] {
                for block in [7, 8192] {
                    for k in [1, 3, 6, 10, 299, 1000] {
                        let opts = options(k, precision, block);
                        let want = search(&queries, &whole, &opts).unwrap();
                        let got = search_shards(&queries, &shards, &opts).unwrap();
                        let what = format!("{stem} {precision:?} block {block} k {k}");
                        assert_eq!(bits(&got.hits), bits(&want), "{what}");
                        assert_eq!(got.ids, whole.ids(), "{what}");
                        assert_eq!(got.rows, SIZES.to_vec(), "{what}");
                    }
                }
            }
        }
    }
}

/// The tied rows are ranked by gallery row across shard boundaries (not by id, not by shard
/// arrival): the top of a query equal to the tied row is exactly `TIES` (with the source row).
#[test]
fn ties_across_shard_boundaries_keep_gallery_order() {
    let dir = Dir::new("ties");
    let (gids, g, qids, q) = data();
    let gallery = FeatureView::new(&gids, &g, D).unwrap();
    let (_, shards) = write_sets(&dir, "t", &gallery, FeatureKind::Image, false);
    let shards = Shards::new(shards, FeatureKind::Image).unwrap();
    let queries = FeatureView::new(&qids, &q, D).unwrap();
    let mut tied: Vec<usize> = TIES.to_vec();
    tied.insert(0, TIE_SOURCE);
    for k in [2, 4, 7] {
        let got = search_shards(&queries, &shards, &options(k, ScanPrecision::Int8, 8192)).unwrap();
        for qi in [0, 4] {
            let rows: Vec<usize> = got.hits[qi].iter().map(|h| h.index).collect();
            assert_eq!(rows, tied[..k], "query {qi}, k {k}");
            let score = got.hits[qi][0].score.to_bits();
            assert!(got.hits[qi].iter().all(|h| h.score.to_bits() == score));
        }
        let rows: Vec<usize> = got.hits[7].iter().take(3).map(|h| h.index).collect();
        assert_eq!(rows, [156, 200, 210][..k.min(3)], "k {k}");
    }
}

/// cn_clip's prediction file from shards (gallery sharded, queries sharded, both) is byte-equal to
/// the one from whole files, text→image and image→text, jsonl and native.
#[test]
fn prediction_files_from_shards_equal_whole_files() {
    let dir = Dir::new("predict");
    let (gids, g, qids, q) = data();
    // Queries get more rows so that they can be sharded too (the same shard sizes as the gallery).
    let n: usize = SIZES.iter().sum();
    let mut rng = Rng(11);
    let mut qrows: Vec<f32> = (0..n * D).map(|_| rng.value()).collect();
    qrows[..q.len()].copy_from_slice(&q);
    let mut qids_all: Vec<i64> = (0..n as i64).map(|i| 1_000 + i).collect();
    qids_all[..qids.len()].copy_from_slice(&qids);
    let gallery = FeatureView::new(&gids, &g, D).unwrap();
    let queries = FeatureView::new(&qids_all, &qrows, D).unwrap();
    for direction in [Direction::TextToImage, Direction::ImageToText] {
        let (gkind, qkind) = match direction {
            Direction::TextToImage => (FeatureKind::Image, FeatureKind::Text),
            Direction::ImageToText => (FeatureKind::Text, FeatureKind::Image),
        };
        for native in [false, true] {
            let tag = format!("{direction:?}-{native}");
            let (gw, gs) = write_sets(&dir, &format!("g-{tag}"), &gallery, gkind, native);
            let (qw, qs) = write_sets(&dir, &format!("q-{tag}"), &queries, qkind, native);
            let sets = |g: &[PathBuf], q: &[PathBuf]| {
                (
                    Shards::new(q.to_vec(), qkind).unwrap(),
                    Shards::new(g.to_vec(), gkind).unwrap(),
                )
            };
            let run = |name: &str, g: &[PathBuf], q: &[PathBuf]| {
                let (qs, gs) = sets(g, q);
                let out = dir.join(&format!("{tag}-{name}.jsonl"));
                let opts = options(10, ScanPrecision::Int8, 32);
                let summary = predict_shards(&out, direction, &qs, &gs, &opts).unwrap();
                assert_eq!((summary.queries, summary.gallery, summary.dim), (n, n, D));
                assert_eq!(
                    summary.empty.len(),
                    usize::from(g.len() > 1) + usize::from(q.len() > 1)
                );
                std::fs::read(&out).unwrap()
            };
            let want = run(
                "whole",
                std::slice::from_ref(&gw),
                std::slice::from_ref(&qw),
            );
            assert_eq!(want.iter().filter(|&&b| b == b'\n').count(), n, "{tag}");
            assert_eq!(
                run("gallery-sharded", &gs, std::slice::from_ref(&qw)),
                want,
                "{tag}"
            );
            assert_eq!(
                run("queries-sharded", std::slice::from_ref(&gw), &qs),
                want,
                "{tag}"
            );
            assert_eq!(run("both-sharded", &gs, &qs), want, "{tag}");
        }
    }
}

/// The resident index (the server's) over native shards equals the index over the whole file and
/// the batch search over the shards.
#[test]
fn resident_index_over_shards_equals_whole() {
    let dir = Dir::new("resident");
    let (gids, g, _qids, q) = data();
    let gallery = FeatureView::new(&gids, &g, D).unwrap();
    let (whole, shards) = write_sets(&dir, "r", &gallery, FeatureKind::Image, true);
    let whole =
        ResidentIndex::new(Arc::new(NativeFeatures::open(&whole).unwrap()), Device::Cpu).unwrap();
    let opened: Vec<Arc<NativeFeatures>> = shards
        .iter()
        .map(|p| Arc::new(NativeFeatures::open(p).unwrap()))
        .collect();
    let sharded = ResidentIndex::from_shards(opened, Device::Cpu).unwrap();
    assert_eq!(sharded.ids(), whole.ids());
    for i in 0..whole.len() {
        assert_eq!(sharded.row(i), whole.row(i), "row {i}");
    }
    let qids: Vec<i64> = (0..9).collect();
    let queries = FeatureView::new(&qids, &q, D).unwrap();
    let shards = Shards::new(shards, FeatureKind::Image).unwrap();
    for k in [1, 4, 10, 300] {
        let want = whole.search(&q, k).unwrap();
        assert_eq!(bits(&sharded.search(&q, k).unwrap()), bits(&want), "k {k}");
        let batch = search_shards(&queries, &shards, &options(k, ScanPrecision::Fp32, 64)).unwrap();
        assert_eq!(bits(&batch.hits), bits(&want), "k {k}");
    }
}

/// An id in two shards fails, naming the id and both files — in the batch search and the index;
/// an id repeated inside one shard is allowed, as in one file.
#[test]
fn an_id_in_two_shards_is_an_error_naming_both_files() {
    let dir = Dir::new("dup");
    let rows: Vec<f32> = (0..3 * D).map(|i| (i % 5) as f32 + 1.0).collect();
    let a = dir.join("a.safetensors");
    let b = dir.join("b.jsonl");
    let c = dir.join("c.safetensors");
    write_native(
        &a,
        &FeatureView::new(&[1, 2, 2], &rows, D).unwrap(),
        FeatureKind::Image,
        None,
    )
    .unwrap();
    write_jsonl(
        &b,
        &FeatureView::new(&[3, 4, 5], &rows, D).unwrap(),
        FeatureKind::Image,
    )
    .unwrap();
    write_native(
        &c,
        &FeatureView::new(&[6, 4, 7], &rows, D).unwrap(),
        FeatureKind::Image,
        None,
    )
    .unwrap();
    let queries = FeatureView::new(&[9], &rows[..D], D).unwrap();
    let opts = options(2, ScanPrecision::Int8, 8192);
    // a repeats id 2 within itself: fine.
    let ok = Shards::new([&a, &b], FeatureKind::Image).unwrap();
    assert_eq!(
        search_shards(&queries, &ok, &opts).unwrap().ids,
        [1, 2, 2, 3, 4, 5]
    );
    let bad = Shards::new([&a, &b, &c], FeatureKind::Image).unwrap();
    let e = search_shards(&queries, &bad, &opts).unwrap_err();
    assert!(
        matches!(e, RetrievalError::DuplicateShardId { id: 4, .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("image id 4") && msg.contains(&b.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains(&c.display().to_string()), "{msg}");
    let native: Vec<_> = [&a, &c]
        .iter()
        .map(|p| Arc::new(NativeFeatures::open(p).unwrap()))
        .collect();
    let dup = write_native(
        dir.join("d.safetensors"),
        &FeatureView::new(&[8, 1], &rows[..2 * D], D).unwrap(),
        FeatureKind::Image,
        None,
    );
    dup.unwrap();
    assert!(ResidentIndex::from_shards(native, Device::Cpu).is_ok());
    let native: Vec<_> = [dir.join("a.safetensors"), dir.join("d.safetensors")]
        .iter()
        .map(|p| Arc::new(NativeFeatures::open(p).unwrap()))
        .collect();
    let Err(e) = ResidentIndex::from_shards(native, Device::Cpu) else {
        panic!("duplicate id across resident shards accepted");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("image id 1") && msg.contains("a.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("d.safetensors"), "{msg}");
}

/// Shards of different dimensions, every shard empty, and no shard at all are errors that say so;
/// an empty shard among others adds no rows.
#[test]
fn bad_shard_sets_are_refused() {
    let dir = Dir::new("bad");
    let rows: Vec<f32> = (0..2 * D).map(|i| (i % 3) as f32 + 0.5).collect();
    let a = dir.join("a.jsonl");
    let narrow = dir.join("narrow.jsonl");
    let empty = dir.join("empty.jsonl");
    write_jsonl(
        &a,
        &FeatureView::new(&[1, 2], &rows, D).unwrap(),
        FeatureKind::Image,
    )
    .unwrap();
    std::fs::write(&narrow, "{\"image_id\": 3, \"feature\": [1.0, 2.0]}\n").unwrap();
    std::fs::write(&empty, "").unwrap();
    let queries = FeatureView::new(&[9], &rows[..D], D).unwrap();
    let opts = options(1, ScanPrecision::Int8, 8192);
    let shards = |p: &[&PathBuf]| Shards::new(p.iter().copied(), FeatureKind::Image).unwrap();

    let msg = search_shards(&queries, &shards(&[&a, &narrow]), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("narrow.jsonl") && msg.contains("a.jsonl"),
        "{msg}"
    );
    assert!(msg.contains("dimension 2 does not match 16"), "{msg}");

    let msg = search_shards(&queries, &shards(&[&empty, &empty]), &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("the gallery is empty"), "{msg}");

    let with_empty = search_shards(&queries, &shards(&[&empty, &a, &empty]), &opts).unwrap();
    let alone = search_shards(&queries, &shards(&[&a]), &opts).unwrap();
    assert_eq!(bits(&with_empty.hits), bits(&alone.hits));
    assert_eq!(with_empty.rows, [0, 2, 0]);

    let mut nan = rows[..D].to_vec();
    nan[3] = f32::NAN;
    let bad_query = FeatureView::new(&[77], &nan, D).unwrap();
    let msg = search_shards(&bad_query, &shards(&[&a, &empty]), &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("queries: feature of id 77"), "{msg}");

    let e = search_shards(
        &queries,
        &shards(&[&a]),
        &options(0, ScanPrecision::Int8, 8192),
    );
    assert!(e.unwrap_err().to_string().contains("k must be at least 1"));
    assert!(Shards::new(Vec::<PathBuf>::new(), FeatureKind::Image).is_err());
}
