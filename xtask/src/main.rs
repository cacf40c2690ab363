//! `cargo xtask …`: the project's automation. It must never depend on tch, so that it builds (and can
//! provision libtorch) on a machine that has no libtorch yet.

mod libtorch;
mod setup;
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Command::Setup(args) => setup::run(&root, &args),
        Command::Test => test::run(&root),
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
