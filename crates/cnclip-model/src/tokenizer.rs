//! cn_clip's BERT WordPiece tokenizer, id for id (cn_clip 1.6.0, `cn_clip/clip/bert_tokenizer.py`
//! and `clip.tokenize`).
//!
//! The pipeline runs on the `tokenizers` crate: its `NormalizedString`/`PreTokenizedString`
//! machinery and its `WordPiece` model (greedy longest match, `##` prefix, whole word to `[UNK]`
//! when a position has no match or the word exceeds 200 characters). The normalizer and
//! pre-tokenizer are our own implementations of the crate's traits, not `BertNormalizer` and
//! `BertPreTokenizer`. Sweeping every code point against cn_clip showed those two differ from it on
//! about 138,000 code points:
//!
//! * private-use characters (Co, 137,468 code points) are deleted by `BertNormalizer`'s
//!   `clean_text`; cn_clip deletes only Cc and Cf and turns them into `[UNK]`;
//! * its CJK ranges start Extension E at U+2B920 instead of U+2B820, so U+2B820–U+2B91F are not
//!   split off as single-character words;
//! * its character tables are Unicode 9 while cn_clip uses Python 3.11's `unicodedata`
//!   (Unicode 14.0.0): 384 newer Mn marks are kept instead of stripped, 13 newer Cf characters are
//!   kept instead of deleted, ~104 newer punctuation characters are not split off, and U+1734
//!   (Mn→Mc) and U+166D (Po→So) changed category since;
//! * it lowercases character by character, so a word-final capital sigma becomes `σ` where Python's
//!   `str.lower()` gives `ς` (`ΣΣ` → `σ ##ς` in cn_clip).
//!
//! The replacement steps follow `BasicTokenizer.tokenize` literally (clean, space out CJK, split on
//! whitespace, `lower()`, NFD, drop Mn, split off punctuation), driven by tables generated from
//! Python 3.11's `unicodedata` (`tokenizer/gen_unicode14.py`), so they agree with cn_clip on every
//! code point, including ones assigned after Unicode 14 (which Python sees as unassigned).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use tch::Tensor;
use tokenizers::models::bpe::Vocab;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    Model, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, SplitDelimiterBehavior, Token,
};

#[rustfmt::skip]
mod unicode14;

/// cn_clip's context length everywhere: the `tokenize` default, `--context-length` and the ONNX
/// export.
pub const DEFAULT_CONTEXT_LENGTH: usize = 52;
/// `[PAD]`: fills a row after `[SEP]`; the text encoder's attention mask is `ids != PAD_ID`.
pub const PAD_ID: i64 = 0;
/// `[UNK]`: a whole word with no WordPiece segmentation, or longer than 200 characters.
pub const UNK_ID: i64 = 100;
/// `[CLS]`: always first; the text feature is read at this position.
pub const CLS_ID: i64 = 101;
/// `[SEP]`: always the last real token, kept even when the text is truncated.
pub const SEP_ID: i64 = 102;
/// `[MASK]`: unused by cn_clip, listed so no caller hard-codes it.
pub const MASK_ID: i64 = 103;

/// Words longer than this many characters become `[UNK]` (cn_clip's `WordpieceTokenizer`).
const MAX_INPUT_CHARS_PER_WORD: usize = 200;

/// The vocabulary cn_clip 1.6.0 ships (`cn_clip/clip/vocab.txt`, 21,128 lines, sha256
/// `45bbac6b…291c`), embedded so the default tokenizer needs no file at run time.
static EMBEDDED_VOCAB: &[u8] = include_bytes!("../assets/vocab.txt");
const EMBEDDED_VOCAB_NAME: &str = "<embedded cn_clip vocab.txt>";

/// cn_clip's `vocab.txt`, byte for byte (what [`Tokenizer::new`] reads); written next to exported
/// models so other tokenizers get the same ids.
pub fn cn_clip_vocab_txt() -> &'static [u8] {
    EMBEDDED_VOCAB
}

