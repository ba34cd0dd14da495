//! Every CUDA kernel variant compiles with NVRTC for sm_80 and sm_90, cleanly (no GPU needed).
//!
//! Skips with one line when NVRTC cannot be loaded, unless `HEADMIX_REQUIRE_NVRTC=1` (CI), which
//! makes a missing NVRTC a failure. The negative controls show the checks can fail: a broken
//! kernel is a typed compile error, a kernel with a warning fails the clean check.
//!
//! Without a GPU the kernels are also *run*: `kernels-cuda/emu/emu.cpp` compiles the real kernel
//! sources with g++ (one fiber per CUDA thread, tensor-core instruction modelled from the PTX ISA
//! layout) and checks them against an f64 implementation of the spec on random problems. Skips
//! with one line without g++ (>= 12), unless `HEADMIX_REQUIRE_EMU=1`.

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
    // Every entry of the kernel table × its dtypes × head dims × mask kinds × options.
    let expected: usize = variants::KERNELS
        .iter()
        .map(|s| s.dtypes.len() * s.head_dims.len().max(1) * s.masks.len() * s.options.len())
        .sum();
    assert_eq!(all.len(), expected);
    for spec in variants::KERNELS {
        assert!(all.iter().any(|v| v.kernel == spec.kernel), "{} is never compiled", spec.name);
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
        Variant::attention(Kernel::AttnV2, headmix::DType::BF16, 128, MaskKind::Causal).unwrap(),
        Variant::epilogue(headmix::DType::F32),
    ] {
        let c = compile::compile_uncached(&v, "sm_80").unwrap();
        let want = format!("{}_param_0[{size}]", v.kernel.entry());
        assert!(c.ptx.contains(&want), "{}: PTX parameter is not `{want}`", v.name());
    }
    // The backward's entries take (HmArgs, HmBwd): the second block too (its chunk fields last).
    let v = Variant::attention(Kernel::BwdV2, headmix::DType::F16, 128, MaskKind::Runtime).unwrap();
    let c = compile::compile_uncached(&v, "sm_80").unwrap();
    let bwd = std::mem::size_of::<cuda::backward::HmBwd>();
    for entry in std::iter::once(v.kernel.entry()).chain(v.kernel.extra_entries().iter().copied()) {
        for want in [format!("{entry}_param_0[{size}]"), format!("{entry}_param_1[{bwd}]")] {
            assert!(c.ptx.contains(&want), "{}: PTX parameter is not `{want}`", v.name());
        }
    }
}

#[test]
fn a_broken_kernel_is_a_typed_compile_error() {
    if !nvrtc_or_skip("a_broken_kernel_is_a_typed_compile_error") {
        return;
    }
    let v = Variant::attention(Kernel::AttnV1, headmix::DType::F16, 64, MaskKind::Window).unwrap();
    assert_eq!(v.mask, MaskKind::Runtime, "v1 reads the mask at run time");
    // The real source with one identifier misspelt in the kernel body.
    let broken = v.source().replacen("hm_key_range(a, i0", "hm_key_rnage(a, i0", 1);
    assert_ne!(broken, v.source(), "the negative control must change the source");
    match compile::compile_source("broken", &broken, "sm_80") {
        Err(e @ Error::Device { backend: "cuda", .. }) => {
            let Error::Device { why, .. } = &e else { unreachable!() };
            assert!(why.contains("hm_key_rnage") && why.contains("error"), "log should name the error: {why}");
            // The cause stays typed: NVRTC's own error behind `source()`.
            let cause = std::error::Error::source(&e).expect("the NVRTC error is the source");
            assert!(cause.is::<cuda::cudarc::nvrtc::result::NvrtcError>(), "source is {cause:?}");
        }
        other => panic!("a broken kernel must be an Error::Device, got {other:?}"),
    }
}

