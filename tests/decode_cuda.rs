//! The CUDA decode kernels without a GPU: `decode_v1.cu` compiles cleanly for sm_80 and sm_90 in
//! every dtype, runs on the CPU emulator (`kernels-cuda/emu/decode_emu.cpp`) against the f64 spec
//! (linear caches and rings that wrapped many times, ragged lengths, random splits and tiles,
//! unwritten slots poisoned), with a negative control, and repeats bit for bit with its blocks
//! run in another order (no atomics: deterministic); the launch plan of B = 8 sequences of 128k
//! tokens builds without allocating, and its counted cache bytes per call are the stored-head
//! cache size (each cached token read once for all heads).

use headmix::backends::cuda::decode::{
    DecodeKernel, compile_decode, compile_decode_kernel, plan_decode, plan_decode_kernel, smem_v2,
};
use headmix::cache::CacheShape;
use headmix::{Config, DType, DecodeProblem, Weights, cache_bytes};

fn nvrtc_or_skip(test: &str) -> bool {
    match headmix::backends::cuda::nvrtc_available() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("HEADMIX_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("{test}: HEADMIX_REQUIRE_NVRTC=1 but NVRTC is not available: {e}");
            }
            eprintln!("skipping {test}: {e}");
            false
        }
    }
}

#[test]
fn decode_kernel_compiles_cleanly() {
    if !nvrtc_or_skip("decode_kernel_compiles_cleanly") {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bytes = compile_decode(dtype, arch).unwrap_or_else(|e| panic!("{arch} {dtype:?}: {e}"));
            assert!(bytes > 0);
        }
    }
}