static DEFAULT: LazyLock<Result<Tokenizer, TokenizerError>> =
    LazyLock::new(|| Tokenizer::from_vocab_bytes(EMBEDDED_VOCAB, Path::new(EMBEDDED_VOCAB_NAME)));

/// Why a tokenizer could not be built or a batch could not be tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// cn_clip needs room for `[CLS]` and `[SEP]`; below 2 its slicing breaks (an assertion error).
    #[error("context length {context_length} is too small: [CLS] and [SEP] need at least 2")]
    ContextLength { context_length: usize },
    #[error("cannot read vocabulary file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid vocabulary file {}, line {line}: {reason}", path.display())]
    InvalidVocab {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// `tokenize` looks up `[CLS]`, `[SEP]` and `[UNK]` by name, as cn_clip does.
    #[error("vocabulary file {} has no {token} token", path.display())]
    MissingToken { path: PathBuf, token: &'static str },
    #[error("building the WordPiece model failed: {0}")]
    WordPiece(String),
    #[error(transparent)]
    Tensor(#[from] tch::TchError),
}

/// Text rewriting applied before tokenizing; cn_clip does it in its datasets only.
///
/// cn_clip's training, evaluation and zero-shot datasets call `_preprocess_text` (lowercase, curly
/// double quotes to `"`) before `tokenize`, while the public `clip.tokenize` API does not. The two
/// paths give different ids for curly quotes (`[UNK]` vs `"`), so reproducing either one means
/// choosing explicitly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TextPreprocessing {
    /// `clip.tokenize` as called directly (feature extraction of user queries, README examples).
    #[default]
    None,
    /// The datasets' `_preprocess_text`, see [`preprocess_dataset_text`].
    Dataset,
}

/// cn_clip's `_preprocess_text`: `text.lower().replace("“", '"').replace("”", '"')`.
///
/// The vocabulary has no curly double quotes, so without this they become `[UNK]`; the datasets
/// apply it to every caption and query. `lower()` has Python 3.11's semantics (Unicode 14.0.0,
/// context-dependent final sigma), which `str::to_lowercase` only approximates for characters
/// assigned after Unicode 14.
pub fn preprocess_dataset_text(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == '\u{3a3}' {
            out.push(if final_sigma(&chars, i) { 'ς' } else { 'σ' });
        } else if let Some(l) = lookup(unicode14::LOWER_CHAR, c) {
            out.push(l);
        } else if let Some(s) = lookup(unicode14::LOWER_STR, c) {
            out.push_str(s);
        } else if c == '“' || c == '”' {
            out.push('"');
        } else {
            out.push(c);
        }
    }
    out
}

/// cn_clip's tokenizer: vocabulary, the BasicTokenizer steps and WordPiece.
///
/// Cloning shares the vocabulary (an `Arc`), so data-loader workers can each hold one; it is
/// `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: Arc<Inner>,
    preprocessing: TextPreprocessing,
}

#[derive(Debug)]
struct Inner {
    model: WordPiece,
    cls: i64,
    sep: i64,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer {
    /// The tokenizer with cn_clip's own vocabulary (embedded), as `cn_clip.clip._tokenizer`.
    ///
    /// The vocabulary is parsed once per process; later calls share it.
    pub fn new() -> Self {
        match &*DEFAULT {
            Ok(tokenizer) => tokenizer.clone(),
            // The embedded file is fixed at compile time and the tests load it.
            Err(e) => panic!("the embedded vocab.txt is invalid: {e}"),
        }
    }

    /// A tokenizer over a user vocabulary in cn_clip's format (one token per line, id = 0-based
    /// line number, token = the line with Python `str.strip()` applied; a later duplicate wins).
    ///
    /// Lines are split as Python's universal newlines do (`\n`, `\r\n`, `\r`), so a vocabulary
    /// that cn_clip's `load_vocab` reads gives the same ids here.
    pub fn from_vocab_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_vocab_bytes(&bytes, path)
    }

