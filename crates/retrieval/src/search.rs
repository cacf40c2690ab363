//! Exact top-k by inner product, blocked over queries and gallery, on the CPU or a CUDA device.
//!
//! # The ranking (what "exact" means here)
//!
//! Every pair gets one **canonical score**: the dot product of the two f32 vectors accumulated in
//! f64 in a fixed order ([`exact_score`]) and rounded to f32. It does not depend on BLAS, thread
//! count, block sizes or device. Each query's hits are the `k` gallery rows with the highest
//! canonical score, **ties broken by the lower gallery row** (file order), sorted best first;
//! `k` larger than the gallery returns every row.
//!
//! That is cn_clip's order too: `make_topk_predictions.py` ranks with Python's stable
//! `sorted(..., reverse=True)`, which keeps equal scores in image-file order. cn_clip's scores come
//! from an fp32 CUDA matmul, so when two scores differ by less than fp32 rounding (≈1e-7) the two may
//! order them differently; exact ties (duplicated features) and everything else agree.
//!
//! # How it is computed fast
//!
//! A scan computes an approximate score `s̃` for every pair — an fp32 GEMM ([`ScanPrecision::Fp32`]) or
//! an int8 GEMM of per-row symmetric quantised features ([`ScanPrecision::Int8`]) — together with a
//! rigorous per-query bound `|s̃ − s| ≤ ε` against the canonical score `s`:
//!
//! * fp32 GEMM: `ε = (d+2)·u·‖q‖·max‖g‖` (the classical bound `γ_d Σ|q_i g_i|`, any summation
//!   order, `u = 2⁻²⁴`) plus the canonical rounding.
//! * int8: with `q = q̃ + e_q`, `g = g̃ + e_g`, `|q·g − q̃·g̃| ≤ ‖q̃‖‖e_g‖ + ‖e_q‖‖g̃‖ + ‖e_q‖‖e_g‖`,
//!   with the norms measured exactly per row (maxima over each gallery block), plus float slack for
//!   the int→f32 conversion and scaling. The int32 accumulation itself is exact.
//!
//! Per query the scan keeps the `k` largest lower bounds `s̃ − ε` (their minimum `L` can only
//! rise) and every row whose upper bound `s̃ + ε ≥ L`; at the end those candidates — a superset of
//! the true top-k including every row tied with the k-th — are rescored canonically and ranked.
//! The result is therefore identical to [`brute_force`], whatever the precision of the scan; near
//! ties only enlarge the candidate set. On CUDA the scan keeps the best `k + 32` approximate scores
//! per block (`topk`); a block whose first left-out score still reaches `L − ε` is rescored in full
//! on the CPU (the fallback).
//!
//! Memory stays bounded: the gallery is visited once, block by block (a memory-mapped gallery is
//! paged in as it is scanned), and only one `[query_block, gallery_block]` score block exists.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::bound::{U, fp32_gemm_eps, max_norm, norm, up};
use crate::error::{Result, RetrievalError};
use crate::store::FeatureView;

/// How the scan computes approximate scores (the result is the same for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanPrecision {
    /// fp32 GEMM (MKL on the CPU, cuBLAS without TF32 on CUDA).
    Fp32,
    /// int8 GEMM of quantised features (libtorch `_int_mm`: oneDNN VNNI on the CPU), then exact
    /// rescoring. On CUDA the fp32 scan is used.
    Int8,
}

/// Knobs of [`search`].
#[derive(Debug, Clone, Copy)]
pub struct SearchOptions {
    /// Hits per query (at least 1).
    pub k: usize,
    /// Queries per GEMM block.
    pub query_block: usize,
    /// Gallery rows per block (the gallery is read once, one block at a time).
    pub gallery_block: usize,
    /// Scan precision.
    pub precision: ScanPrecision,
    /// Where the GEMMs run.
    pub device: Device,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            k: 10,
            query_block: 1024,
            gallery_block: 8192,
            precision: ScanPrecision::Int8,
            device: Device::Cpu,
        }
    }
}

