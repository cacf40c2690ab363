//! Feature stores: cn_clip's feature jsonl and the native memory-mapped safetensors file.
//!
//! * **jsonl** (what `cn_clip/eval/extract_features.py` writes): one object per line,
//!   `{"image_id": 1000002, "feature": [0.0123, ...]}` or `{"text_id": ..., "feature": [...]}`.
//!   Read streaming ([`JsonlReader`]), every error names `file:line`; floats are parsed as Python does
//!   (correctly rounded f64, then rounded to f32 like `np.array(..., dtype=np.float32)`). Features are
//!   kept as written (cn_clip's top-k scripts do not re-normalise either).
//! * **native** (`.safetensors`): tensors `ids` (I64 `[n]`) and `features` (F32 `[n, d]`, every row
//!   L2-normalised on write), metadata `kind` (`image`/`text`), `dim`, and `model` when known.
//!   [`NativeFeatures::open`] memory-maps the file, so a gallery larger than RAM is paged in block by
//!   block while [`crate::search`] streams over it.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, RetrievalError, io_err};
use cnclip_model::weights::{NativeWriter, SafetensorsReader, TensorEntry, WeightsError};
use safetensors::Dtype;
use std::collections::HashMap;

/// Which side of the retrieval a feature set holds; decides the jsonl id key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `{"image_id": …}`
    Image,
    /// `{"text_id": …}`
    Text,
}

impl FeatureKind {
    /// The jsonl key of the id: `image_id` or `text_id`.
    pub fn id_key(self) -> &'static str {
        match self {
            FeatureKind::Image => "image_id",
            FeatureKind::Text => "text_id",
        }
    }

    /// `image` or `text` (the native file's `kind` metadata).
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureKind::Image => "image",
            FeatureKind::Text => "text",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "image" => Some(FeatureKind::Image),
            "text" => Some(FeatureKind::Text),
            _ => None,
        }
    }
}

/// A borrowed `[n, dim]` row-major feature matrix with one id per row.
#[derive(Debug, Clone, Copy)]
pub struct FeatureView<'a> {
    ids: &'a [i64],
    data: &'a [f32],
    dim: usize,
}

impl<'a> FeatureView<'a> {
    /// Checks that `data` holds `ids.len()` rows of `dim` values.
    pub fn new(ids: &'a [i64], data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(RetrievalError::Param("feature dimension 0".into()));
        }
        if ids.len().checked_mul(dim) != Some(data.len()) {
            return Err(RetrievalError::Param(format!(
                "{} ids but {} values (dimension {dim})",
                ids.len(),
                data.len()
            )));
        }
        Ok(Self { ids, data, dim })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row ids, in row order.
    pub fn ids(&self) -> &'a [i64] {
        self.ids
    }

    /// All values, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Row `i` (panics when out of range, like slice indexing).
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows `start..end` (clamped to the view).
    pub fn rows(&self, start: usize, end: usize) -> FeatureView<'a> {
        let end = end.min(self.len());
        let start = start.min(end);
        FeatureView {
            ids: &self.ids[start..end],
            data: &self.data[start * self.dim..end * self.dim],
            dim: self.dim,
        }
    }

    /// Row index of `id` (first occurrence), or [`RetrievalError::UnknownId`].
    pub fn index_of(&self, id: i64, what: &'static str) -> Result<usize> {
        self.ids
            .iter()
            .position(|&x| x == id)
            .ok_or(RetrievalError::UnknownId { what, id })
    }

    /// Fails on the first NaN or infinite value, naming its id.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        // `max(1)`: an empty set read from an empty file has dimension 0 and no data.
        for (i, row) in self.data.chunks_exact(self.dim.max(1)).enumerate() {
            if let Some(position) = row.iter().position(|v| !v.is_finite()) {
                return Err(RetrievalError::NonFinite {
                    what: what.to_string(),
                    id: self.ids[i],
                    position,
                });
            }
        }
        Ok(())
    }
}

