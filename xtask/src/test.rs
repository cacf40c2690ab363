//! `cargo xtask test`: exactly what CI runs. setup, then format, lints and the whole test suite.

use crate::setup::{self, SetupArgs};
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub fn run(root: &Path) -> Result<()> {
    let started = Instant::now();
    setup::run(root, &SetupArgs::default())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let steps: [(&str, &[&str]); 3] = [
        ("format", &["fmt", "--all", "--check"]),
        (
            "lints",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("tests", &["test", "--workspace", "--locked"]),
    ];
    for (name, args) in steps {
        let step_started = Instant::now();
        println!("xtask test: {name}: cargo {}", args.join(" "));
        let mut cmd = Command::new(&cargo);
        cmd.args(args).current_dir(root);
        // setup made sure the JPEG decoder builds with SIMD; a test checks the linked library
        // really has it, so a silent fallback to the C code paths fails the suite.
        if std::env::var_os(crate::jpeg::ALLOW_SLOW_ENV).is_none() {
            cmd.env("CNCLIP_REQUIRE_JPEG_SIMD", "1");
        }
        let status = cmd.status()?;
        if !status.success() {
            bail!(
                "xtask test: {name} failed (`cargo {}` exited with {status})",
                args.join(" ")
            );
        }
        println!(
            "xtask test: {name} passed in {:.1} s",
            step_started.elapsed().as_secs_f64()
        );
    }
    println!("xtask test: {}", crate::jpeg::decoder_report(root, "debug"));
    println!(
        "xtask test: all passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
