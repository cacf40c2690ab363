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
use crate::shard::IdOwners;
use crate::store::NativeFeatures;

/// A gallery ready for repeated exact top-k: one feature file, or several shards concatenated in
/// the order given (row `offset(s) + r` is row `r` of shard `s`, as in [`crate::shard`]).
pub struct ResidentIndex {
    shards: Vec<Arc<NativeFeatures>>,
    /// Row of the whole where each shard starts.
    offsets: Vec<usize>,
    ids: Vec<i64>,
    dim: usize,
    matrix: Tensor,
    max_norm: f64,
}

impl ResidentIndex {
    /// Copies the features to `device` once (fails on a non-finite value, naming its id).
    pub fn new(features: Arc<NativeFeatures>, device: Device) -> Result<Self> {
        Self::from_shards(vec![features], device)
    }

    /// One index over several shards (at least one), copied to `device` shard by shard into one
    /// matrix. Fails on a non-finite value (naming its id and shard), shards of different
    /// dimensions or kinds, and an id held by two shards (naming both files).
    pub fn from_shards(shards: Vec<Arc<NativeFeatures>>, device: Device) -> Result<Self> {
        let first = shards
            .first()
            .ok_or_else(|| RetrievalError::Param("no gallery feature files given".into()))?;
        let (dim, kind) = (first.view().dim(), first.kind());
        let mut owners = IdOwners::default();
        let mut offsets = Vec::with_capacity(shards.len());
        let mut ids = Vec::new();
        let mut max_norm = 0f64;
        for (s, shard) in shards.iter().enumerate() {
            let view = shard.view();
            // With several shards an error names the shard; one file keeps its plain error.
            let named = |source: RetrievalError| match shards.len() {
                1 => source,
                _ => RetrievalError::Shard {
                    path: shard.path().to_path_buf(),
                    source: Box::new(source),
                },
            };
            if view.dim() != dim || shard.kind() != kind {
                return Err(named(RetrievalError::Param(format!(
                    "{} features of dimension {}, but {} holds {} features of dimension {dim}",
                    shard.kind().as_str(),
                    view.dim(),
                    first.path().display(),
                    kind.as_str()
                ))));
            }
            view.check_finite("gallery features").map_err(named)?;
            owners.add(s, view.ids(), kind, |i| shards[i].path().to_path_buf())?;
            offsets.push(ids.len());
            ids.extend_from_slice(view.ids());
            max_norm = max_norm.max(bound::max_norm(view.data(), dim));
        }
        let _guard = tch::no_grad_guard();
        let matrix = Tensor::f_empty([ids.len() as i64, dim as i64], (Kind::Float, device))?;
        for (shard, &offset) in shards.iter().zip(&offsets) {
            let view = shard.view();
            if view.is_empty() {
                continue;
            }
            let rows =
                Tensor::f_from_slice(view.data())?.f_view([view.len() as i64, dim as i64])?;
            matrix
                .f_narrow(0, offset as i64, view.len() as i64)?
                .f_copy_(&rows)?;
        }
        Ok(ResidentIndex {
            shards,
            offsets,
            ids,
            dim,
            matrix,
            max_norm,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids of the gallery rows the hits index into (all shards, in order).
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Arc<NativeFeatures>] {
        &self.shards
    }

    /// Row `index` of the whole gallery (panics when out of range, like slice indexing).
    pub fn row(&self, index: usize) -> &[f32] {
        let s = self.offsets.partition_point(|&o| o <= index) - 1;
        // Empty shards share their offset with the next one: `partition_point` picks the last of
        // them, the one that holds the row.
        self.shards[s].view().row(index - self.offsets[s])
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Exact top-`k` (at least 1, at most the gallery size) for each row of `queries`
    /// (`[n·dim]`, row-major); fails on a non-finite value, naming the query row as its id.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        let d = self.dim();
        if !queries.len().is_multiple_of(d) {
            return Err(RetrievalError::Dim {
                what: "queries".into(),
                expected: d,
                actual: queries.len() % d,
            });
        }
        let n = queries.len() / d;
        if self.is_empty() {
            return Err(RetrievalError::Param("the gallery is empty".into()));
        }
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
                        score: exact_score(query, self.row(index)),
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