/// One retrieved gallery row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Row in the gallery (file order).
    pub index: usize,
    /// Canonical score ([`exact_score`]).
    pub score: f32,
}

/// The ranking order: higher score first, then lower gallery row.
pub fn hit_order(a: &Hit, b: &Hit) -> Ordering {
    b.score.total_cmp(&a.score).then(a.index.cmp(&b.index))
}

/// The canonical score: `Σ a_i·b_i` with every product exact in f64, summed in f64 over 8 fixed
/// lanes (lane `i mod 8`, then `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`), rounded to f32.
pub fn exact_score(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time). The result is bit-identical to the
        // portable path: Rust never fuses the separate multiplies and adds.
        return unsafe { exact_score_avx2(a, b) };
    }
    exact_score_body(a, b)
}

/// True when AVX2 and FMA are available (cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exact_score_avx2(a: &[f32], b: &[f32]) -> f32 {
    exact_score_body(a, b)
}

#[inline(always)]
fn exact_score_body(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] += f64::from(x[l]) * f64::from(y[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lanes[l] += f64::from(*x) * f64::from(*y);
    }
    let s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    s as f32
}

/// The reference: canonical score of every pair, fully sorted. O(n·m·d); for tests and checks.
pub fn brute_force(
    queries: &FeatureView<'_>,
    gallery: &FeatureView<'_>,
    k: usize,
) -> Result<Vec<Vec<Hit>>> {
    validate(queries, gallery, k)?;
    Ok((0..queries.len())
        .into_par_iter()
        .map(|qi| {
            let q = queries.row(qi);
            let mut hits: Vec<Hit> = (0..gallery.len())
                .map(|index| Hit {
                    index,
                    score: exact_score(q, gallery.row(index)),
                })
                .collect();
            hits.sort_by(hit_order);
            hits.truncate(k);
            hits
        })
        .collect())
}

fn validate(queries: &FeatureView<'_>, gallery: &FeatureView<'_>, k: usize) -> Result<()> {
    if k == 0 {
        return Err(RetrievalError::Param("k must be at least 1".into()));
    }
    if gallery.is_empty() {
        return Err(RetrievalError::Param("the gallery is empty".into()));
    }
    // No queries (an empty features file reads as dimension 0): nothing to compare.
    if !queries.is_empty() && queries.dim() != gallery.dim() {
        return Err(RetrievalError::Dim {
            what: "queries vs gallery".into(),
            expected: gallery.dim(),
            actual: queries.dim(),
        });
    }
    if u32::try_from(gallery.len()).is_err() {
        return Err(RetrievalError::Param(
            "gallery larger than 2^32 rows".into(),
        ));
    }
    Ok(())
}

/// Per-row symmetric int8 quantisation: `x ≈ scale·n`, with exact norms of `n·scale` and of the error.
struct Quantised {
    values: Vec<i8>,
    scale: Vec<f32>,
    /// ‖q̃‖ per row.
    qnorm: Vec<f64>,
    /// ‖x − q̃‖ per row.
    err: Vec<f64>,
}

fn quantise(view: &FeatureView<'_>) -> Quantised {
    let d = view.dim();
    let n = view.len();
    let mut values = vec![0i8; n * d];
    let per_row: Vec<(f32, f64, f64)> = values
        .par_chunks_mut(d)
        .enumerate()
        .map(|(i, out)| quantise_row(view.row(i), out))
        .collect();
    finish_quantised(values, per_row)
}

fn quantise_row(x: &[f32], out: &mut [i8]) -> (f32, f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { quantise_row_avx2(x, out) };
    }
    quantise_row_body(x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantise_row_avx2(x: &[f32], out: &mut [i8]) -> (f32, f64, f64) {
    quantise_row_body(x, out)
}

#[inline(always)]
fn quantise_row_body(x: &[f32], out: &mut [i8]) -> (f32, f64, f64) {
    {
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                return (0.0, 0.0, 0.0);
            }
            let scale = amax / 127.0;
            let inv = 127.0 / amax;
            let (mut qn, mut en) = (0f64, 0f64);
            for (o, &v) in out.iter_mut().zip(x) {
                let q = (v * inv).round().clamp(-127.0, 127.0);
                *o = q as i8;
                let deq = f64::from(q) * f64::from(scale);
                qn += deq * deq;
                let e = f64::from(v) - deq;
                en += e * e;
            }
            (scale, up(qn.sqrt()), up(en.sqrt()))
        }
    }
}

