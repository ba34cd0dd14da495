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
//! NaN policy (docs/backward.md, "Non-finite inputs"), bwd_v1 and bwd_v2 in bf16: a clean and a
//! poisoned run of one problem (NaN in one head's query under MHA/GQA selections; NaN or infinite
//! key and value rows in the causal future and beyond a window, sharing tiles with keys the rows
//! see; NaN in `dout`; a NaN query under MEA's head norm; IHA's dense mixing and collapse): the
//! rows that read the poison (`reads`, the policy as a model) are non-finite, all others equal the
//! clean run, itself checked against the reference. Negative controls: kernel copies with a dense
//! mix or mix-back, with masked zero weights multiplied, without bwd_v2's sanitizing (K/Q, dO) or
//! marking (faults switched on at run time, `fault_copy`).
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
    let stem = |f: &Path| f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let key = format!("{}{}", plan.variant.name(), kernel_file.map(|f| format!("_{}", stem(f))).unwrap_or_default());
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let bin = work_dir().join(format!("bwd_emu_{key}"));
    let kernels = kernels_dir();
    let mut cmd = std::process::Command::new("g++");
    cmd.args(["-std=c++20", "-O1"]).args(plan.variant.emu_flags()).arg("-iquote").arg(&kernels);
    if let Some(f) = kernel_file {
        // A copy of bwd_v2.cu replaces the tensor-core passes; any other file bwd_v1.cu (whose
        // mix, recompute, mix-back and weight-gradient passes the bwd_v2 module shares).
        let which = if stem(f).starts_with("bwd_v2") { "HM_BWD_TC_FILE" } else { "HM_BWD_FILE" };
        cmd.arg(format!("-D{which}={}", f.display()));
    }
    let out = cmd.arg(kernels.join("emu/bwd_emu.cpp")).arg("-o").arg(&bin).output().expect("running g++");
    assert!(out.status.success(), "g++ {key}: {}", String::from_utf8_lossy(&out.stderr));
    built.insert(key, bin.clone());
    bin
}

/// The backward plan run on the emulator of the real sources.
trait Emu {
    /// The plan run on the emulator (kernel file: the real one, or a broken copy) with `heads`
    /// heads per chunk (`H`: one chunk); the gradients.
    fn run_emu(&self, tc: bool, kernel_file: Option<&Path>, tag: &str, heads: usize) -> Grads<f32> {
        self.run_plan(tc, kernel_file, None, tag, heads)
    }

    /// One chunk, with `EMU_BREAK=fault` (a fault a kernel copy made by [`fault_copy`] switches on).
    fn run_emu_fault(&self, tc: bool, kernel_file: Option<&Path>, fault: Option<&str>, tag: &str) -> Grads<f32>;

    fn run_plan(&self, tc: bool, file: Option<&Path>, fault: Option<&str>, tag: &str, heads: usize) -> Grads<f32>;
}

impl Emu for Inputs {
    fn run_emu_fault(&self, tc: bool, kernel_file: Option<&Path>, fault: Option<&str>, tag: &str) -> Grads<f32> {
        self.run_plan(tc, kernel_file, fault, tag, self.case.problem.cfg.heads)
    }

