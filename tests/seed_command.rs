//! Drop-in acceptance: a MUGE ViT-H `train_clip.sh` command line (cn_clip's `main.py` flags, `=`
//! syntax, the ViT-H recipe's numbers) runs verbatim with `finetune` under our launcher on two
//! Gloo ranks — only paths and model names differ (a tiny model config, a mini-MUGE LMDB large
//! enough for its global batch of 2 × 360) — and writes what cn_clip writes: validation results in
//! the log, `epoch1`/`epoch2`/`epoch_latest` checkpoints, `params_<time>.txt`. Bad settings are
//! refused before any work, naming the flag.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip::data::files::BadRecordPolicy;
use cnclip::data::synth::{MiniMugeConfig, write_mini_muge};
use cnclip::model::weights::PtHeader;
use cnclip::model::{Clip, ClipConfig};
use common::{TINY_TEXT, TINY_VISION, example_bin};
use std::path::PathBuf;
use std::process::{Command, Output};

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// 120 train queries × 6 images = 720 pairs (one global batch of 2 × 360), 4 valid queries.
    fn new(tag: &str, train_queries: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("cnclip-seed-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        write_mini_muge(
            &data,
            &MiniMugeConfig {
                train_queries,
                valid_queries: 4,
                test_queries: 1,
                train_images_per_query: 6,
                eval_images_per_query: 2,
                image_size: 32,
                ..MiniMugeConfig::default()
            },
        )
        .unwrap();
        for split in ["train", "valid"] {
            cnclip::data::build_split(
                &data,
                split,
                &dir.join("lmdb"),
                BadRecordPolicy::Fail,
                &mut |_| {},
            )
            .unwrap();
        }
        // Tiny configs under cn_clip's model names (cn_clip reads `model_configs/{name}.json`),
        // so the ViT-H recipe's optimizer defaults apply as in a ViT-H run.
        let configs = dir.join("model_configs");
        std::fs::create_dir_all(&configs).unwrap();
        std::fs::write(configs.join("ViT-H-14.json"), TINY_VISION).unwrap();
        std::fs::write(
            configs.join("RoBERTa-wwm-ext-large-chinese.json"),
            TINY_TEXT,
        )
        .unwrap();
        std::fs::write(dir.join("vision.json"), TINY_VISION).unwrap();
        std::fs::write(dir.join("text.json"), TINY_TEXT).unwrap();
        // The "official" initial weights: a random tiny model exported as cn_clip's .pt.
        let config =
            ClipConfig::from_json_files(&dir.join("vision.json"), &dir.join("text.json")).unwrap();
        tch::manual_seed(1);
        let header = PtHeader {
            epoch: 30,
            step: 12_345,
            name: "pretrain".into(),
        };
        Clip::new(&config, tch::Device::Cpu)
            .export_pt(dir.join("clip_cn_tiny.pt"), &header)
            .unwrap();
        Self { dir }
    }

    fn p(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().unwrap().to_string()
    }

    /// A MUGE ViT-H `train_clip.sh` command, paths and model names aside.
    fn seed_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            format!("--train-data={}", self.p("lmdb/train")),
            format!("--val-data={}", self.p("lmdb/valid")),
            "--num-workers=4".into(),
            "--valid-num-workers=4".into(),
            format!("--resume={}", self.p("clip_cn_tiny.pt")),
            "--reset-data-offset".into(),
            "--reset-optimizer".into(),
            "--name=muge_finetune_vit-h-14".into(),
            "--save-step-frequency=999999".into(),
            "--save-epoch-frequency=1".into(),
            "--log-interval=20".into(),
            "--report-training-batch-acc".into(),
            "--context-length=52".into(),
            "--warmup=50".into(),
            "--batch-size=360".into(),
            "--valid-batch-size=360".into(),
            "--lr=5e-06".into(),
            "--wd=0.005".into(),
            "--max-epochs=2".into(),
            "--valid-step-interval=1000".into(),
            "--valid-epoch-interval=1".into(),
            format!("--vision-model={}", self.p("model_configs/ViT-H-14.json")),
            format!(
                "--text-model={}",
                self.p("model_configs/RoBERTa-wwm-ext-large-chinese.json")
            ),
            "--use-augment".into(),
            "--grad-checkpointing".into(),
        ]
        .into();
        args.push(format!("--logs={}", self.p("logs")));
        args
    }
}

