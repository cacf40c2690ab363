//! A gallery kept resident for repeated queries (a server): one `[N, dim]` f32 tensor on a device,
//! built once, so a query costs one small GEMM and a `topk` instead of [`search`](crate::search)'s
//! per-call preparation of the whole gallery (a copy, norms and a finiteness check of every row,
//! which is right for batch prediction and dominates a single query: ~75 ms on a 30k gallery).
//!
//! The ranking is [`search`](crate::search)'s exact one: the GEMM gives approximate scores `s̃`
//! with `|s̃ − s| ≤ ε` ([`bound::fp32_gemm_eps`], the bound the batch search uses), so every row
//! whose canonical score can reach the k-th best has `s̃ ≥ s̃_k − 2ε`. Those candidates are
//! rescored with [`exact_score`] and ordered by [`hit_order`] (higher score, then lower gallery
//! row): the same rows and scores as [`search`](crate::search).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::bound;
use crate::error::{Result, RetrievalError};
use crate::search::{Hit, exact_score, hit_order};
use crate::store::NativeFeatures;

/// A gallery ready for repeated exact top-k.
pub struct ResidentIndex {
    features: Arc<NativeFeatures>,
    matrix: Tensor,
    max_norm: f64,
}

impl ResidentIndex {
    /// Copies the features to `device` once (fails on a non-finite value, naming its id).
    pub fn new(features: Arc<NativeFeatures>, device: Device) -> Result<Self> {
        let view = features.view();
        view.check_finite("gallery features")?;
        let matrix = Tensor::f_from_slice(view.data())?
            .f_view([view.len() as i64, view.dim() as i64])?
            .f_to_device(device)?;
        let max_norm = bound::max_norm(view.data(), view.dim());
        Ok(ResidentIndex {
            features,
            matrix,
            max_norm,
        })
    }

    pub fn len(&self) -> usize {
        self.features.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gallery (ids, rows) the hits index into.
    pub fn features(&self) -> &Arc<NativeFeatures> {
        &self.features
    }

    pub fn dim(&self) -> usize {
        self.features.view().dim()
    }

    /// Exact top-`k` (at least 1, at most the gallery size) for each row of `queries`
    /// (`[n·dim]`, row-major); fails on a non-finite value, naming the query row as its id.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        let d = self.dim();
        let view = self.features.view();
        if !queries.len().is_multiple_of(d) {
            return Err(RetrievalError::Dim {
                what: "queries".into(),
                expected: d,
                actual: queries.len() % d,
            });
        }
        let n = queries.len() / d;
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(bad) = queries.iter().position(|v| !v.is_finite()) {
            return Err(RetrievalError::NonFinite {
                what: "queries".into(),
                id: (bad / d) as i64,
                position: bad % d,
            });
        }
        let k = k.clamp(1, self.len());
        let _guard = tch::no_grad_guard();
        let q = Tensor::f_from_slice(queries)?
            .f_view([n as i64, d as i64])?
            .f_to_device(self.matrix.device())?;
        let scores = q.f_matmul(&self.matrix.f_tr()?)?;
        let (top, _) = scores.f_topk(k as i64, 1, true, true)?;
        let kth = Vec::<f32>::try_from(
            top.f_select(1, k as i64 - 1)?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?,
        )?;
        let mut out = Vec::with_capacity(n);
        for (i, kth) in kth.iter().enumerate() {
            let query = &queries[i * d..(i + 1) * d];
            let eps = bound::fp32_gemm_eps(d, bound::up(bound::norm(query)), self.max_norm);
            let threshold = f64::from(*kth) - 2.0 * eps;
            let rows = Vec::<i64>::try_from(
                scores
                    .f_get(i as i64)?
                    .f_ge(threshold)?
                    .f_nonzero()?
                    .f_flatten(0, -1)?
                    .f_to_device(Device::Cpu)?,
            )?;
            let mut hits: Vec<Hit> = rows
                .into_iter()
                .map(|r| {
                    let index = r as usize;
                    Hit {
                        index,
                        score: exact_score(query, view.row(index)),
                    }
                })
                .collect();
            hits.sort_by(hit_order);
            hits.truncate(k);
            out.push(hits);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{FeatureKind, FeatureView, SearchOptions, write_native};

    /// Same ids and scores as `retrieval::search`, ties included (duplicated rows).
    #[test]
    fn matches_retrieval_search() {
        let (n, d) = (500usize, 24usize);
        let mut state = 12345u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut data: Vec<f32> = (0..n * d).map(|_| next()).collect();
        // Rows 10 and 400 duplicate row 3: exact ties, broken by the lower row.
        let row3 = data[3 * d..4 * d].to_vec();
        data[10 * d..11 * d].copy_from_slice(&row3);
        data[400 * d..401 * d].copy_from_slice(&row3);
        let ids: Vec<i64> = (0..n as i64).map(|i| 5000 - i).collect();
        let path =
            std::env::temp_dir().join(format!("cnclip-retrieval-index-{}.st", std::process::id()));
        write_native(
            &path,
            &FeatureView::new(&ids, &data, d).unwrap(),
            FeatureKind::Image,
            None,
        )
        .unwrap();
        let features = Arc::new(NativeFeatures::open(&path).unwrap());
        let index = ResidentIndex::new(features.clone(), Device::Cpu).unwrap();
        let mut queries: Vec<f32> = (0..7 * d).map(|_| next()).collect();
        queries[..d].copy_from_slice(features.view().row(3));
        let qids: Vec<i64> = (0..7).collect();
        for k in [1, 3, 10, 600] {
            let ours = index.search(&queries, k).unwrap();
            let theirs = crate::search(
                &FeatureView::new(&qids, &queries, d).unwrap(),
                &features.view(),
                &SearchOptions {
                    k,
                    ..SearchOptions::default()
                },
            )
            .unwrap();
            assert_eq!(ours, theirs, "k={k}");
        }
        let first = index.search(&queries[..d], 3).unwrap();
        let tied: Vec<usize> = first[0].iter().map(|h| h.index).collect();
        assert_eq!(tied, vec![3, 10, 400]);
        let _ = std::fs::remove_file(path);
    }
}
