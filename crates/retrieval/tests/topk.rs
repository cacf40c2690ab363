#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Top-k against the brute-force reference: random cases, near ties, exact ties, k > gallery,
//! every precision and block shape, and the parameter errors.

use retrieval::{
    FeatureView, Hit, RetrievalError, ScanPrecision, SearchOptions, brute_force, exact_score,
    search,
};
use tch::Device;

/// Small deterministic generator (splitmix64), so the test needs no rand crate.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn unit_rows(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
    for row in v.chunks_exact_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// A gallery full of near ties: clusters of rows that differ in a few ulps, exact duplicates, and
/// rows that are copies of queries (so scores near the top are crowded).
fn tricky_gallery(rng: &mut Rng, queries: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut g = unit_rows(rng, n, d);
    let nq = queries.len() / d;
    for i in 0..n {
        let mode = rng.below(4);
        let src: Vec<f32> = match mode {
            0 => continue,
            1 if i > 0 => g[(i - 1) * d..i * d].to_vec(), // exact duplicate of the previous row
            2 => queries[rng.below(nq) * d..][..d].to_vec(), // a query itself
            _ => {
                let j = rng.below(i.max(1));
                g[j * d..(j + 1) * d].to_vec()
            }
        };
        let row = &mut g[i * d..(i + 1) * d];
        row.copy_from_slice(&src);
        if mode == 3 {
            // nudge one coordinate by a few ulps: a near tie
            let c = rng.below(d);
            let ulps = rng.below(5) as u32;
            row[c] = f32::from_bits(row[c].to_bits().wrapping_add(ulps));
        }
    }
    g
}

fn ids(n: usize) -> Vec<i64> {
    (0..n as i64).map(|i| 1000 + i).collect()
}

