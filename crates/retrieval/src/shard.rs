//! Feature sets split over several files (shards), searched one shard at a time.
//!
//! A sharded set is the **concatenation of its files in the order given**: row `r` of shard `s` is
//! row `offset(s) + r` of the whole, where `offset(s)` counts the rows of the shards before it. So
//! `a b c` holds the same rows, in the same order, as one file with `a`'s rows, then `b`'s, then
//! `c`'s — and every result here equals [`search`](crate::search) over that one file: the same
//! gallery rows, the same score bits, ties broken by the lower row of the whole (the earlier shard,
//! then file order), also when tied rows sit in different shards.
//!
//! # Why the merge is exact
//!
//! [`search`](crate::search) returns, per query, the first `k` rows of one total order —
//! [`hit_order`]: canonical score descending, then row ascending — and the canonical score of a
//! pair ([`exact_score`](crate::exact_score)) depends only on the two vectors, never on the
//! block, shard or device that computed it. Shifting a shard's rows by its offset keeps that order
//! within the shard, so each member of the global top-`k` is among the top-`k` of its own shard;
//! merging the shards' lists under the same order and keeping `k` gives the global top-`k`
//! exactly ([`merge_hits`]). Each shard's scan starts from the `k`-th score merged so far (`k` rows
//! already reach it, so a row below it cannot enter the merged top-`k`): later shards skip the
//! exact rescoring of rows that could not make it, without changing the result.
//!
//! # Memory
//!
//! [`search_shards`] holds one shard at a time (a native shard is memory-mapped and paged in block
//! by block, a jsonl shard is read into memory), the queries, `k` hits per query, and every id of
//! the gallery (8 bytes a row, to name hits and to find an id that appears in two shards): a
//! gallery larger than memory streams as long as each jsonl shard fits.
//!
//! An id in two shards is an error naming both files; a shard may repeat an id within itself, as
//! one file may (cn_clip's scripts do not check either).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::{Result, RetrievalError, io_err};
use crate::predict::{Direction, write_prediction_lines};
use crate::search::{Hit, SearchOptions, hit_order, search, search_above};
use crate::store::{FeatureKind, FeatureView, load_features};

/// An ordered list of feature files of one kind that together form one feature set.
#[derive(Debug, Clone)]
pub struct Shards {
    kind: FeatureKind,
    paths: Vec<PathBuf>,
}

/// What [`Shards::for_each`] saw: the ids of the whole set, in row order, and per-shard row counts.
#[derive(Debug, Clone, Default)]
pub struct ShardedIds {
    /// Ids of every row of the concatenated set.
    pub ids: Vec<i64>,
    /// Rows of each shard, in shard order.
    pub rows: Vec<usize>,
    /// Feature dimension (0 when every shard is empty).
    pub dim: usize,
}

impl Shards {
    /// The shards `paths`, in this order (at least one), holding features of `kind`.
    pub fn new(
        paths: impl IntoIterator<Item = impl Into<PathBuf>>,
        kind: FeatureKind,
    ) -> Result<Self> {
        let paths: Vec<PathBuf> = paths.into_iter().map(Into::into).collect();
        if paths.is_empty() {
            return Err(RetrievalError::Param(format!(
                "no {} feature files given",
                kind.as_str()
            )));
        }
        Ok(Shards { kind, paths })
    }

    /// The files, in shard order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Image or text.
    pub fn kind(&self) -> FeatureKind {
        self.kind
    }

