//! The pickle reader of cn_clip's LMDB pairs (`pickle.loads` of `(image_id, text_id, text)`) and the
//! lenient base64 of its image values, on arbitrary bytes: errors, never panics; what decodes
//! re-encodes to a pickle that decodes to the same pair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muge_data::base64::{decode_cn_clip, encode};
use muge_data::pickle::{dumps_pair, loads_pair};

fuzz_target!(|data: &[u8]| {
    if let Ok(pair) = loads_pair(data) {
        let again = loads_pair(&dumps_pair(pair.image_id, pair.text_id, &pair.text))
            .expect("our own pickle must load");
        assert_eq!(
            (again.image_id, again.text_id, &again.text),
            (pair.image_id, pair.text_id, &pair.text)
        );
    }
    if let Ok(bytes) = decode_cn_clip(data) {
        assert_eq!(decode_cn_clip(encode(&bytes).as_bytes()).ok(), Some(bytes));
    }
});