/// An owned feature set (what a jsonl file holds, or features computed in memory).
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// Image or text.
    pub kind: FeatureKind,
    /// Feature dimension.
    pub dim: usize,
    /// One id per row.
    pub ids: Vec<i64>,
    /// `ids.len() * dim` values, row-major.
    pub data: Vec<f32>,
    /// The model that produced them, when known.
    pub model: Option<String>,
}

impl Features {
    /// An empty set of dimension `dim`.
    pub fn new(kind: FeatureKind, dim: usize) -> Self {
        Self {
            kind,
            dim,
            ids: Vec::new(),
            data: Vec::new(),
            model: None,
        }
    }

    /// Appends one row; fails on a dimension mismatch or a non-finite value.
    pub fn push(&mut self, id: i64, feature: &[f32]) -> Result<()> {
        if feature.len() != self.dim {
            return Err(RetrievalError::Dim {
                what: format!("{} id {id}", self.kind.as_str()),
                expected: self.dim,
                actual: feature.len(),
            });
        }
        if let Some(position) = feature.iter().position(|v| !v.is_finite()) {
            return Err(RetrievalError::NonFinite {
                what: self.kind.as_str().to_string(),
                id,
                position,
            });
        }
        self.ids.push(id);
        self.data.extend_from_slice(feature);
        Ok(())
    }

    /// The borrowed matrix.
    pub fn view(&self) -> FeatureView<'_> {
        FeatureView {
            ids: &self.ids,
            data: &self.data,
            dim: self.dim,
        }
    }

    /// L2-normalises every row in place (f64 norm); fails on a zero row.
    pub fn normalize(&mut self) -> Result<()> {
        for (i, row) in self.data.chunks_exact_mut(self.dim).enumerate() {
            normalize_row(row).ok_or_else(|| RetrievalError::ZeroNorm {
                what: self.kind.as_str().to_string(),
                id: self.ids[i],
            })?;
        }
        Ok(())
    }
}

/// Divides `row` by its L2 norm; `None` when the norm is zero or not finite.
fn normalize_row(row: &mut [f32]) -> Option<()> {
    let norm = row
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return None;
    }
    for v in row.iter_mut() {
        *v = (f64::from(*v) / norm) as f32;
    }
    Some(())
}

#[derive(serde::Deserialize)]
struct JsonlLine {
    image_id: Option<serde_json::Value>,
    text_id: Option<serde_json::Value>,
    feature: Option<Vec<f64>>,
}

/// Streams `(id, feature)` rows of a cn_clip feature jsonl, with `file:line` errors.
///
/// Blank lines are skipped (Python would fail on them; they carry no row either way).
pub struct JsonlReader<R> {
    reader: R,
    path: PathBuf,
    kind: FeatureKind,
    line_no: usize,
    buf: String,
    dim: Option<usize>,
}

impl JsonlReader<BufReader<File>> {
    /// Opens `path` for streaming.
    pub fn open(path: impl AsRef<Path>, kind: FeatureKind) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        Ok(Self::new(
            BufReader::with_capacity(1 << 20, file),
            path,
            kind,
        ))
    }
}

impl<R: BufRead> JsonlReader<R> {
    /// Reads from any buffered reader; `path` only names the source in errors.
    pub fn new(reader: R, path: impl AsRef<Path>, kind: FeatureKind) -> Self {
        Self {
            reader,
            path: path.as_ref().to_path_buf(),
            kind,
            line_no: 0,
            buf: String::new(),
            dim: None,
        }
    }

    fn err(&self, message: impl Into<String>) -> RetrievalError {
        RetrievalError::Jsonl {
            path: self.path.clone(),
            line: self.line_no,
            message: message.into(),
        }
    }

