//! Compiles the C++ glue (autocast state, foreach AdamW) against the libtorch headers torch-sys linked, and gives
//! this package's tests libtorch's rpath.
use std::path::PathBuf;

fn main() {
    libtorch_rpath::emit();
    println!("cargo:rerun-if-changed=src/autocast.cpp");
    println!("cargo:rerun-if-changed=src/adamw.cpp");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: cannot find libtorch's headers");
        std::process::exit(1);
    };
    let include = lib
        .parent()
        .map(|root| root.join("include"))
        .unwrap_or_default();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .flag_if_supported("-Wno-unused-parameter")
        .file("src/autocast.cpp")
        .file("src/adamw.cpp")
        .compile("cnclip_torch_ext");
}
