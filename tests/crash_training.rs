//! kill -9 during training: the `finetune` binary is killed at several points of a run (some while
//! it writes a checkpoint), restarted with the same command — which resumes from `epoch_latest`
//! mid-epoch — and must end with exactly the weights of the run that was never interrupted. A torn
//! or partial checkpoint must never be taken for a complete one: the restart either resumes from the
//! last complete checkpoint or starts over, and the result is the same either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cnclip::model::{Clip, LoadOptions};
use common::{example_bin, tiny_training_fixture};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VISION: &str = r#"{"embed_dim":16,"image_resolution":32,"vision_layers":2,"vision_width":32,
    "vision_head_width":16,"vision_patch_size":8}"#;

fn command(dir: &Path, logs: &Path) -> Command {
    command_for_epochs(dir, logs, 4)
}

fn command_for_epochs(dir: &Path, logs: &Path, epochs: u32) -> Command {
    let mut cmd = Command::new(example_bin("finetune"));
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    cmd.args([
        "--train-data",
        &s(dir.join("lmdb").join("train")),
        "--vision-model",
        &s(dir.join("vision.json")),
        "--text-model",
        &s(dir.join("text.json")),
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--warmup",
        "2",
        "--max-epochs",
        &epochs.to_string(),
        "--context-length",
        "24",
        "--precision",
        "fp32",
        "--num-workers",
        "1",
        "--device",
        "cpu",
        "--use-augment",
        "--text-prompt",
        "--save-step-frequency",
        "1",
        "--seed",
        "7",
        "--logs",
        &s(logs.to_path_buf()),
        "--name",
        "run",
    ])
    // One intra-op thread and MKL's reproducible code path: bit-identical arithmetic across processes.
    .env("OMP_NUM_THREADS", "1")
    .env("MKL_NUM_THREADS", "1")
    .env("MKL_CBWR", "COMPATIBLE")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

/// The training data and configs both tests use.
fn prepare(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    tiny_training_fixture(dir, 2, VISION);
}

fn run_to_end(dir: &Path, logs: &Path) {
    let out = command(dir, logs).output().unwrap();
    assert!(
        out.status.success(),
        "finetune failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn final_weights(logs: &Path) -> Clip {
    let path = logs
        .join("run")
        .join("checkpoints")
        .join("epoch_latest.safetensors");
    Clip::load(&path, &LoadOptions::default(), tch::Device::Cpu).unwrap()
}

/// `.NAME.tmp-…` files (the atomic writers' temporaries) in a run directory and its checkpoints.
fn temporaries(run_dir: &Path) -> Vec<String> {
    [run_dir.to_path_buf(), run_dir.join("checkpoints")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".tmp-"))
        .collect()
}

/// Two runs on the same `--logs/--name`: the second is refused, naming the first one's pid, and
/// writes nothing; once the first is killed (the OS releases its lock) the same command runs.
#[test]
fn a_second_run_on_the_same_directory_is_refused() {
    let dir = std::env::temp_dir().join(format!("cnclip-run-lock-{}", std::process::id()));
    prepare(&dir);
    let logs = dir.join("logs");
    // Long enough (400 epochs) that it is still running when the second starts; killed below.
    let mut first = command_for_epochs(&dir, &logs, 400).spawn().unwrap();
    let lock = logs.join("run").join(".lock");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        assert!(
            Instant::now() < deadline,
            "the first run never took its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = command(&dir, &logs).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run must still hold the directory"
    );
    assert!(!second.status.success(), "the second run must be refused");
    assert!(
        stderr.contains(&format!("pid {}", first.id())) && stderr.contains("in use by another run"),
        "the refusal names the holder: {stderr}"
    );
    let _ = first.kill(); // SIGKILL: no chance to unlock; the OS must release it
    let _ = first.wait();
    // The lock died with its holder: the same command now starts (and finishes) normally.
    run_to_end(&dir, &logs);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_killed_anywhere_resumes_to_the_uninterrupted_weights() {
    let dir = std::env::temp_dir().join(format!("cnclip-crash-training-{}", std::process::id()));
    prepare(&dir);

    // The uninterrupted run (16 pairs, batch 8, 4 epochs: 8 steps, a checkpoint after each).
    let reference_logs = dir.join("reference");
    let started = Instant::now();
    run_to_end(&dir, &reference_logs);
    let whole = started.elapsed();
    let reference = final_weights(&reference_logs).named_tensors();

    // Kill points spread over the run (start-up included), deterministic so a failure reproduces:
    // fractions of the uninterrupted run's time, and two measured from the moment the first
    // checkpoint exists (now, and about one step later), so that at least two kills land mid-run
    // after a checkpoint however loaded the machine is (time fractions alone can all miss it when
    // the reference run happened to be fast and these ones slow).
    let mut resumed_mid_run = 0;
    let latest_of = |logs: &std::path::Path| {
        logs.join("run")
            .join("checkpoints")
            .join("epoch_latest.state.safetensors")
    };
    let kill_points = [
        (Some(0.15), None),
        (Some(0.4), None),
        (None, Some(0.0)),
        (Some(0.7), None),
        (None, Some(1.0 / 8.0)),
    ];
    for (i, (fraction, after_checkpoint)) in kill_points.into_iter().enumerate() {
        let logs = dir.join(format!("killed-{i}"));
        let mut child = command(&dir, &logs).spawn().unwrap();
        if let Some(fraction) = fraction {
            std::thread::sleep(whole.mul_f64(fraction));
        }
        if let Some(steps) = after_checkpoint {
            while !latest_of(&logs).is_file() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(whole.mul_f64(steps));
        }
        let fraction = format!("{fraction:?}/{after_checkpoint:?}");
        let finished_first = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if !finished_first && latest_of(&logs).is_file() {
            resumed_mid_run += 1;
        }
        // A dead writer's temporary is planted too, so that removal is checked on every restart
        // and not only when a kill happened to land inside a write.
        let checkpoints = logs.join("run").join("checkpoints");
        std::fs::create_dir_all(&checkpoints).unwrap();
        std::fs::write(
            checkpoints.join(".epoch_latest.safetensors.tmp-999999-0"),
            b"partial",
        )
        .unwrap();
        // Restart with the same command until it completes (it resumes from epoch_latest).
        let deadline = Instant::now() + Duration::from_secs(300);
        run_to_end(&dir, &logs);
        assert!(Instant::now() < deadline);
        let left = temporaries(&logs.join("run"));
        assert!(
            left.is_empty(),
            "kill at {fraction}: temporary files of killed writers remain: {left:?}"
        );
        let resumed = final_weights(&logs).named_tensors();
        for (key, tensor) in &reference {
            assert!(
                tensor.equal(&resumed[key]),
                "kill at {fraction} of the run (finished before the kill: {finished_first}): {key} differs from the uninterrupted run"
            );
        }
    }
    eprintln!("{resumed_mid_run} of 5 kills resumed mid-run; an uninterrupted run took {whole:?}");
    assert!(
        resumed_mid_run >= 2,
        "only {resumed_mid_run} of 5 kills landed mid-run after a checkpoint (run took {whole:?})"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A disk that fills during a checkpoint write (simulated with a file-size limit, `ulimit -f`,
/// SIGXFSZ ignored so the write fails with EFBIG as on a full disk): the run stops with an error
/// naming the file, leaves no temporary file and no `epoch_latest` pair behind, and the same
/// command succeeds once there is room.
#[test]
fn a_full_disk_during_a_checkpoint_write_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("cnclip-disk-full-{}", std::process::id()));
    prepare(&dir);
    // About 1.5 MB per model file and twice that for the optimizer state: 1000 KiB stops the
    // model file, 2000 KiB lets it through and stops the state file.
    for limit_kib in [1000, 2000] {
        let logs = dir.join(format!("limit-{limit_kib}"));
        let cmd = command(&dir, &logs);
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" \"$@\""
            ))
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
        let out = shell.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "limit {limit_kib} KiB: the run must fail"
        );
        assert!(
            !stderr.contains("panicked"),
            "limit {limit_kib} KiB: {stderr}"
        );
        assert!(
            stderr.contains(".safetensors: File too large"),
            "limit {limit_kib} KiB: the error names the file: {stderr}"
        );
        let checkpoints = logs.join("run").join("checkpoints");
        let names: Vec<String> = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            names
                .iter()
                .all(|n| n.ends_with(".safetensors") && !n.starts_with('.')),
            "limit {limit_kib} KiB: temporary files left: {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("epoch_latest")),
            "limit {limit_kib} KiB: no resumable checkpoint may come out of a failed write: {names:?}"
        );
        run_to_end(&dir, &logs);
        final_weights(&logs);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