    fn parse_line(&mut self) -> Result<(i64, Vec<f32>)> {
        let line: JsonlLine = serde_json::from_str(self.buf.trim())
            .map_err(|e| self.err(format!("malformed json: {e}")))?;
        let key = self.kind.id_key();
        let id_value = match self.kind {
            FeatureKind::Image => line.image_id,
            FeatureKind::Text => line.text_id,
        };
        let id_value = id_value.ok_or_else(|| self.err(format!("missing \"{key}\"")))?;
        let id = id_value
            .as_i64()
            .ok_or_else(|| self.err(format!("\"{key}\" is not an integer: {id_value}")))?;
        let feature = line
            .feature
            .ok_or_else(|| self.err(format!("{key} {id}: missing \"feature\"")))?;
        let feature: Vec<f32> = feature.into_iter().map(|v| v as f32).collect();
        if let Some(position) = feature.iter().position(|v| !v.is_finite()) {
            return Err(self.err(format!(
                "{key} {id}: non-finite feature value at position {position}"
            )));
        }
        match self.dim {
            None if feature.is_empty() => {
                return Err(self.err(format!("{key} {id}: empty feature")));
            }
            None => self.dim = Some(feature.len()),
            Some(d) if d != feature.len() => {
                return Err(self.err(format!(
                    "{key} {id}: feature has dimension {}, earlier lines have {d}",
                    feature.len()
                )));
            }
            Some(_) => {}
        }
        Ok((id, feature))
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<(i64, Vec<f32>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) if self.buf.trim().is_empty() => continue,
                Ok(_) => return Some(self.parse_line()),
                Err(e) => return Some(Err(self.err(format!("read error: {e}")))),
            }
        }
    }
}

/// Reads a whole cn_clip feature jsonl into memory (file order kept).
pub fn read_jsonl(path: impl AsRef<Path>, kind: FeatureKind) -> Result<Features> {
    let mut out: Option<Features> = None;
    for row in JsonlReader::open(path, kind)? {
        let (id, feature) = row?;
        let f = out.get_or_insert_with(|| Features::new(kind, feature.len()));
        f.ids.push(id);
        f.data.extend_from_slice(&feature);
    }
    // An empty file is a valid (empty) set; searching it is the error.
    Ok(out.unwrap_or_else(|| Features::new(kind, 0)))
}

/// Writes features as cn_clip's jsonl, floats formatted like Python's `json.dumps` of
/// `tensor.tolist()` (f32 widened to f64, shortest round-trip `repr`).
pub fn write_jsonl(
    path: impl AsRef<Path>,
    view: &FeatureView<'_>,
    kind: FeatureKind,
) -> Result<()> {
    let path = path.as_ref();
    let file = File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = BufWriter::new(file);
    let mut line = String::new();
    for i in 0..view.len() {
        line.clear();
        line.push_str(&format!(
            "{{\"{}\": {}, \"feature\": [",
            kind.id_key(),
            view.ids()[i]
        ));
        for (j, &v) in view.row(i).iter().enumerate() {
            if j > 0 {
                line.push_str(", ");
            }
            line.push_str(&format_py_float(f64::from(v)));
        }
        line.push_str("]}\n");
        w.write_all(line.as_bytes()).map_err(|e| io_err(path, e))?;
    }
    w.flush().map_err(|e| io_err(path, e))
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form when the decimal exponent is
/// below -4 or at least 16 (`1e-05`, `1.5e+16`), otherwise positional with a `.0` when integral.
pub fn format_py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if x != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let s = format!("{x}");
        if s.contains('.') { s } else { format!("{s}.0") }
    }
}

const NATIVE_IDS: &str = "ids";
const NATIVE_FEATURES: &str = "features";

