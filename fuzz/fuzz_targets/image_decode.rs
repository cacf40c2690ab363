//! Image decoding as Pillow would (libjpeg-turbo for JPEG, the `image`/`gif` crates for the rest)
//! on arbitrary bytes: an image or an error naming it, never a panic. Headers claiming more than
//! 4M pixels are skipped so that each run stays fast (the size limit itself is tested in
//! `crates/cnclip-model/tests/bad_inputs.rs`).
#![no_main]

use cnclip_model::preprocess::{Preprocessor, decode_named};
use std::sync::Once;

use libfuzzer_sys::fuzz_target;

fn claims_few_pixels(data: &[u8]) -> bool {
    let reader = image::ImageReader::new(std::io::Cursor::new(data)).with_guessed_format();
    match reader.map(|r| r.into_dimensions()) {
        Ok(Ok((w, h))) => u64::from(w) * u64::from(h) <= 1 << 22,
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's hook aborts on every panic, even one `decode_named` catches and turns into
    // an error (it does so for panics inside the third-party decoders). Replace it with a
    // one-line report: a panic that escapes still aborts through libfuzzer-sys's own
    // `catch_unwind`, and libFuzzer saves the input.
    static HOOK: Once = Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("caught? {info}"))));
    if !claims_few_pixels(data) {
        return;
    }
    match decode_named(data, "fuzz") {
        Ok(img) => {
            let p = Preprocessor::new(8).expect("size");
            let _ = p.rgb_from_bytes(data, "fuzz");
            let _ = img.resize_rgb(8, 8);
        }
        Err(e) => assert!(e.to_string().starts_with("image fuzz ")),
    }
});
