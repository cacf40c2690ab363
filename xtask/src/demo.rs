//! `cargo xtask demo`: the whole MUGE recipe (prompt, augmentation, LoRA, pairwise soup), end to end, on this machine's CPU in minutes.
//!
//! 1. data: mini-MUGE (rendered product photos + Chinese queries, MUGE layout) or `--data`;
//! 2. LMDB: `build_lmdb`, cn_clip's layout;
//! 3. base model: pretrained on mini-MUGE's train split from random weights (the stand-in for
//!    Chinese-CLIP's pretrained weights; with the prompt, since a text tower trained from scratch on
//!    a few hundred queries, unlike RoBERTa, cannot absorb a new 14-character prefix in a short
//!    fine-tune), or `--checkpoint` (real weights);
//! 4. fine-tunes from the base with the product prompt and augmentation, several
//!    hyper-parameters, one of them LoRA (the machinery of `cargo xtask sweep`), each scored on
//!    valid (MUGE Recall@1/5/10 and mean recall);
//! 5. the pairwise soup of the fine-tunes (`cargo xtask soup`);
//! 6. test: features of the soup, top-10 per query into a submission file, validated and scored.
//!
//! Every step prints the command it runs, so the same pipeline can be rerun by hand on real data.

use crate::{examples, sweep};
use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where everything is written.
    #[arg(long, default_value = "target/demo")]
    pub out: PathBuf,
    /// Real MUGE-style data: a directory with {train,valid,test}_imgs.tsv and _texts.jsonl.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Real weights to fine-tune (official .pt, HF directory or native file) instead of
    /// pretraining the small demo model; give --vision-model/--text-model for a .pt.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long = "vision-model", default_value = "ViT-B-16")]
    pub vision_model: String,
    #[arg(long = "text-model", default_value = "RoBERTa-wwm-ext-base-chinese")]
    pub text_model: String,
    /// Device for training and extraction (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A much smaller run (what the integration test uses): fewer images and steps.
    #[arg(long)]
    pub quick: bool,
    /// Epochs of the base model's pretraining on mini-MUGE.
    #[arg(long = "pretrain-epochs")]
    pub pretrain_epochs: Option<u64>,
    /// Epochs of each fine-tune.
    #[arg(long = "finetune-epochs")]
    pub finetune_epochs: Option<u64>,
    /// Use binaries already built into this target profile directory (e.g. target/debug after
    /// `cargo test`) instead of building release ones.
    #[arg(long, hide = true)]
    pub prebuilt: Option<PathBuf>,
}

/// The demo's small model: a ViT on 64 px images and a 2-layer BERT over Chinese-CLIP's vocabulary
/// (the real tokenizer), so it trains from scratch on two CPU cores in a minute or two.
const DEMO_VISION: &str = r#"{
    "embed_dim": 128,
    "image_resolution": 64,
    "vision_layers": 4,
    "vision_width": 192,
    "vision_head_width": 64,
    "vision_patch_size": 16
}
"#;

const DEMO_TEXT: &str = r#"{
    "vocab_size": 21128,
    "text_attention_probs_dropout_prob": 0.1,
    "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1,
    "text_hidden_size": 192,
    "text_initializer_range": 0.02,
    "text_intermediate_size": 768,
    "text_max_position_embeddings": 64,
    "text_num_attention_heads": 3,
    "text_num_hidden_layers": 2,
    "text_type_vocab_size": 2
}
"#;

struct Plan {
    pretrain_epochs: u64,
    finetune_epochs: u64,
    batch_size: u64,
    data_flags: Vec<&'static str>,
}

impl Plan {
    fn new(args: &DemoArgs) -> Self {
        let (pretrain, finetune, data_flags) = if args.quick {
            (
                2,
                1,
                vec![
                    "--train-queries",
                    "40",
                    "--valid-queries",
                    "10",
                    "--test-queries",
                    "10",
                    "--train-images-per-query",
                    "2",
                    "--eval-images-per-query",
                    "2",
                    "--image-size",
                    "32",
                ],
            )
        } else {
            (5, 3, vec![])
        };
        Self {
            pretrain_epochs: args.pretrain_epochs.unwrap_or(pretrain),
            finetune_epochs: args.finetune_epochs.unwrap_or(finetune),
            batch_size: if args.quick { 16 } else { 64 },
            data_flags,
        }
    }
}