    fn from_vocab_bytes(bytes: &[u8], path: &Path) -> Result<Self, TokenizerError> {
        let vocab = parse_vocab(bytes, path)?;
        let id_of = |token: &'static str| {
            vocab
                .get(token)
                .map(|&id| i64::from(id))
                .ok_or_else(|| TokenizerError::MissingToken {
                    path: path.to_path_buf(),
                    token,
                })
        };
        let cls = id_of("[CLS]")?;
        let sep = id_of("[SEP]")?;
        id_of("[UNK]")?;
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".to_owned())
            .continuing_subword_prefix("##".to_owned())
            .max_input_chars_per_word(MAX_INPUT_CHARS_PER_WORD)
            .build()
            .map_err(|e| TokenizerError::WordPiece(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner { model, cls, sep }),
            preprocessing: TextPreprocessing::None,
        })
    }

    /// The same tokenizer (shared vocabulary) with `preprocessing` applied to every input, e.g.
    /// [`TextPreprocessing::Dataset`] to reproduce cn_clip's training and evaluation datasets.
    pub fn with_preprocessing(mut self, preprocessing: TextPreprocessing) -> Self {
        self.preprocessing = preprocessing;
        self
    }

    /// Which rewriting this tokenizer applies before tokenizing.
    pub fn preprocessing(&self) -> TextPreprocessing {
        self.preprocessing
    }

    /// Number of vocabulary lines, i.e. the text tower's `vocab_size` (21,128 for the default).
    pub fn vocab_size(&self) -> usize {
        self.inner.model.get_vocab_size()
    }

    /// Id of a vocabulary token, for callers that need other special tokens than the constants.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.model.token_to_id(token).map(i64::from)
    }

    /// Token of an id, for debugging and decoding.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.inner.model.id_to_token(id))
    }

    /// `[CLS]`'s id in this vocabulary (101 for cn_clip's).
    pub fn cls_id(&self) -> i64 {
        self.inner.cls
    }

    /// `[SEP]`'s id in this vocabulary (102 for cn_clip's).
    pub fn sep_id(&self) -> i64 {
        self.inner.sep
    }

    /// The wordpieces of `text`, untruncated and without `[CLS]`/`[SEP]`, as cn_clip's
    /// `_tokenizer.tokenize` returns them; for inspecting why a text got the ids it got.
    pub fn wordpieces(&self, text: &str) -> Vec<String> {
        self.with_tokens(text, |tokens| tokens.map(|t| t.value.clone()).collect())
    }

    /// The wordpiece ids of `text`, untruncated and without `[CLS]`/`[SEP]`.
    pub fn token_ids(&self, text: &str) -> Vec<i64> {
        self.with_tokens(text, |tokens| tokens.map(|t| i64::from(t.id)).collect())
    }

    /// One row of `clip.tokenize(text)` at the default context length (52), without the padding:
    /// `[CLS] + ids[:50] + [SEP]`. Data loaders pad and batch these themselves.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.encode_row(text, DEFAULT_CONTEXT_LENGTH)
    }

    /// One row of `clip.tokenize(text, context_length)` without the padding:
    /// `[CLS] + ids[:context_length - 2] + [SEP]`, at most `context_length` long.
    pub fn encode_with_context(
        &self,
        text: &str,
        context_length: usize,
    ) -> Result<Vec<i64>, TokenizerError> {
        check_context_length(context_length)?;
        Ok(self.encode_row(text, context_length))
    }

    /// `cn_clip.clip.tokenize(texts, context_length)`: an `i64` tensor `[texts.len(),
    /// context_length]` on the CPU, each row `[CLS] + ids[:context_length - 2] + [SEP]` followed by
    /// `[PAD]` (0). Truncation keeps `[SEP]`, so the end-of-text position is always present.
    pub fn tokenize(
        &self,
        texts: &[impl AsRef<str>],
        context_length: usize,
    ) -> Result<Tensor, TokenizerError> {
        check_context_length(context_length)?;
        let mut data = vec![PAD_ID; texts.len() * context_length];
        for (text, row) in texts.iter().zip(data.chunks_exact_mut(context_length)) {
            let ids = self.encode_row(text.as_ref(), context_length);
            row[..ids.len()].copy_from_slice(&ids);
        }
        Ok(Tensor::from_slice(&data).f_reshape([texts.len() as i64, context_length as i64])?)
    }

    /// Caller guarantees `context_length >= 2`.
    fn encode_row(&self, text: &str, context_length: usize) -> Vec<i64> {
        let keep = context_length - 2;
        self.with_tokens(text, |tokens| {
            let mut ids = Vec::with_capacity(context_length.min(64));
            ids.push(self.inner.cls);
            ids.extend(tokens.take(keep).map(|t| i64::from(t.id)));
            ids.push(self.inner.sep);
            ids
        })
    }

    fn with_tokens<R>(
        &self,
        text: &str,
        f: impl FnOnce(&mut dyn Iterator<Item = &Token>) -> R,
    ) -> R {
        let text: Cow<'_, str> = match self.preprocessing {
            TextPreprocessing::None => Cow::Borrowed(text),
            TextPreprocessing::Dataset => Cow::Owned(preprocess_dataset_text(text)),
        };
        let pre = match self.run_pipeline(&text) {
            Ok(pre) => pre,
            // WordPiece fails only when `[UNK]` is missing, which construction rules out; the
            // normalizer and pre-tokenizer never fail.
            Err(e) => unreachable!("tokenizer pipeline failed: {e}"),
        };
        let splits = pre.get_splits(OffsetReferential::Normalized, OffsetType::Byte);
        let mut tokens = splits
            .into_iter()
            .flat_map(|(_, _, tokens)| tokens.iter().flatten());
        f(&mut tokens)
    }

    fn run_pipeline(&self, text: &str) -> tokenizers::Result<PreTokenizedString> {
        let mut normalized = NormalizedString::from(text);
        BasicNormalizer.normalize(&mut normalized)?;
        let mut pre = PreTokenizedString::from(normalized);
        BasicPreTokenizer.pre_tokenize(&mut pre)?;
        pre.tokenize(|word| self.inner.model.tokenize(word.get()))?;
        Ok(pre)
    }
}

