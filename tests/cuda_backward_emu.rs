//! The CUDA backward (`kernels-cuda/bwd_v1.cu`) on the CPU emulator against the f64 reference
//! backward: the host's launch plan (`headmix::backends::cuda::backward::BwdPlan`, what the CUDA
//! backend launches) is executed by `kernels-cuda/emu/bwd_emu.cpp` over the real kernel sources,
//! gradients and scratch poisoned with NaN, on random problems of every named method (windows,
//! RoPE in both position modes, `M > N`, `Hk < H`, collapse, both head norms) in f32, f16 and bf16.
//! Tolerances: the one rule of every backward suite (`headmix_tests::backward::Expected::check`),
//! with bwd_v2's working precision (bf16 / f16 operands split hi + lo: 2^7 / 2^2 times f32's unit
//! roundoff) scaling the ill-conditioned gradients' bound. Negative controls: copies of bwd_v1 and bwd_v2
//! with `dS = P (dP + D)` fail the same check.
//!
//! Chunks of heads (`Chunk`, the bounded-memory plan): cases run with one chunk and with `G = 1`
//! or `1 < G < H` heads per chunk (both on the cases of the chunk test); every chunked run matches
//! the f64 reference and gives the same bits as the one-chunk run (the same sums in the same
//! order). Negative control: a mix-back that drops the previous chunks' sum passes with one chunk
//! and fails with several.
//!
//! Skips with one line without g++ >= 12, unless `HEADMIX_REQUIRE_EMU=1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use headmix::backends::cuda::Kernel;
use headmix::backends::cuda::backward::{BwdPlan, Chunk};
use headmix::reference::backward::Grads;
use headmix::timing::Owned;
use headmix::{Config, DType, Weights};
use headmix_tests::backward::Inputs;
use headmix_tests::cases::{Limits, specs};
use headmix_tests::{Case, check_property, gxx_or_skip};

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels-cuda")
}

fn work_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("headmix-bwd-emu-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// The emulator binary of a variant (built once per variant and kernel file).
fn emulator(plan: &BwdPlan, kernel_file: Option<&Path>) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let stem = kernel_file.and_then(|f| f.file_stem()).map(|s| format!("_{}", s.to_string_lossy()));
    let key = format!("{}{}", plan.variant.name(), stem.unwrap_or_default());
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let bin = work_dir().join(format!("bwd_emu_{key}"));
    let kernels = kernels_dir();
    let mut cmd = std::process::Command::new("g++");
    cmd.args(["-std=c++20", "-O1"]).args(plan.variant.emu_flags()).arg("-iquote").arg(&kernels);
    if let Some(f) = kernel_file {
        let which = if plan.variant.kernel == Kernel::BwdV2 { "HM_BWD_TC_FILE" } else { "HM_BWD_FILE" };
        cmd.arg(format!("-D{which}={}", f.display()));
    }
    let out = cmd.arg(kernels.join("emu/bwd_emu.cpp")).arg("-o").arg(&bin).output().expect("running g++");
    assert!(out.status.success(), "g++ {key}: {}", String::from_utf8_lossy(&out.stderr));
    built.insert(key, bin.clone());
    bin
}

/// The backward plan run on the emulator of the real sources.
trait Emu {
    fn run_emu(&self, tc: bool, kernel_file: Option<&Path>, tag: &str, heads: usize) -> Grads<f32>;
}

