//! Streaming readers for the files contestants download: `{split}_imgs.tsv` and
//! `{split}_texts.jsonl`.
//!
//! Both read one line at a time (MUGE's training TSV is gigabytes of base64), split lines the way
//! Python's text mode does (`\n`, `\r\n` and a lone `\r` all end a line, because cn_clip iterates
//! `open(path, encoding="utf-8")`), strip each line with Python's `str.strip()` whitespace, and
//! name file and line in every error.
//!
//! Accepted forms:
//! * images: `<image_id>\t<base64>` (exactly two fields after stripping, as cn_clip's
//!   `line.split("\t")` unpacking requires). The id must be an integer written the way Python's
//!   `str(int)` writes it, because cn_clip looks images up by `str(image_id)` of the JSON id: an id
//!   such as `007` would be stored but never found.
//! * texts, Chinese-CLIP form: `{"text_id": int, "text": str, "image_ids": [int, ...]}`;
//!   original Tianchi form: `{"query_id": int, "query_text": str, "item_ids": [int, ...]}`. The
//!   first record fixes the form of the file. The image list may be absent (Tianchi's test
//!   queries); [`TextRecord::image_ids`] is then `None`.
//!
//! What is wrong with a record is either an error (the default, [`BadRecordPolicy::Fail`]) or,
//! with [`BadRecordPolicy::Skip`], skipped and counted in a [`ReadReport`] that keeps the first
//! [`MAX_EXAMPLES`] problems verbatim. Skipping is per problem: a malformed line or a repeated id
//! drops that record; a repeated or unknown image id inside an image list drops that one id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// What to do with a record that is malformed, repeats an id or references a missing image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BadRecordPolicy {
    /// Stop with an error naming file and line (cn_clip stops too, on most of these).
    #[default]
    Fail,
    /// Skip what is wrong, count it per kind, and keep reading.
    Skip,
}

impl std::str::FromStr for BadRecordPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fail" => Ok(BadRecordPolicy::Fail),
            "skip" => Ok(BadRecordPolicy::Skip),
            other => Err(format!("unknown policy {other:?} (expected fail or skip)")),
        }
    }
}

/// Kinds of problems a policy may skip (I/O errors always stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// Not UTF-8, not two TAB fields, not JSON, wrong types, a non-canonical id.
    Malformed,
    /// An image id that an earlier TSV line already had.
    DuplicateImage,
    /// A text id that an earlier JSONL line already had.
    DuplicateText,
    /// The same image id twice in one text's image list.
    RepeatedImageRef,
    /// A text references an image id the image source does not have.
    MissingImage,
    /// An image whose base64 or picture does not decode (checked only when asked:
    /// [`ImageTsvReader::with_image_check`]).
    UndecodableImage,
}

impl ProblemKind {
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::Malformed => "malformed line",
            ProblemKind::DuplicateImage => "duplicate image id",
            ProblemKind::DuplicateText => "duplicate text id",
            ProblemKind::RepeatedImageRef => "image id repeated in one image list",
            ProblemKind::MissingImage => "reference to a missing image",
            ProblemKind::UndecodableImage => "image that does not decode",
        }
    }
}

/// An error reading a MUGE file. Every variant but [`FileError::Io`] names a line.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}, line {line}: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{}, line {line}: image id {image_id} already appeared on line {first_line}", path.display())]
    DuplicateImage {
        path: PathBuf,
        line: u64,
        image_id: i64,
        first_line: u64,
    },
    #[error("{}, line {line}: text id {text_id} already appeared on line {first_line}", path.display())]
    DuplicateText {
        path: PathBuf,
        line: u64,
        text_id: i64,
        first_line: u64,
    },
    #[error("{}, line {line}: text {text_id} lists image {image_id} more than once", path.display())]
    RepeatedImageRef {
        path: PathBuf,
        line: u64,
        text_id: i64,
        image_id: i64,
    },
    #[error("{}, line {line}: image {image_id} does not decode: {reason}", path.display())]
    UndecodableImage {
        path: PathBuf,
        line: u64,
        image_id: i64,
        reason: String,
    },
    #[error("{}, line {line}: text {text_id} references image {image_id}, which {images} does not contain", path.display())]
    MissingImage {
        path: PathBuf,
        line: u64,
        text_id: i64,
        image_id: i64,
        images: String,
    },
}

