//! The TSV and JSONL readers on the committed split and on small bad files written per test:
//! both text forms, Python's line splitting and stripping, and errors that name file and line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TempDir, tiny_data};
use muge_data::files::{
    BadRecordPolicy, FileError, ImageTsvReader, KnownImages, ProblemKind, TextForm,
    TextJsonlReader, read_image_tsv, read_texts_jsonl,
};

fn write(dir: &TempDir, name: &str, content: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn first_error_tsv(content: &[u8]) -> String {
    let d = TempDir::new("tsv");
    let p = write(&d, "x_imgs.tsv", content);
    read_image_tsv(&p, BadRecordPolicy::Fail)
        .unwrap_err()
        .to_string()
}

fn first_error_jsonl(content: &[u8]) -> String {
    let d = TempDir::new("jsonl");
    let p = write(&d, "x_texts.jsonl", content);
    read_texts_jsonl(&p, BadRecordPolicy::Fail)
        .unwrap_err()
        .to_string()
}

#[test]
fn reads_both_text_forms_identically() {
    let (a, ra) =
        read_texts_jsonl(tiny_data().join("train_texts.jsonl"), BadRecordPolicy::Fail).unwrap();
    let (b, _) = read_texts_jsonl(
        tiny_data().join("tianchi_texts.jsonl"),
        BadRecordPolicy::Fail,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 6);
    assert_eq!((ra.lines, ra.records, ra.total_skipped()), (6, 6, 0));
    assert_eq!(a[2].text, "“Nike”运动鞋 AIR Max 男款");
    assert_eq!(
        a[2].image_ids.as_deref(),
        Some(&[7_454_547_004, 999, 1_000_010][..])
    );
    assert_eq!(a[4].image_ids.as_deref(), Some(&[][..]));
    let mut r = TextJsonlReader::open(
        tiny_data().join("tianchi_texts.jsonl"),
        BadRecordPolicy::Fail,
    )
    .unwrap();
    r.next().unwrap().unwrap();
    assert_eq!(r.form(), Some(TextForm::Tianchi));
}

#[test]
fn reads_the_image_tsv() {
    let mut r =
        ImageTsvReader::open(tiny_data().join("train_imgs.tsv"), BadRecordPolicy::Fail).unwrap();
    let records: Vec<_> = r.by_ref().map(|x| x.unwrap()).collect();
    assert_eq!(records.len(), 8);
    assert_eq!(records[0].image_id, 1_000_002);
    assert!(records[0].base64.starts_with("/9j/"), "a JPEG's base64");
    assert_eq!(r.bytes_read(), r.file_len());
    let mut ids: Vec<i64> = r.image_ids().collect();
    ids.sort_unstable();
    assert_eq!(ids[0], 3);
}

#[test]
fn python_line_rules() {
    let d = TempDir::new("rules");
    // CRLF, a lone CR, surrounding whitespace and a trailing line without newline.
    let p = write(&d, "a_imgs.tsv", b" 1\tZm9v \r\n2\tYmFy\r3\tYg==");
    let (r, report) = read_image_tsv(&p, BadRecordPolicy::Fail).unwrap();
    let got: Vec<_> = r
        .iter()
        .map(|r| (r.line, r.image_id, r.base64.as_str()))
        .collect();
    assert_eq!(got, [(1, 1, "Zm9v"), (2, 2, "YmFy"), (3, 3, "Yg==")]);
    assert_eq!(report.lines, 3);
    let p = write(
        &d,
        "b_texts.jsonl",
        "{\"text_id\": 1, \"text\": \"a\"}\r\n\t{\"text_id\": 2, \"text\": \"b\", \"image_ids\": [5]}  \n".as_bytes(),
    );
    let (t, _) = read_texts_jsonl(&p, BadRecordPolicy::Fail).unwrap();
    assert_eq!(t[0].image_ids, None);
    assert_eq!(t[1].image_ids.as_deref(), Some(&[5][..]));
}

#[test]
fn tsv_errors_name_file_line_and_problem() {
    let e = first_error_tsv(b"1\tZm9v\n2 Zm9v\n");
    assert!(
        e.contains(
            "x_imgs.tsv, line 2: expected `image_id<TAB>base64`, found 1 tab-separated field"
        ),
        "{e}"
    );
    let e = first_error_tsv(b"1\tZm9v\t\tx\n");
    assert!(
        e.contains("line 1: expected `image_id<TAB>base64`, found 4 tab-separated fields"),
        "{e}"
    );
    let e = first_error_tsv(b"007\tZm9v\n");
    assert!(
        e.contains("line 1: image id \"007\" is not an integer written as Python's str(int)"),
        "{e}"
    );
    let e = first_error_tsv("\u{feff}1\tZm9v\n".as_bytes());
    assert!(e.contains("byte order mark"), "{e}");
    let e = first_error_tsv(b"1\tZm9v\n2\tZm\xff9v\n");
    assert!(e.contains("line 2: not valid UTF-8"), "{e}");
    let e = first_error_tsv(b"5\ta\n6\tb\n5\tc\n");
    assert!(
        e.ends_with("line 3: image id 5 already appeared on line 1"),
        "{e}"
    );
    let missing =
        read_image_tsv("/nonexistent/dir/valid_imgs.tsv", BadRecordPolicy::Skip).unwrap_err();
    assert!(matches!(missing, FileError::Io { .. }));
    assert!(
        missing
            .to_string()
            .starts_with("cannot read /nonexistent/dir/valid_imgs.tsv")
    );
}

#[test]
fn jsonl_errors_name_file_line_and_problem() {
    let cases: [(&str, &str); 10] = [
        ("\n", "line 1: blank line"),
        (
            "{\"text_id\": 1, \"text\": \"a\"\n",
            "line 1: not valid JSON",
        ),
        ("[1, 2]\n", "line 1: expected a JSON object, found a list"),
        ("{\"id\": 1}\n", "line 1: has neither text_id/text"),
        (
            "{\"text_id\": \"1\", \"text\": \"a\"}\n",
            "text_id must be an integer (as in cn_clip's data), found the string \"1\"",
        ),
        (
            "{\"text_id\": 1.5, \"text\": \"a\"}\n",
            "found the number 1.5",
        ),
        (
            "{\"text_id\": 1, \"text\": 5}\n",
            "text must be a string, found the number 5",
        ),
        (
            "{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [1, \"2\"]}\n",
            "every entry of image_ids must be an integer",
        ),
        (
            "{\"text_id\": 1, \"text\": \"a\", \"query_id\": 1}\n",
            "mixes the Chinese-CLIP keys",
        ),
        ("{\"text_id\": 1}\n", "line 1: has no text"),
    ];
    for (content, want) in cases {
        let e = first_error_jsonl(content.as_bytes());
        assert!(e.contains("x_texts.jsonl, line 1: "), "{e}");
        assert!(e.contains(want), "{content:?}: {e}");
    }
    let e = first_error_jsonl(
        b"{\"text_id\": 1, \"text\": \"a\"}\n{\"query_id\": 2, \"query_text\": \"b\"}\n",
    );
    assert!(e.contains("line 2: uses the Tianchi (query_id, query_text, item_ids) keys but the file's first record uses the Chinese-CLIP"), "{e}");
    let e = first_error_jsonl(
        b"{\"text_id\": 1, \"text\": \"a\"}\n{\"text_id\": 1, \"text\": \"b\"}\n",
    );
    assert!(
        e.ends_with("line 2: text id 1 already appeared on line 1"),
        "{e}"
    );
    let e = first_error_jsonl(b"{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [4, 4]}\n");
    assert!(
        e.ends_with("line 1: text 1 lists image 4 more than once"),
        "{e}"
    );
}

#[test]
fn known_images_catch_missing_references() {
    let d = TempDir::new("known");
    let p = write(
        &d,
        "v_texts.jsonl",
        b"{\"text_id\": 1, \"text\": \"a\", \"image_ids\": [1, 2]}\n{\"text_id\": 2, \"text\": \"b\", \"image_ids\": [3, 1]}\n",
    );
    let known = || KnownImages {
        ids: [1, 2].into_iter().collect(),
        source: "v_imgs.tsv".into(),
    };
    let mut r = TextJsonlReader::open(&p, BadRecordPolicy::Fail)
        .unwrap()
        .with_known_images(known());
    assert!(r.next().unwrap().is_ok());
    let e = r.next().unwrap().unwrap_err().to_string();
    assert!(
        e.ends_with("line 2: text 2 references image 3, which v_imgs.tsv does not contain"),
        "{e}"
    );
    assert!(r.next().is_none(), "a failed reader stops");

    let mut r = TextJsonlReader::open(&p, BadRecordPolicy::Skip)
        .unwrap()
        .with_known_images(known());
    let records: Vec<_> = r.by_ref().map(|x| x.unwrap()).collect();
    assert_eq!(
        records[1].image_ids.as_deref(),
        Some(&[1][..]),
        "only the missing id is dropped"
    );
    let report = r.into_report();
    assert_eq!(report.skipped.get(&ProblemKind::MissingImage), Some(&1));
    assert_eq!(report.records, 2);
    let shown = report.to_string();
    assert!(
        shown.contains("1 × reference to a missing image"),
        "{shown}"
    );
}

#[test]
fn skip_policy_keeps_reading_and_caps_examples() {
    let mut content = String::new();
    for i in 0..30 {
        content.push_str(&format!("bad line {i}\n"));
    }
    content.push_str("7\tZm9v\n");
    let d = TempDir::new("cap");
    let p = write(&d, "c_imgs.tsv", content.as_bytes());
    let (records, report) = read_image_tsv(&p, BadRecordPolicy::Skip).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(report.skipped.get(&ProblemKind::Malformed), Some(&30));
    assert_eq!(report.examples.len(), muge_data::files::MAX_EXAMPLES);
    assert!(report.to_string().ends_with("… and 10 more"));
}