impl Emu for Inputs {
    /// The plan run on the emulator (kernel file: the real one, or a broken copy); the gradients.
    /// `heads`: heads per chunk of the plan (`H`: one chunk).
    fn run_emu(&self, tc: bool, kernel_file: Option<&Path>, tag: &str, heads: usize) -> Grads<f32> {
        let started = std::time::Instant::now();
        let c = &self.case;
        let p = &c.problem;
        let plan = BwdPlan::new(p, &c.weights, tc, Chunk::Heads(heads)).expect("a plan");
        assert_eq!(plan.chunk_heads(), heads.min(p.cfg.heads));
        let bin = emulator(&plan, kernel_file);
        let dir = work_dir().join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = |x: &[f32]| -> Vec<u8> {
            let o = Owned::from_f32(p.dtype, x);
            o.tensor(&[x.len()]).data.bytes().to_vec()
        };
        let (q, k, v, out, dout) = (bytes(&c.q), bytes(&c.k), bytes(&c.v), bytes(&self.out), bytes(&self.dout));
        let lse: Vec<u8> = bytemuck_f32(&self.lse);
        let inputs: [(&str, &[u8]); 6] =
            [("q", &q), ("k", &k), ("v", &v), ("out", &out), ("lse", &lse), ("dout", &dout)];
        let plan_file = plan.write_emu(&dir, &inputs).unwrap();
        let run = std::process::Command::new(&bin).arg(&plan_file).output().unwrap();
        assert!(
            run.status.success(),
            "{tag}: emulator failed: {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let read = |name: &str, dtype: DType| -> Vec<f32> {
            let b = std::fs::read(dir.join(format!("{name}.out"))).unwrap();
            match dtype {
                DType::F32 => b.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect(),
                DType::F16 => b.chunks_exact(2).map(|x| half::f16::from_le_bytes([x[0], x[1]]).to_f32()).collect(),
                DType::BF16 => b.chunks_exact(2).map(|x| half::bf16::from_le_bytes([x[0], x[1]]).to_f32()).collect(),
            }
        };
        let w = &c.weights;
        let g = Grads {
            dq: read("dq", p.dtype),
            dk: read("dk", p.dtype),
            dv: read("dv", p.dtype),
            daq: read("daq", DType::F32),
            dak: read("dak", DType::F32),
            dav: read("dav", DType::F32),
            dr: w.r.as_ref().map(|_| read("dr", DType::F32)),
            dgamma: w.norm.as_ref().map(|_| read("dgamma", DType::F32)),
            dbeta: w.norm.as_ref().and_then(|n| n.beta()).map(|_| read("dbeta", DType::F32)),
        };
        let _ = std::fs::remove_dir_all(&dir);
        EMU_SECS.with(|c| c.set((c.get().0, c.get().1 + started.elapsed().as_secs_f64())));
        g
    }
}

fn bytemuck_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Bitwise equality of two runs' gradients (a chunked and a one-chunk run of the same kernels).
fn same_bits(a: &Grads<f32>, b: &Grads<f32>, label: &str) {
    for ((name, x), (_, y)) in a.named().iter().zip(b.named()) {
        let differ = x.iter().zip(y.iter()).filter(|(u, v)| u.to_bits() != v.to_bits()).count();
        assert_eq!(differ, 0, "{label}: {name} differs from the one-chunk run in {differ} of {} values", x.len());
    }
}

/// Heads per chunk case `i` runs beyond one chunk (none when `H = 1`): `G = 1` in even cases,
/// `G = H - 1` (`1 < G < H` from `H = 3`, an uneven last chunk) in odd ones. One chunked run per
/// case keeps the suite's time (CI): `cuda_backward_in_chunks_of_heads_on_the_emulator` runs both
/// on the same cases.
fn chunking(i: usize, heads: usize) -> Vec<usize> {
    match heads {
        0 | 1 => vec![],
        h if i % 2 == 1 && h > 2 => vec![h - 1],
        _ => vec![1],
    }
}

thread_local! {
    /// Wall time of this thread's emulator runs: (chunked, all), for the random-case report.
    static EMU_SECS: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((0.0, 0.0)) };
}

/// The case through bwd_v1 (FMA), and for f16/bf16 also through bwd_v2 (tensor cores), with one
/// chunk; then the last of them (bwd_v2 where it runs) with every chunking of `chunks`: each
/// matches the reference and has the one-chunk run's bits.
fn check_case_chunked(inputs: &Inputs, label: &str, chunks: &[usize]) -> f64 {
    let expected = inputs.expected();
    let dtype = inputs.case.problem.dtype;
    let heads = inputs.case.problem.cfg.heads;
    let mut last = inputs.run_emu(false, None, label, heads);
    let mut worst = expected.check(&last, 1.0, label);
    let (mut tc, mut precision) = (false, 1.0);
    if dtype != DType::F32 {
        let label = format!("{label}_bwd_v2");
        (tc, precision) = (true, if dtype == DType::BF16 { 128.0 } else { 4.0 });
        last = inputs.run_emu(true, None, &label, heads);
        worst = worst.max(expected.check(&last, precision, &label));
    }
    for &g in chunks {
        let label = format!("{label}_{}_g{g}", if tc { "bwd_v2" } else { "bwd_v1" });
        let t = std::time::Instant::now();
        let got = inputs.run_emu(tc, None, &label, g);
        let s = t.elapsed().as_secs_f64();
        EMU_SECS.with(|c| c.set((c.get().0 + s, c.get().1)));
        worst = worst.max(expected.check(&got, precision, &label));
        same_bits(&got, &last, &label);
    }
    worst
}

/// [`check_case_chunked`] with one chunk only.
fn check_case(inputs: &Inputs, label: &str) -> f64 {
    check_case_chunked(inputs, label, &[])
}

