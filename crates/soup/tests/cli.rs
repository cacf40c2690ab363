//! The tool end to end on tiny checkpoints and a tiny validation LMDB: the `cnclip-soup` binary
//! (what `cargo xtask soup` runs) scores the candidates, merges, writes the soup and the report;
//! a second run recomputes nothing; `--report-only` regenerates the same report from the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip_model::weights::{StateDict, load_native, read_safetensors_metadata};
use cnclip_model::{Clip, ClipConfig, LoadOptions};
use muge_data::files::BadRecordPolicy;
use soup::sink::average_state_dicts;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnclip-soup-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_config() -> ClipConfig {
    let fx = repo().join("crates/cnclip-model/tests/fixtures/model/configs");
    ClipConfig::from_json_files(&fx.join("tiny-vit.json"), &fx.join("tiny-bert.json")).unwrap()
}

/// A tiny "valid" split: the 10 images and 7 texts of cnclip-train's loop fixture.
fn valid_lmdb(root: &Path) -> PathBuf {
    let raw = root.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let fx = repo().join("crates/cnclip-train/tests/fixtures/loop");
    std::fs::copy(fx.join("train_imgs.tsv"), raw.join("valid_imgs.tsv")).unwrap();
    std::fs::copy(fx.join("train_texts.jsonl"), raw.join("valid_texts.jsonl")).unwrap();
    let out = root.join("lmdb");
    muge_data::build_split(&raw, "valid", &out, BadRecordPolicy::Fail, &mut |_| {}).unwrap();
    out.join("valid")
}

/// torch's generator is global and the tests run in parallel.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn random_model(seed: i64) -> Clip {
    let _lock = SEEDED.lock().unwrap();
    tch::manual_seed(seed);
    Clip::new(&tiny_config(), Device::Cpu)
}

/// A random tiny model per seed, saved as a training run saves its model.
fn checkpoint(root: &Path, rel: &str, seed: i64) -> PathBuf {
    let model = random_model(seed);
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    model.save_native(&path).unwrap();
    path
}

fn soup(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_cnclip-soup"))
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// MUGE recall of `path` computed independently of the soup crate, as cnclip-train's validation
/// does it (features, dense similarity, torch topk, eval).
fn independent_score(path: &Path, val: &Path) -> f64 {
    let model = Clip::load(path, &LoadOptions::default(), Device::Cpu).unwrap();
    let split = muge_data::LmdbSplit::open(val).unwrap();
    let pipeline = muge_data::TextPipeline::new(52)
        .unwrap()
        .with_product_prompt();
    let reader = split.reader().unwrap();
    let mut texts: Vec<(i64, String)> = Vec::new();
    let mut truth: std::collections::HashMap<i64, Vec<i64>> = Default::default();
    for i in 0..split.num_samples() {
        let p = reader.pairs().pair(i).unwrap();
        if !truth.contains_key(&p.text_id) {
            texts.push((p.text_id, p.text.clone()));
        }
        truth.entry(p.text_id).or_default().push(p.image_id);
    }
    let ids = split.images().ids_in_key_order().unwrap();
    let pre = cnclip_model::preprocess::Preprocessor::new(32).unwrap();
    let items: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.to_string(), split.images().image_bytes(*id).unwrap()))
        .collect();
    let _g = tch::no_grad_guard();
    let img = model.image_features(&pre.preprocess_batch(&items).unwrap());
    let tok = pipeline
        .encode_batch(&texts.iter().map(|t| t.1.as_str()).collect::<Vec<_>>())
        .unwrap();
    let txt = model.text_features(&tok);
    let top = txt.matmul(&img.tr()).topk(10, -1, true, true).1;
    let rankings: std::collections::HashMap<i64, Vec<i64>> = texts
        .iter()
        .enumerate()
        .map(|(row, (tid, _))| {
            let cols = Vec::<i64>::try_from(top.get(row as i64)).unwrap();
            (*tid, cols.into_iter().map(|c| ids[c as usize]).collect())
        })
        .collect();
    eval::muge_score(&rankings, &eval::GroundTruth::from_pairs(truth))
        .unwrap()
        .mean_recall
}

