//! `cargo xtask sweep`: a grid of fine-tuning runs from one TOML file, a table of their validation
//! scores, and (optionally) the soup of their checkpoints.
//!
//! ```toml
//! [sweep]
//! logs = "target/sweep"          # runs go to {logs}/{name}
//! devices = ["cuda:0", "cuda:1"] # runs in parallel, one per device (default: one at a time)
//! soup = "pairwise"              # then soup the runs: pairwise | greedy | uniform | none
//!
//! [common]                       # `finetune` flags shared by every run, without the dashes
//! train-data = "datasets/MUGE/lmdb/train"
//! val-data = "datasets/MUGE/lmdb/valid"
//! resume = "pretrained/clip_cn_vit-h-14.pt"
//! vision-model = "ViT-H-14"
//! text-model = "RoBERTa-wwm-ext-large-chinese"
//! text-prompt = true
//! use-augment = true
//!
//! [[run]]
//! name = "full-lr2e-5"
//! lr = 2e-5
//!
//! [[run]]
//! name = "lora-r16"
//! lora-rank = 16
//! lr = 2e-4
//! ```
//!
//! A run's own keys override `[common]`; the merged table is deserialised into `finetune`'s own
//! [`RunConfig`] (the keys are its flags without dashes, so a misspelt key is refused before any
//! run starts; `lora-*` keys form its `lora` settings), written to `{logs}/{name}/run.toml` and run
//! as `finetune --config run.toml`. Each run's score is the last validation record of its
//! `metrics.jsonl` (MUGE mean recall, the number checkpoints are selected by).

use crate::examples;
use crate::soup_runs::{self, RunScore};
use anyhow::{Context, Result, anyhow, bail};
use cnclip_train_config::{LoraSettings, RunConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// The sweep file (TOML).
    pub config: PathBuf,
    /// Print the runs' commands without running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip runs whose `metrics.jsonl` already holds a validation score (resume a sweep).
    #[arg(long)]
    pub skip_finished: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    #[serde(default)]
    pub sweep: SweepSection,
    #[serde(default)]
    pub common: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub run: Vec<BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSection {
    pub logs: Option<PathBuf>,
    #[serde(default)]
    pub devices: Vec<String>,
    pub soup: Option<String>,
}

/// One planned run.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    /// What `finetune --config` is given.
    pub config: RunConfig,
    pub run_dir: PathBuf,
    /// Whether it trains LoRA adapters (its checkpoint holds adapters only).
    pub lora: bool,
    /// The weights it starts from (`resume`), needed to soup a LoRA run.
    pub base: Option<PathBuf>,
}

pub fn load(path: &Path) -> Result<SweepFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the sweep file {}", path.display()))?;
    let file: SweepFile =
        toml::from_str(&text).with_context(|| format!("{}: not a sweep file", path.display()))?;
    if file.run.is_empty() {
        bail!("{}: no [[run]] tables", path.display());
    }
    Ok(file)
}

/// The runs of `file`, with `logs` resolved against `root`.
pub fn plan(root: &Path, file: &SweepFile, default_logs: &Path) -> Result<Vec<Run>> {
    let logs = file
        .sweep
        .logs
        .clone()
        .unwrap_or_else(|| default_logs.to_path_buf());
    let logs = if logs.is_absolute() {
        logs
    } else {
        root.join(logs)
    };
    let mut names = std::collections::HashSet::new();
    let mut runs = Vec::new();
    for (i, own) in file.run.iter().enumerate() {
        let mut merged = file.common.clone();
        merged.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        let name = match merged.remove("name") {
            Some(toml::Value::String(s)) if !s.is_empty() => s,
            Some(other) => bail!(
                "run {}: `name` must be a non-empty string, found {other}",
                i + 1
            ),
            None => bail!("run {}: every [[run]] needs a `name`", i + 1),
        };
        if !names.insert(name.clone()) {
            bail!("run {}: the name {name:?} is used twice", i + 1);
        }
        if merged.contains_key("logs") {
            bail!("run {name}: set `logs` in [sweep], not per run");
        }
        let lora = lora_settings(&mut merged).with_context(|| format!("run {name}"))?;
        merged.insert("logs".into(), toml::Value::String(path_text(&logs)?));
        merged.insert("name".into(), toml::Value::String(name.clone()));
        let table: toml::Table = merged.into_iter().collect();
        let mut config: RunConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| anyhow!("run {name}: not a finetune configuration: {e}"))?;
        config.lora = lora;
        runs.push(Run {
            run_dir: logs.join(&name),
            lora: config.lora.is_some(),
            base: config.resume.clone(),
            name,
            config,
        });
    }
    // Settings that cannot train are refused before any run starts.
    for run in &runs {
        run.config
            .check()
            .map_err(|e| anyhow!("run {}: {e}", run.name))?;
    }
    Ok(runs)
}