impl FileError {
    /// The kind of problem, or `None` for I/O errors (which no policy skips).
    pub fn kind(&self) -> Option<ProblemKind> {
        match self {
            FileError::Io { .. } => None,
            FileError::Malformed { .. } => Some(ProblemKind::Malformed),
            FileError::DuplicateImage { .. } => Some(ProblemKind::DuplicateImage),
            FileError::DuplicateText { .. } => Some(ProblemKind::DuplicateText),
            FileError::RepeatedImageRef { .. } => Some(ProblemKind::RepeatedImageRef),
            FileError::MissingImage { .. } => Some(ProblemKind::MissingImage),
            FileError::UndecodableImage { .. } => Some(ProblemKind::UndecodableImage),
        }
    }
}

/// How many skipped problems a report keeps verbatim.
pub const MAX_EXAMPLES: usize = 20;

/// What a reader read and, under [`BadRecordPolicy::Skip`], what it skipped.
#[derive(Debug, Default)]
pub struct ReadReport {
    /// Lines read (Python's line count; blank lines included).
    pub lines: u64,
    /// Records returned.
    pub records: u64,
    /// Skipped problems per kind.
    pub skipped: BTreeMap<ProblemKind, u64>,
    /// The first [`MAX_EXAMPLES`] skipped problems.
    pub examples: Vec<FileError>,
}

impl ReadReport {
    /// Skipped problems of all kinds.
    pub fn total_skipped(&self) -> u64 {
        self.skipped.values().sum()
    }

    fn skip(&mut self, e: FileError) {
        if let Some(kind) = e.kind() {
            *self.skipped.entry(kind).or_default() += 1;
        }
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(e);
        }
    }
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records from {} lines", self.records, self.lines)?;
        if self.skipped.is_empty() {
            return write!(f, ", nothing skipped");
        }
        write!(f, "; skipped: ")?;
        for (i, (kind, n)) in self.skipped.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{n} × {}", kind.name())?;
        }
        for e in &self.examples {
            write!(f, "\n  {e}")?;
        }
        let total = self.total_skipped();
        if total > self.examples.len() as u64 {
            write!(f, "\n  … and {} more", total - self.examples.len() as u64)?;
        }
        Ok(())
    }
}

/// Python's `str.isspace()` characters, which `str.strip()` removes: Rust's `White_Space` plus
/// the four information separators U+001C–U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()`.
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

/// Splits a byte stream into lines as Python's universal-newline text mode does, counting bytes
/// for progress reports.
pub(crate) struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    /// Lines split off the current chunk at lone `\r`, not yet returned (in order).
    pending: std::collections::VecDeque<Vec<u8>>,
    line: u64,
    bytes: u64,
    eof: bool,
}

