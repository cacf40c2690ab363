//! The error bounds that let a fast approximate scan return the exact ranking: one place for the
//! f32 unit roundoff, the norms and the GEMM bound, used by the batch [`search`](crate::search) and
//! the resident [`index`](crate::index).
//!
//! An fp32 GEMM computes `s̃ = fl(Σ q_i g_i)` in some summation order; the classical bound
//! `|s̃ − Σ q_i g_i| ≤ γ_d Σ|q_i g_i| ≤ γ_d ‖q‖‖g‖` (Higham, *Accuracy and Stability of Numerical
//! Algorithms*, §3.1, `γ_d = d·u/(1 − d·u)`, here written `(d+2)·u·1.01`) holds for any order, and the
//! canonical score ([`exact_score`](crate::exact_score)) differs from the exact dot product by at
//! most one f32 rounding (`u·|s| ≤ u‖q‖‖g‖`, counted twice for slack).

/// Unit roundoff of f32: `2⁻²⁴`.
pub const U: f64 = 1.0 / 16_777_216.0;

/// Rounds a non-negative bound up a little (covers the f64 arithmetic that computed it).
#[inline]
pub fn up(x: f64) -> f64 {
    x * (1.0 + 1e-9) + 1e-12
}

/// Euclidean norm, accumulated in f64 (each square exact).
pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// An upper bound of the norms of the `dim`-wide rows of `data` (row-major).
pub fn max_norm(data: &[f32], dim: usize) -> f64 {
    up(data.chunks_exact(dim.max(1)).map(norm).fold(0f64, f64::max))
}

/// `ε` with `|s̃ − s| ≤ ε` between an fp32 GEMM score `s̃` and the canonical score `s` of a query of
/// norm at most `qnorm` against gallery rows of norm at most `gnorm_max`, dimension `dim`.
#[inline]
pub fn fp32_gemm_eps(dim: usize, qnorm: f64, gnorm_max: f64) -> f64 {
    let d = dim as f64;
    up((d + 2.0) * U * qnorm * gnorm_max * 1.01 + 2.0 * U * qnorm * gnorm_max)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The bound holds for an adversarial-ish case: many equal-sign products summed naively in f32.
    #[test]
    fn fp32_bound_covers_naive_summation() {
        let d = 4096;
        let q: Vec<f32> = (0..d).map(|i| 1.0 + (i % 7) as f32 * 1e-3).collect();
        let g: Vec<f32> = (0..d).map(|i| 0.5 + (i % 11) as f32 * 1e-3).collect();
        let naive = q.iter().zip(&g).fold(0f32, |acc, (a, b)| acc + a * b);
        let canonical = crate::exact_score(&q, &g);
        let eps = fp32_gemm_eps(d, norm(&q), max_norm(&g, d));
        let err = (f64::from(naive) - f64::from(canonical)).abs();
        assert!(err > 0.0, "the case must exercise rounding");
        assert!(err <= eps, "err {err} > eps {eps}");
    }
}