fn path_text(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", path.display()))
}

/// The flat `lora-*` keys (`finetune`'s `--lora-*` flags) as the config's `lora` settings.
fn lora_settings(merged: &mut BTreeMap<String, toml::Value>) -> Result<Option<LoraSettings>> {
    let keys: Vec<String> = merged
        .keys()
        .filter(|k| k.starts_with("lora-"))
        .cloned()
        .collect();
    if keys.is_empty() {
        return Ok(None);
    }
    let mut table = toml::Table::new();
    for key in keys {
        let Some(value) = merged.remove(&key) else {
            continue;
        };
        let field = key.trim_start_matches("lora-").to_string();
        let value = match (field.as_str(), value) {
            ("targets", toml::Value::String(s)) => toml::Value::Array(
                s.split(',')
                    .map(|t| toml::Value::String(t.trim().to_string()))
                    .collect(),
            ),
            (_, value) => value,
        };
        table.insert(field, value);
    }
    if !table.contains_key("rank") {
        bail!("`lora-*` keys need `lora-rank`");
    }
    let settings: LoraSettings = toml::Value::Table(table)
        .try_into()
        .map_err(|e| anyhow!("`lora-*` keys: {e}"))?;
    Ok(Some(settings))
}

/// Writes the run's `run.toml` and returns the `finetune` arguments that run it.
fn config_args(run: &Run) -> Result<Vec<OsString>> {
    std::fs::create_dir_all(&run.run_dir)
        .with_context(|| format!("cannot create {}", run.run_dir.display()))?;
    let path = run.run_dir.join("run.toml");
    let text = toml::to_string(&run.config).with_context(|| format!("run {}", run.name))?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(vec!["--config".into(), path.into()])
}

/// Trains every run (in parallel over `devices` when given) and returns their scores.
pub fn train_all(
    root: &Path,
    runs: &[Run],
    devices: &[String],
    skip_finished: bool,
) -> Result<Vec<RunScore>> {
    let todo: Vec<&Run> = runs
        .iter()
        .filter(|run| !(skip_finished && read_score(run).is_ok()))
        .collect();
    if devices.len() <= 1 {
        for run in &todo {
            let mut args = config_args(run)?;
            if let Some(device) = devices.first() {
                args.extend(["--device".into(), device.into()]);
            }
            examples::run_example(root, "finetune", &args)
                .with_context(|| format!("run {}", run.name))?;
        }
    } else {
        // One queue per device: run i goes to device i mod n, each device runs its queue in order.
        let mut queues: Vec<Vec<&Run>> = vec![Vec::new(); devices.len()];
        for (i, run) in todo.iter().enumerate() {
            queues[i % devices.len()].push(run);
        }
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = queues
                .into_iter()
                .zip(devices)
                .map(|(queue, device)| {
                    scope.spawn(move || -> Result<()> {
                        for run in queue {
                            std::fs::create_dir_all(&run.run_dir)?;
                            let log = run.run_dir.join("sweep.log");
                            let out = File::create(&log)
                                .with_context(|| format!("cannot create {}", log.display()))?;
                            let mut cmd = examples::command(root, "finetune");
                            cmd.args(config_args(run)?)
                                .args(["--device", device])
                                .stdout(Stdio::from(out.try_clone()?))
                                .stderr(Stdio::from(out));
                            let shown = examples::shown(root, &cmd);
                            println!("[{device}] {} → {}", shown, log.display());
                            let status = cmd.status()?;
                            if !status.success() {
                                bail!(
                                    "run {} on {device} failed ({status}); see {}",
                                    run.name,
                                    log.display()
                                );
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a device worker panicked")))
                })
                .collect()
        });
        for result in results {
            result?;
        }
    }
    runs.iter().map(read_score).collect()
}

/// The last validation score in the run's `metrics.jsonl`.
pub fn read_score(run: &Run) -> Result<RunScore> {
    let metrics = run.run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("run {}: cannot read {}", run.name, metrics.display()))?;
    let mut last = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", metrics.display(), i + 1))?;
        if value["kind"] == "valid" && value["mean_recall"].is_number() {
            last = Some(value);
        }
    }
    let Some(v) = last else {
        bail!(
            "run {}: {} has no validation score (give the run `val-data`)",
            run.name,
            metrics.display()
        );
    };
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(RunScore {
        name: run.name.clone(),
        r1: num("r1"),
        r5: num("r5"),
        r10: num("r10"),
        mean_recall: num("mean_recall"),
        checkpoint: run
            .run_dir
            .join("checkpoints")
            .join("epoch_latest.safetensors"),
        lora: run.lora,
        base: run.base.clone(),
    })
}