fn check_same(got: &[Vec<Hit>], want: &[Vec<Hit>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: query count");
    for (qi, (g, w)) in got.iter().zip(want).enumerate() {
        let gi: Vec<usize> = g.iter().map(|h| h.index).collect();
        let wi: Vec<usize> = w.iter().map(|h| h.index).collect();
        assert_eq!(gi, wi, "{what}: query {qi}");
        for (a, b) in g.iter().zip(w) {
            assert_eq!(a.score.to_bits(), b.score.to_bits(), "{what}: query {qi}");
        }
    }
}

#[test]
fn random_cases_match_brute_force_in_every_precision() {
    let mut rng = Rng(7);
    for case in 0..24 {
        let d = [8, 13, 32, 64, 96][case % 5];
        let nq = 1 + rng.below(40);
        let ng = 1 + rng.below(300);
        let k = 1 + rng.below(20);
        let q = unit_rows(&mut rng, nq, d);
        let g = if case % 2 == 0 {
            tricky_gallery(&mut rng, &q, ng, d)
        } else {
            unit_rows(&mut rng, ng, d)
        };
        let (qi, gi) = (ids(nq), ids(ng));
        let qv = FeatureView::new(&qi, &q, d).unwrap();
        let gv = FeatureView::new(&gi, &g, d).unwrap();
        let want = brute_force(&qv, &gv, k).unwrap();
        assert_eq!(want[0].len(), k.min(ng));
        for precision in [ScanPrecision::Fp32, ScanPrecision::Int8] {
            for (qb, gb) in [(1024, 8192), (3, 17), (1, 1)] {
                let opts = SearchOptions {
                    k,
                    query_block: qb,
                    gallery_block: gb,
                    precision,
                    device: Device::Cpu,
                };
                let got = search(&qv, &gv, &opts).unwrap();
                check_same(&got, &want, &format!("case {case} {precision:?} {qb}x{gb}"));
            }
        }
    }
}

#[test]
fn exact_ties_keep_gallery_order_and_k_beyond_gallery_returns_all() {
    // Dyadic unit vectors: every dot product is exact, so ties are exact in any arithmetic.
    let d = 4;
    let g = vec![
        0.5, 0.5, 0.5, 0.5, // 0
        1.0, 0.0, 0.0, 0.0, // 1
        0.5, 0.5, 0.5, 0.5, // 2 (duplicate of 0)
        0.0, 1.0, 0.0, 0.0, // 3
        0.5, 0.5, 0.5, -0.5, // 4
        1.0, 0.0, 0.0, 0.0, // 5 (duplicate of 1)
    ];
    let q = vec![1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5];
    let (qi, gi) = (ids(2), ids(6));
    let qv = FeatureView::new(&qi, &q, d).unwrap();
    let gv = FeatureView::new(&gi, &g, d).unwrap();
    for precision in [ScanPrecision::Fp32, ScanPrecision::Int8] {
        let opts = SearchOptions {
            k: 50,
            precision,
            gallery_block: 4,
            ..SearchOptions::default()
        };
        let got = search(&qv, &gv, &opts).unwrap();
        let idx: Vec<Vec<usize>> = got
            .iter()
            .map(|h| h.iter().map(|x| x.index).collect())
            .collect();
        // query 0 scores: 0.5, 1, 0.5, 0, 0.5, 1 → 1,5 | 0,2,4 | 3
        assert_eq!(idx[0], vec![1, 5, 0, 2, 4, 3], "{precision:?}");
        // query 1 scores: 1, .5, 1, .5, .5, .5 → 0,2 | 1,3,4,5
        assert_eq!(idx[1], vec![0, 2, 1, 3, 4, 5], "{precision:?}");
        assert_eq!(got[0][0].score, 1.0);
    }
}

#[test]
fn non_unit_features_are_ranked_by_raw_dot_product() {
    let mut rng = Rng(99);
    let d = 16;
    let q: Vec<f32> = (0..5 * d).map(|_| rng.normal() * 3.0).collect();
    let g: Vec<f32> = (0..70 * d).map(|_| rng.normal() * 0.01).collect();
    let (qi, gi) = (ids(5), ids(70));
    let qv = FeatureView::new(&qi, &q, d).unwrap();
    let gv = FeatureView::new(&gi, &g, d).unwrap();
    let want = brute_force(&qv, &gv, 7).unwrap();
    for precision in [ScanPrecision::Fp32, ScanPrecision::Int8] {
        let opts = SearchOptions {
            k: 7,
            precision,
            ..SearchOptions::default()
        };
        check_same(&search(&qv, &gv, &opts).unwrap(), &want, "raw");
    }
    // and the reference itself is the canonical dot product, sorted
    let s = exact_score(qv.row(0), gv.row(want[0][0].index));
    assert_eq!(s, want[0][0].score);
    assert!((0..70).all(|j| exact_score(qv.row(0), gv.row(j)) <= s));
}

#[test]
fn bad_parameters_are_errors() {
    let g = vec![1.0f32, 0.0, 0.0, 1.0];
    let gi = ids(2);
    let gv = FeatureView::new(&gi, &g, 2).unwrap();
    let q3 = vec![1.0f32, 0.0, 0.0];
    let qi = ids(1);
    let qv3 = FeatureView::new(&qi, &q3, 3).unwrap();
    let qv = FeatureView::new(&qi, &g[..2], 2).unwrap();
    let k0 = SearchOptions {
        k: 0,
        ..SearchOptions::default()
    };
    assert!(matches!(search(&qv, &gv, &k0), Err(RetrievalError::Param(m)) if m.contains("k must")));
    assert!(matches!(
        search(&qv3, &gv, &SearchOptions::default()),
        Err(RetrievalError::Dim {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    let empty = FeatureView::new(&[], &[], 2).unwrap();
    let err = search(&qv, &empty, &SearchOptions::default()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let nan = vec![1.0f32, 0.0, f32::NAN, 1.0];
    let nv = FeatureView::new(&gi, &nan, 2).unwrap();
    let err = search(&qv, &nv, &SearchOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            RetrievalError::NonFinite {
                id: 1001,
                position: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(FeatureView::new(&gi, &g[..3], 2).is_err());
    assert!(matches!(
        gv.index_of(5, "image"),
        Err(RetrievalError::UnknownId { id: 5, .. })
    ));
}

/// On a GPU machine: the CUDA scan (fp32 matmul + top-k per block, rescored where the bound
/// fails) returns the brute-force ids. Skipped, and says so, without CUDA.
#[test]
fn cuda_search_matches_brute_force() {
    if !torch_ext::init_cuda() {
        eprintln!(
            "skipped: {}",
            torch_ext::cuda_init_error().unwrap_or_default()
        );
        return;
    }
    let mut rng = Rng(11);
    for case in 0..12 {
        let d = [16, 64, 512][case % 3];
        let nq = 1 + rng.below(64);
        let ng = 1 + rng.below(2000);
        let k = 1 + rng.below(20);
        let q = unit_rows(&mut rng, nq, d);
        let g = if case % 2 == 0 {
            tricky_gallery(&mut rng, &q, ng, d)
        } else {
            unit_rows(&mut rng, ng, d)
        };
        let (qi, gi) = (ids(nq), ids(ng));
        let qv = FeatureView::new(&qi, &q, d).unwrap();
        let gv = FeatureView::new(&gi, &g, d).unwrap();
        let want = brute_force(&qv, &gv, k).unwrap();
        for (qb, gb) in [(1024, 8192), (7, 129)] {
            let opts = SearchOptions {
                k,
                query_block: qb,
                gallery_block: gb,
                precision: ScanPrecision::Fp32,
                device: Device::Cuda(0),
            };
            let got = search(&qv, &gv, &opts).unwrap();
            check_same(&got, &want, &format!("cuda case {case} {qb}x{gb}"));
        }
    }
    eprintln!("cuda: 12 cases × 2 block shapes identical to brute force");
}