/// The tile sizes and shared memory live only in the kernel table's prelude: each attention kernel
/// `static_assert`s its shared-memory carve-up against `HM_SMEM`, and `traits.cuh` refuses a
/// source without the prelude's tile sizes. Negative controls: a table figure off by 16 bytes,
/// or a missing `HM_BR`, does not compile.
#[test]
fn a_wrong_kernel_table_entry_does_not_compile() {
    if !nvrtc_or_skip("a_wrong_kernel_table_entry_does_not_compile") {
        return;
    }
    for v in [
        Variant::attention(Kernel::AttnV1, headmix::DType::F32, 64, MaskKind::None).unwrap(),
        Variant::attention(Kernel::AttnV2, headmix::DType::BF16, 128, MaskKind::Causal).unwrap(),
    ] {
        let smem = v.tiles().smem;
        compile::check_clean(&v.name(), "sm_80", &compile::compile_uncached(&v, "sm_80").unwrap(), v.kernel.entry())
            .unwrap();
        let (right, wrong) = (format!("#define HM_SMEM {smem}\n"), format!("#define HM_SMEM {}\n", smem - 16));
        let src = compile::source(&v);
        assert_eq!(src.matches(&right).count(), 1, "{}: the prelude defines HM_SMEM once", v.name());
        let err = compile::compile_source("wrong_smem", &src.replacen(&right, &wrong, 1), "sm_80").unwrap_err();
        assert!(err.to_string().contains("HM_SMEM"), "{}: {err}", v.name());
        let br = format!("#define HM_BR {}\n", v.tiles().br);
        let err = compile::compile_source("no_br", &src.replacen(&br, "", 1), "sm_80").unwrap_err();
        assert!(err.to_string().contains("prelude"), "{}: {err}", v.name());
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
        let v = Variant { kernel: Kernel::AttnV2, dtype: dtype.into(), hd, mask: MaskKind::Causal, option: 0 };
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

/// The sm_80 instruction models broken one at a time (`EMU_BREAK`): every v3 case must fail.
const EMU_BREAKS: [&str; 5] = ["ldsm_trans", "ldsm_rows", "cp_nowait", "cp_zfill", "mma_b"];

#[test]
fn kernels_match_the_spec_on_the_cpu_emulator() {
    if !headmix_tests::gxx_or_skip("kernels_match_the_spec_on_the_cpu_emulator") {
        return;
    }
    let kernels = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels-cuda");
    let src = kernels.join("emu/emu.cpp");
    // Every kernel, dtype, head-dim capacity, mask kind and option at least once (from the
    // kernel table); `kernels-cuda/emu/run.sh` runs the whole grid. HEADMIX_EMU_ALL=1: the grid.
    let grid = if std::env::var("HEADMIX_EMU_ALL").is_ok_and(|v| v == "1") {
        variants::emu_grid()
    } else {
        variants::emu_cover()
    };
    let dir = std::env::temp_dir().join(format!("headmix-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads() {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(v) = grid.get(i) else { break };
                    let bin = dir.join(format!("emu_{}", v.name()));
                    // The variant's prelude #defines as g++ flags (`headmix kernels --emu-grid`).
                    let build = std::process::Command::new("g++")
                        .args(["-std=c++20", "-O1"])
                        .args(v.emu_flags())
                        .arg("-iquote")
                        .arg(&kernels)
                        .arg(&src)
                        .arg("-o")
                        .arg(&bin)
                        .output()
                        .expect("running g++");
                    let fail = |why: String| failures.lock().unwrap().push(why);
                    if !build.status.success() {
                        fail(format!("g++ {bin:?}: {}", String::from_utf8_lossy(&build.stderr)));
                        continue;
                    }
                    // 6 random problems per variant, a fixed seed per variant (CI's 15-minute
                    // budget; `kernels-cuda/emu/run.sh` runs more).
                    let run = std::process::Command::new(&bin).args(["6", &(11 + i).to_string()]).output().unwrap();
                    let text = String::from_utf8_lossy(&run.stdout).into_owned();
                    eprint!("{}", text.lines().last().map(|l| format!("{l}\n")).unwrap_or_default());
                    if !run.status.success() {
                        fail(format!("{bin:?}:\n{text}{}", String::from_utf8_lossy(&run.stderr)));
                    }
                    if i == 0 {
                        // Negative control: against a shifted reference every case must fail.
                        let neg = std::process::Command::new(&bin).args(["3", "5"]).env("EMU_NEGATIVE", "1").output();
                        if !neg.unwrap().status.success() {
                            fail(format!("{bin:?}: the shifted-reference negative control passed a case"));
                        }
                    }
                    if i == 0 || v.name().starts_with("v3_bf16") {
                        // Negative control of the lse check (f32 and bf16 tolerances): every lse
                        // moved by 2.5x its tolerance must fail.
                        let neg =
                            std::process::Command::new(&bin).args(["3", "5"]).env("EMU_NEGATIVE_LSE", "1").output();
                        if !neg.unwrap().status.success() {
                            fail(format!("{bin:?}: the shifted-lse negative control passed a case"));
                        }
                    }
                    if v.kernel == Kernel::AttnV3 && v.hd == 128 {
                        // Negative controls of the ldmatrix / cp.async / mma models: a wrong layout, a
                        // missing wait, a missing zero-fill must fail every case.
                        for brk in EMU_BREAKS {
                            let neg = std::process::Command::new(&bin).args(["2", "7"]).env("EMU_BREAK", brk).output();
                            if !neg.unwrap().status.success() {
                                fail(format!("{bin:?}: EMU_BREAK={brk} passed a case"));
                            }
                        }
                    }
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("emu: {} variants in {:.1} s", grid.len(), t.elapsed().as_secs_f64());
}
