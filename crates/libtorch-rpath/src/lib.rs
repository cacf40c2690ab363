//! Build-script helper that makes every binary, test, example and bench of a package find libtorch at
//! run time without `LD_LIBRARY_PATH`.
//!
//! torch-sys adds an rpath only to its own C++ wrapper, never to the final link, so a plain
//! `cargo test` fails with `libtorch_cpu.so: cannot open shared object file`. A package fixes that by
//! depending directly on `torch-sys` (which declares `links = "tch"`, so cargo hands its build
//! script `DEP_TCH_LIBTORCH_LIB`) and calling [`emit`] from its own `build.rs`:
//!
//! ```text
//! // build.rs
//! fn main() {
//!     libtorch_rpath::emit();
//! }
//! ```
//!
//! `cargo:rustc-link-arg` only reaches the emitting package's own targets, which is why each package
//! that links an executable needs the two lines above; this crate keeps the logic in one place.
//!
//! Two rpath entries are written, in order:
//! 1. the libtorch this build linked against (the checkout's `.libtorch`, or the user's `LIBTORCH`);
//! 2. [`GPU_IMAGE_TORCH_LIB`], the torch of the borrowed GPU machines, so that a binary built here and
//!    copied there runs against that torch (same PyTorch 2.11.0 ABI).
//!
//! This crate must stay dependency-free: it is compiled for every build script that uses it.

use std::path::PathBuf;

/// `lib/` of the PyTorch 2.11.0 install on the GPU machines binaries are shipped to.
pub const GPU_IMAGE_TORCH_LIB: &str = "/opt/torch/.venv/lib/python3.12/site-packages/torch/lib";

/// The rpath entries for a build whose libtorch lives in `libtorch_lib`, in search order.
pub fn rpath_entries(libtorch_lib: Option<PathBuf>) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = libtorch_lib.into_iter().collect();
    let gpu = PathBuf::from(GPU_IMAGE_TORCH_LIB);
    if !entries.contains(&gpu) {
        entries.push(gpu);
    }
    entries
}

/// The linker argument that embeds `entries` as the executable's run path.
pub fn link_arg(entries: &[PathBuf]) -> String {
    let joined: Vec<String> = entries.iter().map(|p| p.display().to_string()).collect();
    format!("-Wl,-rpath,{}", joined.join(":"))
}

/// Emits the rpath link argument for the calling package's binaries, tests, examples and benches.
///
/// Call from `build.rs`. Prints a cargo warning, rather than failing, when `DEP_TCH_LIBTORCH_LIB` is
/// missing (the package forgot its direct `torch-sys` dependency): the build still succeeds and only the
/// GPU-image entry is written, so the mistake shows up as a clear loader error naming libtorch.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from);
    if lib.is_none() {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: add `torch-sys` as a direct dependency of \
             this package so its binaries get libtorch's rpath"
        );
    }
    let entries = rpath_entries(lib);
    println!("cargo:rustc-link-arg={}", link_arg(&entries));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_lib_comes_first_then_gpu_image() {
        let entries = rpath_entries(Some(PathBuf::from("/w/.libtorch/lib")));
        assert_eq!(
            entries,
            vec![
                PathBuf::from("/w/.libtorch/lib"),
                PathBuf::from(GPU_IMAGE_TORCH_LIB)
            ]
        );
        assert_eq!(
            link_arg(&entries),
            format!("-Wl,-rpath,/w/.libtorch/lib:{GPU_IMAGE_TORCH_LIB}")
        );
    }

    #[test]
    fn gpu_image_is_not_listed_twice() {
        let entries = rpath_entries(Some(PathBuf::from(GPU_IMAGE_TORCH_LIB)));
        assert_eq!(entries, vec![PathBuf::from(GPU_IMAGE_TORCH_LIB)]);
    }

    #[test]
    fn missing_build_lib_still_gives_gpu_entry() {
        assert_eq!(
            rpath_entries(None),
            vec![PathBuf::from(GPU_IMAGE_TORCH_LIB)]
        );
    }
}
