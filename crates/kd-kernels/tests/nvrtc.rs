//! With the `cuda` feature: every kernel source compiles with NVRTC (needs the NVRTC library,
//! not a GPU). Without the feature there is nothing to compile and this file is empty.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    let modules = kd_kernels::compile_all_kernels().expect("NVRTC compiles every kernel");
    let names: Vec<&str> = modules.iter().map(|m| m.0).collect();
    assert_eq!(
        names,
        [
            "kd_batch_norm",
            "kd_max_pool",
            "kd_augment",
            "kd_sgd",
            "kd_add_relu",
            "kd_softmax_loss"
        ]
    );
    for (name, ptx_len) in modules {
        assert!(ptx_len > 1000, "{name}: PTX of {ptx_len} bytes");
    }
}

/// The PTX of each `.entry` (kernel) of a module, by name; device functions are inlined, so an
/// entry's text is all the code it runs.
fn entries(ptx: &str) -> Vec<(String, &str)> {
    ptx.split(".entry ")
        .skip(1)
        .map(|e| (e[..e.find('(').unwrap()].to_string(), e))
        .collect()
}

const DIVIDES_64: [&str; 4] = ["div.s64", "div.u64", "rem.s64", "rem.u64"];

/// The BatchNorm kernels run over every activation of the network, four times a step; a 64-bit
/// integer division or remainder per element (a long instruction sequence on a GPU, no
/// hardware divide) would cost more than their memory traffic. Their launch geometry
/// (`LaunchGeometry::per_plane`, `per_channel`, the channels-last tiles) exists so that they
/// need none. Nor do the channels-last max-pool kernels, which count pixels in an int.
#[test]
fn batch_norm_and_channels_last_kernels_divide_no_64_bit_integer() {
    let ptx = kd_kernels::kernel_ptx("kd_batch_norm").unwrap();
    for op in DIVIDES_64 {
        assert!(!ptx.contains(op), "batch_norm.cu compiles to {op}");
    }
    let pool = kd_kernels::kernel_ptx("kd_max_pool").unwrap();
    let kernels = entries(pool);
    assert_eq!(
        kernels.len(),
        8,
        "{:?}",
        kernels.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
    for (name, body) in kernels {
        let divides = DIVIDES_64.iter().any(|op| body.contains(op));
        // The check can fail: the channels-first max-pool kernels do divide 64-bit indices.
        assert_eq!(divides, !name.contains("_cl_"), "{name}");
    }
}

/// `sgd_list_f32` takes its parameter list by value: the bytes the host passes (its `#[repr(C)]`
/// mirror of the C struct) must be the size NVRTC gives the parameter, or the kernel would read
/// pointers from the wrong offsets. Also under CUDA's 4 KB limit for kernel parameters.
#[test]
fn the_sgd_list_argument_has_the_kernels_layout() {
    let ptx = kd_kernels::kernel_ptx("kd_sgd").unwrap();
    let bytes = kd_kernels::sgd_list_arg_bytes();
    let param = format!("sgd_list_f32_param_0[{bytes}]");
    assert!(
        ptx.contains(&param),
        "no {param} in the PTX:\n{}",
        ptx.lines()
            .filter(|l| l.contains("sgd_list_f32_param"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(bytes + 16 <= 4096, "{bytes} bytes of kernel parameters");
}