#[test]
fn soup_end_to_end() {
    let root = temp("e2e");
    let val = valid_lmdb(&root);
    let c1 = checkpoint(&root, "run1/checkpoints/epoch1.safetensors", 1);
    let c2 = checkpoint(&root, "run2/checkpoints/epoch1.safetensors", 2);
    let c3 = checkpoint(&root, "run3/epoch2.safetensors", 3);
    let cache = root.join("cache");
    let base = |strategy: &'static str, out: &Path| -> Vec<String> {
        [
            "--candidates",
            s(&c1),
            s(&c2),
            s(&c3),
            "--val-data",
            s(&val),
            "--text-prompt",
            "--device",
            "cpu",
            "--strategy",
            strategy,
            "--out",
            s(out),
            "--cache-dir",
            s(&cache),
            "--img-batch-size",
            "4",
            "--text-batch-size",
            "3",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let reports = root.join("pairwise");
    let out = reports.join("soup.safetensors");
    let args = base("pairwise", &reports);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = soup(&argv);
    assert!(first.status.success());
    let stdout = String::from_utf8_lossy(&first.stdout);
    let r = report(&reports);
    let rows = r["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .take(3)
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "run1/checkpoints/epoch1",
            "run2/checkpoints/epoch1",
            "epoch2"
        ]
    );
    assert!(rows.len() >= 4, "at least one merge: {r}");
    for row in rows {
        for k in ["r1", "r5", "r10", "mean_recall"] {
            let v = row["score"][k].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{row}");
        }
        let sc = &row["score"];
        let mean =
            (sc["r1"].as_f64().unwrap() + sc["r5"].as_f64().unwrap() + sc["r10"].as_f64().unwrap())
                / 3.0;
        assert!((mean - sc["mean_recall"].as_f64().unwrap()).abs() < 1e-9);
    }
    assert_eq!(rows[3]["kind"], "merge");
    assert_eq!(rows[3]["members"].as_array().unwrap().len(), 2);
    let md = std::fs::read_to_string(reports.join("report.md")).unwrap();
    assert!(
        md.contains("| name | kind | members | R@1 | R@5 | R@10 | MR | kept | note |"),
        "{md}"
    );
    assert!(md.contains("**Result: "), "{md}");
    let computed = rows.len();
    assert!(
        stdout.contains(&format!("soup: {computed} scored, 0 from the cache")),
        "{stdout}"
    );

    // The candidates' scores are what an independent evaluation of each file gives.
    for (i, c) in [&c1, &c2, &c3].iter().enumerate() {
        let want = independent_score(c, &val);
        let got = rows[i]["score"]["mean_recall"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "{}: {got} vs {want}",
            c.display()
        );
    }

    // The soup is the recipe's average of the candidates, as recorded in its metadata.
    let meta = read_safetensors_metadata(&out).unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta["cnclip.soup"]).unwrap();
    assert_eq!(record["strategy"], "pairwise");
    let members: Vec<(StateDict, f64)> = record["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let file = m["file"].as_str().unwrap();
            (load_native(file).unwrap().1, m["weight"].as_f64().unwrap())
        })
        .collect();
    let want =
        average_state_dicts(&members.iter().map(|(s, w)| (s, *w)).collect::<Vec<_>>()).unwrap();
    let (config, got) = load_native(&out).unwrap();
    assert_eq!(config, tiny_config());
    for (k, t) in want.iter() {
        assert!(got.get(k).unwrap().equal(t), "{k}");
    }
    // A soup loads as a model.
    Clip::load(&out, &LoadOptions::default(), Device::Cpu).unwrap();

    // Second run: everything from the cache, same report.
    let second = soup(&argv);
    assert!(second.status.success());
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains(&format!("soup: 0 scored, {computed} from the cache")),
        "{stdout}"
    );
    assert_eq!(report(&reports)["rows"], r["rows"]);

    // Report only: no model, no soup written, the same table.
    let again = root.join("again");
    let mut args = base("pairwise", &again);
    args.push("--report-only".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(soup(&argv).status.success());
    assert!(!again.join("soup.safetensors").exists());
    let regenerated = report(&again);
    assert_eq!(regenerated["rows"], r["rows"]);
    assert_eq!(regenerated["final"]["recipe"], r["final"]["recipe"]);
    assert_eq!(
        regenerated["final"]["mean_recall"],
        r["final"]["mean_recall"]
    );
    assert!(regenerated["final"]["checkpoint"].is_null());
    assert_eq!(r["final"]["checkpoint"].as_str(), Some(s(&out)));

    // Report only for a strategy whose merges were never scored: fails naming what is missing.
    let mut args = base("uniform", &again);
    args.push("--report-only".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let failed = soup(&argv);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("no cached score for 0.3333333333333333·run1/checkpoints/epoch1"),
        "{err}"
    );

    // Greedy reuses the candidates' cached scores.
    let dir = root.join("greedy");
    let args = base("greedy", &dir);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = soup(&argv);
    assert!(run.status.success());
    assert_eq!(report(&dir)["strategy"], "greedy");
    assert!(dir.join("soup.safetensors").is_file());
    let stdout = String::from_utf8_lossy(&run.stdout);
    for name in [
        "run1/checkpoints/epoch1",
        "run2/checkpoints/epoch1",
        "epoch2",
    ] {
        assert!(stdout.contains(&format!("soup: 1·{name}: MR ")), "{stdout}");
    }
    assert!(stdout.matches("(cached)").count() >= 3, "{stdout}");

    // Uniform with queries and ground truth from valid_texts.jsonl: the same texts as the pairs,
    // so the same candidate scores (computed afresh: other data, other cache keys).
    let dir = root.join("uniform");
    let mut args = base("uniform", &dir);
    args.extend([
        "--val-texts".into(),
        s(&root.join("raw/valid_texts.jsonl")).to_string(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = soup(&argv);
    assert!(run.status.success());
    let u = report(&dir);
    assert_eq!(u["strategy"], "uniform");
    assert_eq!(u["rows"].as_array().unwrap().len(), 4);
    for i in 0..3 {
        assert_eq!(u["rows"][i]["score"], r["rows"][i]["score"]);
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("soup: 4 scored, 0 from the cache"),
        "{stdout}"
    );
    // SOUP_TEST_KEEP=1 leaves the tiny checkpoints and LMDB for trying `cargo xtask soup` by hand.
    if std::env::var_os("SOUP_TEST_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[test]
fn mismatched_candidates_fail_with_the_key() {
    let root = temp("mismatch");
    let val = valid_lmdb(&root);
    let c1 = checkpoint(&root, "a.safetensors", 1);
    // Same config, one tensor of another shape.
    let model = random_model(2);
    let mut sd = model.state_dict();
    sd.insert(
        "text_projection",
        Tensor::zeros([8, 5], (Kind::Float, Device::Cpu)),
    );
    let bad = root.join("b.safetensors");
    cnclip_model::weights::save_native(&bad, &tiny_config(), &sd).unwrap();
    let dir = root.join("out");
    let out = dir.join("soup.safetensors");
    let run = soup(&[
        "--candidates",
        s(&c1),
        s(&bad),
        "--val-data",
        s(&val),
        "--device",
        "cpu",
        "--strategy",
        "uniform",
        "--out",
        s(&dir),
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("text_projection"), "{err}");
    assert!(!out.exists());
    // A candidate that is not a checkpoint at all.
    let run = soup(&[
        "--candidates",
        s(&c1),
        s(&root.join("missing.safetensors")),
        "--val-data",
        s(&val),
        "--device",
        "cpu",
        "--out",
        s(&dir),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("missing.safetensors"));
    let _ = std::fs::remove_dir_all(&root);
}