#[test]
fn cuda_backward_matches_the_reference_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_matches_the_reference_on_the_emulator") {
        return;
    }
    let t = std::time::Instant::now();
    // Head dims up to 32 (one head-dim capacity per dtype: three emulator builds).
    let limits = Limits { max_n: 10, max_extra: 5, head_dims: vec![4, 8, 16, 32], ..Limits::default() };
    let count = std::sync::atomic::AtomicUsize::new(0);
    let worst = Mutex::new(0f64);
    check_property("cuda backward (emulator)", 12, specs(limits), |spec| {
        let i = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let inputs = Inputs::new(spec.case(), spec.seed);
        let w = check_case_chunked(&inputs, &format!("case{i}"), &chunking(i, inputs.case.problem.cfg.heads));
        let mut g = worst.lock().unwrap();
        *g = g.max(w);
    });
    eprintln!(
        "bwd emu: {} random cases pass (chunked runs too, same bits), worst error {:.2} of its bound, {:.1} s \
         ({:.1} s of {:.1} s of emulator runs chunked)",
        count.into_inner(),
        worst.into_inner().unwrap(),
        t.elapsed().as_secs_f64(),
        EMU_SECS.with(|c| c.get().0),
        EMU_SECS.with(|c| c.get().1),
    );
}

/// Larger head dims (64 and 128: more capacities, bwd_v2's 16-row streamed tiles at 128; several
/// query and key tiles per head), RoPE both modes, windows, `M > N`, `Hk < H`, GQA.
#[test]
fn cuda_backward_at_head_dims_64_and_128_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_at_head_dims_64_and_128_on_the_emulator") {
        return;
    }
    let rope = |mode| headmix::Rope { base: 10000.0, mode };
    let cases = [
        (Config::iha(2, 2, 64).with_rope(rope(headmix::PosMode::Virtual)), DType::F32),
        (Config::iha_window(2, 2, 64, 5).with_rope(rope(headmix::PosMode::Token)), DType::BF16),
        (Config::mea_compressed(4, 2, 64).unwrap().with_causal(true), DType::F16),
        (Config::gqa(4, 2, 64).unwrap().with_causal(true).with_rope(rope(headmix::PosMode::Token)), DType::F32),
        (Config::iha(2, 2, 128).with_causal(true).with_rope(rope(headmix::PosMode::Virtual)), DType::F16),
    ];
    for (i, (cfg, dtype)) in cases.into_iter().enumerate() {
        let case = Case::random(cfg, Weights::random(&cfg, i as u64), 2, 13, 19, dtype, 70 + i as u64);
        let inputs = Inputs::new(case, i as u64);
        check_case(&inputs, &format!("d64_{i}"));
    }
}

/// Every named method once (its own weights: MHA/GQA selections, MEA's norm, IHA's collapse, IHA
/// local's window), RoPE alternating between the position modes, `M > N`, bf16 (bwd_v1 and bwd_v2),
/// and bwd_v2 in chunks of 1 or 3 of the 4 heads (alternating).
#[test]
fn cuda_backward_of_every_named_method_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_of_every_named_method_on_the_emulator") {
        return;
    }
    for (i, method) in headmix::Method::ALL.into_iter().enumerate() {
        let mode = if i % 2 == 0 { headmix::PosMode::Token } else { headmix::PosMode::Virtual };
        let cfg =
            method.config(4, 2, 2, 16, 12).unwrap().with_causal(true).with_rope(headmix::Rope { base: 500.0, mode });
        let case = Case::random(cfg, Weights::random(&cfg, 20 + i as u64), 1, 7, 11, DType::BF16, 90 + i as u64);
        let inputs = Inputs::new(case, i as u64);
        check_case_chunked(&inputs, &format!("method_{}", method.name()), &chunking(i, cfg.heads));
    }
}

/// Chunks of heads on the paths the random cases may miss: a collapse feeding a head norm (`y`
/// summed over the chunks, then the norm once) in bf16 (bwd_v2) and f32 (the sums in `dq, dk, dv`
/// themselves), a norm without a collapse (MEA, per-chunk `dgamma`), `Hk < H`; `G = 1`, `G = 2`
/// and `G = 3` of `H = 4` (an uneven last chunk), each against the reference and bit for bit
/// against one chunk.
#[test]
fn cuda_backward_in_chunks_of_heads_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_in_chunks_of_heads_on_the_emulator") {
        return;
    }
    let rope = |mode| headmix::Rope { base: 500.0, mode };
    let iha = Config::iha(4, 2, 16).with_causal(true);
    let mea = Config::mea_compressed(4, 2, 16).unwrap().with_rope(rope(headmix::PosMode::Token));
    let cases = [
        (iha.with_rope(rope(headmix::PosMode::Virtual)), Some(headmix::NormKind::Group), DType::BF16, &[1, 2, 3][..]),
        (iha, Some(headmix::NormKind::Rms), DType::F32, &[1, 3][..]),
        (mea, None, DType::F16, &[1, 3][..]),
    ];
    for (i, (cfg, norm, dtype, chunks)) in cases.into_iter().enumerate() {
        let mut w = Weights::random(&cfg, 40 + i as u64);
        if norm.is_some() {
            w = w.with_norm_kind(norm, &cfg);
        }
        let case = Case::random(cfg, w, 2, 7, 10, dtype, 50 + i as u64);
        let inputs = Inputs::new(case, 50 + i as u64);
        check_case_chunked(&inputs, &format!("chunks_{i}"), chunks);
    }
}

