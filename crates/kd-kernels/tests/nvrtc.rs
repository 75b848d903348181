//! With the `cuda` feature: every kernel source compiles with NVRTC (needs the NVRTC library,
//! not a GPU). Without the feature there is nothing to compile and this file is empty.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    let modules = kd_kernels::compile_all_kernels().expect("NVRTC compiles every kernel");
    assert_eq!(modules.len(), 4);
    for (name, ptx_len) in modules {
        assert!(ptx_len > 1000, "{name}: PTX of {ptx_len} bytes");
    }
}
