//! MUGE's `{split}_imgs.tsv` and `{split}_texts.jsonl` readers on arbitrary bytes, under both
//! bad-record policies. They read paths, so the input goes through a per-process temp file; the
//! first byte picks the reader and the policy. No panic, and under `Skip` no error but I/O.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use muge_data::files::{BadRecordPolicy, ImageTsvReader, TextJsonlReader};

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cnclip-fuzz-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let policy = if mode & 1 == 0 {
        BadRecordPolicy::Fail
    } else {
        BadRecordPolicy::Skip
    };
    if mode & 2 == 0 {
        let path = dir().join("x_imgs.tsv");
        std::fs::write(&path, body).expect("write");
        let mut reader = ImageTsvReader::open(&path, policy).expect("open");
        for r in reader.by_ref() {
            if r.is_err() {
                assert_eq!(policy, BadRecordPolicy::Fail);
                break;
            }
        }
        let _ = reader.report().to_string();
    } else {
        let path = dir().join("x_texts.jsonl");
        std::fs::write(&path, body).expect("write");
        let mut reader = TextJsonlReader::open(&path, policy).expect("open");
        for r in reader.by_ref() {
            if r.is_err() {
                assert_eq!(policy, BadRecordPolicy::Fail);
                break;
            }
        }
        let _ = reader.report().to_string();
    }
});