pub fn run(root: &Path, args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args);
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::setup::run(root, &crate::setup::SetupArgs::default())?;
    if let Some(dir) = &args.prebuilt {
        examples::use_prebuilt(dir.clone());
    }
    examples::build(
        root,
        &[
            "mini_muge",
            "build_lmdb",
            "finetune",
            "extract_features",
            "predict",
            "evaluate",
        ],
        true,
    )?;
    if args.prebuilt.is_none() {
        println!("{}", crate::jpeg::decoder_report(root, "release"));
    }
    let build_time = started.elapsed().as_secs_f64();

    // 1–2. Data and LMDB.
    let data = match &args.data {
        Some(dir) => {
            for split in ["train", "valid", "test"] {
                for file in [format!("{split}_imgs.tsv"), format!("{split}_texts.jsonl")] {
                    if !dir.join(&file).is_file() {
                        bail!("--data {}: {file} is missing", dir.display());
                    }
                }
            }
            dir.clone()
        }
        None => {
            let dir = out.join("data");
            let mut a: Vec<OsString> = vec!["--out".into(), dir.clone().into()];
            a.extend(plan.data_flags.iter().map(OsString::from));
            examples::run_example(root, "mini_muge", &a)?;
            dir
        }
    };
    let lmdb = out.join("lmdb");
    examples::run_example(
        root,
        "build_lmdb",
        &os(&[
            "--data_dir",
            &path_str(&data)?,
            "--splits",
            "train,valid,test",
            "--lmdb_dir",
            &path_str(&lmdb)?,
        ]),
    )?;
    let (train, valid, test) = (lmdb.join("train"), lmdb.join("valid"), lmdb.join("test"));

    // 3. The base model.
    let runs_dir = out.join("runs");
    let (vision, text, base) = match &args.checkpoint {
        Some(checkpoint) => (
            args.vision_model.clone(),
            args.text_model.clone(),
            checkpoint.clone(),
        ),
        None => {
            let configs = out.join("configs");
            std::fs::create_dir_all(&configs)?;
            let vision = configs.join("demo-vit.json");
            let text = configs.join("demo-bert.json");
            std::fs::write(&vision, DEMO_VISION)?;
            std::fs::write(&text, DEMO_TEXT)?;
            let (vision, text) = (path_str(&vision)?, path_str(&text)?);
            examples::run_example(
                root,
                "finetune",
                &os(&[
                    "--train-data",
                    &path_str(&train)?,
                    "--val-data",
                    &path_str(&valid)?,
                    "--vision-model",
                    &vision,
                    "--text-model",
                    &text,
                    "--batch-size",
                    &plan.batch_size.to_string(),
                    "--lr",
                    "1e-3",
                    "--wd",
                    "0.1",
                    "--warmup",
                    "20",
                    "--beta1",
                    "0.9",
                    "--beta2",
                    "0.98",
                    "--eps",
                    "1e-6",
                    "--context-length",
                    "32",
                    "--text-prompt",
                    "--max-epochs",
                    &plan.pretrain_epochs.to_string(),
                    "--valid-epoch-interval",
                    &plan.pretrain_epochs.to_string(),
                    "--save-epoch-frequency",
                    &plan.pretrain_epochs.to_string(),
                    "--precision",
                    "fp32",
                    "--num-workers",
                    "2",
                    "--device",
                    &args.device,
                    "--logs",
                    &path_str(&runs_dir)?,
                    "--name",
                    "base",
                ]),
            )?;
            let base = runs_dir
                .join("base")
                .join("checkpoints")
                .join("epoch_latest.safetensors");
            (vision, text, base)
        }
    };

    // The demo model reads short queries; real Chinese-CLIP checkpoints use cn_clip's 52.
    let context_length = if args.checkpoint.is_some() { 52 } else { 32 };

    // 4. Fine-tunes from the base, as a sweep.
    let sweep_toml = demo_sweep(
        &train,
        &valid,
        &Base {
            weights: &base,
            vision: &vision,
            text: &text,
            context_length,
        },
        &plan,
        &args.device,
    )?;
    let sweep_path = out.join("demo-sweep.toml");
    std::fs::write(&sweep_path, &sweep_toml)?;
    println!("\nfine-tunes: {}", sweep_path.display());
    let file = sweep::load(&sweep_path)?;
    let runs = sweep::plan(root, &file, &runs_dir)?;
    let scores = sweep::train_all(root, &runs, &[], false)?;
    sweep::write_results(&runs_dir, &scores)?;

    // 5. The pairwise soup.
    let soup_dir = out.join("soup");
    let soup = crate::soup_runs::soup(root, &scores, &valid, "pairwise", &soup_dir, &file.common)?;

    // 6. Test: features of the soup, top-10, submission, score.
    let test_score = crate::soup_runs::predict_and_score(
        root,
        &soup,
        &test,
        &data,
        &out.join("test"),
        &vision,
        &text,
        context_length,
        &args.device,
    )?;

    let chance = chance_line(&data)?;
    println!("\n=== cnclip demo: mini-MUGE text→image retrieval ===");
    println!("chance level (random ranking): {chance}");
    if args.checkpoint.is_none() {
        let base_run = sweep::Run {
            name: "base".into(),
            config: cnclip_train_config::RunConfig::default(),
            run_dir: runs_dir.join("base"),
            lora: false,
            base: None,
        };
        if let Ok(b) = sweep::read_score(&base_run) {
            println!(
                "base model (trained here from random weights): R@1 {:.2}  R@5 {:.2}  R@10 {:.2}  MR {:.2}",
                b.r1, b.r5, b.r10, b.mean_recall
            );
        }
    }
    println!("fine-tunes from it (valid):");
    print!("{}", sweep::table(&scores));
    println!("soup (valid): {}", soup.summary);
    println!("soup (test) : {test_score}");
    println!(
        "\nfiles: submission {}, runs and curves (curves.png) under {}, soup report {}",
        out.join("test").join("test_predictions.jsonl").display(),
        runs_dir.display(),
        soup.report.display()
    );
    println!(
        "time: {:.0} s in all ({:.0} s building)",
        started.elapsed().as_secs_f64(),
        build_time
    );
    Ok(())
}

