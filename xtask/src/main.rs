//! `cargo xtask …`: the project's automation. It must never depend on tch, so that it builds (and can
//! provision libtorch) on a machine that has no libtorch yet.

mod demo;
mod examples;
mod iproute;
mod jpeg;
mod libtorch;
mod setup;
mod soup;
mod soup_runs;
mod sweep;
mod system_package;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "cnclip project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Provision libtorch 2.11.0 from PyPI into a shared cache and point this checkout at it.
    Setup(setup::SetupArgs),
    /// setup + cargo fmt --check + cargo clippy -D warnings + cargo test, as CI runs it.
    Test,
    /// The whole MUGE recipe on CPU in minutes: mini-MUGE, LMDB, fine-tunes (one LoRA),
    /// validation recall, pairwise soup, test submission.
    Demo(demo::DemoArgs),
    /// A grid of fine-tuning runs from a TOML file, a table of their validation recall, and the
    /// soup of their checkpoints.
    Sweep(sweep::SweepArgs),
    /// Merge checkpoints into a model soup scored on the validation split (runs the release
    /// `cnclip-soup` binary; `cargo xtask soup --help` lists its options).
    #[command(disable_help_flag = true)]
    Soup {
        /// Everything is passed to cnclip-soup.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Command::Setup(args) => setup::run(&root, &args),
        Command::Test => test::run(&root),
        Command::Demo(args) => demo::run(&root, &args),
        Command::Sweep(args) => sweep::run(&root, &args),
        Command::Soup { args } => soup::run(&root, &args),
    }
}

/// The checkout this xtask binary was built from (xtask/ sits directly under the workspace root).
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}