    fn run_plan(
        &self,
        tc: bool,
        kernel_file: Option<&Path>,
        fault: Option<&str>,
        tag: &str,
        heads: usize,
    ) -> Grads<f32> {
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
        let run =
            std::process::Command::new(&bin).arg(&plan_file).env("EMU_BREAK", fault.unwrap_or("")).output().unwrap();
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

// ---- NaN policy (docs/operator.md "Non-finite inputs", docs/backward.md "Non-finite inputs") ----

/// The stored gradient rows (`dq [B, N, Hq]`, `dk`, `dv [B, M, Hk]`, one flag per row of `d`)
/// that read a non-finite input, by the NaN policy: a selection (MHA, GQA) reads only its head, a
/// dense mixing every head of the token. Per pseudo-row `i` and visible key `j`: `dS_ij` reads
/// `qt_i`, `kt_j`, `vt_j`, the row's saved `lse_i` and its `D_i` and `do_i` (so every key and value
/// the row sees: `o_i`), and `do_i` is non-finite when `o_i` is and a head norm follows (every
/// pseudo-row of the token when the norm follows a collapse); `P_ij` reads `qt_i`, `kt_j` and
/// `lse_i` only. `dqt_i` reads row `i`'s `dS`, `dkt_j` the `dS_ij` of the rows that see `j`,
/// `dvt_j` their `P_ij` and `do_i`. `lse` is the forward's (an absorbed `-inf` score leaves it
/// finite). A non-finite `dout` row reaches `do` of its pseudo-rows (of every pseudo-row of its
/// token through a collapse).
struct Reads {
    dq: Vec<bool>,
    dk: Vec<bool>,
    dv: Vec<bool>,
}

fn reads(case: &Case, lse: &[f32], dout: &[f32]) -> Reads {
    use headmix::backends::cuda::plan::selection;
    let pb = &case.problem;
    let p = pb.params();
    let c = &pb.cfg;
    let (b, n, m, hq, hk, h, pp, d) = (pb.batch, pb.n, pb.m, c.q_heads, c.kv_heads, c.heads, c.pseudo, c.head_dim);
    let (hp, nq, nk) = (h * pp, n * pp, m * pp);
    let w = &case.weights;
    let sel = [selection(&w.aq, hq, hp), selection(&w.ak, hk, hp), selection(&w.av, hk, hp)];
    // Stored head s feeds pseudo-head c (h * P + p) of a mixing: its selection, or any (dense).
    let feeds = |sel: &Option<Vec<i32>>, s: usize, c: usize| sel.as_ref().is_none_or(|x| x[c] as usize == s);
    // Pseudo-head rows [B, H, L*P] that hold a non-finite value after the mixing.
    let mixed = |x: &[f32], sel: &Option<Vec<i32>>, src: usize, len: usize| {
        let mut t = vec![false; b * h * len * pp];
        for (row, xs) in x.chunks(d).enumerate() {
            if xs.iter().all(|v| v.is_finite()) {
                continue;
            }
            let (bl, s) = (row / src, row % src);
            let (bb, l) = (bl / len, bl % len);
            for cc in (0..hp).filter(|&cc| feeds(sel, s, cc)) {
                t[(bb * h + cc / pp) * len * pp + l * pp + cc % pp] = true;
            }
        }
        t
    };
    let (qt, kt, vt) = (mixed(&case.q, &sel[0], hq, n), mixed(&case.k, &sel[1], hk, m), mixed(&case.v, &sel[2], hk, m));
    // Pseudo-rows: o_i (reads the query, lse and every key and value the row sees), do_i (o_i's
    // when a head norm follows: a token's rows together after a collapse), dS (both).
    let lse_bad = |r: usize| !lse[r].is_finite();
    let sees = |bh: usize, i: usize| (0..nk).any(|j| p.visible(i, j) && (kt[bh * nk + j] || vt[bh * nk + j]));
    let o: Vec<bool> = (0..b * h * nq).map(|r| qt[r] || lse_bad(r) || sees(r / nq, r % nq)).collect();
    // do: dout's row (a collapse: any of the token's), o's with a head norm (the token's with both).
    let outs = if pb.collapse { h } else { hp };
    let dout_bad =
        |bb: usize, t: usize, r: usize| dout[((bb * n + t) * outs + r) * d..][..d].iter().any(|v| !v.is_finite());
    let mut dop = vec![false; b * h * nq];
    for bb in 0..b {
        for t in 0..n {
            let at = |hh: usize, q: usize| (bb * h + hh) * nq + t * pp + q;
            let token = pb.collapse
                && ((0..h).any(|r| dout_bad(bb, t, r)) || pb.norm && (0..hp).any(|c| o[at(c / pp, c % pp)]));
            for c in 0..hp {
                let r = at(c / pp, c % pp);
                dop[r] = token || !pb.collapse && (dout_bad(bb, t, c) || pb.norm && o[r]);
            }
        }
    }
    let dout = dop;
    let row: Vec<bool> = o.iter().zip(&dout).map(|(x, y)| *x || *y).collect();
    let (mut key, mut value) = (vec![false; b * h * nk], vec![false; b * h * nk]);
    for bh in 0..b * h {
        for j in 0..nk {
            let r = |i: usize| bh * nq + i;
            let vis = |i: &usize| p.visible(*i, j);
            key[bh * nk + j] = (0..nq).filter(vis).any(|i| row[r(i)]);
            let prob = |i: usize| qt[r(i)] || kt[bh * nk + j] || lse_bad(r(i));
            value[bh * nk + j] = (0..nq).filter(vis).any(|i| prob(i) || dout[r(i)]);
        }
    }
    // Mixed back: a stored row reads the pseudo-rows its head feeds.
    let back = |t: &[bool], sel: &Option<Vec<i32>>, src: usize, len: usize| -> Vec<bool> {
        (0..b * len * src)
            .map(|r| {
                let (bl, s) = (r / src, r % src);
                let (bb, l) = (bl / len, bl % len);
                (0..hp).any(|cc| feeds(sel, s, cc) && t[(bb * h + cc / pp) * len * pp + l * pp + cc % pp])
            })
            .collect()
    };
    Reads { dq: back(&row, &sel[0], hq, n), dk: back(&key, &sel[1], hk, m), dv: back(&value, &sel[2], hk, m) }
}

/// The policy on a clean and a poisoned run of the same kernel: rows that read no non-finite input
/// are finite and equal to the clean run's (which `check` holds to the f64 reference), rows that
/// read one have a non-finite element. Err: the first row that breaks it.
fn policy_holds(clean: &Grads<f32>, dirty: &Grads<f32>, reads: &Reads, d: usize) -> Result<(), String> {
    for (name, x, y, r) in [
        ("dq", &clean.dq, &dirty.dq, &reads.dq),
        ("dk", &clean.dk, &dirty.dk, &reads.dk),
        ("dv", &clean.dv, &dirty.dv, &reads.dv),
    ] {
        for (row, &bad) in r.iter().enumerate() {
            let (a, b) = (&x[row * d..][..d], &y[row * d..][..d]);
            if bad && b.iter().all(|v| v.is_finite()) {
                return Err(format!("{name} row {row} reads a non-finite input but is finite"));
            }
            if !bad && (b.iter().any(|v| !v.is_finite()) || a.iter().zip(b).any(|(u, v)| u != v)) {
                return Err(format!("{name} row {row} reads no non-finite input but is {b:?}, clean {a:?}"));
            }
        }
    }
    Ok(())
}

/// A NaN-policy scenario: the same random problem (bf16 unless said) clean and with `poison`
/// applied.
struct NanCase {
    clean: Inputs,
    dirty: Inputs,
    reads: Reads,
    label: String,
}

impl NanCase {
    fn new(label: &str, cfg: Config, n: usize, m: usize, seed: u64, poison: impl FnOnce(&mut Case)) -> NanCase {
        NanCase::with_dout(label, cfg, (n, m, DType::BF16), seed, poison, None)
    }

    /// In `dtype`, and `dout` made NaN at `dout_nan`.
    fn with_dout(
        label: &str,
        cfg: Config,
        (n, m, dtype): (usize, usize, DType),
        seed: u64,
        poison: impl FnOnce(&mut Case),
        dout_nan: Option<usize>,
    ) -> NanCase {
        let w = Weights::random(&cfg, seed);
        let clean = Case::random(cfg, w.clone(), 1, n, m, dtype, seed);
        let mut dirty = Case::random(cfg, w, 1, n, m, dtype, seed);
        poison(&mut dirty);
        let mut dirty = Inputs::new(dirty, seed);
        if let Some(e) = dout_nan {
            dirty.dout[e] = f32::NAN;
        }
        let reads = reads(&dirty.case, &dirty.lse, &dirty.dout);
        // Rows of both kinds (dv reads only P and do: a value row alone leaves it clean).
        for (name, r) in [("dq", &reads.dq), ("dk", &reads.dk), ("dv", &reads.dv)] {
            let bad = r.iter().filter(|&&x| x).count();
            assert!(bad < r.len(), "{label}: {name} must have rows that do not read the poison");
            assert!(bad > 0 || name == "dv", "{label}: {name} must have rows that read the poison");
        }
        NanCase { clean: Inputs::new(clean, seed), dirty, reads, label: label.into() }
    }

    /// bwd_v1 (`tc` false) or bwd_v2 (true), or a kernel copy with a fault switched on: the
    /// policy, Err naming how it broke. The real kernels' clean run is also checked against the
    /// reference.
    fn check(&self, tc: bool, faulty: Option<(&Path, &str)>) -> Result<(), String> {
        let label = format!(
            "{}_{}{}",
            self.label,
            if tc { "v2" } else { "v1" },
            faulty.map_or(String::new(), |(_, f)| format!("_{f}"))
        );
        let (file, fault) = (faulty.map(|(p, _)| p), faulty.map(|(_, f)| f));
        let clean = self.clean.run_emu_fault(tc, file, fault, &format!("{label}_clean"));
        let dirty = self.dirty.run_emu_fault(tc, file, fault, &format!("{label}_dirty"));
        if faulty.is_none() {
            self.clean.expected().check(&clean, if tc { 128.0 } else { 1.0 }, &label);
        }
        policy_holds(&clean, &dirty, &self.reads, self.clean.case.problem.cfg.head_dim)
            .map_err(|e| format!("{label}: {e}"))
    }
}

/// Element `e` of row (token `t`, head `s`) of a `[1, L, S, d]` tensor.
fn at(t: usize, s: usize, heads: usize, d: usize, e: usize) -> usize {
    (t * heads + s) * d + e
}

/// Selection mixing (policy 1): a NaN in one head's query (MHA; GQA with `M > N`; causal, so the
/// keys after it share its tiles without seeing it) reaches only that head's rows that read it.
fn selection_cases() -> Vec<NanCase> {
    let d = 16;
    let rope = headmix::Rope { base: 500.0, mode: headmix::PosMode::Token };
    vec![
        NanCase::new("mha_nan_q", Config::mha(2, d).with_rope(rope), 20, 20, 31, |c| c.q[at(7, 1, 2, d, 3)] = f32::NAN),
        NanCase::new("gqa_nan_q", Config::gqa(4, 2, d).unwrap(), 18, 21, 32, |c| c.q[at(5, 2, 4, d, 0)] = f32::NAN),
        // f32 (bwd_v1 only: D read from `out`, no recomputed o).
        NanCase::with_dout(
            "mha_nan_q_f32",
            Config::mha(2, d),
            (20, 20, DType::F32),
            39,
            |c| c.q[at(11, 0, 2, d, 2)] = f32::NAN,
            None,
        ),
    ]
}

/// Masks (policies 2 and 3): non-finite key and value rows in the causal future of earlier rows,
/// beyond the window of later ones, sharing tiles with keys those rows see; NaN, and infinities in
/// a value row;
/// a NaN in `dout`, and a NaN query under a head norm (their `do` rows non-finite); IHA's dense
/// mixing and collapse.
fn mask_cases() -> Vec<NanCase> {
    let d = 16;
    let kv = |t: usize, s: usize, hk: usize, x: f32, y: f32| {
        move |c: &mut Case| {
            c.k[at(t, s, hk, d, 1)] = x;
            c.v[at(t, s, hk, d, 2)] = y;
        }
    };
    vec![
        // A NaN in dout: its row's do, so dv of the keys the row sees through P_ij do_i (finite P).
        NanCase::with_dout(
            "mha_nan_dout",
            Config::mha(2, d),
            (20, 20, DType::BF16),
            38,
            |_| (),
            Some(at(8, 0, 2, d, 5)),
        ),
        NanCase::new("gqa_nan_kv", Config::gqa(4, 2, d).unwrap(), 20, 20, 33, kv(9, 0, 2, f32::NAN, f32::NAN)),
        NanCase::new(
            "mha_window_nan_kv",
            Config::mha(2, d).with_window(4, 0),
            20,
            20,
            34,
            kv(5, 0, 2, f32::NAN, f32::NAN),
        ),
        // Infinities in a value row (a key's: its score, +inf or an absorbed -inf by the sign of
        // the query, would move the lse of rows that see it without making them non-finite).
        NanCase::new("gqa_inf_v", Config::gqa(4, 2, d).unwrap(), 20, 20, 35, |c| {
            c.v[at(12, 1, 2, d, 1)] = f32::INFINITY;
            c.v[at(12, 1, 2, d, 2)] = f32::NEG_INFINITY;
        }),
        NanCase::new("mea_nan_q", Config::mea(2, d), 20, 20, 36, |c| c.q[at(6, 0, 2, d, 0)] = f32::NAN),
        NanCase::new("iha_window_nan_kv", Config::iha_window(2, 2, d, 3), 16, 16, 37, kv(4, 0, 2, f32::NAN, f32::NAN)),
    ]
}

fn run_policy(cases: &[NanCase]) {
    for c in cases {
        let tcs: &[bool] = if c.clean.case.problem.dtype == DType::F32 { &[false] } else { &[false, true] };
        for &tc in tcs {
            if let Err(e) = c.check(tc, None) {
                panic!("{e}");
            }
        }
    }
}

/// The copy of a kernel file whose faults (`EMU_BREAK` names, emu.cpp's `broken`) the negative
/// controls switch on one at a time: each `(from, to)` replaces `from` (found `count` times) by
/// code that behaves as the original unless its fault is set. One emulator build per file.
fn fault_copy(file: &str, edits: &[(&str, &str, usize)]) -> PathBuf {
    static WRITTEN: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut written = WRITTEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let stem = file.trim_end_matches(".cu");
    if let Some(p) = written.get(stem) {
        return p.clone();
    }
    let mut src = std::fs::read_to_string(kernels_dir().join(file)).unwrap();
    for (from, to, count) in edits {
        assert_eq!(src.matches(from).count(), *count, "the negative control must find {from:?} in {file}");
        src = src.replace(from, to);
    }
    let path = work_dir().join(format!("{stem}_faults.cu"));
    std::fs::write(&path, src).unwrap();
    written.insert(stem.into(), path.clone());
    path
}

/// bwd_v1 with its NaN-policy mechanisms switchable off: `dense_mix` (the mix reads a selection
/// densely), `dense_mixback` (the mix-back multiplies it densely), `no_skip` (the FMA passes
/// multiply masked pairs' zero weights instead of skipping them).
fn bwd_v1_faults() -> PathBuf {
    fault_copy(
        "bwd_v1.cu",
        &[
            ("if (sel) return", "if (sel && !broken(\"dense_mix\")) return", 1),
            (
                "if (sel[hp] == m) s += gv;",
                "if (broken(\"dense_mixback\")) s = fmaf(w[m * HP + hp], gv, s); else if (sel[hp] == m) s += gv;",
                1,
            ),
            ("continue; // masked", "if (!broken(\"no_skip\")) continue; // masked", 2),
        ],
    )
}

/// bwd_v2 with its sanitizing switchable off: `y1` (K in the dq pass, Q in the dk/dv pass), `do`
/// (dO in the dk/dv pass), `mark` (rows that see a sanitized row keep finite gradients).
fn bwd_v2_faults() -> PathBuf {
    fault_copy(
        "bwd_v2.cu",
        &[
            ("Y1, (int)c0, ny, BW2_BC, d, san)", "Y1, (int)c0, ny, BW2_BC, d, broken(\"y1\") ? nullptr : san)", 1),
            ("KEYS ? san : nullptr", "KEYS && !broken(\"do\") ? san : nullptr", 1),
            (
                "const bool nan = c < 2 ? bad_a : bad_b;",
                "const bool nan = !broken(\"mark\") && (c < 2 ? bad_a : bad_b);",
                1,
            ),
        ],
    )
}

/// Asserts that the kernel copy with `fault` switched on breaks the policy on one of the cases.
fn fails_policy(cases: &[NanCase], tc: bool, copy: &Path, fault: &str, what: &str) {
    let runs = cases.iter().filter(|c| !tc || c.clean.case.problem.dtype != DType::F32); // (no f32 bwd_v2)
    let failed = runs.into_iter().find_map(|c| c.check(tc, Some((copy, fault))).err());
    let failed = failed.unwrap_or_else(|| panic!("{what}: the broken kernel passed the NaN policy"));
    eprintln!("{what}: caught ({failed})");
}

#[test]
fn cuda_backward_nan_in_one_head_leaves_other_heads_alone_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_nan_in_one_head_leaves_other_heads_alone_on_the_emulator") {
        return;
    }
    let cases = selection_cases();
    run_policy(&cases);
    // Negative controls: bwd_v1's mix-back (shared by bwd_v2) applying the selection as a dense
    // multiply (0 · NaN), and its mix reading the selection densely.
    let v1 = bwd_v1_faults();
    fails_policy(&cases, false, &v1, "dense_mixback", "dense mix-back");
    fails_policy(&cases, false, &v1, "dense_mix", "dense mix");
}