/// The model the fine-tunes start from.
struct Base<'a> {
    weights: &'a Path,
    vision: &'a str,
    text: &'a str,
    context_length: u32,
}

fn demo_sweep(
    train: &Path,
    valid: &Path,
    base: &Base<'_>,
    plan: &Plan,
    device: &str,
) -> Result<String> {
    let Base {
        weights,
        vision,
        text,
        context_length,
    } = *base;
    let q = |p: &Path| -> Result<String> { Ok(toml::Value::String(path_str(p)?).to_string()) };
    let s = |v: &str| toml::Value::String(v.to_string()).to_string();
    Ok(format!(
        r#"# The demo's fine-tunes from the base: the MUGE recipe (prompt + augmentation), a gentler full
# fine-tune without augmentation (AutoAugment's colour ops fight mini-MUGE's colour words), and LoRA.
[common]
train-data = {train}
val-data = {valid}
resume = {base}
# The base run's checkpoint gives the initial weights; as cn_clip's finetune scripts, start the
# fine-tunes at step 0 with a fresh optimizer.
reset-data-offset = true
reset-optimizer = true
vision-model = {vision}
text-model = {text}
text-prompt = true
batch-size = {batch}
max-epochs = {epochs}
valid-epoch-interval = {epochs}
save-epoch-frequency = {epochs}
warmup = 10
wd = 0.1
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
context-length = {context_length}
precision = "fp32"
num-workers = 2
device = {device}

[[run]]
name = "full-aug-lr2e-4"
lr = 2e-4
use-augment = true

[[run]]
name = "full-lr2e-4"
lr = 2e-4

[[run]]
name = "lora-r8"
lr = 1e-3
lora-rank = 8
lora-alpha = 16
"#,
        train = q(train)?,
        valid = q(valid)?,
        base = q(weights)?,
        vision = s(vision),
        text = s(text),
        batch = plan.batch_size,
        epochs = plan.finetune_epochs,
        device = s(device),
        context_length = context_length,
    ))
}

/// Chance-level recall of the valid split, from its ground truth.
fn chance_line(data: &Path) -> Result<String> {
    let path = data.join("valid_texts.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let images = std::fs::read_to_string(data.join("valid_imgs.tsv"))
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    let mut per_query = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        per_query.push(v["image_ids"].as_array().map_or(0, Vec::len));
    }
    if images == 0 || per_query.is_empty() {
        return Ok("unknown (empty valid split)".into());
    }
    let at = |k: usize| {
        per_query
            .iter()
            .map(|&m| {
                let mut miss = 1.0;
                for i in 0..k.min(images) {
                    miss *= images.saturating_sub(m + i) as f64 / (images - i) as f64;
                }
                100.0 * (1.0 - miss)
            })
            .sum::<f64>()
            / per_query.len() as f64
    };
    let (r1, r5, r10) = (at(1), at(5), at(10));
    Ok(format!(
        "R@1 {r1:.2}  R@5 {r5:.2}  R@10 {r10:.2}  MR {:.2}  ({} queries, {images} images)",
        (r1 + r5 + r10) / 3.0,
        per_query.len()
    ))
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}
