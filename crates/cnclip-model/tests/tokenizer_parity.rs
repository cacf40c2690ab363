//! The tokenizer against cn_clip 1.6.0: recorded reference ids (tests/fixtures/tokenizer, made by
//! tests/fixtures/make_tokenizer_fixtures.py), the spec's worked examples, and the error paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use cnclip_model::tokenizer::{
    CLS_ID, DEFAULT_CONTEXT_LENGTH, MASK_ID, PAD_ID, SEP_ID, TextPreprocessing, Tokenizer,
    TokenizerError, UNK_ID, preprocess_dataset_text,
};
use serde_json::Value;

static CASES: &str = include_str!("fixtures/tokenizer/cases.jsonl");

struct Case {
    text: String,
    context_length: usize,
    dataset: bool,
    ids: Vec<i64>,
    pieces: Option<Vec<String>>,
}

fn cases() -> Vec<Case> {
    CASES
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            Case {
                text: v["text"].as_str().unwrap().to_owned(),
                context_length: v["context_length"].as_u64().unwrap() as usize,
                dataset: match v["path"].as_str().unwrap() {
                    "api" => false,
                    "dataset" => true,
                    other => panic!("unknown path {other}"),
                },
                ids: v["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect(),
                pieces: v.get("pieces").map(|p| {
                    p.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap().to_owned())
                        .collect()
                }),
            }
        })
        .collect()
}

fn rows(t: &tch::Tensor) -> Vec<Vec<i64>> {
    let size = t.size();
    assert_eq!(size.len(), 2);
    assert_eq!(t.kind(), tch::Kind::Int64);
    let flat = Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    if size[1] == 0 {
        return vec![Vec::new(); size[0] as usize];
    }
    flat.chunks(size[1] as usize).map(<[i64]>::to_vec).collect()
}

fn padded(ids: &[i64], context_length: usize) -> Vec<i64> {
    let mut row = ids.to_vec();
    row.resize(context_length, PAD_ID);
    row
}

