//! Making libtorch's CUDA kernels available to a Rust binary.
//!
//! rustc links with `--as-needed`, and a Rust program references no symbol of `libtorch_cuda.so`, so
//! the linker drops it: CUDA kernels never register and `tch::Cuda::is_available()` is false even on
//! a GPU machine. Loading the library by hand with `RTLD_GLOBAL` registers them. On a CPU-only libtorch
//! (our minimal PyPI wheel set lacks cuBLAS and friends) the load fails and we report CPU-only, so the
//! same binary serves CPU CI and the GPU machines.

use std::sync::OnceLock;

/// Outcome of the one load attempt: the library kept alive for the process, or why it failed.
static CUDA: OnceLock<Result<libloading::os::unix::Library, String>> = OnceLock::new();

const LIBTORCH_CUDA: &str = "libtorch_cuda.so";

fn load() -> &'static Result<libloading::os::unix::Library, String> {
    CUDA.get_or_init(|| {
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: loading libtorch_cuda runs its static initialisers, which only register CUDA
        // kernels and hooks with the already-loaded libtorch_cpu/c10 of the same build (the rpath
        // makes the loader pick the libtorch we linked against). The handle lives in a static for
        // the rest of the process, so the library is never unloaded under live registrations.
        unsafe { libloading::os::unix::Library::open(Some(LIBTORCH_CUDA), flags) }
            .map_err(|e| e.to_string())
    })
}

/// Loads `libtorch_cuda.so` once per process and tells whether libtorch can now use a GPU: true only
/// when the library loaded and the driver reports at least one device.
///
/// Call it (or [`crate::parse_device`], which calls it) before **any** other torch call, not just
/// before the first CUDA use: on an H100, a binary that called `tch::set_num_threads` and
/// `tch::manual_seed` first could no longer use CUDA after this load, while the same binary
/// resolving its device first worked (measured 2026-11-27, docs/BENCHMARKS.md).
pub fn init_cuda() -> bool {
    load().is_ok() && tch::Cuda::is_available()
}

/// Why CUDA is unavailable, in words fit for an error message; `None` when [`init_cuda`] is true.
pub fn cuda_init_error() -> Option<String> {
    match load() {
        Err(e) => Some(format!(
            "{LIBTORCH_CUDA} could not be loaded ({e}); this libtorch is CPU-only or its CUDA \
             libraries are missing (run `cargo xtask setup --cuda`, or point LIBTORCH at a CUDA build)"
        )),
        Ok(_) if !tch::Cuda::is_available() => Some(format!(
            "{LIBTORCH_CUDA} loaded but libtorch sees no CUDA device (no GPU, or no working driver)"
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_consistent_with_the_reported_error() {
        let available = init_cuda();
        assert_eq!(available, cuda_init_error().is_none());
        // A second call answers from the cached load and agrees.
        assert_eq!(init_cuda(), available);
        if available {
            assert!(tch::Cuda::device_count() >= 1);
        }
        eprintln!("CUDA available: {available} ({:?})", cuda_init_error());
    }
}