impl<R: BufRead> Lines<R> {
    pub(crate) fn new(reader: R) -> Self {
        Lines {
            reader,
            buf: Vec::new(),
            pending: Default::default(),
            line: 0,
            bytes: 0,
            eof: false,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The next line without its terminator, with its 1-based number.
    pub(crate) fn next_line(&mut self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        if let Some(l) = self.pending.pop_front() {
            self.line += 1;
            return Ok(Some((self.line, l)));
        }
        if self.eof {
            return Ok(None);
        }
        self.buf.clear();
        let n = self.reader.read_until(b'\n', &mut self.buf)?;
        self.bytes += n as u64;
        if n == 0 {
            self.eof = true;
            return Ok(None);
        }
        let mut body: &[u8] = &self.buf;
        let had_newline = body.last() == Some(&b'\n');
        if had_newline {
            body = &body[..body.len() - 1];
            if body.last() == Some(&b'\r') {
                body = &body[..body.len() - 1];
            }
        }
        if !body.contains(&b'\r') {
            self.line += 1;
            return Ok(Some((self.line, body.to_vec())));
        }
        let mut pieces: Vec<&[u8]> = body.split(|&b| b == b'\r').collect();
        // Without a final '\n' the chunk ends at EOF; a trailing '\r' then ended the last line.
        if !had_newline && pieces.last().is_some_and(|p| p.is_empty()) {
            pieces.pop();
        }
        self.pending.extend(pieces.into_iter().map(<[u8]>::to_vec));
        match self.pending.pop_front() {
            Some(l) => {
                self.line += 1;
                Ok(Some((self.line, l)))
            }
            None => Ok(None),
        }
    }
}

fn open(path: &Path) -> Result<(Lines<BufReader<File>>, u64), FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    Ok((Lines::new(BufReader::with_capacity(1 << 20, file)), len))
}

/// Parses an id written as Python's `str(int)` writes it (`-?[1-9][0-9]*|0`).
pub fn parse_canonical_id(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && s != "-0";
    if canonical { s.parse().ok() } else { None }
}

fn utf8_line(path: &Path, line: u64, bytes: Vec<u8>) -> Result<String, FileError> {
    String::from_utf8(bytes).map_err(|e| FileError::Malformed {
        path: path.to_path_buf(),
        line,
        reason: format!(
            "not valid UTF-8 (byte {} of the line); cn_clip reads the file as UTF-8",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// One `{split}_imgs.tsv` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub line: u64,
    pub image_id: i64,
    /// The base64 text as written in the file (cn_clip stores this text, not the decoded bytes).
    pub base64: String,
}

/// Streams `{split}_imgs.tsv`; see the module documentation for the accepted form.
pub struct ImageTsvReader {
    path: PathBuf,
    lines: Lines<BufReader<File>>,
    file_len: u64,
    policy: BadRecordPolicy,
    seen: HashMap<i64, u64>,
    report: ReadReport,
    failed: bool,
    check_images: bool,
}

impl ImageTsvReader {
    /// Also decode every image (base64, then the picture, as training will) and treat one that
    /// does not decode as a bad record: under [`BadRecordPolicy::Fail`] an error naming the line
    /// and id, under [`BadRecordPolicy::Skip`] counted and left out, so texts that reference it
    /// count as referencing a missing image. This is what keeps one broken picture in a 250k-pair
    /// dataset from ending a training run hours later. It costs one decode per image.
    pub fn with_image_check(mut self, check: bool) -> Self {
        self.check_images = check;
        self
    }

    pub fn open(path: impl AsRef<Path>, policy: BadRecordPolicy) -> Result<Self, FileError> {
        let path = path.as_ref().to_path_buf();
        let (lines, file_len) = open(&path)?;
        Ok(ImageTsvReader {
            path,
            lines,
            file_len,
            policy,
            seen: HashMap::new(),
            report: ReadReport::default(),
            failed: false,
            check_images: false,
        })
    }

    /// The image ids read so far (all of them once the iterator is exhausted).
    pub fn image_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.seen.keys().copied()
    }

    fn parse(&mut self, line: u64, bytes: Vec<u8>) -> Result<ImageRecord, FileError> {
        let malformed = |reason: String| FileError::Malformed {
            path: self.path.clone(),
            line,
            reason,
        };
        let text = utf8_line(&self.path, line, bytes)?;
        let stripped = python_strip(&text);
        let fields: Vec<&str> = stripped.split('\t').collect();
        let [id, b64] = fields[..] else {
            return Err(malformed(format!(
                "expected `image_id<TAB>base64`, found {} tab-separated field{}",
                fields.len(),
                if fields.len() == 1 { "" } else { "s" }
            )));
        };
        let Some(image_id) = parse_canonical_id(id) else {
            let hint = if id.starts_with('\u{feff}') {
                " (the file starts with a UTF-8 byte order mark; save it without one)"
            } else {
                ""
            };
            return Err(malformed(format!(
                "image id {:?} is not an integer written as Python's str(int) writes it; cn_clip looks \
                 images up by that form{hint}",
                truncate(id, 40)
            )));
        };
        if let Some(&first_line) = self.seen.get(&image_id) {
            return Err(FileError::DuplicateImage {
                path: self.path.clone(),
                line,
                image_id,
                first_line,
            });
        }
        if self.check_images {
            let undecodable = |reason: String| FileError::UndecodableImage {
                path: self.path.clone(),
                line,
                image_id,
                reason,
            };
            let bytes = crate::base64::decode_cn_clip(b64.as_bytes())
                .map_err(|e| undecodable(format!("bad base64: {e}")))?;
            cnclip_model::preprocess::decode_named(&bytes, &format!("image {image_id}"))
                .map_err(|e| undecodable(e.to_string()))?;
        }
        self.seen.insert(image_id, line);
        Ok(ImageRecord {
            line,
            image_id,
            base64: b64.to_string(),
        })
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// What both readers share: their accessors and the record loop — next line, parse, then stop at
/// the first error or, under [`BadRecordPolicy::Skip`], count it in the report and go on. Only
/// `parse` differs.
macro_rules! record_iterator {
    ($reader:ty, $record:ty) => {
        impl $reader {
            pub fn path(&self) -> &Path {
                &self.path
            }

            /// The file's size in bytes, for progress bars.
            pub fn file_len(&self) -> u64 {
                self.file_len
            }

            /// Bytes read so far.
            pub fn bytes_read(&self) -> u64 {
                self.lines.bytes_read()
            }

            /// Counts so far; complete once the iterator returned `None`.
            pub fn report(&self) -> &ReadReport {
                &self.report
            }

            pub fn into_report(self) -> ReadReport {
                self.report
            }
        }

        impl Iterator for $reader {
            type Item = Result<$record, FileError>;

            fn next(&mut self) -> Option<Self::Item> {
                if self.failed {
                    return None;
                }
                loop {
                    let (line, bytes) = match self.lines.next_line() {
                        Ok(Some(l)) => l,
                        Ok(None) => return None,
                        Err(source) => {
                            self.failed = true;
                            return Some(Err(FileError::Io {
                                path: self.path.clone(),
                                source,
                            }));
                        }
                    };
                    self.report.lines = line;
                    match self.parse(line, bytes) {
                        Ok(r) => {
                            self.report.records += 1;
                            return Some(Ok(r));
                        }
                        Err(e) if self.policy == BadRecordPolicy::Skip => self.report.skip(e),
                        Err(e) => {
                            self.failed = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    };
}

record_iterator!(ImageTsvReader, ImageRecord);

/// Which key names a texts file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextForm {
    /// `text_id`, `text`, `image_ids` (Chinese-CLIP's preprocessed MUGE and its other data sets).
    ChineseClip,
    /// `query_id`, `query_text`, `item_ids` (the original Tianchi MUGE files).
    Tianchi,
}

impl TextForm {
    /// (id, text, image list) key names.
    pub fn keys(self) -> [&'static str; 3] {
        match self {
            TextForm::ChineseClip => ["text_id", "text", "image_ids"],
            TextForm::Tianchi => ["query_id", "query_text", "item_ids"],
        }
    }
}

/// One `{split}_texts.jsonl` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRecord {
    pub line: u64,
    pub text_id: i64,
    pub text: String,
    /// The image list, `None` when the line has none (test queries of the Tianchi files). Under
    /// [`BadRecordPolicy::Skip`], repeated and missing ids have been removed.
    pub image_ids: Option<Vec<i64>>,
}

/// The set of image ids references are checked against, and how to name it in errors.
#[derive(Debug, Clone)]
pub struct KnownImages {
    pub ids: HashSet<i64>,
    /// E.g. the TSV's or the LMDB's path.
    pub source: String,
}

/// Streams `{split}_texts.jsonl` in either form; see the module documentation.
pub struct TextJsonlReader {
    path: PathBuf,
    lines: Lines<BufReader<File>>,
    file_len: u64,
    policy: BadRecordPolicy,
    form: Option<TextForm>,
    seen: HashMap<i64, u64>,
    known_images: Option<KnownImages>,
    report: ReadReport,
    failed: bool,
}

impl TextJsonlReader {
    pub fn open(path: impl AsRef<Path>, policy: BadRecordPolicy) -> Result<Self, FileError> {
        let path = path.as_ref().to_path_buf();
        let (lines, file_len) = open(&path)?;
        Ok(TextJsonlReader {
            path,
            lines,
            file_len,
            policy,
            form: None,
            seen: HashMap::new(),
            known_images: None,
            report: ReadReport::default(),
            failed: false,
        })
    }

    /// Checks every referenced image id against `images`: a missing one is an error, or under
    /// [`BadRecordPolicy::Skip`] dropped from the list and counted.
    pub fn with_known_images(mut self, images: KnownImages) -> Self {
        self.known_images = Some(images);
        self
    }

    /// The form fixed by the first record (`None` before it).
    pub fn form(&self) -> Option<TextForm> {
        self.form
    }

    fn parse(&mut self, line: u64, bytes: Vec<u8>) -> Result<TextRecord, FileError> {
        use serde_json::Value;
        let path = self.path.clone();
        let malformed = |reason: String| FileError::Malformed {
            path: path.clone(),
            line,
            reason,
        };
        let text = utf8_line(&self.path, line, bytes)?;
        let stripped = python_strip(&text);
        if stripped.is_empty() {
            return Err(malformed("blank line; expected a JSON object".into()));
        }
        if stripped.starts_with('\u{feff}') {
            return Err(malformed(
                "the line starts with a UTF-8 byte order mark, which JSON does not allow; save the \
                 file without one"
                    .into(),
            ));
        }
        let value: Value = serde_json::from_str(stripped)
            .map_err(|e| malformed(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(malformed(format!(
                "expected a JSON object, found {}",
                json_kind(&value)
            )));
        };
        let has = |form: TextForm| form.keys().iter().any(|k| obj.contains_key(*k));
        let line_form = match (has(TextForm::ChineseClip), has(TextForm::Tianchi)) {
            (true, false) => TextForm::ChineseClip,
            (false, true) => TextForm::Tianchi,
            (true, true) => {
                return Err(malformed(
                    "mixes the Chinese-CLIP keys (text_id, text, image_ids) with the Tianchi keys \
                     (query_id, query_text, item_ids)"
                        .into(),
                ));
            }
            (false, false) => {
                return Err(malformed(
                    "has neither text_id/text (Chinese-CLIP form) nor query_id/query_text \
                     (Tianchi form)"
                        .into(),
                ));
            }
        };
        let form = *self.form.get_or_insert(line_form);
        if form != line_form {
            return Err(malformed(format!(
                "uses the {} keys but the file's first record uses the {} keys",
                form_name(line_form),
                form_name(form)
            )));
        }
        let [id_key, text_key, images_key] = form.keys();
        let int = |v: &Value, what: &str| -> Result<i64, FileError> {
            v.as_i64().ok_or_else(|| {
                malformed(format!(
                    "{what} must be an integer (as in cn_clip's data), found {}",
                    json_kind(v)
                ))
            })
        };
        let text_id = match obj.get(id_key) {
            Some(v) => int(v, id_key)?,
            None => return Err(malformed(format!("has no {id_key}"))),
        };
        let text = match obj.get(text_key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(malformed(format!(
                    "{text_key} must be a string, found {}",
                    json_kind(v)
                )));
            }
            None => return Err(malformed(format!("has no {text_key}"))),
        };
        let image_ids = match obj.get(images_key) {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| int(v, &format!("every entry of {images_key}")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(v) => {
                return Err(malformed(format!(
                    "{images_key} must be a list of integers, found {}",
                    json_kind(v)
                )));
            }
        };
        if let Some(&first_line) = self.seen.get(&text_id) {
            return Err(FileError::DuplicateText {
                path: self.path.clone(),
                line,
                text_id,
                first_line,
            });
        }
        // Problems inside the image list: fail, or drop the id and count it.
        let image_ids = match image_ids {
            None => None,
            Some(ids) => {
                let mut kept = Vec::with_capacity(ids.len());
                let mut in_list = HashSet::with_capacity(ids.len());
                for image_id in ids {
                    let problem = if !in_list.insert(image_id) {
                        Some(FileError::RepeatedImageRef {
                            path: self.path.clone(),
                            line,
                            text_id,
                            image_id,
                        })
                    } else {
                        self.known_images
                            .as_ref()
                            .filter(|k| !k.ids.contains(&image_id))
                            .map(|k| FileError::MissingImage {
                                path: self.path.clone(),
                                line,
                                text_id,
                                image_id,
                                images: k.source.clone(),
                            })
                    };
                    match problem {
                        None => kept.push(image_id),
                        Some(e) if self.policy == BadRecordPolicy::Skip => self.report.skip(e),
                        Some(e) => return Err(e),
                    }
                }
                Some(kept)
            }
        };
        self.seen.insert(text_id, line);
        Ok(TextRecord {
            line,
            text_id,
            text,
            image_ids,
        })
    }
}

fn form_name(form: TextForm) -> &'static str {
    match form {
        TextForm::ChineseClip => "Chinese-CLIP (text_id, text, image_ids)",
        TextForm::Tianchi => "Tianchi (query_id, query_text, item_ids)",
    }
}

fn json_kind(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {:?}", truncate(s, 40)),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

record_iterator!(TextJsonlReader, TextRecord);

/// Reads a whole image TSV into `(image_id, base64)` pairs in file order; convenient for small
/// files and tests (MUGE's training TSV is better streamed).
pub fn read_image_tsv(
    path: impl AsRef<Path>,
    policy: BadRecordPolicy,
) -> Result<(Vec<ImageRecord>, ReadReport), FileError> {
    let mut reader = ImageTsvReader::open(path, policy)?;
    let records = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((records, reader.into_report()))
}

/// Reads a whole texts JSONL file in file order (cn_clip's `EvalTxtDataset` order).
pub fn read_texts_jsonl(
    path: impl AsRef<Path>,
    policy: BadRecordPolicy,
) -> Result<(Vec<TextRecord>, ReadReport), FileError> {
    let mut reader = TextJsonlReader::open(path, policy)?;
    let records = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((records, reader.into_report()))
}

/// Reads everything from `reader` split into Python text-mode lines; used by tests of the
/// splitting rules.
#[cfg(test)]
fn split_lines(data: &[u8]) -> Vec<(u64, String)> {
    use std::io::Read;
    let mut lines = Lines::new(BufReader::new(data));
    let mut out = Vec::new();
    while let Some((n, l)) = lines.next_line().unwrap() {
        out.push((n, String::from_utf8(l).unwrap()));
    }
    let mut rest = Vec::new();
    lines.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[(u64, String)]) -> Vec<&str> {
        lines.iter().map(|(_, s)| s.as_str()).collect()
    }

    /// The splits Python's `for line in open(f)` makes.
    #[test]
    fn universal_newlines() {
        assert_eq!(texts(&split_lines(b"a\nb\n")), ["a", "b"]);
        assert_eq!(texts(&split_lines(b"a\r\nb")), ["a", "b"]);
        assert_eq!(texts(&split_lines(b"a\rb\r\nc\n")), ["a", "b", "c"]);
        assert_eq!(texts(&split_lines(b"a\r\r\n")), ["a", ""]);
        assert_eq!(texts(&split_lines(b"a\r")), ["a"]);
        assert_eq!(texts(&split_lines(b"\n\n")), ["", ""]);
        assert!(split_lines(b"").is_empty());
        let numbered = split_lines(b"x\ry\nz");
        assert_eq!(
            numbered.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn python_strip_matches_str_strip() {
        assert_eq!(python_strip("\u{1c}\u{3000} a b\u{a0}\u{1f}\t"), "a b");
        assert_eq!(python_strip("\u{feff}x"), "\u{feff}x");
        assert_eq!(python_strip("\u{200b}x"), "\u{200b}x");
    }

    #[test]
    fn canonical_ids() {
        assert_eq!(parse_canonical_id("0"), Some(0));
        assert_eq!(parse_canonical_id("7454547004"), Some(7_454_547_004));
        assert_eq!(parse_canonical_id("-12"), Some(-12));
        for bad in [
            "",
            "-",
            "-0",
            "007",
            "+5",
            " 5",
            "5 ",
            "1_000",
            "١٢",
            "99999999999999999999",
        ] {
            assert_eq!(parse_canonical_id(bad), None, "{bad:?}");
        }
    }
}