/// Negative control of the chunked plan: a mix-back that forgets the previous chunks' sum of
/// `dq, dk, dv` passes with one chunk and fails the check with two.
#[test]
fn negative_control_a_chunked_sum_that_drops_a_chunk_fails_on_the_emulator() {
    if !gxx_or_skip("negative_control_a_chunked_sum_that_drops_a_chunk_fails_on_the_emulator") {
        return;
    }
    let src = std::fs::read_to_string(kernels_dir().join("bwd_v1.cu")).unwrap();
    let right = "float s = first ? 0.f : acc[o];";
    assert_eq!(src.matches(right).count(), 1, "the negative control must find the mix-back's running sum");
    let broken = work_dir().join("bwd_v1_chunk_broken.cu");
    std::fs::write(&broken, src.replacen(right, "float s = 0.f;", 1)).unwrap();
    let cfg = Config::mha(2, 16).with_causal(true);
    let case = Case::random(cfg, Weights::random(&cfg, 7), 1, 7, 9, DType::F32, 7);
    let inputs = Inputs::new(case, 7);
    let expected = inputs.expected();
    let whole = inputs.run_emu(false, Some(&broken), "chunk_control_whole", cfg.heads);
    expected.check(&whole, 1.0, "broken mix-back, one chunk"); // passes
    let got = inputs.run_emu(false, Some(&broken), "chunk_control_broken", 1);
    let failed = std::panic::catch_unwind(|| expected.check(&got, 1.0, "broken")).is_err();
    assert!(failed, "a mix-back that drops the first chunk passed the check");
}

/// Negative control: the kernel with one sign flipped in dS (`dP + D`) fails the check.
#[test]
fn negative_control_a_wrong_kernel_fails_on_the_emulator() {
    if !gxx_or_skip("negative_control_a_wrong_kernel_fails_on_the_emulator") {
        return;
    }
    let src = std::fs::read_to_string(kernels_dir().join("bwd_v1.cu")).unwrap();
    let right = "- Dr[r])";
    assert_eq!(src.matches(right).count(), 1, "the negative control must find dS = P (dP - D)");
    let broken = work_dir().join("bwd_v1_broken.cu");
    std::fs::write(&broken, src.replacen(right, "+ Dr[r])", 1)).unwrap();
    let cfg = Config::iha(2, 2, 16).with_causal(true);
    let case = Case::random(cfg, Weights::random(&cfg, 5), 1, 7, 9, DType::F32, 5);
    let inputs = Inputs::new(case, 5);
    check_case(&inputs, "control_right"); // the real kernel passes this case
    let got = inputs.run_emu(false, Some(&broken), "control_broken", cfg.heads);
    let expected = inputs.expected();
    let failed = std::panic::catch_unwind(|| expected.check(&got, 1.0, "broken")).is_err();
    assert!(failed, "the broken kernel passed the check");
}

/// Negative control of the tensor-core passes: bwd_v2 with `dS = P (dP + D)` fails.
#[test]
fn negative_control_a_wrong_tensor_core_kernel_fails_on_the_emulator() {
    if !gxx_or_skip("negative_control_a_wrong_tensor_core_kernel_fails_on_the_emulator") {
        return;
    }
    let src = std::fs::read_to_string(kernels_dir().join("bwd_v2.cu")).unwrap();
    let right = "(dp[n][c] - Dv)";
    assert_eq!(src.matches(right).count(), 1, "the negative control must find dS = P (dP - D)");
    let broken = work_dir().join("bwd_v2_broken.cu");
    std::fs::write(&broken, src.replacen(right, "(dp[n][c] + Dv)", 1)).unwrap();
    let cfg = Config::iha(2, 2, 16).with_causal(true);
    let case = Case::random(cfg, Weights::random(&cfg, 6), 1, 7, 9, DType::BF16, 6);
    let inputs = Inputs::new(case, 6);
    check_case(&inputs, "tc_control_right"); // v1 and v2 pass this case
    let got = inputs.run_emu(true, Some(&broken), "tc_control_broken", cfg.heads);
    let expected = inputs.expected();
    let failed = std::panic::catch_unwind(|| expected.check(&got, 128.0, "broken v2")).is_err();
    assert!(failed, "the broken tensor-core kernel passed the check");
}