#[test]
fn every_fixture_case_is_identical() {
    let api = Tokenizer::new();
    let dataset = Tokenizer::new().with_preprocessing(TextPreprocessing::Dataset);
    let cases = cases();
    assert!(cases.len() >= 1000, "only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut pieces_checked = 0;
    for (i, case) in cases.iter().enumerate() {
        let t = if case.dataset { &dataset } else { &api };
        let row = t
            .encode_with_context(&case.text, case.context_length)
            .unwrap();
        let tensor = t.tokenize(&[&case.text], case.context_length).unwrap();
        let tensor_row = rows(&tensor).remove(0);
        if row != case.ids || tensor_row != padded(&case.ids, case.context_length) {
            failures.push(format!(
                "case {i} {:?} (L={}, dataset={}): expected {:?}, got {:?}",
                case.text, case.context_length, case.dataset, case.ids, row
            ));
        }
        if let Some(pieces) = &case.pieces {
            pieces_checked += 1;
            let got = t.wordpieces(&case.text);
            if &got != pieces {
                failures.push(format!(
                    "case {i} {:?}: pieces {pieces:?}, got {got:?}",
                    case.text
                ));
            }
        }
    }
    assert!(pieces_checked >= 300);
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

#[test]
fn batch_tokenize_equals_row_by_row() {
    let t = Tokenizer::new();
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| !c.dataset && c.context_length == DEFAULT_CONTEXT_LENGTH)
        .collect();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let batch = t.tokenize(&texts, DEFAULT_CONTEXT_LENGTH).unwrap();
    assert_eq!(batch.size(), [texts.len() as i64, 52]);
    for (row, case) in rows(&batch).iter().zip(&cases) {
        assert_eq!(row, &padded(&case.ids, 52), "{:?}", case.text);
    }
}

fn ids(text: &str) -> Vec<i64> {
    Tokenizer::new().encode(text)
}

#[test]
fn spec_worked_examples() {
    assert_eq!(
        ids("这是一张图片，里面存在商品：连衣裙"),
        [
            101, 6821, 3221, 671, 2476, 1745, 4275, 8024, 7027, 7481, 2100, 1762, 1555, 1501, 8038,
            6825, 6132, 6170, 102
        ]
    );
    assert_eq!(ids("杰尼龟"), [101, 3345, 2225, 7991, 102]);
    assert_eq!(ids("妙蛙种子"), [101, 1975, 6032, 4905, 2094, 102]);
    assert_eq!(ids("小火龙"), [101, 2207, 4125, 7987, 102]);
    assert_eq!(ids("皮卡丘"), [101, 4649, 1305, 687, 102]);
    assert_eq!(
        ids("一只可爱的小猫在草地上玩耍"),
        [
            101, 671, 1372, 1377, 4263, 4638, 2207, 4344, 1762, 5770, 1765, 677, 4381, 5446, 102
        ]
    );
    let t = Tokenizer::new();
    assert_eq!(
        t.wordpieces("iPhone 14 Pro Max 手机壳 256GB"),
        [
            "iphone", "14", "pro", "max", "手", "机", "壳", "256", "##gb"
        ]
    );
    assert_eq!(
        ids("iPhone 14 Pro Max 手机壳 256GB"),
        [
            101, 8210, 8122, 8376, 8621, 2797, 3322, 1900, 9745, 9673, 102
        ]
    );
    assert_eq!(
        t.wordpieces("Café naïve ÄÖÜ 北京2022冬奥会!"),
        [
            "cafe", "na", "##ive", "a", "##ou", "北", "京", "2022", "冬", "奥", "会", "!"
        ]
    );
    assert_eq!(
        ids("Café naïve ÄÖÜ 北京2022冬奥会!"),
        [
            101, 8377, 11469, 8857, 143, 9857, 1266, 776, 10550, 1100, 1952, 833, 106, 102
        ]
    );
    assert_eq!(
        t.wordpieces("Hello, World! 我爱NLP。"),
        ["hello", ",", "world", "!", "我", "爱", "n", "##lp", "。"]
    );
    assert_eq!(
        ids("Hello, World! 我爱NLP。"),
        [101, 8701, 117, 8572, 106, 2769, 4263, 156, 10986, 511, 102]
    );
    assert_eq!(
        ids("“高级感”托特包斜挎"),
        [
            101, 100, 7770, 5277, 2697, 100, 2805, 4294, 1259, 3162, 2903, 102
        ]
    );
    assert_eq!(
        t.clone()
            .with_preprocessing(TextPreprocessing::Dataset)
            .encode("“高级感”托特包斜挎"),
        [
            101, 107, 7770, 5277, 2697, 107, 2805, 4294, 1259, 3162, 2903, 102
        ]
    );
    assert_eq!(
        t.wordpieces("𠀀𪜀 ㈠ ＡＢＣ　１２３ unaffable"),
        [
            "[UNK]", "[UNK]", "[UNK]", "ａ", "##ｂ", "##ｃ", "１２", "##３", "u", "##na", "##ff",
            "##able"
        ]
    );
    assert_eq!(
        ids("𠀀𪜀 ㈠ ＡＢＣ　１２３ unaffable"),
        [
            101, 100, 100, 100, 8051, 12641, 10675, 10351, 9089, 163, 8374, 9049, 9609, 102
        ]
    );

    let mut sixty = vec![101];
    sixty.extend([704; 50]);
    sixty.push(102);
    assert_eq!(ids(&"中".repeat(60)), sixty);
    let padded_row = rows(&t.tokenize(&["中".repeat(60)], 52).unwrap()).remove(0);
    assert_eq!(padded_row, sixty, "exactly 52, no padding");

    let long = "Chinese-CLIP是一个非常强大的中文多模态模型，它可以用于图文检索、零样本图像分类等多种任务，效果很好，而且速度也很快。";
    assert_eq!(t.wordpieces(long).len(), 56);
    let row = ids(long);
    assert_eq!(row.len(), 52);
    assert_eq!(row[..6], [101, 10101, 118, 12847, 9032, 3221]);
    assert_eq!(row[48..], [8024, 5445, 684, 102]);
}

#[test]
fn empty_and_blank_give_cls_sep() {
    let t = Tokenizer::new();
    for text in ["", " ", "\t\n", "\u{3000}\u{200b}"] {
        let row = rows(&t.tokenize(&[text], 52).unwrap()).remove(0);
        assert_eq!(row, padded(&[CLS_ID, SEP_ID], 52), "{text:?}");
        assert!(t.wordpieces(text).is_empty());
    }
}

#[test]
fn divergences_of_bert_normalizer_are_fixed() {
    // Cases where tokenizers' BertNormalizer/BertPreTokenizer disagree with cn_clip.
    let t = Tokenizer::new();
    assert_eq!(t.wordpieces("a\u{e000}b"), ["[UNK]"], "private use is kept");
    assert_eq!(
        t.wordpieces("a\u{2b820}b"),
        ["a", "[UNK]", "b"],
        "CJK Ext E start"
    );
    assert_eq!(
        t.wordpieces("x\u{1ac1}"),
        ["x"],
        "Unicode 14 Mn is stripped"
    );
    assert_eq!(
        t.wordpieces("a\u{890}a"),
        ["aa"],
        "Unicode 14 Cf is dropped"
    );
    assert_eq!(
        t.wordpieces("a\u{2e55}a"),
        ["a", "[UNK]", "a"],
        "Unicode 14 Ps splits"
    );
    assert_eq!(t.wordpieces("a\u{166d}a"), ["[UNK]"], "U+166D is So now");
    assert_eq!(t.wordpieces("\u{1734}"), ["[UNK]"], "U+1734 is Mc now");
    assert_eq!(t.wordpieces("ΣΣ"), ["σ", "##ς"], "final sigma");
}

#[test]
fn special_ids() {
    let t = Tokenizer::new();
    assert_eq!(
        [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID],
        [0, 100, 101, 102, 103]
    );
    assert_eq!(t.cls_id(), CLS_ID);
    assert_eq!(t.sep_id(), SEP_ID);
    assert_eq!(t.token_to_id("[MASK]"), Some(MASK_ID));
    assert_eq!(t.vocab_size(), 21_128);
    assert_eq!(DEFAULT_CONTEXT_LENGTH, 52);
    // The vocabulary has no curly quotes, and typed special tokens are plain text.
    assert_eq!(t.encode("“"), [CLS_ID, UNK_ID, SEP_ID]);
    assert_eq!(t.wordpieces("[CLS]"), ["[", "cl", "##s", "]"]);
}

#[test]
fn token_ids_are_untruncated() {
    let t = Tokenizer::new();
    let text = "中".repeat(60);
    assert_eq!(t.token_ids(&text), vec![704; 60]);
    assert_eq!(t.encode_with_context(&text, 2).unwrap(), [CLS_ID, SEP_ID]);
    assert_eq!(
        t.encode_with_context(&text, 5).unwrap(),
        [CLS_ID, 704, 704, 704, SEP_ID]
    );
}

#[test]
fn tensor_shape_and_padding() {
    let t = Tokenizer::new();
    let batch = t.tokenize(&["杰尼龟", "", "中文"], 8).unwrap();
    assert_eq!(batch.size(), [3, 8]);
    assert_eq!(batch.device(), tch::Device::Cpu);
    assert_eq!(
        rows(&batch),
        [
            vec![101, 3345, 2225, 7991, 102, 0, 0, 0],
            vec![101, 102, 0, 0, 0, 0, 0, 0],
            vec![101, 704, 3152, 102, 0, 0, 0, 0],
        ]
    );
    let empty: [&str; 0] = [];
    assert_eq!(t.tokenize(&empty, 52).unwrap().size(), [0, 52]);
    let owned = vec![String::from("中文")];
    assert_eq!(t.tokenize(&owned, 4).unwrap().size(), [1, 4]);
}

#[test]
fn dataset_preprocessing() {
    assert_eq!(preprocess_dataset_text("“BIG” Sale"), "\"big\" sale");
    // Python lowercases before cleaning: the NUL still ends the word, so Σ is final here, while
    // the API path drops the NUL first and sees ΑΣΒ.
    assert_eq!(preprocess_dataset_text("ΟΔΟΣ ΑΣ\u{0}Β"), "οδος ας\u{0}β");
    assert_eq!(preprocess_dataset_text("İ‘’"), "i\u{307}‘’");
    let t = Tokenizer::new().with_preprocessing(TextPreprocessing::Dataset);
    assert_eq!(t.preprocessing(), TextPreprocessing::Dataset);
    assert_eq!(Tokenizer::new().preprocessing(), TextPreprocessing::None);
    assert_eq!(t.wordpieces("“高”"), ["\"", "高", "\""]);
    assert_eq!(t.wordpieces("ΑΣ\u{0}Β"), ["α", "##ς", "##β"]);
    assert_eq!(Tokenizer::new().wordpieces("ΑΣ\u{0}Β"), ["α", "##σ", "##β"]);
}

#[test]
fn context_length_below_two_is_an_error() {
    let t = Tokenizer::new();
    for l in [0, 1] {
        let err = t.tokenize(&["中"], l).unwrap_err();
        assert!(
            matches!(err, TokenizerError::ContextLength { context_length } if context_length == l)
        );
        assert!(err.to_string().contains("at least 2"), "{err}");
        assert!(t.encode_with_context("中", l).is_err());
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("cnclip-tokenizer-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn vocab_file_errors_name_the_file() {
    let missing = std::env::temp_dir().join("cnclip-no-such-dir/vocab.txt");
    let err = Tokenizer::from_vocab_file(&missing).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }));
    assert!(
        err.to_string().contains("cnclip-no-such-dir/vocab.txt"),
        "{err}"
    );

    let bad = temp_file("bad-utf8.txt", b"[PAD]\n[UNK]\n\xff\xfe\n");
    let err = Tokenizer::from_vocab_file(&bad).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::InvalidVocab { line: 3, path, .. } if path == &bad),
        "{err}"
    );
    assert!(err.to_string().contains("line 3"), "{err}");
    assert!(err.to_string().contains(&*bad.to_string_lossy()), "{err}");
    std::fs::remove_file(&bad).unwrap();

    for (name, body, token) in [
        ("no-unk.txt", "[PAD]\n[CLS]\n[SEP]\n", "[UNK]"),
        ("no-cls.txt", "[PAD]\n[UNK]\n[SEP]\n", "[CLS]"),
        ("empty.txt", "", "[CLS]"),
    ] {
        let path = temp_file(name, body.as_bytes());
        let err = Tokenizer::from_vocab_file(&path).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::MissingToken { token: t, .. } if *t == token),
            "{err}"
        );
        assert!(err.to_string().contains(name), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn user_vocab_files() {
    // cn_clip's own vocab from disk gives the embedded tokenizer's ids.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/vocab.txt");
    let from_file = Tokenizer::from_vocab_file(&path).unwrap();
    let embedded = Tokenizer::new();
    for case in cases().iter().filter(|c| !c.dataset).take(300) {
        assert_eq!(from_file.encode(&case.text), embedded.encode(&case.text));
    }

    // A tiny vocabulary with CRLF lines and its specials elsewhere: ids are line numbers.
    let path = temp_file(
        "tiny.txt",
        b"[PAD]\r\nhelp\r\n[CLS]\r\n[SEP]\r\n[UNK]\r\n##lo\r\nhel\r\n",
    );
    let t = Tokenizer::from_vocab_file(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(t.vocab_size(), 7);
    assert_eq!((t.cls_id(), t.sep_id()), (2, 3));
    assert_eq!(
        t.wordpieces("HELLO help helo x"),
        ["hel", "##lo", "help", "[UNK]", "[UNK]"]
    );
    assert_eq!(
        rows(&t.tokenize(&["hello help"], 6).unwrap()).remove(0),
        [2, 6, 5, 1, 3, 0]
    );
}

#[test]
fn clones_share_and_work_across_threads() {
    let t = Tokenizer::new();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || t.encode(&format!("第{i}个商品")))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().len(), 7);
    }
}

