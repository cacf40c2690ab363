//! `cargo xtask demo --quick` end to end, on the debug binaries `cargo test` has just built
//! (mini-MUGE → LMDB → base model → three fine-tunes, one LoRA → pairwise soup → test submission).
//! The full-size demo's recall is recorded in docs/BENCHMARKS.md; this checks that every stage runs
//! and writes what it promises.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_demo_runs_the_whole_recipe() -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/demo-… → target/debug
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or("no target directory")?
        .to_path_buf();
    for needed in [
        profile_dir.join("examples").join("finetune"),
        profile_dir.join("cnclip-soup"),
    ] {
        if !needed.exists() {
            return Err(format!(
                "{} is missing: run through `cargo test --workspace` (or `cargo xtask test`), which builds the examples and the soup binary",
                needed.display()
            )
            .into());
        }
    }
    let out = std::env::temp_dir().join(format!("cnclip-demo-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--quick", "--device", "cpu", "--prebuilt"])
        .arg(&profile_dir)
        .arg("--out")
        .arg(&out)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "demo failed:\n{text}");
    for expected in [
        "chance level",
        "lora-r8 (LoRA)",
        "soup (valid)",
        "soup (test)",
    ] {
        assert!(
            text.contains(expected),
            "output lacks {expected:?}:\n{text}"
        );
    }
    let submission = out.join("test").join("test_predictions.jsonl");
    let lines = std::fs::read_to_string(&submission)?;
    assert_eq!(lines.lines().count(), 10, "one line per quick test query");
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(v["image_ids"].as_array().map(Vec::len), Some(10));
    }
    let score: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("test").join("test_score.json"),
    )?)?;
    assert_eq!(score["success"], true);
    let runs: [PathBuf; 4] = ["base", "full-aug-lr2e-4", "full-lr2e-4", "lora-r8"]
        .map(|name| out.join("runs").join(name));
    for run in &runs {
        let png = std::fs::read(run.join("curves.png"))?;
        assert!(png.starts_with(b"\x89PNG"), "{}", run.display());
    }
    assert!(out.join("soup").join("report.md").is_file());
    assert!(out.join("soup").join("soup.safetensors").is_file());
    assert!(out.join("runs").join("sweep-results.md").is_file());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