fn check_context_length(context_length: usize) -> Result<(), TokenizerError> {
    if context_length < 2 {
        return Err(TokenizerError::ContextLength { context_length });
    }
    Ok(())
}

/// cn_clip's `load_vocab`: universal-newline lines, Python `strip()`, id = line index.
fn parse_vocab(bytes: &[u8], path: &Path) -> Result<Vocab, TokenizerError> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&bytes[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&bytes[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        lines.push(&bytes[start..]);
    }
    let mut vocab = Vocab::default();
    for (index, raw) in lines.into_iter().enumerate() {
        let invalid = |reason: String| TokenizerError::InvalidVocab {
            path: path.to_path_buf(),
            line: index + 1,
            reason,
        };
        let line = std::str::from_utf8(raw).map_err(|e| invalid(format!("not UTF-8 ({e})")))?;
        let id = u32::try_from(index).map_err(|_| invalid("more than 2^32 lines".to_owned()))?;
        vocab.insert(line.trim_matches(is_py_space).to_owned(), id);
    }
    Ok(vocab)
}

/// cn_clip's `BasicTokenizer` steps up to (not including) the punctuation split, on the crate's
/// `NormalizedString` so alignments stay valid: `_clean_text`, `_tokenize_chinese_chars`, then per
/// word `lower()`, NFD and dropping Mn.
#[derive(Clone, Copy, Debug, Default)]
struct BasicNormalizer;

impl Normalizer for BasicNormalizer {
    fn normalize(&self, normalized: &mut NormalizedString) -> tokenizers::Result<()> {
        rewrite(normalized, |_, c, out| {
            if in_ranges(unicode14::DROP, c) {
            } else if in_ranges(unicode14::TO_SPACE, c) {
                out.push(' ');
            } else if is_cjk(c) {
                out.extend([' ', c, ' ']);
            } else {
                out.push(c);
            }
        });
        // Lowercasing per whitespace word equals lowercasing the whole cleaned text: the separators
        // left after cleaning (space, U+2028, U+2029) are neither cased nor case-ignorable, so they
        // end a final-sigma context just as a word boundary does (asserted by gen_unicode14.py).
        let chars: Vec<char> = normalized.get().chars().collect();
        rewrite(normalized, |i, c, out| fold(&chars, i, c, out));
        Ok(())
    }
}