/// Replays cn_clip's ids for every code point in three contexts (about 1.1 million lines, written
/// by `make_tokenizer_fixtures.py --sweep PATH`; too large to commit). Run with
/// `CNCLIP_TOKENIZER_SWEEP=PATH cargo test -p cnclip-model --test tokenizer_parity -- --ignored`.
#[test]
#[ignore = "needs CNCLIP_TOKENIZER_SWEEP from make_tokenizer_fixtures.py --sweep"]
fn exhaustive_code_point_sweep() {
    let path = std::env::var("CNCLIP_TOKENIZER_SWEEP").expect("set CNCLIP_TOKENIZER_SWEEP");
    let text = std::fs::read_to_string(path).unwrap();
    let t = Tokenizer::new();
    let mut failures = Vec::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let v: Value = serde_json::from_str(line).unwrap();
        let c = char::from_u32(v[0].as_u64().unwrap() as u32).unwrap();
        let contexts = [c.to_string(), format!("a{c}a"), format!("\u{3a3}{c}")];
        for (k, context) in contexts.iter().enumerate() {
            let expected: Vec<i64> = v[k + 1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let mut got = vec![CLS_ID];
            got.extend(t.token_ids(context));
            got.push(SEP_ID);
            if got != expected {
                failures.push(format!(
                    "U+{:04X} {context:?}: {expected:?} vs {got:?}",
                    c as u32
                ));
            }
        }
    }
    assert_eq!(lines, 0x110000 - 0x800);
    assert!(
        failures.is_empty(),
        "{} differ:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}
