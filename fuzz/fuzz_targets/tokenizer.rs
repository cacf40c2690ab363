//! cn_clip's tokenizer on arbitrary text: BasicTokenizer + WordPiece must never panic, every id
//! must be in the vocabulary, and the context-length form must have exactly the asked length.
#![no_main]

use std::sync::OnceLock;

use cnclip_model::tokenizer::{Tokenizer, preprocess_dataset_text};
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(Tokenizer::new)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = tokenizer();
    let ids = t.token_ids(&text);
    let vocab = t.vocab_size() as i64;
    assert!(ids.iter().all(|&i| (0..vocab).contains(&i)));
    if let Ok(row) = t.encode_with_context(&text, 52) {
        assert!((2..=52).contains(&row.len()));
        assert_eq!((row[0], row[row.len() - 1]), (t.cls_id(), t.sep_id()));
    }
    let _ = t.wordpieces(&preprocess_dataset_text(&text));
});