fn finish_quantised(values: Vec<i8>, per_row: Vec<(f32, f64, f64)>) -> Quantised {
    let n = per_row.len();
    let mut q = Quantised {
        values,
        scale: Vec::with_capacity(n),
        qnorm: Vec::with_capacity(n),
        err: Vec::with_capacity(n),
    };
    for (s, qn, en) in per_row {
        q.scale.push(s);
        q.qnorm.push(qn);
        q.err.push(en);
    }
    q
}

/// f32 wrapper ordered by `total_cmp`, for the min-heap of lower bounds.
#[derive(Clone, Copy, PartialEq)]
struct Ord32(f32);
impl Eq for Ord32 {}
impl PartialOrd for Ord32 {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ord32 {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0) // reversed: BinaryHeap becomes a min-heap
    }
}

/// What a query keeps while the gallery streams past.
struct QueryState {
    k: usize,
    lower: BinaryHeap<Ord32>,
    /// Candidate rows and their upper bounds.
    cands: Vec<(u32, f32)>,
    /// Gallery ranges whose left-out rows (CUDA top-k) had approximate score up to `.2`, with `.3` = ε.
    unseen: Vec<(usize, usize, f32, f32)>,
}

impl QueryState {
    fn new(k: usize) -> Self {
        Self {
            k,
            lower: BinaryHeap::with_capacity(k + 1),
            cands: Vec::new(),
            unseen: Vec::new(),
        }
    }

    /// `L`: the k-th largest lower bound so far (−∞ until k rows were seen).
    fn floor(&self) -> f32 {
        if self.lower.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.lower.peek().map_or(f32::NEG_INFINITY, |x| x.0)
        }
    }

    #[inline]
    fn offer(&mut self, index: usize, approx: f32, eps: f32) {
        let lo = approx - eps;
        if self.lower.len() < self.k {
            self.lower.push(Ord32(lo));
        } else if lo > self.floor() {
            self.lower.pop();
            self.lower.push(Ord32(lo));
        }
        self.cands.push((index as u32, approx + eps));
        if self.cands.len() > 4 * self.k + 4096 {
            let l = self.floor();
            self.cands.retain(|c| c.1 >= l);
        }
    }

    /// Scans one row of approximate scores for gallery rows `base..base+len`.
    /// `fill(j0, out)` writes approximate scores of rows `j0..j0+out.len()` into `out`.
    #[inline(always)]
    fn scan(&mut self, base: usize, len: usize, eps: f32, fill: impl Fn(usize, &mut [f32])) {
        const CHUNK: usize = 64;
        let mut buf = [0f32; CHUNK];
        let mut j0 = 0;
        while j0 < len {
            let m = CHUNK.min(len - j0);
            let chunk = &mut buf[..m];
            fill(j0, chunk);
            let thr = self.floor() - eps;
            let mut hit = false;
            for &v in chunk.iter() {
                hit |= v >= thr;
            }
            if hit {
                for (t, &v) in chunk.iter().enumerate() {
                    if v >= self.floor() - eps {
                        self.offer(base + j0 + t, v, eps);
                    }
                }
            }
            j0 += m;
        }
    }

    /// Rescoring: candidates (and fallback ranges) scored canonically, ranked, cut to k.
    fn finish(self, q: &[f32], gallery: &FeatureView<'_>) -> Vec<Hit> {
        let l = self.floor();
        let mut cands: Vec<(u32, f32)> = self.cands.into_iter().filter(|c| c.1 >= l).collect();
        // Best upper bound first; stop once an upper bound falls below the k-th canonical score
        // found so far (no later candidate can reach it; equal bounds are still scored, for ties).
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kth: BinaryHeap<Ord32> = BinaryHeap::with_capacity(self.k + 1);
        let mut hits: Vec<Hit> = Vec::with_capacity(self.k * 2);
        for (i, upper) in cands {
            if kth.len() == self.k && kth.peek().is_some_and(|m| upper < m.0) {
                break;
            }
            let index = i as usize;
            let score = exact_score(q, gallery.row(index));
            hits.push(Hit { index, score });
            kth.push(Ord32(score));
            if kth.len() > self.k {
                kth.pop();
            }
        }
        for &(start, end, max_left_out, eps) in &self.unseen {
            if max_left_out + eps >= l {
                // The bound failed for this block: rows not kept by top-k may still belong.
                let seen: std::collections::HashSet<usize> = hits.iter().map(|h| h.index).collect();
                for index in start..end {
                    if !seen.contains(&index) {
                        hits.push(Hit {
                            index,
                            score: exact_score(q, gallery.row(index)),
                        });
                    }
                }
            }
        }
        hits.sort_by(hit_order);
        hits.dedup_by_key(|h| h.index);
        hits.truncate(self.k);
        hits
    }
}