#[test]
fn cuda_backward_masked_non_finite_keys_never_reach_a_row_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_masked_non_finite_keys_never_reach_a_row_on_the_emulator") {
        return;
    }
    let cases = mask_cases();
    run_policy(&cases);
    // Negative controls: bwd_v1 multiplying masked pairs' zero weights (0 · NaN) instead of
    // skipping them; bwd_v2 without sanitizing Y1 (K in the dq pass, Q in the dk/dv pass), or dO,
    // and without marking the rows that see a sanitized row.
    fails_policy(&cases, false, &bwd_v1_faults(), "no_skip", "masked weights multiplied");
    let v2 = bwd_v2_faults();
    fails_policy(&cases, true, &v2, "y1", "K (dq) and Q (dk, dv) not sanitized");
    fails_policy(&cases, true, &v2, "do", "dO not sanitized");
    fails_policy(&cases, true, &v2, "mark", "rows that see a sanitized row not marked");
}

/// A block whose owned rows see no streamed tile (keys no query sees: `M > N` with a window) runs
/// no barrier in its loop; bwd_v1's passes then reuse their owned rows' shared memory, which other
/// warps may still be loading: a barrier after the loop orders them (found by the random suite:
/// `dk` of the unseen keys held `kt`). The case, and the negative control without that barrier.
#[test]
fn cuda_backward_blocks_that_see_nothing_on_the_emulator() {
    if !gxx_or_skip("cuda_backward_blocks_that_see_nothing_on_the_emulator") {
        return;
    }
    let spec = headmix_tests::cases::Spec {
        kind: headmix::Method::IhaLocal,
        batch: 1,
        heads: 3,
        q_heads: 3,
        kv_heads: 3,
        pseudo: 4,
        head_dim: 16,
        n: 1,
        m: 6,
        causal: true,
        window: Some((3, 0)),
        rope: None,
        rope_base: 10000.0,
        pos_offset: 0,
        scale: None,
        collapse: false,
        norm: None,
        dtype: DType::BF16,
        seed: 55134688335,
    };
    let inputs = Inputs::new(spec.case(), spec.seed);
    check_case(&inputs, "unseen_keys");
    let src = std::fs::read_to_string(kernels_dir().join("bwd_v1.cu")).unwrap();
    let barrier = "ran no barrier yet).\n    __syncthreads();";
    assert_eq!(src.matches(barrier).count(), 1, "the negative control must find the key pass's barrier");
    let broken = work_dir().join("bwd_v1_no_barrier.cu");
    std::fs::write(&broken, src.replace(barrier, "ran no barrier yet).")).unwrap();
    let got = inputs.run_emu(false, Some(&broken), "unseen_keys_broken", inputs.case.problem.cfg.heads);
    let expected = inputs.expected();
    let failed = std::panic::catch_unwind(|| expected.check(&got, 1.0, "no barrier")).is_err();
    assert!(failed, "the key pass without its barrier passed the check");
}
