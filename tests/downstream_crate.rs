//! The README's "Using cnclip from your crate" works: its `Cargo.toml` lines, `build.rs` and
//! `src/main.rs`, taken from the README itself, become a crate of their own in a temporary
//! directory (git dependencies turned into `path` dependencies on this checkout), which
//! `cargo build --offline` builds and which then encodes a text with a tiny random model saved
//! here; the feature it prints must be the one this process computes.
//!
//! The crate shares this workspace's target directory and lock file, so a warm run compiles only
//! the small crate itself (the first run after a change to cnclip-model recompiles that too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cnclip::model::tokenizer::Tokenizer;
use cnclip::model::{Clip, ClipConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

const SECTION: &str = "## Using cnclip from your crate";
const GIT: &str = r#"{ git = "https://github.com/cnclip/cnclip" }"#;

/// The code blocks of the README's section: (language, body), in order.
fn readme_blocks(root: &Path) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let section = &readme[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let (lang, body) = after.split_once('\n').unwrap();
        let close = body.find("```").unwrap();
        blocks.push((lang.trim().to_string(), body[..close].to_string()));
        rest = &body[close + 3..];
    }
    blocks
}

/// This checkout's directory of a workspace package.
fn package_dir(root: &Path, name: &str) -> PathBuf {
    let dir = match name {
        "cnclip" => return root.to_path_buf(),
        "cnclip-serve" => "serve",
        "cnclip-pickle" => "pickle",
        "cnclip-train-config" => "train-config",
        other => other,
    };
    root.join("crates").join(dir)
}

/// Writes the downstream crate from the README's blocks.
fn write_crate(root: &Path, dir: &Path) {
    let blocks = readme_blocks(root);
    let block = |lang: &str, marker: &str| {
        blocks
            .iter()
            .find(|(l, b)| l == lang && b.contains(marker))
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("README section: no ```{lang} block with {marker:?}"))
    };
    let mut dependencies = String::new();
    for line in block("toml", "[dependencies]").lines() {
        match line.split_once(" = ") {
            Some((name, spec)) if spec.trim() == GIT => {
                let path = package_dir(root, name.trim());
                assert!(path.join("Cargo.toml").is_file(), "{}", path.display());
                dependencies.push_str(&format!("{name} = {{ path = {:?} }}\n", path));
            }
            _ => {
                dependencies.push_str(line);
                dependencies.push('\n');
            }
        }
    }
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"cnclip-downstream-check\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
             publish = false\n\n[workspace]\n\n{dependencies}"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("build.rs"), block("rust", "libtorch_rpath::emit")).unwrap();
    std::fs::write(dir.join("src/main.rs"), block("rust", "Clip::load")).unwrap();
    // The workspace's versions of every dependency, so the shared target directory's builds fit.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
}

fn tiny_model() -> Clip {
    let config = ClipConfig::from_json_str(
        r#"{"embed_dim":16,"image_resolution":32,"vision_layers":1,"vision_width":32,
            "vision_head_width":16,"vision_patch_size":16,"vocab_size":21128,
            "text_attention_probs_dropout_prob":0.0,"text_hidden_act":"gelu",
            "text_hidden_dropout_prob":0.0,"text_hidden_size":24,"text_initializer_range":0.02,
            "text_intermediate_size":48,"text_max_position_embeddings":64,
            "text_num_attention_heads":2,"text_num_hidden_layers":2,"text_type_vocab_size":2}"#,
        "tiny",
    )
    .unwrap();
    // Random weights: the test compares two computations of one model, not a reference.
    Clip::new(&config, tch::Device::Cpu)
}

#[test]
fn the_readme_crate_builds_and_encodes_like_the_library() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // target/<profile>/deps/<this test> → target
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let dir = std::env::temp_dir().join(format!("cnclip-downstream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_crate(&root, &dir);

    let model = tiny_model();
    let weights = dir.join("tiny.safetensors");
    model.save_native(&weights).unwrap();
    let text = "这是一张图片，里面存在商品：红色连衣裙";

    let libtorch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".libtorch"));
    let libtorch = if libtorch.is_relative() {
        root.join(libtorch)
    } else {
        libtorch
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .env("LIBTORCH", &libtorch)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "cargo build of the README crate failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );

    // Run without LD_LIBRARY_PATH: the rpath from build.rs must find libtorch.
    let bin = target.join("debug").join("cnclip-downstream-check");
    let run = Command::new(&bin)
        .arg(&weights)
        .arg(text)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        bin.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let printed: Vec<f32> = String::from_utf8(run.stdout)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();

    let ids = Tokenizer::new().tokenize(&[text], 52).unwrap();
    let expected =
        Vec::<f32>::try_from(tch::no_grad(|| model.text_features(&ids)).flatten(0, -1)).unwrap();
    assert_eq!(printed.len(), expected.len());
    // Same code, weights (saved exactly) and libtorch; `to_string` prints an f32 that parses
    // back to itself. Only the summation order of libtorch's multi-threaded kernels may differ
    // between the two processes: a few fp32 ulps on unit-norm features of width 16.
    for (i, (got, want)) in printed.iter().zip(&expected).enumerate() {
        assert!((got - want).abs() <= 1e-6, "feature {i}: {got} vs {want}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(&bin);
}