fn finetune(args: &[String], extra: &[&str]) -> Output {
    Command::new(example_bin("finetune"))
        .args(args)
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_seed_train_command_runs_verbatim_on_two_ranks() {
    let fx = Fixture::new("run", 120);
    let port = cnclip::train::ddp::launch::free_port().unwrap().to_string();
    let out = finetune(
        &fx.seed_args(),
        &[
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--device",
            "cpu",
        ],
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("distributed: 2 ranks over gloo"), "{log}");
    // One global batch of 720 per epoch: 2 steps, each epoch validated with recall.
    assert_eq!(log.matches("Validation Result (epoch").count(), 2, "{log}");
    assert!(log.contains("Mean Recall"), "{log}");
    assert!(log.contains("trained 2 steps (2 epochs)"), "{log}");
    let run = fx.dir.join("logs").join("muge_finetune_vit-h-14");
    for stem in ["epoch1", "epoch2", "epoch_latest"] {
        let file = run.join("checkpoints").join(format!("{stem}.safetensors"));
        assert!(file.is_file(), "{} missing", file.display());
    }
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let params = names
        .iter()
        .find(|n| n.starts_with("params_") && n.ends_with(".txt"))
        .unwrap_or_else(|| panic!("no params_<time>.txt in {names:?}"));
    let params = std::fs::read_to_string(run.join(params)).unwrap();
    assert!(params.contains("batch_size: 360\n") && params.contains("reset_optimizer: True\n"));
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("params_") && n.ends_with(".json"))
    );
    let out_log = names.iter().find(|n| n.starts_with("out_")).unwrap();
    let out_log = std::fs::read_to_string(run.join(out_log)).unwrap();
    assert!(
        out_log.contains("| INFO | Rank 0 | Validation Result"),
        "{out_log}"
    );

    // Restarting the same command continues the finished run: nothing left to train.
    let again = finetune(
        &fx.seed_args(),
        &[
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--device",
            "cpu",
        ],
    );
    let again_log = text(&again);
    assert!(again.status.success(), "{again_log}");
    assert!(again_log.contains("resuming from"), "{again_log}");
    assert!(again_log.contains("nothing to train"), "{again_log}");
    assert!(!again_log.contains("NaN"), "{again_log}");
    let _ = std::fs::remove_dir_all(&fx.dir);
}

/// The same command under PyTorch's own launcher, as a cn_clip user runs it:
/// `torchrun --no-python --nproc_per_node=2 --master_port=P -- finetune ARGS`. Needs a torchrun
/// (e.g. the reference venv's), hence opt-in:
/// `CNCLIP_TORCHRUN=/path/to/torchrun cargo test --test seed_command -- --ignored`.
#[test]
#[ignore = "needs torchrun: set CNCLIP_TORCHRUN and pass --ignored"]
fn the_seed_train_command_runs_verbatim_under_torchrun() {
    let torchrun = std::env::var("CNCLIP_TORCHRUN").expect("CNCLIP_TORCHRUN=/path/to/torchrun");
    let fx = Fixture::new("torchrun", 120);
    let port = cnclip::train::ddp::launch::free_port().unwrap().to_string();
    let out = Command::new(torchrun)
        .args([
            "--no-python",
            "--nproc_per_node=2",
            &format!("--master_port={port}"),
            // As the README says: without it torchrun's argparse takes `--logs=` for its own
            // `--logs-specs` (an ambiguous prefix).
            "--",
        ])
        .arg(example_bin("finetune"))
        .args(fx.seed_args())
        .arg("--device=cpu")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("distributed: 2 ranks over gloo"), "{log}");
    assert_eq!(log.matches("Validation Result (epoch").count(), 2, "{log}");
    assert!(log.contains("trained 2 steps (2 epochs)"), "{log}");
    let checkpoints = fx
        .dir
        .join("logs")
        .join("muge_finetune_vit-h-14")
        .join("checkpoints");
    for stem in ["epoch1", "epoch2", "epoch_latest"] {
        let file = checkpoints.join(format!("{stem}.safetensors"));
        assert!(file.is_file(), "{} missing", file.display());
    }
    let _ = std::fs::remove_dir_all(&fx.dir);
}

