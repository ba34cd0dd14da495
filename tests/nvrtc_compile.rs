//! Every CUDA kernel variant compiles with NVRTC for sm_80 and sm_90, cleanly (no GPU needed).
//!
//! Skips with one line when NVRTC cannot be loaded, unless `HEADMIX_REQUIRE_NVRTC=1` (CI), which
//! makes a missing NVRTC a failure. The negative controls show the checks can fail: a broken
//! kernel is a typed compile error, a kernel with a warning fails the clean check.

use std::time::Instant;

use headmix::Error;
use headmix::backends::cuda::{self, HmArgs, Kernel, MaskKind, Variant, compile, variants};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// NVRTC present, or a one-line skip (a failure under `HEADMIX_REQUIRE_NVRTC=1`).
fn nvrtc_or_skip(test: &str) -> bool {
    match cuda::nvrtc_available() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("HEADMIX_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("{test}: HEADMIX_REQUIRE_NVRTC=1 but NVRTC is not available: {e}");
            }
            eprintln!("skipping {test}: NVRTC not available ({e})");
            false
        }
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 4)
}

#[test]
fn every_variant_compiles_cleanly_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_variant_compiles_cleanly_for_sm80_and_sm90") {
        return;
    }
    let all = variants::all_variants();
    // v1: 3 dtypes × 5 head-dim capacities × 3 mask kinds; v2: f16/bf16 × 4 capacities × 3 mask
    // kinds; one epilogue per dtype.
    let expected = 3 * variants::HEAD_DIMS.len() * 3 + 2 * variants::V2_HEAD_DIMS.len() * 3 + 3;
    assert_eq!(all.len(), expected, "the variant list changed: update this test");
    for kernel in [Kernel::AttnV1, Kernel::AttnV2, Kernel::CollapseEpilogue] {
        assert!(all.iter().any(|v| v.kernel == kernel), "{kernel:?} is never compiled");
    }
    let t = Instant::now();
    for arch in ARCHS {
        let compiled = cuda::compile_variants(arch, &all, threads()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.len(), all.len());
        for (name, bytes) in &compiled {
            assert!(*bytes > 1000, "{name} ({arch}): only {bytes} bytes of PTX");
        }
    }
    eprintln!(
        "nvrtc: {} variants × {} architectures compiled cleanly in {:.1} s on {} threads",
        all.len(),
        ARCHS.len(),
        t.elapsed().as_secs_f64(),
        threads()
    );
}

#[test]
fn kernel_parameter_block_matches_the_host_struct() {
    if !nvrtc_or_skip("kernel_parameter_block_matches_the_host_struct") {
        return;
    }
    // The kernels take `HmArgs` by value: its size in the PTX must be the Rust struct's.
    let size = std::mem::size_of::<HmArgs>();
    for v in [
        Variant::attention(Kernel::AttnV1, headmix::DType::BF16, 128, MaskKind::Causal).unwrap(),
        Variant::epilogue(headmix::DType::F32),
    ] {
        let c = compile::compile_uncached(&v, "sm_80").unwrap();
        let want = format!("{}_param_0[{size}]", v.kernel.entry());
        assert!(c.ptx.contains(&want), "{}: PTX parameter is not `{want}`", v.name());
    }
}

#[test]
fn a_broken_kernel_is_a_typed_compile_error() {
    if !nvrtc_or_skip("a_broken_kernel_is_a_typed_compile_error") {
        return;
    }
    let v = Variant::attention(Kernel::AttnV1, headmix::DType::F16, 64, MaskKind::Window).unwrap();
    // The real source with one identifier misspelt in the kernel body.
    let broken = v.source().replacen("hm_key_range(a, i0", "hm_key_rnage(a, i0", 1);
    assert_ne!(broken, v.source(), "the negative control must change the source");
    match compile::compile_source("broken", &broken, "sm_80") {
        Err(Error::Device { backend: "cuda", why }) => {
            assert!(why.contains("hm_key_rnage") && why.contains("error"), "log should name the error: {why}");
        }
        other => panic!("a broken kernel must be an Error::Device, got {other:?}"),
    }
}

#[test]
fn v2_refuses_what_it_cannot_run() {
    if !nvrtc_or_skip("v2_refuses_what_it_cannot_run") {
        return;
    }
    // f32 and head dims above 128 are compile-time errors of v2 (the host never asks for them:
    // it falls back to v1), so a wrong variant list cannot silently build a broken kernel.
    for (dtype, hd) in [(headmix::DType::F32, 64), (headmix::DType::BF16, 256)] {
        let v = Variant { kernel: Kernel::AttnV2, dtype: dtype.into(), hd, mask: MaskKind::Causal };
        let err = compile::compile_uncached(&v, "sm_80").unwrap_err();
        assert!(err.to_string().contains("attn_v2"), "{err}");
        assert!(Variant::attention(Kernel::AttnV2, dtype, hd, MaskKind::Causal).is_none());
    }
}

#[test]
fn a_warning_fails_the_clean_check() {
    if !nvrtc_or_skip("a_warning_fails_the_clean_check") {
        return;
    }
    let src = "extern \"C\" __global__ void hm_warn(float* x) { int unused; x[0] = 1.f; }";
    let c = compile::compile_source("warn", src, "sm_90").expect("a warning is not a compile error");
    assert!(c.log.contains("warning"), "NVRTC should warn: {:?}", c.log);
    assert!(compile::check_clean("warn", "sm_90", &c, "hm_warn").is_err(), "a warning must fail the check");
    // And the same kernel without the warning passes it.
    let src = "extern \"C\" __global__ void hm_warn(float* x) { x[0] = 1.f; }";
    let c = compile::compile_source("clean", src, "sm_90").unwrap();
    compile::check_clean("clean", "sm_90", &c, "hm_warn").unwrap();
    assert!(compile::check_clean("clean", "sm_80", &c, "hm_warn").is_err(), "wrong architecture must fail");
}

#[test]
fn ptx_disk_cache_is_keyed_and_read_back() {
    if !nvrtc_or_skip("ptx_disk_cache_is_keyed_and_read_back") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("headmix-nvrtc-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let v = Variant::epilogue(headmix::DType::BF16);
    let first = compile::load_or_compile(&v, "sm_90", Some(&dir)).unwrap();
    let file = compile::cache_file(&dir, &v, "sm_90");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first, "the PTX is written to {}", file.display());
    assert_ne!(file, compile::cache_file(&dir, &v, "sm_80"), "the architecture is part of the key");
    let other = Variant::epilogue(headmix::DType::F16);
    assert_ne!(file, compile::cache_file(&dir, &other, "sm_90"), "the source is part of the key");
    // A second load reads the file (here replaced by a marker) instead of compiling.
    let marker = format!("// marker\n.visible .entry {}(\n", v.kernel.entry());
    std::fs::write(&file, &marker).unwrap();
    assert_eq!(compile::load_or_compile(&v, "sm_90", Some(&dir)).unwrap(), marker);
    // A file without the entry point (truncated, corrupt) is ignored and rewritten.
    std::fs::write(&file, "garbage").unwrap();
    assert_eq!(compile::load_or_compile(&v, "sm_90", Some(&dir)).unwrap(), first);
    let _ = std::fs::remove_dir_all(&dir);
}
