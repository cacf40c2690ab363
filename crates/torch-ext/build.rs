//! Compiles the C++ glue (autocast state, foreach AdamW, c10d) against the libtorch headers
//! torch-sys linked, and gives this package's tests libtorch's rpath.
//!
//! c10d: libtorch's wheel ships the c10d headers but not gloo's, so `cpp/gloo-stubs` stands in for
//! them (the shim static_asserts the layouts it allocates). With the `nccl` feature the shim also
//! compiles `ProcessGroupNCCL`, which needs the CUDA runtime, CCCL/CRT and NCCL headers of the
//! NVIDIA wheels (`cargo xtask setup --cuda` installs them next to torch; `CNCLIP_CUDA_INCLUDE`, a
//! `:`-separated list, adds directories elsewhere) and links `libtorch_cuda`/`libc10_cuda`.
use std::path::{Path, PathBuf};

fn main() {
    libtorch_rpath::emit();
    for file in [
        "src/autocast.cpp",
        "src/adamw.cpp",
        "src/c10d.cpp",
        "src/reducer.cpp",
        "src/sync_bn.cpp",
        "src/shim_error.hpp",
        "cpp/gloo-stubs",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=CNCLIP_CUDA_INCLUDE");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: cannot find libtorch's headers");
        std::process::exit(1);
    };
    let root = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .flag_if_supported("-Wno-unused-parameter")
        .file("src/autocast.cpp")
        .file("src/adamw.cpp")
        .file("src/sync_bn.cpp")
        .compile("cnclip_torch_ext");

    let mut c10d = cc::Build::new();
    c10d.cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include("cpp/gloo-stubs")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag_if_supported("-Wno-unused-parameter")
        .file("src/c10d.cpp")
        .file("src/reducer.cpp");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // The NVIDIA wheels sit next to torch/ in site-packages (`.libtorch` is a link to torch/).
        let real = root.canonicalize().unwrap_or_else(|_| root.clone());
        let nvidia = real.parent().map(|p| p.join("nvidia")).unwrap_or_default();
        let extra = std::env::var("CNCLIP_CUDA_INCLUDE").unwrap_or_default();
        let dirs: Vec<PathBuf> = extra
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .chain([nvidia.join("cu13/include"), nvidia.join("nccl/include")])
            .collect();
        // A missing header would surface as a compiler error deep in c10's includes; name the
        // wheel instead.
        for (header, wheel) in [
            ("nccl.h", "nvidia-nccl-cu13==2.28.9"),
            ("cuda_runtime_api.h", "nvidia-cuda-runtime==13.0.96"),
            ("crt/host_config.h", "nvidia-cuda-crt==13.0.88"),
            ("cusparse.h", "cuda-toolkit[cusparse]==13.0.2"),
            ("cublas_v2.h", "cuda-toolkit[cublas]==13.0.2"),
            ("cusolverDn.h", "cuda-toolkit[cusolver]==13.0.2"),
        ] {
            if !dirs.iter().any(|d| d.join(header).is_file()) {
                println!(
                    "cargo:warning=the `nccl` feature needs {header} (wheel {wheel}): run \
                     `cargo xtask setup --cuda`, or unpack the header wheels and set \
                     CNCLIP_CUDA_INCLUDE=<site>/nvidia/cu13/include:<site>/nvidia/nccl/include \
                     (searched: {dirs:?})"
                );
                std::process::exit(1);
            }
        }
        for dir in &dirs {
            c10d.include(dir);
        }
        // c10's CUDA headers use std::hardware_destructive_interference_size, which GCC warns about.
        c10d.flag_if_supported("-Wno-interference-size");
        c10d.define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("CNCLIP_NCCL", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    c10d.compile("cnclip_c10d");
}