/// The results table as Markdown, best first.
pub fn table(scores: &[RunScore]) -> String {
    let mut sorted: Vec<&RunScore> = scores.iter().collect();
    sorted.sort_by(|a, b| b.mean_recall.total_cmp(&a.mean_recall));
    let mut out = String::from(
        "| run | R@1 | R@5 | R@10 | MR | checkpoint |\n|---|---:|---:|---:|---:|---|\n",
    );
    for s in sorted {
        out.push_str(&format!(
            "| {}{} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            s.name,
            if s.lora { " (LoRA)" } else { "" },
            s.r1,
            s.r5,
            s.r10,
            s.mean_recall,
            s.checkpoint.display()
        ));
    }
    out
}

/// Writes `{logs}/sweep-results.{md,json}`.
pub fn write_results(dir: &Path, scores: &[RunScore]) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let md = dir.join("sweep-results.md");
    let json = dir.join("sweep-results.json");
    std::fs::write(&md, table(scores)).with_context(|| format!("cannot write {}", md.display()))?;
    std::fs::write(&json, serde_json::to_string_pretty(scores)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    Ok((md, json))
}

pub fn run(root: &Path, args: &SweepArgs) -> Result<()> {
    let file = load(&args.config)?;
    let runs = plan(root, &file, &root.join("target").join("sweep"))?;
    if args.dry_run {
        for run in &runs {
            let mut cmd = examples::command(root, "finetune");
            cmd.args(["--config", &format!("{}/run.toml", run.run_dir.display())]);
            println!("{}", examples::shown(root, &cmd));
            let text = toml::to_string(&run.config)?;
            println!("    {}", text.trim_end().replace('\n', "\n    "));
        }
        return Ok(());
    }
    crate::setup::run(root, &crate::setup::SetupArgs::default())?;
    examples::build(
        root,
        &["finetune"],
        file.sweep.soup.as_deref().is_some_and(|s| s != "none"),
    )?;
    let scores = train_all(root, &runs, &file.sweep.devices, args.skip_finished)?;
    let logs = runs
        .first()
        .and_then(|r| r.run_dir.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target").join("sweep"));
    let (md, json) = write_results(&logs, &scores)?;
    println!("\n{}", table(&scores));
    println!("results: {} and {}", md.display(), json.display());
    match file.sweep.soup.as_deref() {
        None | Some("none") => Ok(()),
        Some(strategy) => {
            let val = file
                .common
                .get("val-data")
                .and_then(|v| v.as_str())
                .context("[sweep] soup needs `val-data` in [common]")?;
            let soup = soup_runs::soup(
                root,
                &scores,
                Path::new(val),
                strategy,
                &logs.join("soup"),
                &file.common,
            )?;
            println!("soup: {}", soup.summary);
            println!("soup checkpoint: {}", soup.checkpoint.display());
            println!("soup report: {}", soup.report.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_common_and_run_keys_into_the_config() -> Result<()> {
        let file: SweepFile = toml::from_str(
            r#"
            [sweep]
            logs = "out"
            [common]
            train-data = "t"
            text-prompt = true
            use-augment = false
            lr = 1e-4
            [[run]]
            name = "a"
            [[run]]
            name = "b"
            lr = 5e-5
            lora-rank = 8
            lora-targets = ["attn.in_proj.q", "query"]
            "#,
        )?;
        let runs = plan(Path::new("/r"), &file, Path::new("/unused"))?;
        let a = &runs[0].config;
        assert_eq!(a.train_data, Path::new("t"));
        assert_eq!(
            (a.lr, a.text_prompt, a.use_augment),
            (Some(1e-4), true, false)
        );
        assert_eq!(
            (a.logs.as_path(), a.name.as_str()),
            (Path::new("/r/out"), "a")
        );
        assert_eq!(a.batch_size, RunConfig::default().batch_size);
        let b = &runs[1].config;
        assert_eq!(b.lr, Some(5e-5));
        let lora = b.lora.clone().unwrap_or_default();
        assert_eq!(lora.rank, 8);
        assert_eq!(lora.targets, ["attn.in_proj.q", "query"]);
        assert!(runs[1].lora && !runs[0].lora);
        assert_eq!(runs[1].run_dir, Path::new("/r/out/b"));
        // What finetune --config reads back is the same configuration.
        let text = toml::to_string(b)?;
        assert_eq!(&toml::from_str::<RunConfig>(&text)?, b);
        Ok(())
    }

    #[test]
    fn bad_sweeps_are_refused_with_the_run() {
        let dup: SweepFile = toml::from_str("[[run]]\nname = \"a\"\n[[run]]\nname = \"a\"\n")
            .unwrap_or_else(|_| unreachable!());
        let err = plan(Path::new("/r"), &dup, Path::new("/l"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
        let nameless: SweepFile =
            toml::from_str("[[run]]\nlr = 1.0\n").unwrap_or_else(|_| unreachable!());
        let err = plan(Path::new("/r"), &nameless, Path::new("/l"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a `name`"), "{err}");
        assert!(toml::from_str::<SweepFile>("[sweep]\nbogus = 1\n").is_err());
        // A misspelt finetune key is refused with its run, before anything trains.
        let typo: SweepFile = toml::from_str(
            "[common]\ntrain-data = \"t\"\n[[run]]\nname = \"a\"\nlearning-rate = 1.0\n",
        )
        .unwrap_or_else(|_| unreachable!());
        let err = format!(
            "{:#}",
            plan(Path::new("/r"), &typo, Path::new("/l")).unwrap_err()
        );
        assert!(
            err.contains("run a") && err.contains("learning-rate"),
            "{err}"
        );
    }

    #[test]
    fn score_is_the_last_validation_record() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-sweep-{}", std::process::id()));
        let run_dir = dir.join("a");
        std::fs::create_dir_all(&run_dir)?;
        std::fs::write(
            run_dir.join("metrics.jsonl"),
            concat!(
                "{\"kind\":\"train\",\"step\":1,\"loss\":2.0}\n",
                "{\"kind\":\"valid\",\"step\":1,\"loss\":1.0,\"r1\":10.0,\"r5\":20.0,\"r10\":30.0,\"mean_recall\":20.0}\n",
                "{\"kind\":\"valid\",\"step\":2,\"loss\":0.5,\"r1\":40.0,\"r5\":50.0,\"r10\":60.0,\"mean_recall\":50.0}\n",
            ),
        )?;
        let run = Run {
            name: "a".into(),
            config: RunConfig::default(),
            run_dir,
            lora: false,
            base: None,
        };
        let score = read_score(&run)?;
        assert_eq!((score.r1, score.mean_recall), (40.0, 50.0));
        assert!(table(&[score]).contains("| a | 40.00 | 50.00 | 60.00 | 50.00 |"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