/// Writes the native feature file, L2-normalising every row on the way (streamed in blocks of
/// rows through `cnclip_model::weights::NativeWriter`: written beside `path` and renamed over it
/// when complete, so a crash, a full disk or a bad row leaves the previous file, or none).
pub fn write_native(
    path: impl AsRef<Path>,
    view: &FeatureView<'_>,
    kind: FeatureKind,
    model: Option<&str>,
) -> Result<()> {
    let path = path.as_ref();
    let (n, d) = (view.len(), view.dim());
    let mut meta = HashMap::from([
        ("kind".to_string(), kind.as_str().to_string()),
        ("dim".to_string(), d.to_string()),
    ]);
    if let Some(m) = model {
        meta.insert("model".to_string(), m.to_string());
    }
    let layout = vec![
        (NATIVE_IDS.to_string(), Dtype::I64, vec![n]),
        (NATIVE_FEATURES.to_string(), Dtype::F32, vec![n, d]),
    ];
    let weights = |e| weights_err(path, e);
    let writer = NativeWriter::create(path, meta, layout).map_err(weights)?;
    let (ids, features) = (
        writer.index_of(NATIVE_IDS),
        writer.index_of(NATIVE_FEATURES),
    );
    let (Some(ids), Some(features)) = (ids, features) else {
        return Err(RetrievalError::Native {
            path: path.to_path_buf(),
            message: "the writer lost a tensor".into(),
        });
    };
    let id_bytes: Vec<u8> = view.ids().iter().flat_map(|id| id.to_le_bytes()).collect();
    writer.write(ids, 0, &id_bytes).map_err(weights)?;
    // About 1 MiB of rows per write.
    let rows_per_block = ((1 << 18) / d.max(1)).max(1);
    let mut block: Vec<f32> = Vec::with_capacity(rows_per_block * d);
    let mut row = vec![0f32; d];
    let mut offset = 0usize;
    for i in 0..n {
        row.copy_from_slice(view.row(i));
        let id = view.ids()[i];
        if let Some(position) = row.iter().position(|v| !v.is_finite()) {
            return Err(RetrievalError::NonFinite {
                what: path.display().to_string(),
                id,
                position,
            });
        }
        normalize_row(&mut row).ok_or_else(|| RetrievalError::ZeroNorm {
            what: path.display().to_string(),
            id,
        })?;
        block.extend_from_slice(&row);
        if block.len() >= rows_per_block * d || i + 1 == n {
            let bytes: &[u8] = bytemuck::cast_slice(&block);
            writer.write(features, offset, bytes).map_err(weights)?;
            offset += bytes.len();
            block.clear();
        }
    }
    writer.finish().map_err(weights)
}

/// A weight-file error on a feature file: I/O stays I/O, the rest names the file's layout.
fn weights_err(path: &Path, e: WeightsError) -> RetrievalError {
    match e {
        WeightsError::Io { source, .. } => io_err(path, source),
        e => RetrievalError::Native {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    }
}

enum Values {
    /// The `features` tensor of the file, read in place.
    Mapped(TensorEntry),
    Owned(Vec<f32>),
}

/// A native feature file, memory-mapped (`cnclip_model::weights::SafetensorsReader`): values are
/// read from the page cache on demand. The file must not be truncated or rewritten while open.
pub struct NativeFeatures {
    path: PathBuf,
    /// Boxed: the header's tables are large next to an in-memory store.
    file: Box<SafetensorsReader>,
    kind: FeatureKind,
    dim: usize,
    model: Option<String>,
    ids: Vec<i64>,
    values: Values,
}

impl std::fmt::Debug for NativeFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeFeatures")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("n", &self.ids.len())
            .field("dim", &self.dim)
            .field("model", &self.model)
            .finish()
    }
}