#[test]
fn decode_kernel_matches_the_spec_on_the_cpu_emulator() {
    if !headmix_tests::gxx_or_skip("the decode emulator") {
        return;
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels-cuda/emu/decode_emu.cpp");
    let dir = std::env::temp_dir().join(format!("headmix-decode-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (dtype, hd)) in [(0, 64), (1, 128), (2, 32), (2, 128)].into_iter().enumerate() {
        let bin = dir.join(format!("decode_t{dtype}_d{hd}"));
        let build = std::process::Command::new("g++")
            .args(["-std=c++20", "-O1", &format!("-DHM_DTYPE={dtype}"), &format!("-DHM_HD={hd}")])
            .args(["-DHM_MASK=3", "-DHM_NT=128"])
            .arg(format!("-DHM_EPI_ROWS={}", headmix::backends::cuda::variants::EPI_ROWS))
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .output()
            .expect("running g++");
        assert!(build.status.success(), "g++: {}", String::from_utf8_lossy(&build.stderr));
        let run = std::process::Command::new(&bin).args(["24", &(7 + i).to_string()]).output().unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        eprint!("{}", text.lines().last().map(|l| format!("{l}\n")).unwrap_or_default());
        assert!(run.status.success(), "{bin:?}:\n{text}");
        if i == 0 {
            // Negative control: against a shifted reference every case must fail.
            let neg = std::process::Command::new(&bin).args(["4", "3"]).env("EMU_NEGATIVE", "1").output().unwrap();
            assert!(neg.status.success(), "the shifted-reference negative control passed a case");
            // Negative control of the determinism check (each case is run twice, the second time
            // with its blocks shuffled, and must repeat bit for bit): the old collapse by float
            // atomicAdd makes a quarter of the f32 cases or more differ.
            let neg = std::process::Command::new(&bin).args(["12", "3"]).env("EMU_BREAK", "atomic").output().unwrap();
            assert!(neg.status.success(), "the atomic-collapse negative control repeated bit for bit");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A decode problem of `b` sequences each holding `len` tokens (one new token).
fn problem(cfg: &Config, b: usize, len: usize, dtype: DType) -> DecodeProblem {
    DecodeProblem::new(cfg, 1, dtype, cfg.pseudo > 1, false, vec![len; b], vec![0; b]).expect("a valid decode problem")
}

#[test]
fn b8_at_128k_plans_and_reads_the_cache_once() {
    let len = 128 * 1024;
    for cfg in [Config::mha(32, 128), Config::iha(8, 4, 128), Config::mea_compressed(32, 8, 128).unwrap()] {
        let shape = CacheShape { batch: 8, capacity: len, kv_heads: cfg.kv_heads, head_dim: 128, dtype: DType::BF16 };
        shape.check().unwrap();
        let w = Weights::random(&cfg, 1);
        let lens = vec![len; 8];
        let plan = plan_decode(&problem(&cfg, 8, len, DType::BF16), &w, &shape, &lens, 227 * 1024, 132)
            .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        // Each held token's Hk stored heads read once per call, for all H·P pseudo-heads.
        assert_eq!(plan.cache_bytes_read as usize, cache_bytes(&cfg, 8, len, DType::BF16).headmix, "{cfg:?}");
        assert!(plan.args.vec16 == 1 && plan.grid.1 == 8 && plan.grid.0 >= 1, "{plan:?}");
    }
    // MHA at 32 heads: 2^32 elements per tensor, beyond 32-bit indexing of the whole cache.
    let shape = CacheShape { batch: 8, capacity: len, kv_heads: 32, head_dim: 128, dtype: DType::BF16 };
    assert!(shape.elements() > u32::MAX as u128 / 2);
}

#[test]
fn decode_v2_compiles_cleanly() {
    if !nvrtc_or_skip("decode_v2_compiles_cleanly") {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for dtype in [DType::F16, DType::BF16] {
            let bytes = compile_decode_kernel(DecodeKernel::V2, dtype, arch)
                .unwrap_or_else(|e| panic!("decode v2 {arch} {dtype:?}: {e}"));
            assert!(bytes > 0);
        }
    }
}

/// Build `decode_emu.cpp` for decode_v2 (`-DHM_DECODE=2`) of a dtype and head-dim capacity.
fn build_v2(dir: &std::path::Path, dtype: u32, hd: usize) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels-cuda/emu/decode_emu.cpp");
    let bin = dir.join(format!("decode_v2_t{dtype}_d{hd}"));
    let build = std::process::Command::new("g++")
        .args(["-std=c++20", "-O1", "-DHM_DECODE=2", &format!("-DHM_DTYPE={dtype}"), &format!("-DHM_HD={hd}")])
        .args(["-DHM_MASK=3", "-DHM_NT=128"])
        .arg(format!("-DHM_EPI_ROWS={}", headmix::backends::cuda::variants::EPI_ROWS))
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("running g++");
    assert!(build.status.success(), "g++: {}", String::from_utf8_lossy(&build.stderr));
    bin
}

/// decode_v2 (tensor cores, cp.async, absorbed mixing) on the CPU emulator against the f64 spec:
/// random problems cycling through IHA global, IHA local (a ring that wraps), MEA dense, MEA
/// compressed, GQA, MHA and random heads and mixing (dense and selection), rings that
/// wrapped, ragged lengths, random splits and tiles, RoPE in both position modes, collapse and
/// head norms, non-finite values planted in q, k or v; f16 and bf16, the forward's tolerances
/// and the 2x rule; every split call also equals the same call with one split. Negative controls:
/// a shifted reference, the emulator's mma, ldmatrix and cp.async models broken one at a time
/// (every case must then fail: v2 really runs on them), a single split missing a token.
#[test]
fn decode_v2_matches_the_spec_on_the_cpu_emulator() {
    if !headmix_tests::gxx_or_skip("the decode emulator") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("headmix-decode-v2-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (dtype, hd)) in [(1, 128), (2, 64), (2, 128)].into_iter().enumerate() {
        let bin = build_v2(&dir, dtype, hd);
        // 16 problems per build (CI budget; run_decode.sh runs more).
        let run = std::process::Command::new(&bin).args(["16", &(11 + i).to_string()]).output().unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        eprint!("{}", text.lines().last().map(|l| format!("{l}\n")).unwrap_or_default());
        assert!(run.status.success(), "{bin:?}:\n{text}");
        if i == 0 {
            for (var, value) in [
                ("EMU_NEGATIVE", "1"),
                ("EMU_BREAK", "mma_b"),
                ("EMU_BREAK", "ldsm_trans"),
                ("EMU_BREAK", "cp_nowait"),
                ("EMU_BREAK", "split"), // the single-split comparison drops a token
            ] {
                let neg = std::process::Command::new(&bin).args(["4", "3"]).env(var, value).output().unwrap();
                assert!(neg.status.success(), "negative control {var}={value} passed a case");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn decode_v2_plans_within_shared_memory_and_refuses_what_it_cannot_run() {
    let len = 32 * 1024;
    let smem = 227 * 1024;
    for cfg in [Config::mha(32, 128), Config::iha(16, 2, 128), Config::mea_compressed(32, 8, 128).unwrap()] {
        let cfg = cfg.with_rope(headmix::Rope::default());
        let shape = CacheShape { batch: 8, capacity: len, kv_heads: cfg.kv_heads, head_dim: 128, dtype: DType::F16 };
        let w = Weights::random(&cfg, 1);
        let pb = problem(&cfg, 8, len, DType::F16);
        let plan = plan_decode_kernel(DecodeKernel::V2, &pb, &w, &shape, &vec![len; 8], smem, 132)
            .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        let tc = plan.args.tile_tokens as usize;
        assert!(plan.smem <= smem && plan.smem == smem_v2(&pb, tc) && (tc * cfg.kv_heads) % 16 == 0, "{plan:?}");
        // The same bytes as v1: every held token's stored heads once per call.
        assert_eq!(plan.cache_bytes_read as usize, cache_bytes(&cfg, 8, len, DType::F16).headmix, "{cfg:?}");
    }
    // f32 and head dims that are not multiples of 16: v2 refuses (the backend then runs v1).
    let cfg = Config::iha(4, 2, 40);
    let shape = CacheShape { batch: 1, capacity: 64, kv_heads: 4, head_dim: 40, dtype: DType::F16 };
    let w = Weights::random(&cfg, 1);
    for (dtype, d) in [(DType::F32, 64), (DType::F16, 40)] {
        let cfg = Config::iha(4, 2, d);
        let shape = CacheShape { head_dim: d, dtype, ..shape };
        let err = plan_decode_kernel(DecodeKernel::V2, &problem(&cfg, 1, 64, dtype), &w, &shape, &[64], smem, 132);
        assert!(matches!(err, Err(headmix::Error::Unsupported { .. })), "{dtype:?} d {d}: {err:?}");
    }
    let _ = cfg;
}

/// The counted cost (cost.rs, a model) of one decode call of dense IHA (H = 16, P = 2, Hk = 16,
/// d = 128, f16, B = 8, 32k tokens): both kernels read the stored-head cache once; v1's FMA
/// mixing makes it FMA-bound on an H200, v2 (tensor cores) stays under the ridge: HBM-bound.
#[test]
fn decode_v2_is_counted_memory_bound_where_v1_is_fma_bound() {
    use headmix::backends::cuda::cost::{H200, decode_cost};
    let len = 32 * 1024;
    for rope in [None, Some(headmix::Rope::default())] {
        let mut cfg = Config::iha(16, 2, 128);
        if let Some(r) = rope {
            cfg = cfg.with_rope(r);
        }
        let shape = CacheShape { batch: 8, capacity: len, kv_heads: 16, head_dim: 128, dtype: DType::F16 };
        let w = Weights::random(&cfg, 1);
        let pb = problem(&cfg, 8, len, DType::F16);
        let bytes = cache_bytes(&cfg, 8, len, DType::F16).headmix as f64;
        let mut bound = Vec::new();
        for kernel in DecodeKernel::ALL {
            let plan = plan_decode_kernel(kernel, &pb, &w, &shape, &vec![len; 8], 227 * 1024, 132).unwrap();
            let cost = decode_cost(&pb, &plan);
            let r = cost.roofline(&H200);
            eprintln!(
                "decode {} rope {}: cache {:.1} MB, tile {} tokens, {} splits; tensor-core {:.1} FLOP/B, FMA {:.1} FLOP/B; \
                 HBM {:.1} us (cache / 4.3 TB/s {:.1} us), tensor cores {:.1} us, FMA {:.1} us: {}-bound",
                kernel.name(),
                rope.is_some(),
                bytes / 1e6,
                plan.args.tile_tokens,
                plan.args.splits,
                cost.tc_flop / bytes,
                cost.fma_flop / bytes,
                r.hbm_s * 1e6,
                bytes / 4.3e12 * 1e6,
                r.tc_s * 1e6,
                r.fma_s * 1e6,
                r.bound
            );
            assert_eq!(plan.cache_bytes_read as f64, bytes);
            bound.push(r.bound);
        }
        assert_eq!(bound, ["FMA", "HBM"], "rope {}", rope.is_some());
    }
    // Negative control: a cost with v1's FMA work but v2's plan would be FMA-bound too.
    let cfg = Config::iha(16, 2, 128);
    let shape = CacheShape { batch: 8, capacity: len, kv_heads: 16, head_dim: 128, dtype: DType::F16 };
    let pb = problem(&cfg, 8, len, DType::F16);
    let w = Weights::random(&cfg, 1);
    let v2 = plan_decode_kernel(DecodeKernel::V2, &pb, &w, &shape, &vec![len; 8], 227 * 1024, 132).unwrap();
    let v1 = plan_decode_kernel(DecodeKernel::V1, &pb, &w, &shape, &vec![len; 8], 227 * 1024, 132).unwrap();
    let mut c = decode_cost(&pb, &v2);
    c.fma_flop = decode_cost(&pb, &v1).fma_flop;
    assert_eq!(c.roofline(&H200).bound, "FMA");
}