/// `whitespace_tokenize` + `_run_split_on_punc` + the final re-split, with Python's whitespace and
/// cn_clip's punctuation (ASCII symbols and every Unicode P* category, Unicode 14).
#[derive(Clone, Copy, Debug, Default)]
struct BasicPreTokenizer;

impl PreTokenizer for BasicPreTokenizer {
    fn pre_tokenize(&self, pretokenized: &mut PreTokenizedString) -> tokenizers::Result<()> {
        pretokenized.split(|_, s| s.split(is_py_space, SplitDelimiterBehavior::Removed))?;
        pretokenized.split(|_, s| s.split(is_punct, SplitDelimiterBehavior::Isolated))
    }
}

/// Replaces every character of `normalized` by what `f` pushes (possibly nothing), keeping the
/// alignment bookkeeping `NormalizedString::transform` expects: the first output character
/// replaces the input one, further ones are insertions, and a deleted character is counted on the
/// last character that consumed an input.
fn rewrite(normalized: &mut NormalizedString, mut f: impl FnMut(usize, char, &mut Vec<char>)) {
    let mut dest: Vec<(char, isize)> = Vec::with_capacity(normalized.len() + 8);
    let mut removed_at_start = 0;
    let mut last_consuming: Option<usize> = None;
    let mut out = Vec::with_capacity(4);
    for (i, c) in normalized.get().chars().enumerate() {
        out.clear();
        f(i, c, &mut out);
        match out.split_first() {
            None => match last_consuming {
                Some(j) => dest[j].1 -= 1,
                None => removed_at_start += 1,
            },
            Some((&first, rest)) => {
                last_consuming = Some(dest.len());
                dest.push((first, 0));
                dest.extend(rest.iter().map(|&r| (r, 1)));
            }
        }
    }
    normalized.transform(dest, removed_at_start);
}

/// `lower()` then NFD then drop Mn for the character at `chars[i]`. Per character equals per
/// word here: lowercasing is per character except for Σ, and canonical reordering could only
/// reorder non-Mn marks with a combining class, none of which the vocabulary holds, so a word with
/// them is `[UNK]` in any order (asserted by gen_unicode14.py).
fn fold(chars: &[char], i: usize, c: char, out: &mut Vec<char>) {
    if c.is_ascii() {
        out.push(c.to_ascii_lowercase());
    } else if c == '\u{3a3}' {
        out.push(if final_sigma(chars, i) { 'ς' } else { 'σ' });
    } else if let Some(jamo) = decompose_hangul(c) {
        out.extend(jamo.into_iter().flatten());
    } else if in_ranges(unicode14::FOLD_EMPTY, c) {
    } else if let Some(f) = lookup(unicode14::FOLD_CHAR, c) {
        out.push(f);
    } else if let Some(s) = lookup(unicode14::FOLD_STR, c) {
        out.extend(s.chars());
    } else {
        out.push(c);
    }
}

/// CPython's `handle_capital_sigma`: Σ at `i` lowercases to final `ς` when a cased letter precedes
/// it and none follows, skipping case-ignorable characters both ways.
fn final_sigma(chars: &[char], i: usize) -> bool {
    let not_ignorable = |c: &&char| !in_ranges(unicode14::CASE_IGNORABLE, **c);
    let before = chars[..i].iter().rev().find(not_ignorable);
    if !before.is_some_and(|&c| in_ranges(unicode14::CASED, c)) {
        return false;
    }
    let after = chars[i + 1..].iter().find(not_ignorable);
    !after.is_some_and(|&c| in_ranges(unicode14::CASED, c))
}

/// Hangul syllables decompose algorithmically (NFD), into conjoining jamo that are not Mn.
fn decompose_hangul(c: char) -> Option<[Option<char>; 3]> {
    const S_BASE: u32 = 0xAC00;
    const S_COUNT: u32 = 11_172;
    const T_COUNT: u32 = 28;
    const N_COUNT: u32 = 21 * T_COUNT;
    let s = (c as u32).checked_sub(S_BASE).filter(|&s| s < S_COUNT)?;
    let l = char::from_u32(0x1100 + s / N_COUNT);
    let v = char::from_u32(0x1161 + (s % N_COUNT) / T_COUNT);
    let t = (s % T_COUNT != 0)
        .then(|| char::from_u32(0x11A7 + s % T_COUNT))
        .flatten();
    Some([l, v, t])
}