/// Scans a block of int8 accumulators (rows of `gn`) for queries `q0..`, dispatching to AVX2.
#[allow(clippy::too_many_arguments)]
fn scan_block_int8(
    states: &mut [QueryState],
    acc: &[i32],
    gn: usize,
    g0: usize,
    q0: usize,
    qq: &Quantised,
    gq: &Quantised,
    qnorm: &[f64],
    gnorm_max: f64,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { scan_block_int8_avx2(states, acc, gn, g0, q0, qq, gq, qnorm, gnorm_max) };
    }
    scan_block_int8_body(states, acc, gn, g0, q0, qq, gq, qnorm, gnorm_max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn scan_block_int8_avx2(
    states: &mut [QueryState],
    acc: &[i32],
    gn: usize,
    g0: usize,
    q0: usize,
    qq: &Quantised,
    gq: &Quantised,
    qnorm: &[f64],
    gnorm_max: f64,
) {
    scan_block_int8_body(states, acc, gn, g0, q0, qq, gq, qnorm, gnorm_max)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_block_int8_body(
    states: &mut [QueryState],
    acc: &[i32],
    gn: usize,
    g0: usize,
    q0: usize,
    qq: &Quantised,
    gq: &Quantised,
    qnorm: &[f64],
    gnorm_max: f64,
) {
    let gerr = gq.err.iter().copied().fold(0f64, f64::max);
    let gqn = gq.qnorm.iter().copied().fold(0f64, f64::max);
    let gscale = &gq.scale[..gn];
    for (r, (st, row)) in states.iter_mut().zip(acc.chunks(gn)).enumerate() {
        let qi = q0 + r;
        let qs = qq.scale[qi];
        let eps = qq.qnorm[qi] * gerr + qq.err[qi] * gqn + qq.err[qi] * gerr;
        // float slack: int→f32 conversion and two scalings (≤ 4u relative), and the canonical
        // rounding (u relative).
        let slack = 8.0 * U * qq.qnorm[qi] * gqn + 2.0 * U * qnorm[qi] * gnorm_max;
        let eps = up(eps + slack) as f32;
        st.scan(g0, gn, eps, |j0, out| {
            let m = out.len();
            for ((o, &a), &sc) in out
                .iter_mut()
                .zip(&row[j0..j0 + m])
                .zip(&gscale[j0..j0 + m])
            {
                *o = (a as f32 * sc) * qs;
            }
        });
    }
}

/// Scans a block of fp32 scores (rows of `gn`) for queries `q0..`, dispatching to AVX2.
fn scan_block_f32(
    states: &mut [QueryState],
    scores: &[f32],
    gn: usize,
    g0: usize,
    q0: usize,
    eps_of: &dyn Fn(usize) -> f32,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { scan_block_f32_avx2(states, scores, gn, g0, q0, eps_of) };
    }
    scan_block_f32_body(states, scores, gn, g0, q0, eps_of)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scan_block_f32_avx2(
    states: &mut [QueryState],
    scores: &[f32],
    gn: usize,
    g0: usize,
    q0: usize,
    eps_of: &dyn Fn(usize) -> f32,
) {
    scan_block_f32_body(states, scores, gn, g0, q0, eps_of)
}

#[inline(always)]
fn scan_block_f32_body(
    states: &mut [QueryState],
    scores: &[f32],
    gn: usize,
    g0: usize,
    q0: usize,
    eps_of: &dyn Fn(usize) -> f32,
) {
    for (r, (st, row)) in states.iter_mut().zip(scores.chunks(gn)).enumerate() {
        st.scan(g0, gn, eps_of(q0 + r), |j0, out| {
            out.copy_from_slice(&row[j0..j0 + out.len()]);
        });
    }
}

/// Sets libtorch's intra-op threads to 1 for the guard's lifetime (restored on drop).
struct TorchThreads(i32);
impl TorchThreads {
    fn one() -> Self {
        let prev = tch::get_num_threads();
        tch::set_num_threads(1);
        Self(prev)
    }
}
impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

thread_local! {
    /// Each worker's GEMM output, reused across blocks (no page faults for fresh allocations).
    static BUFFER: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
}

fn with_buffer<R>(
    kind: Kind,
    rows: usize,
    cols: usize,
    f: impl FnOnce(&Tensor) -> Result<R>,
) -> Result<R> {
    BUFFER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let fits = slot
            .as_ref()
            .is_some_and(|t| t.kind() == kind && t.size() == [rows as i64, cols as i64]);
        if !fits {
            *slot = None; // free the old one first
            *slot = Some(Tensor::f_empty(
                [rows as i64, cols as i64],
                (kind, Device::Cpu),
            )?);
        }
        match slot.as_ref() {
            Some(t) => f(t),
            None => Err(RetrievalError::Param("no buffer".into())),
        }
    })
}

