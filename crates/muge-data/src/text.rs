//! Captions and queries to token ids, the same way on every path that feeds the text tower.
//!
//! The MUGE contest recipe prefixes every text with a product prompt, `这是一张图片，里面存在商品：`
//! ("this is a picture containing the product: "), in *both* training and evaluation: the text
//! is prefixed where cn_clip's `LMDBDataset.__getitem__` (training and validation) and
//! `EvalTxtDataset` (feature extraction) tokenize it, the same way in both. A
//! prompt applied on one side only silently costs recall, so [`TextPipeline`] is the one place
//! that turns a raw text into ids; the loader and the evaluation text path both call it.
//!
//! Order of operations (cn_clip's datasets, plus the prompt):
//! 1. `prompt + raw_text` when a prompt is set;
//! 2. cn_clip's `_preprocess_text` (Python `lower()`, curly double quotes to `"`), through
//!    [`cnclip_model::tokenizer::preprocess_dataset_text`];
//! 3. `tokenize([...], context_length)[0]`: `[CLS] + ids[:L-2] + [SEP]`, padded with 0 to `L`.
//!
//! The prompt goes through step 2 as well, so a custom prompt is lower-cased like the text it
//! prefixes; the product prompt has no letters, so it is unchanged.

use std::borrow::Cow;

use cnclip_model::tokenizer::{
    DEFAULT_CONTEXT_LENGTH, PAD_ID, TextPreprocessing, Tokenizer, TokenizerError,
};
use tch::Tensor;

/// The product prompt of the winning MUGE recipe (14 characters, 14 tokens).
pub const PRODUCT_PROMPT: &str = "这是一张图片，里面存在商品：";

/// `prompt + text` (cn_clip's string concatenation), borrowing when there is no prompt.
pub fn apply_prompt<'a>(prompt: Option<&str>, text: &'a str) -> Cow<'a, str> {
    match prompt {
        Some(p) if !p.is_empty() => Cow::Owned(format!("{p}{text}")),
        _ => Cow::Borrowed(text),
    }
}

/// Why texts could not be turned into ids.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("building the token tensor failed: {0}")]
    Tensor(#[from] tch::TchError),
}

/// Prompt, cn_clip's dataset text preprocessing and tokenization at a fixed context length.
///
/// Cheap to clone (the vocabulary is shared); `Send + Sync`, so loader workers share one.
#[derive(Debug, Clone)]
pub struct TextPipeline {
    tokenizer: Tokenizer,
    prompt: Option<String>,
    context_length: usize,
}

impl TextPipeline {
    /// cn_clip's vocabulary and dataset preprocessing at `context_length` (cn_clip's
    /// `--context-length`, 52 by default), without a prompt.
    pub fn new(context_length: usize) -> Result<Self, TextError> {
        Self::with_tokenizer(Tokenizer::new(), context_length)
    }

    /// A pipeline over a given tokenizer (e.g. a user vocabulary); dataset preprocessing is
    /// switched on whatever the tokenizer had, because every dataset path of cn_clip applies it.
    pub fn with_tokenizer(tokenizer: Tokenizer, context_length: usize) -> Result<Self, TextError> {
        // Validates the length (at least [CLS] and [SEP]) once, so encoding never fails later.
        tokenizer.encode_with_context("", context_length)?;
        Ok(TextPipeline {
            tokenizer: tokenizer.with_preprocessing(TextPreprocessing::Dataset),
            prompt: None,
            context_length,
        })
    }

    /// Sets or clears the prompt prefixed to every text.
    pub fn with_prompt(mut self, prompt: Option<impl Into<String>>) -> Self {
        self.prompt = prompt.map(Into::into).filter(|p| !p.is_empty());
        self
    }

    /// Prefixes [`PRODUCT_PROMPT`] to every text.
    pub fn with_product_prompt(self) -> Self {
        self.with_prompt(Some(PRODUCT_PROMPT))
    }

    pub fn prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The string cn_clip hands to `tokenize`: prompt, then `_preprocess_text`.
    pub fn prepare(&self, raw_text: &str) -> String {
        cnclip_model::tokenizer::preprocess_dataset_text(&apply_prompt(
            self.prompt.as_deref(),
            raw_text,
        ))
    }