    /// Loads the shards in order, one at a time, and calls `f(path, offset, view)` for each
    /// (`offset`: row of the whole set where the shard starts; empty shards are passed too).
    ///
    /// Fails on a shard that cannot be read (naming it), a non-empty shard whose dimension differs
    /// from the first non-empty one, and an id that an earlier shard holds (naming both files).
    pub fn for_each(
        &self,
        mut f: impl FnMut(&Path, usize, &FeatureView<'_>) -> Result<()>,
    ) -> Result<ShardedIds> {
        let mut out = ShardedIds::default();
        let mut owners = IdOwners::default();
        let mut dim_from: Option<&Path> = None;
        for (s, path) in self.paths.iter().enumerate() {
            let source = load_features(path, self.kind)?;
            let view = source.view();
            if !view.is_empty() {
                match dim_from {
                    None => {
                        out.dim = view.dim();
                        dim_from = Some(path);
                    }
                    Some(first) if out.dim != view.dim() => {
                        return Err(RetrievalError::Dim {
                            what: format!(
                                "shard {} against shard {}",
                                path.display(),
                                first.display()
                            ),
                            expected: out.dim,
                            actual: view.dim(),
                        });
                    }
                    Some(_) => {}
                }
            }
            owners.add(s, view.ids(), self.kind, |i| self.paths[i].clone())?;
            f(path, out.ids.len(), &view)?;
            out.ids.extend_from_slice(view.ids());
            out.rows.push(view.len());
        }
        Ok(out)
    }
}

/// Which shard holds each id seen so far; finds an id held by two shards.
#[derive(Debug, Default)]
pub(crate) struct IdOwners {
    owner: HashMap<i64, usize>,
}

impl IdOwners {
    /// Records the ids of shard `shard`; fails on one an earlier shard holds.
    pub(crate) fn add(
        &mut self,
        shard: usize,
        ids: &[i64],
        kind: FeatureKind,
        path_of: impl Fn(usize) -> PathBuf,
    ) -> Result<()> {
        self.owner.reserve(ids.len());
        for &id in ids {
            let first = *self.owner.entry(id).or_insert(shard);
            if first != shard {
                return Err(RetrievalError::DuplicateShardId {
                    what: kind.as_str(),
                    id,
                    first: path_of(first),
                    second: path_of(shard),
                });
            }
        }
        Ok(())
    }
}

/// Merges `more` (a shard's hits, best first, rows relative to the shard) into `acc` (best first,
/// rows of the whole) with the shard's rows shifted by `offset`, keeping the best `k` by
/// [`hit_order`].
pub fn merge_hits(acc: &mut Vec<Hit>, more: &[Hit], offset: usize, k: usize) {
    let mut merged = Vec::with_capacity((acc.len() + more.len()).min(k));
    let (mut a, mut b) = (acc.iter().peekable(), more.iter().peekable());
    while merged.len() < k {
        let shifted = b.peek().map(|h| Hit {
            index: h.index + offset,
            score: h.score,
        });
        let take_a = match (a.peek(), &shifted) {
            (Some(x), Some(y)) => hit_order(x, y).is_le(),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_a {
            merged.extend(a.next().copied());
        } else {
            b.next();
            merged.extend(shifted);
        }
    }
    *acc = merged;
}

/// The result of [`search_shards`]: per query, hits indexing the concatenated gallery.
#[derive(Debug, Clone)]
pub struct ShardedHits {
    /// `hits[q]`: the best `k` rows of the whole gallery for query `q`, best first.
    pub hits: Vec<Vec<Hit>>,
    /// The gallery's ids, in row order (`ids[hit.index]` names a hit).
    pub ids: Vec<i64>,
    /// Rows of each gallery shard, in shard order.
    pub rows: Vec<usize>,
    /// Feature dimension of the gallery.
    pub dim: usize,
}

/// Exact top-k of every query against a gallery split into `gallery`'s shards, streamed one shard
/// at a time: equal to [`search`] over the concatenated gallery (see the module doc).
///
/// Fails as [`search`] does (a shard's failure names the shard), on an id in two shards, and when
/// every shard is empty.
pub fn search_shards(
    queries: &FeatureView<'_>,
    gallery: &Shards,
    opts: &SearchOptions,
) -> Result<ShardedHits> {
    if opts.k == 0 {
        return Err(RetrievalError::Param("k must be at least 1".into()));
    }
    // Here, not in each shard's search: a bad query is not the shard's fault.
    queries.check_finite("queries")?;
    let mut merged: Vec<Vec<Hit>> = vec![Vec::new(); queries.len()];
    let seen = gallery.for_each(|path, offset, view| {
        if view.is_empty() {
            return Ok(());
        }
        // Each query's k-th score merged so far: k rows reach it, so a row of this shard below it
        // cannot enter the merged top-k and need not be rescored.
        let floors: Vec<f32> = merged
            .iter()
            .map(|acc| match acc.get(opts.k - 1) {
                Some(kth) => kth.score,
                None => f32::NEG_INFINITY,
            })
            .collect();
        let local = search_above(queries, view, opts, Some(&floors)).map_err(|e| {
            RetrievalError::Shard {
                path: path.to_path_buf(),
                source: Box::new(e),
            }
        })?;
        merged
            .par_iter_mut()
            .zip(local.par_iter())
            .for_each(|(acc, more)| merge_hits(acc, more, offset, opts.k));
        Ok(())
    })?;
    if seen.ids.is_empty() {
        return Err(all_empty(gallery));
    }
    Ok(ShardedHits {
        hits: merged,
        ids: seen.ids,
        rows: seen.rows,
        dim: seen.dim,
    })
}

fn all_empty(gallery: &Shards) -> RetrievalError {
    match gallery.paths() {
        [one] => RetrievalError::Empty {
            path: one.clone(),
            what: gallery.kind().as_str(),
        },
        many => RetrievalError::Param(format!(
            "the gallery is empty: none of its {} {} feature files holds a row",
            many.len(),
            gallery.kind().as_str()
        )),
    }
}

/// What [`predict_shards`] did.
#[derive(Debug, Clone, Default)]
pub struct PredictSummary {
    /// Query rows (prediction lines written).
    pub queries: usize,
    /// Gallery rows.
    pub gallery: usize,
    /// Feature dimension.
    pub dim: usize,
    /// Files (queries or gallery) that hold no rows.
    pub empty: Vec<PathBuf>,
    /// Time spent searching (with a sharded gallery, loading its shards included).
    pub search: Duration,
}

/// cn_clip's prediction jsonl for queries and gallery each given as one file or several shards:
/// one line per query row, in query order (shard order, then file order), each line the top
/// `opts.k` gallery ids as [`search`] over the concatenated files ranks them.
///
/// The query shards are read one at a time; a gallery of one file is loaded once, a gallery of
/// several is streamed shard by shard for each query shard (so with many query shards, prefer
/// native gallery shards: re-opening them costs a memory map). The file is written beside `output`
/// and renamed over it when complete.
pub fn predict_shards(
    output: impl AsRef<Path>,
    direction: Direction,
    queries: &Shards,
    gallery: &Shards,
    opts: &SearchOptions,
) -> Result<PredictSummary> {
    let output = output.as_ref();
    let (qkind, gkind) = match direction {
        Direction::TextToImage => (FeatureKind::Text, FeatureKind::Image),
        Direction::ImageToText => (FeatureKind::Image, FeatureKind::Text),
    };
    if queries.kind() != qkind || gallery.kind() != gkind {
        return Err(RetrievalError::Param(format!(
            "{direction:?} needs {} queries and a {} gallery",
            qkind.as_str(),
            gkind.as_str()
        )));
    }
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.ok_or_else(|| io_err(output, std::io::ErrorKind::InvalidInput.into()))?;
    let tmp = output.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = predict_into(&tmp, output, direction, queries, gallery, opts);
    let renamed = written.and_then(|summary| {
        std::fs::rename(&tmp, output).map_err(|e| io_err(output, e))?;
        Ok(summary)
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

fn predict_into(
    tmp: &Path,
    shown: &Path,
    direction: Direction,
    queries: &Shards,
    gallery: &Shards,
    opts: &SearchOptions,
) -> Result<PredictSummary> {
    let mut summary = PredictSummary::default();
    // One gallery file: loaded once and searched as `search` does; several: streamed per query shard.
    let single = match gallery.paths() {
        [one] => {
            let source = load_features(one, gallery.kind())?;
            if source.view().is_empty() {
                return Err(all_empty(gallery));
            }
            Some(source)
        }
        _ => None,
    };
    let file = File::create(tmp).map_err(|e| io_err(shown, e))?;
    let mut w = BufWriter::new(file);
    // Rows per gallery shard and the dimension, once a sharded gallery has been streamed.
    let mut gallery_rows: Option<(Vec<usize>, usize)> = None;
    let seen = queries.for_each(|qpath, _, qview| {
        if qview.is_empty() {
            summary.empty.push(qpath.to_path_buf());
            return Ok(());
        }
        let t = Instant::now();
        let written = match &single {
            Some(source) => {
                let g = source.view();
                let hits = search(qview, &g, opts)?;
                write_prediction_lines(&mut w, shown, direction, qview.ids(), g.ids(), &hits)
            }
            None => {
                let found = search_shards(qview, gallery, opts)?;
                gallery_rows = Some((found.rows, found.dim));
                write_prediction_lines(
                    &mut w,
                    shown,
                    direction,
                    qview.ids(),
                    &found.ids,
                    &found.hits,
                )
            }
        };
        summary.search += t.elapsed();
        written
    })?;
    w.flush().map_err(|e| io_err(shown, e))?;
    let file = w.into_inner().map_err(|e| io_err(shown, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(shown, e))?;
    summary.queries = seen.ids.len();
    match &single {
        Some(source) => {
            summary.gallery = source.view().len();
            summary.dim = source.view().dim();
        }
        None => {
            let (rows, dim) = match gallery_rows {
                Some(r) => r,
                None => {
                    // No query rows, so no shard was searched: still check the gallery's shards.
                    let g = gallery.for_each(|_, _, _| Ok(()))?;
                    if g.ids.is_empty() {
                        return Err(all_empty(gallery));
                    }
                    (g.rows, g.dim)
                }
            };
            summary.gallery = rows.iter().sum();
            summary.dim = dim;
            for (path, &n) in gallery.paths().iter().zip(&rows) {
                if n == 0 {
                    summary.empty.push(path.clone());
                }
            }
        }
    }
    Ok(summary)
}