/// Each of these ran before (or panicked, or trained 0 steps, or padded to an OOM): now refused
/// up front with the flag named and nothing written.
#[test]
fn bad_settings_are_refused_before_any_work() {
    let fx = Fixture::new("bad", 8);
    // A training split with 0 pairs: the fixture's files with the training texts emptied.
    let empty = fx.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for entry in std::fs::read_dir(fx.dir.join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), empty.join(entry.file_name())).unwrap();
    }
    std::fs::write(empty.join("train_texts.jsonl"), "").unwrap();
    cnclip::data::build_split(
        &empty,
        "train",
        &fx.dir.join("empty-lmdb"),
        BadRecordPolicy::Fail,
        &mut |_| {},
    )
    .unwrap();
    let base = |extra: &[&str]| -> (bool, String) {
        let mut args = vec![
            format!("--train-data={}", fx.p("lmdb/train")),
            format!("--vision-model={}", fx.p("vision.json")),
            format!("--text-model={}", fx.p("text.json")),
            "--lr=1e-3".into(),
            "--beta1=0.9".into(),
            "--beta2=0.98".into(),
            "--eps=1e-6".into(),
            "--batch-size=8".into(),
            "--max-steps=1".into(),
            "--device=cpu".into(),
            format!("--logs={}", fx.p("bad-logs")),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = finetune(&args, &[]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let empty_lmdb = format!("--train-data={}", fx.p("empty-lmdb/train"));
    for (extra, flag) in [
        (vec!["--batch-size=0"], "--batch-size"),
        (vec!["--accum-freq=0"], "--accum-freq"),
        (vec!["--lr=-1e-3"], "--lr"),
        (vec!["--lr=NaN"], "--lr"),
        (vec!["--wd=-0.1"], "--wd"),
        (vec!["--wd=inf"], "--wd"),
        (vec!["--context-length=65"], "--context-length"),
        (vec![empty_lmdb.as_str()], "--train-data"),
        (vec!["--batch-size=100000"], "--batch-size"),
        (vec!["--precision=fp16", "--lora-rank=4"], "--precision"),
        (vec!["--mask-ratio=1"], "--mask-ratio"),
        (vec!["--distillation"], "--teacher-model-name"),
        (
            vec![
                "--distillation",
                "--teacher-model-name=damo/multi-modal_clip-vit-huge-patch14_zh",
            ],
            "--teacher-model-name",
        ),
        (
            vec!["--clip-weight-path=no/such/ViT-B-16.pt"],
            "--clip-weight-path",
        ),
    ] {
        let (ok, err) = base(&extra);
        assert!(!ok, "{extra:?} should be refused");
        assert!(err.contains(&format!("{flag}:")), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    assert!(
        !fx.dir.join("bad-logs").exists(),
        "a refused run wrote files"
    );
    // The flags cn_clip accepts as no-ops here are accepted, `None` included.
    let (ok, err) = base(&[
        "--use-flash-attention",
        "--skip-scheduler",
        "--debug",
        "--use-bn-sync",
        "--val-data=None",
        "--valid-step-interval=None",
        "--logs=None",
        "--kd_loss_weight=0.5",
        "--teacher-model-name=None",
        "--mask-ratio=0",
    ]);
    assert!(ok, "{err}");
    // cn_clip's pure fp16 and FLIP train (one step of each, and both together).
    for extra in [
        &["--precision=fp16", "--logs=None"][..],
        &["--mask-ratio=0.5", "--logs=None"],
        &["--precision=fp16", "--mask-ratio=0.75", "--logs=None"],
    ] {
        let (ok, err) = base(extra);
        assert!(ok, "{extra:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&fx.dir);
}
