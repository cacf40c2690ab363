//! Shared by the root package's integration tests, which run the example binaries as users do.

use std::path::PathBuf;

pub mod netns;

/// The example `name` as `cargo test` built it (`target/<profile>/examples/`, next to this test's
/// own `deps/` directory).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "{} is missing: run the tests through `cargo test` (it builds the examples)",
        bin.display()
    );
    bin
}
