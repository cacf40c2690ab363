//! The checkpoint readers on arbitrary bytes: a raw `.pt` file (zip + pickle + storages), a
//! fuzzed pickle wrapped as `archive/data.pkl` of a well-formed zip (so the pickle machine itself
//! is reached), and a native `.safetensors` file. The first byte picks; errors, never panics.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use cnclip_model::weights::{load_native, read_pt};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cnclip-fuzz-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn zip_with_pickle(pickle: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).expect("zip");
    zip.write_all(pickle).expect("zip");
    // One small storage, so persistent ids naming "0" can resolve.
    zip.start_file("archive/data/0", options).expect("zip");
    zip.write_all(&[0u8; 64]).expect("zip");
    zip.finish().expect("zip").into_inner()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let p = dir().join("f.pt");
            std::fs::write(&p, body).expect("write");
            let _ = read_pt(&p).map(|c| c.into_cn_clip_state_dict());
        }
        1 => {
            let p = dir().join("p.pt");
            std::fs::write(&p, zip_with_pickle(body)).expect("write");
            let _ = read_pt(&p).map(|c| c.into_cn_clip_state_dict());
        }
        _ => {
            let p = dir().join("f.safetensors");
            std::fs::write(&p, body).expect("write");
            let _ = load_native(&p);
        }
    }
});