/// `_is_chinese_char`: the CJK Unified Ideographs blocks as cn_clip lists them.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

fn is_py_space(c: char) -> bool {
    in_ranges(unicode14::PY_SPACE, c)
}

fn is_punct(c: char) -> bool {
    in_ranges(unicode14::PUNCT, c)
}

fn in_ranges(table: &[(char, char)], c: char) -> bool {
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn lookup<T: Copy>(table: &[(char, T)], c: char) -> Option<T> {
    table
        .binary_search_by_key(&c, |&(k, _)| k)
        .ok()
        .map(|k| table[k].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn tokenizer_is_send_sync_clone() {
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn tables_are_sorted_and_python_3_11() {
        assert_eq!(unicode14::UNICODE_VERSION, "14.0.0");
        for table in [
            unicode14::DROP,
            unicode14::TO_SPACE,
            unicode14::PY_SPACE,
            unicode14::PUNCT,
            unicode14::CASE_IGNORABLE,
            unicode14::CASED,
            unicode14::FOLD_EMPTY,
        ] {
            assert!(table.iter().all(|&(lo, hi)| lo <= hi));
            assert!(table.windows(2).all(|w| w[0].1 < w[1].0));
        }
        assert!(unicode14::FOLD_CHAR.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(unicode14::FOLD_STR.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(unicode14::LOWER_CHAR.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(unicode14::LOWER_STR.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn ascii_fast_path_matches_the_tables() {
        for b in 0u8..0x80 {
            let c = char::from(b);
            let mut out = Vec::new();
            let table = lookup(unicode14::FOLD_CHAR, c).unwrap_or(c);
            fold(&[c], 0, c, &mut out);
            assert_eq!(out, vec![table], "{c:?}");
        }
    }

    #[test]
    fn vocab_quirks_match_load_vocab() {
        let t = Tokenizer::new();
        assert_eq!(t.vocab_size(), 21_128);
        assert_eq!(t.token_to_id(""), Some(343));
        assert_eq!(t.token_to_id("##"), Some(13_502));
        for (token, id) in [
            ("[PAD]", PAD_ID),
            ("[UNK]", UNK_ID),
            ("[CLS]", CLS_ID),
            ("[SEP]", SEP_ID),
            ("[MASK]", MASK_ID),
            ("\"", 107),
            ("一", 671),
        ] {
            assert_eq!(t.token_to_id(token), Some(id), "{token}");
        }
        assert_eq!(t.id_to_token(101).as_deref(), Some("[CLS]"));
        assert_eq!(t.id_to_token(-1), None);
    }

    #[test]
    fn universal_newlines_and_python_strip() {
        let v = parse_vocab(b"a\r\nb\rc\n\n \x1c d\x1f\xe2\x80\xa8\n", Path::new("v")).unwrap();
        assert_eq!(v.get("a"), Some(&0));
        assert_eq!(v.get("b"), Some(&1));
        assert_eq!(v.get("c"), Some(&2));
        assert_eq!(v.get(""), Some(&3));
        assert_eq!(v.get("d"), Some(&4));
        assert_eq!(v.len(), 5);
        let dup = parse_vocab(b"x\ny\nx", Path::new("v")).unwrap();
        assert_eq!(dup.get("x"), Some(&2));
    }

    #[test]
    fn hangul_decomposes_like_nfd() {
        assert_eq!(
            decompose_hangul('한'),
            Some([Some('\u{1112}'), Some('\u{1161}'), Some('\u{11ab}')])
        );
        assert_eq!(
            decompose_hangul('가'),
            Some([Some('\u{1100}'), Some('\u{1161}'), None])
        );
        assert_eq!(decompose_hangul('a'), None);
    }
}