fn to_tensor(view: &FeatureView<'_>, device: Device) -> Result<Tensor> {
    let t = Tensor::f_from_slice(view.data())?.f_view([view.len() as i64, view.dim() as i64])?;
    Ok(if device == Device::Cpu {
        t
    } else {
        t.f_to_device(device)?
    })
}

/// Exact top-k of every query against the gallery (see the module doc for the ranking).
///
/// Fails on `k = 0`, an empty gallery, a dimension mismatch or a non-finite value (naming its id).
pub fn search(
    queries: &FeatureView<'_>,
    gallery: &FeatureView<'_>,
    opts: &SearchOptions,
) -> Result<Vec<Vec<Hit>>> {
    validate(queries, gallery, opts.k)?;
    if opts.query_block == 0 || opts.gallery_block == 0 {
        return Err(RetrievalError::Param(
            "block sizes must be at least 1".into(),
        ));
    }
    queries.check_finite("queries")?;
    let nq = queries.len();
    let d = queries.dim();
    let k = opts.k.min(gallery.len());
    let mut states: Vec<QueryState> = (0..nq).map(|_| QueryState::new(k)).collect();
    if nq == 0 {
        return Ok(Vec::new());
    }
    let qnorm: Vec<f64> = (0..nq).map(|i| up(norm(queries.row(i)))).collect();
    let cuda = opts.device != Device::Cpu;
    let int8 = opts.precision == ScanPrecision::Int8 && !cuda;
    let _guard = tch::no_grad_guard();

    let quant_q = if int8 { Some(quantise(queries)) } else { None };
    // CUDA: all queries live on the device. CPU: each worker builds its query block itself
    // (tch tensors are not `Sync`).
    let q_dev = if cuda {
        Some(to_tensor(queries, opts.device)?)
    } else {
        None
    };
    // CPU: one single-threaded GEMM per rayon worker and query block, so libtorch's OpenMP pool
    // never spins against rayon; query blocks are sized to split evenly over the workers.
    let threads = rayon::current_num_threads().max(1);
    let n_blocks = threads * nq.div_ceil(threads * opts.query_block);
    let qb = if cuda {
        opts.query_block
    } else {
        nq.div_ceil(n_blocks)
    };
    let _threads = if cuda {
        None
    } else {
        Some(TorchThreads::one())
    };

    let mut g0 = 0;
    while g0 < gallery.len() {
        let g1 = (g0 + opts.gallery_block).min(gallery.len());
        let gv = gallery.rows(g0, g1);
        gv.check_finite("gallery")?;
        let gn = gv.len();
        let gnorm_max = max_norm(gv.data(), d);
        let eps_fp32 = |qi: usize| fp32_gemm_eps(d, qnorm[qi], gnorm_max) as f32;
        if let (true, Some(qq)) = (int8, &quant_q) {
            let gq = quantise(&gv);
            states
                .par_chunks_mut(qb)
                .enumerate()
                .try_for_each(|(bi, chunk)| -> Result<()> {
                    let q0 = bi * qb;
                    let q1 = q0 + chunk.len();
                    let qt = Tensor::f_from_slice(&qq.values[q0 * d..q1 * d])?
                        .f_view([(q1 - q0) as i64, d as i64])?;
                    let gt = Tensor::f_from_slice(&gq.values)?.f_view([gn as i64, d as i64])?;
                    with_buffer(Kind::Int, q1 - q0, gn, |out| {
                        let _ = qt.f_internal_int_mm_out(out, &gt.tr())?;
                        let acc = torch_ext::cpu_slice::<i32>(out)?;
                        scan_block_int8(chunk, acc, gn, g0, q0, qq, &gq, &qnorm, gnorm_max);
                        Ok(())
                    })
                })?;
        } else if let Some(q_all) = &q_dev {
            let gt = to_tensor(&gv, opts.device)?;
            let gt_t = gt.tr();
            let keep = (k + 32).min(gn);
            let mut q0 = 0;
            while q0 < nq {
                let q1 = (q0 + qb).min(nq);
                let scores = q_all
                    .f_narrow(0, q0 as i64, (q1 - q0) as i64)?
                    .f_matmul(&gt_t)?;
                let (vals, idx) = scores.f_topk(keep as i64, 1, true, true)?;
                let vals = vals.f_to_device(Device::Cpu)?.f_contiguous()?;
                let idx = idx
                    .f_to_kind(Kind::Int)?
                    .f_to_device(Device::Cpu)?
                    .f_contiguous()?;
                let vals = torch_ext::cpu_slice::<f32>(&vals)?;
                let idx = torch_ext::cpu_slice::<i32>(&idx)?;
                states[q0..q1]
                    .par_iter_mut()
                    .zip(vals.par_chunks(keep).zip(idx.par_chunks(keep)))
                    .enumerate()
                    .for_each(|(r, (st, (v, ix)))| {
                        let eps = eps_fp32(q0 + r);
                        for (&s, &i) in v.iter().zip(ix) {
                            st.offer(g0 + i as usize, s, eps);
                        }
                        if keep < gn {
                            st.unseen.push((g0, g1, v[keep - 1], eps));
                        }
                    });
                q0 = q1;
            }
        } else {
            states
                .par_chunks_mut(qb)
                .enumerate()
                .try_for_each(|(bi, chunk)| -> Result<()> {
                    let q0 = bi * qb;
                    let q1 = q0 + chunk.len();
                    let qt = to_tensor(&queries.rows(q0, q1), Device::Cpu)?;
                    let gt = to_tensor(&gv, Device::Cpu)?;
                    with_buffer(Kind::Float, q1 - q0, gn, |out| {
                        let _ = qt.f_matmul_out(out, &gt.tr())?;
                        let s = torch_ext::cpu_slice::<f32>(out)?;
                        scan_block_f32(chunk, s, gn, g0, q0, &eps_fp32);
                        Ok(())
                    })
                })?;
        }
        g0 = g1;
    }
    Ok(states
        .into_par_iter()
        .enumerate()
        .map(|(qi, st)| st.finish(queries.row(qi), gallery))
        .collect())
}