impl NativeFeatures {
    /// Maps `path` and checks its layout (tensor names, dtypes, shapes, metadata).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |message: String| RetrievalError::Native {
            path: path.to_path_buf(),
            message,
        };
        let file = Box::new(SafetensorsReader::open(path).map_err(|e| weights_err(path, e))?);
        let user = file.metadata().clone();
        let kind = user
            .get("kind")
            .and_then(|k| FeatureKind::parse(k))
            .ok_or_else(|| bad("metadata \"kind\" must be \"image\" or \"text\"".into()))?;
        let model = user.get("model").cloned();
        let ids_info = file
            .entry(NATIVE_IDS)
            .ok_or_else(|| bad("no \"ids\" tensor".into()))?
            .clone();
        let feat_info = file
            .entry(NATIVE_FEATURES)
            .ok_or_else(|| bad("no \"features\" tensor".into()))?
            .clone();
        if ids_info.dtype != Dtype::I64 || ids_info.shape.len() != 1 {
            return Err(bad("\"ids\" must be I64 [n]".into()));
        }
        if feat_info.dtype != Dtype::F32 || feat_info.shape.len() != 2 {
            return Err(bad("\"features\" must be F32 [n, d]".into()));
        }
        let (n, dim) = (feat_info.shape[0], feat_info.shape[1]);
        if ids_info.shape[0] != n {
            return Err(bad(format!(
                "{} ids for {n} feature rows",
                ids_info.shape[0]
            )));
        }
        if dim == 0 {
            return Err(bad("feature dimension 0".into()));
        }
        if let Some(d) = user.get("dim")
            && d.parse::<usize>().ok() != Some(dim)
        {
            return Err(bad(format!(
                "metadata dim {d} but features have {dim} columns"
            )));
        }
        let ids: Vec<i64> = file
            .bytes(&ids_info)
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                i64::from_le_bytes(b)
            })
            .collect();
        let values = if bytemuck::try_cast_slice::<u8, f32>(file.bytes(&feat_info)).is_ok() {
            Values::Mapped(feat_info)
        } else {
            // Unaligned data (a foreign writer): copy once.
            Values::Owned(
                file.bytes(&feat_info)
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            kind,
            dim,
            model,
            ids,
            values,
        })
    }

    /// The borrowed matrix (pages are read as they are touched).
    pub fn view(&self) -> FeatureView<'_> {
        let data: &[f32] = match &self.values {
            Values::Mapped(e) => bytemuck::try_cast_slice(self.file.bytes(e)).unwrap_or(&[]),
            Values::Owned(v) => v,
        };
        FeatureView {
            ids: &self.ids,
            data,
            dim: self.dim,
        }
    }

    /// Image or text.
    pub fn kind(&self) -> FeatureKind {
        self.kind
    }

    /// The model name from the metadata, when the writer knew it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The file this was mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Features from either format, as [`load_features`] returns them.
#[derive(Debug)]
pub enum FeatureSource {
    /// A cn_clip jsonl, read into memory.
    Jsonl(Features),
    /// A native file, memory-mapped.
    Native(NativeFeatures),
}

impl FeatureSource {
    /// The borrowed matrix.
    pub fn view(&self) -> FeatureView<'_> {
        match self {
            FeatureSource::Jsonl(f) => f.view(),
            FeatureSource::Native(n) => n.view(),
        }
    }
}

/// True when `path` is a native (safetensors) file: by extension, else by its first bytes.
pub fn is_native(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(true);
    }
    let mut head = [0u8; 9];
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => return Err(io_err(path, e)),
        }
    }
    if got < 9 {
        return Ok(false);
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[..8]);
    let header_len = u64::from_le_bytes(n);
    Ok(head[8] == b'{' && header_len.checked_add(8).is_some_and(|t| t <= len))
}

/// Loads a jsonl or native file of the given kind; the native file's kind must agree.
pub fn load_features(path: impl AsRef<Path>, kind: FeatureKind) -> Result<FeatureSource> {
    let path = path.as_ref();
    if is_native(path)? {
        let native = NativeFeatures::open(path)?;
        if native.kind() != kind {
            return Err(RetrievalError::Native {
                path: path.to_path_buf(),
                message: format!(
                    "holds {} features, {} features were expected",
                    native.kind().as_str(),
                    kind.as_str()
                ),
            });
        }
        Ok(FeatureSource::Native(native))
    } else {
        Ok(FeatureSource::Jsonl(read_jsonl(path, kind)?))
    }
}