    /// Writes the padded id row of `raw_text` into `row` (length `context_length`) and returns
    /// the position of `[SEP]` (cn_clip's `eos_index`).
    pub fn encode_into(&self, raw_text: &str, row: &mut [i64]) -> usize {
        let text = apply_prompt(self.prompt.as_deref(), raw_text);
        // The tokenizer applies the dataset preprocessing itself; the length was validated.
        let ids = match self
            .tokenizer
            .encode_with_context(&text, self.context_length)
        {
            Ok(ids) => ids,
            Err(e) => unreachable!("context length validated at construction: {e}"),
        };
        row.fill(PAD_ID);
        row[..ids.len()].copy_from_slice(&ids);
        ids.len() - 1
    }

    /// The padded id row of `raw_text` (length `context_length`).
    pub fn encode(&self, raw_text: &str) -> Vec<i64> {
        let mut row = vec![PAD_ID; self.context_length];
        self.encode_into(raw_text, &mut row);
        row
    }

    /// `[N, context_length]` i64 ids for a batch of raw texts (CPU).
    pub fn encode_batch(&self, texts: &[impl AsRef<str>]) -> Result<Tensor, TextError> {
        let l = self.context_length;
        let mut data = vec![PAD_ID; texts.len() * l];
        for (text, row) in texts.iter().zip(data.chunks_exact_mut(l)) {
            self.encode_into(text.as_ref(), row);
        }
        Ok(Tensor::f_from_slice(&data)?.f_view([texts.len() as i64, l as i64])?)
    }
}

/// A texts file encoded for feature extraction: cn_clip's `EvalTxtDataset` (file order, text ids
/// as integers) through the same [`TextPipeline`] as training.
#[derive(Debug)]
pub struct EncodedTexts {
    /// Text ids in file order.
    pub text_ids: Vec<i64>,
    /// `[N, context_length]` i64 token ids, row `i` for `text_ids[i]` (CPU).
    pub ids: Tensor,
}

/// Why a texts file could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeTextsError {
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error(transparent)]
    Text(#[from] TextError),
}

impl TextPipeline {
    /// Reads `{split}_texts.jsonl` (either form; image lists are not needed) and encodes every
    /// text, as `extract_features.py --extract-text-feats` feeds the text tower. Malformed lines and
    /// repeated text ids follow `policy`.
    pub fn encode_texts_file(
        &self,
        path: impl AsRef<std::path::Path>,
        policy: crate::files::BadRecordPolicy,
    ) -> Result<EncodedTexts, EncodeTextsError> {
        let (records, _) = crate::files::read_texts_jsonl(path, policy)?;
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        Ok(EncodedTexts {
            text_ids: records.iter().map(|r| r.text_id).collect(),
            ids: self.encode_batch(&texts)?,
        })
    }
}

impl Default for TextPipeline {
    /// Context length 52, no prompt.
    fn default() -> Self {
        match Self::new(DEFAULT_CONTEXT_LENGTH) {
            Ok(p) => p,
            Err(e) => unreachable!("the default context length is valid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cn_clip's tokenizer (`cn_clip/clip/bert_tokenizer.py`) on prompt + 连衣裙, ids from running it.
    #[test]
    fn product_prompt_ids() {
        let p = TextPipeline::default().with_product_prompt();
        let ids = p.encode("连衣裙");
        let want = [
            101, 6821, 3221, 671, 2476, 1745, 4275, 8024, 7027, 7481, 2100, 1762, 1555, 1501, 8038,
            6825, 6132, 6170, 102,
        ];
        assert_eq!(&ids[..want.len()], &want);
        assert!(ids[want.len()..].iter().all(|&i| i == 0));
        assert_eq!(ids.len(), 52);
        let mut row = vec![7; 52];
        assert_eq!(p.encode_into("连衣裙", &mut row), want.len() - 1);
        assert_eq!(row, ids);
    }

    #[test]
    fn dataset_preprocessing_applies() {
        let p = TextPipeline::new(8).unwrap();
        // Curly quotes become '"' (id 107) rather than [UNK]; upper case is lowered.
        let ids = p.encode("“AB”");
        assert_eq!(ids, p.encode("\"ab\""));
        assert!(!ids.contains(&cnclip_model::tokenizer::UNK_ID));
        assert_eq!(p.prepare("“Ab”"), "\"ab\"");
        let prompted = TextPipeline::new(8).unwrap().with_prompt(Some("X:"));
        assert_eq!(prompted.prepare("Y"), "x:y");
    }

    #[test]
    fn truncation_keeps_sep() {
        let p = TextPipeline::new(4).unwrap().with_product_prompt();
        let ids = p.encode("连衣裙");
        assert_eq!(ids, vec![101, 6821, 3221, 102]);
        assert!(TextPipeline::new(1).is_err());
    }
}
