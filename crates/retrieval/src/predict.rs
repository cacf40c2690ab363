//! cn_clip's prediction jsonl: `{"text_id": 8428, "image_ids": [1076345, ...]}` per query
//! (`make_topk_predictions.py`) or `{"image_id": …, "text_ids": […]}` (`make_topk_predictions_tr.py`),
//! one line per query in query-file order, written as Python's `json.dumps` does.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Result, RetrievalError, io_err};
use crate::search::Hit;
use crate::store::FeatureView;
/// Which script's output to write: text→image (`make_topk_predictions.py`) or image→text
/// (`make_topk_predictions_tr.py`); `eval`'s type, whose keys the predictions carry.
pub use eval::Direction;

/// Writes one line per query; `hits[i]` belongs to `queries.ids()[i]` and indexes `gallery`.
pub fn write_predictions(
    path: impl AsRef<Path>,
    direction: Direction,
    queries: &FeatureView<'_>,
    gallery: &FeatureView<'_>,
    hits: &[Vec<Hit>],
) -> Result<()> {
    let path = path.as_ref();
    if hits.len() != queries.len() {
        return Err(RetrievalError::Param(format!(
            "{} hit lists for {} queries",
            hits.len(),
            queries.len()
        )));
    }
    let (qkey, gkey) = (direction.query_key(), direction.items_key());
    let file = File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = BufWriter::new(file);
    let gids = gallery.ids();
    for (qid, list) in queries.ids().iter().zip(hits) {
        let mut line = format!("{{\"{qkey}\": {qid}, \"{gkey}\": [");
        for (j, h) in list.iter().enumerate() {
            let gid = gids.get(h.index).ok_or_else(|| {
                RetrievalError::Param(format!("query {qid}: hit row {} out of range", h.index))
            })?;
            if j > 0 {
                line.push_str(", ");
            }
            line.push_str(&gid.to_string());
        }
        line.push_str("]}\n");
        w.write_all(line.as_bytes()).map_err(|e| io_err(path, e))?;
    }
    w.flush().map_err(|e| io_err(path, e))
}
