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
//! Skips with one line without g++ >= 12, unless `HEADMIX_REQUIRE_EMU=1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use headmix::backends::cuda::Kernel;
use headmix::backends::cuda::backward::BwdPlan;
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
    let key = format!("{}{}", plan.variant.name(), kernel_file.map(|_| "_broken").unwrap_or(""));
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
    fn run_emu(&self, tc: bool, kernel_file: Option<&Path>, tag: &str) -> Grads<f32>;
}

impl Emu for Inputs {
    /// The plan run on the emulator (kernel file: the real one, or a broken copy); the gradients.
    fn run_emu(&self, tc: bool, kernel_file: Option<&Path>, tag: &str) -> Grads<f32> {
        let c = &self.case;
        let p = &c.problem;
        let plan = BwdPlan::new(p, &c.weights, tc).expect("a plan");
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
        g
    }
}

fn bytemuck_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The case through bwd_v1 (FMA), and for f16/bf16 also through bwd_v2 (tensor cores).
fn check_case(inputs: &Inputs, label: &str) -> f64 {
    let expected = inputs.expected();
    let dtype = inputs.case.problem.dtype;
    let mut worst = expected.check(&inputs.run_emu(false, None, label), 1.0, label);
    if dtype != DType::F32 {
        let label = format!("{label}_bwd_v2");
        let precision = if dtype == DType::BF16 { 128.0 } else { 4.0 };
        worst = worst.max(expected.check(&inputs.run_emu(true, None, &label), precision, &label));
    }
    worst
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
        let w = check_case(&inputs, &format!("case{i}"));
        let mut g = worst.lock().unwrap();
        *g = g.max(w);
    });
    eprintln!(
        "bwd emu: {} random cases pass, worst error {:.2} of its bound, {:.1} s",
        count.into_inner(),
        worst.into_inner().unwrap(),
        t.elapsed().as_secs_f64()
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
/// local's window), RoPE alternating between the position modes, `M > N`, bf16 (bwd_v1 and bwd_v2).
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
        check_case(&inputs, &format!("method_{}", method.name()));
    }
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
    let got = inputs.run_emu(false, Some(&broken), "control_broken");
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
    let got = inputs.run_emu(true, Some(&broken), "tc_control_broken");
    let expected = inputs.expected();
    let failed = std::panic::catch_unwind(|| expected.check(&got, 128.0, "broken v2")).is_err();
    assert!(failed, "the broken tensor-core kernel passed the check");
}
