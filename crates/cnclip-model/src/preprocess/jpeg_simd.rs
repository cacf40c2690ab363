//! Whether the linked libjpeg-turbo decodes with its SIMD kernels. The `mozjpeg` crate builds
//! libjpeg-turbo from source and, on x86, falls back to the C code paths when `nasm` was missing
//! at build time: the same pixels, about 1.6× slower decode. Tools print this, and the test suite
//! run by `cargo xtask test` requires it, so a slow build never goes unnoticed.

use std::os::raw::c_int;

unsafe extern "C" {
    // libjpeg-turbo's own probe (jsimd.h): non-zero when a SIMD inverse DCT was compiled in and
    // this CPU supports it. The build without SIMD links `jsimd_none.c`, whose probes return 0.
    fn jsimd_can_idct_islow() -> c_int;
}

/// True when JPEG decoding uses libjpeg-turbo's SIMD kernels on this CPU.
pub fn jpeg_simd_enabled() -> bool {
    // SAFETY: a C function without arguments that only reads CPU feature flags (once, then cached
    // in a static by libjpeg-turbo); it is always linked, by `mozjpeg-sys`.
    unsafe { jsimd_can_idct_islow() != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo xtask test` sets `CNCLIP_REQUIRE_JPEG_SIMD=1` after making sure nasm is installed:
    /// there, a build without SIMD is a failure. Elsewhere this only reports.
    #[test]
    fn the_simd_decoder_is_linked_where_required() {
        let enabled = jpeg_simd_enabled();
        eprintln!("libjpeg-turbo SIMD: {enabled}");
        if std::env::var_os("CNCLIP_REQUIRE_JPEG_SIMD").is_some_and(|v| v == "1") {
            assert!(
                enabled,
                "libjpeg-turbo was built without SIMD (nasm missing when mozjpeg-sys was built?): \
                 run `cargo xtask setup`, which installs nasm and rebuilds it"
            );
        }
    }
}
