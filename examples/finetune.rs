//! Fine-tunes Chinese-CLIP on a cn_clip LMDB: a drop-in for `cn_clip/training/main.py`. Every
//! flag of cn_clip's `params.py` is accepted with its meaning, `=` syntax and `None` included
//! (`--help` lists them with their defaults); the run itself is `cnclip_train::Session`.
//!
//! ```text
//! cargo run --release --example finetune -- --train-data=LMDB/train --val-data=LMDB/valid \
//!     --resume=clip_cn_vit-b-16.pt --reset-data-offset --reset-optimizer --name=muge \
//!     --batch-size=128 --lr=5e-5 --wd=0.001 --warmup=100 --max-epochs=3 --use-augment
//! ```
//! Data-parallel: `--nproc-per-node N` spawns and supervises N local workers (with
//! `--nnodes/--node-rank/--master-addr/--master-port` for several machines), or run under
//! `torchrun --no-python --nproc_per_node=N` or Slurm's `srun`, whose environment is read.
//! `--config FILE` reads the settings from TOML/JSON (what `cargo xtask sweep` writes); flags
//! given on the command line override the file.

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use cnclip::train::config::{
    LaunchArgs, LoraArgs, RunConfig, from_file, normalize_none, override_with_flags,
};
use cnclip::train::observe::{CnClipLog, Observers, ProgressBars, utc_now};
use cnclip::train::{Session, run::file_observers};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    about = "Fine-tune Chinese-CLIP like cn_clip's training/main.py",
    args_override_self = true
)]
struct Args {
    #[command(flatten)]
    run: RunConfig,
    /// Settings from a TOML or JSON file (kebab-case flag names); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    launch: LaunchArgs,
}

fn main() -> Result<()> {
    let matches = Args::command().get_matches_from(normalize_none(std::env::args_os()));
    let args = Args::from_arg_matches(&matches)?;
    let mut config = match &args.config {
        Some(path) => {
            let file = from_file(path).map_err(anyhow::Error::msg)?;
            override_with_flags(&file, &args.run, &matches).map_err(anyhow::Error::msg)?
        }
        None => args.run.clone(),
    };
    if args.lora.lora_rank.is_some() {
        config.lora = args.lora.settings();
    }
    config.check()?;
    // Our `--nproc-per-node` launcher: re-runs this command line as the workers.
    if cnclip::train::ddp::launch::relaunch_self(&args.launch)? {
        return Ok(());
    }
    let session = Session::prepare(config)?;
    let (main, config) = (session.is_main(), session.config().clone());
    let mut observers = Observers::new();
    if main {
        session.notes().iter().for_each(|n| eprintln!("note: {n}"));
        observers = file_observers(&config)?;
        if let Some(dir) = config.run_dir() {
            let log = dir.join(format!("out_{}.log", utc_now("file")));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            observers.push(CnClipLog::new(
                file,
                config.log_interval,
                config.report_training_batch_acc,
            ));
        }
        let (interval, acc) = (config.log_interval, config.report_training_batch_acc);
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            observers.push(ProgressBars::new(interval, acc));
        } else {
            observers.push(CnClipLog::new(std::io::stdout(), interval, acc));
        }
    }
    let summary = session.run(&mut observers)?;
    if !main {
        return Ok(());
    }
    if let Some(v) = summary.last_validation {
        println!(
            "last validation: loss {:.6}, Recall@1/5/10 {:.2}/{:.2}/{:.2}, mean recall {:.2}",
            v.loss, v.score.r1, v.score.r5, v.score.r10, v.score.mean_recall
        );
    }
    match summary.last_loss {
        Some(loss) => println!(
            "trained {} steps ({} epochs), last loss {loss:.6}",
            summary.steps, summary.epochs
        ),
        None => println!(
            "nothing to train: this run's checkpoint is already at the end of its schedule \
             (--max-epochs {}, --max-steps {}); raise it, or choose another --name",
            config.max_epochs,
            config.max_steps.map_or("None".into(), |s| s.to_string())
        ),
    }
    if let Some(dir) = config.run_dir() {
        println!(
            "run directory: {} (checkpoints/, metrics.jsonl, curves.png)",
            dir.display()
        );
    }
    Ok(())
}
