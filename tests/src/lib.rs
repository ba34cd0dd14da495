//! Shared helpers of the headmix test suites: device discovery with clear skips, random inputs,
//! poisoned outputs, and the comparison of a backend against the f64 reference.

pub mod backward;
pub mod cases;

use headmix::reference::{self, HeadNorm, MixWeights, Output, Params, Rounding, max_abs_err, rel_err};
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, Config, DType, Io, Problem, Rng, Weights};

/// Open a device backend, or say in one line why the test is skipped. Under
/// `HEADMIX_REQUIRE_CUDA=1` / `HEADMIX_REQUIRE_WGPU=1` a missing device fails the test instead.
pub fn device_or_skip(kind: BackendKind, test: &str) -> Option<Box<dyn Backend>> {
    let var = match kind {
        BackendKind::Cuda => "HEADMIX_REQUIRE_CUDA",
        BackendKind::Wgpu => "HEADMIX_REQUIRE_WGPU",
        BackendKind::Cpu => "",
    };
    match headmix::open(kind) {
        Ok(b) => Some(b),
        Err(e) => {
            if !var.is_empty() && std::env::var(var).is_ok_and(|v| v == "1") {
                panic!("{test}: {var}=1 but the {kind} backend is not available: {e}");
            }
            // Straight to stderr, past libtest's capture, so the skip shows in a passing run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipping {test}: no {kind} device ({e})");
            None
        }
    }
}

/// Relative-error tolerance (‖out − ref‖ / ‖ref‖ against the f64 reference) per dtype.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// The reference's rounding that mimics a kernel in `dtype`.
pub fn rounding(dtype: DType) -> Rounding {
    match dtype {
        DType::F32 => Rounding::Exact,
        DType::F16 => Rounding::F16,
        DType::BF16 => Rounding::BF16,
    }
}

/// A layer's weights widened to f64 (what the f64 reference takes).
pub struct Weights64 {
    pub aq: Vec<f64>,
    pub ak: Vec<f64>,
    pub av: Vec<f64>,
    pub r: Option<Vec<f64>>,
    pub norm: Option<HeadNorm<Vec<f64>>>,
}

impl Weights64 {
    pub fn of(w: &Weights) -> Weights64 {
        let f = |x: &Vec<f32>| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Weights64 {
            aq: f(&w.aq),
            ak: f(&w.ak),
            av: f(&w.av),
            r: w.r.as_ref().map(f),
            norm: w.norm.as_ref().map(|n| n.map(f)),
        }
    }

    pub fn mix(&self) -> MixWeights<'_, f64> {
        let norm = self.norm.as_ref().map(|n| n.as_slices());
        MixWeights { aq: &self.aq, ak: &self.ak, av: &self.av, r: self.r.as_deref(), norm }
    }
}

/// Inputs of one case, in f32 values exactly representable in the case's dtype.
pub struct Case {
    pub problem: Problem,
    pub weights: Weights,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

fn representable(dtype: DType, x: Vec<f32>) -> Vec<f32> {
    Owned::from_f32(dtype, &x).to_f32()
}

impl Case {
    /// Fresh random inputs (normal, never zeros) for a configuration and sizes.
    pub fn random(cfg: Config, weights: Weights, batch: usize, n: usize, m: usize, dtype: DType, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let c = &cfg;
        let q = rng.normal_vec(batch * n * c.q_heads * c.head_dim, 1.0);
        let k = rng.normal_vec(batch * m * c.kv_heads * c.head_dim, 1.0);
        let v = rng.normal_vec(batch * m * c.kv_heads * c.head_dim, 1.0);
        let problem = Problem::for_weights(&cfg, &weights, batch, n, m, dtype).expect("a valid case");
        Case { problem, weights, q: representable(dtype, q), k: representable(dtype, k), v: representable(dtype, v) }
    }

    pub fn q_shape(&self) -> [usize; 4] {
        let p = &self.problem;
        [p.batch, p.n, p.cfg.q_heads, p.cfg.head_dim]
    }

    pub fn kv_shape(&self) -> [usize; 4] {
        let p = &self.problem;
        [p.batch, p.m, p.cfg.kv_heads, p.cfg.head_dim]
    }

    /// The reference in f64 with a given rounding.
    pub fn reference(&self, rounding: Rounding) -> Output<f64> {
        let mut params: Params = self.problem.params();
        params.rounding = rounding;
        let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let w = Weights64::of(&self.weights);
        reference::attention(&params, &f(&self.q), &f(&self.k), &f(&self.v), &w.mix())
    }

    /// Run a backend through the validated host API with NaN-poisoned outputs; returns
    /// (out as f32, lse).
    pub fn run(&self, backend: &dyn Backend) -> headmix::Result<(Vec<f32>, Vec<f32>)> {
        let p = &self.problem;
        let (q, k, v) =
            (Owned::from_f32(p.dtype, &self.q), Owned::from_f32(p.dtype, &self.k), Owned::from_f32(p.dtype, &self.v));
        let out_shape = p.out_shape();
        let mut out = Owned::filled(p.dtype, out_shape.iter().product(), f32::NAN);
        let mut lse = vec![f32::NAN; p.lse_len()];
        backend.forward(
            &p.cfg,
            &self.weights,
            Io {
                q: q.tensor(&self.q_shape()),
                k: k.tensor(&self.kv_shape()),
                v: v.tensor(&self.kv_shape()),
                out: out.tensor_mut(&out_shape),
                lse: Some(&mut lse),
            },
        )?;
        Ok((out.to_f32(), lse))
    }

    /// Run `backend` and assert it matches the f64 reference: relative error within
    /// [`tolerance`], every element written (no NaN left from the poison), lse equal where
    /// finite and `-inf` exactly where the reference has it; for f16/bf16 also the
    /// FlashAttention rule: max error at most 2× that of the reference run in the same
    /// precision, plus `atol`.
    pub fn check(&self, backend: &dyn Backend, label: &str) {
        let (out, lse) = self.run(backend).unwrap_or_else(|e| panic!("{label}: {e}"));
        let exact = self.reference(Rounding::Exact);
        assert!(out.iter().all(|x| !x.is_nan()), "{label}: output has NaN (unwritten or wrong)");
        let err = rel_err(&out, &exact.out);
        let tol = tolerance(self.problem.dtype);
        assert!(err <= tol, "{label}: relative error {err:.3e} above {tol:.0e} ({:?})", self.problem);
        if self.problem.dtype != DType::F32 {
            let low = self.reference(rounding(self.problem.dtype));
            let ref_err = max_abs_err(&low.out, &exact.out);
            let our_err = max_abs_err(&out, &exact.out);
            let atol = 1e-3 * exact.out.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
            assert!(
                our_err <= 2.0 * ref_err + atol,
                "{label}: max error {our_err:.3e} above 2 × {ref_err:.3e} (reference in {:?}) + {atol:.1e}",
                self.problem.dtype
            );
        }
        check_lse(&lse, &exact.lse, if self.problem.dtype == DType::F32 { 1e-4 } else { 2e-2 }, label);
    }
}

/// Log-sum-exp: `-inf` exactly where the reference has it, else within `atol`.
pub fn check_lse(got: &[f32], want: &[f64], atol: f64, label: &str) {
    assert_eq!(got.len(), want.len(), "{label}: lse length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert!(g == f32::NEG_INFINITY, "{label}: lse[{i}] = {g}, expected -inf (row sees no key)");
        } else {
            assert!((g as f64 - w).abs() <= atol * (1.0 + w.abs()), "{label}: lse[{i}] = {g}, expected {w}");
        }
    }
}

/// Run `test` on `cases` draws of `strategy` through `proptest!` (failures shrink as usual), then
/// assert that the cases really ran: a property suite that runs nothing cannot fail.
/// `PROPTEST_CASES` overrides `cases`, as for any proptest.
pub fn check_property<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S: proptest::strategy::Strategy,
    S::Value: std::fmt::Debug,
{
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    let expected = proptest::test_runner::contextualize_config(config.clone()).cases;
    let ran = AtomicU32::new(0);
    proptest!(config, |(x in strategy)| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(x);
    });
    let ran = ran.into_inner();
    assert!(ran > 0 && ran >= expected, "{name}: only {ran} of {expected} cases ran");
}

/// `len` standard-normal values times `std` in f64, never exactly zero.
pub fn normals(rng: &mut Rng, len: usize, std: f64) -> Vec<f64> {
    (0..len)
        .map(|_| {
            let x = rng.normal();
            if x == 0.0 { 0.5 * std } else { x * std }
        })
        .collect()
}

/// The mask of the spec written out directly in wide integers: virtual query `i` sits at key index
/// `i' = i + (M − N)·P`; causal: `j <= i'`; window `(left, right)`: `i' − left <= j <= i' + right`.
pub fn spec_visible(
    i: usize,
    j: usize,
    n: usize,
    m: usize,
    p: usize,
    causal: bool,
    window: Option<(usize, usize)>,
) -> bool {
    let (i, j) = (i as i128, j as i128);
    let ia = i + (m as i128 - n as i128) * p as i128;
    let causal_ok = !causal || j <= ia;
    let window_ok = window.is_none_or(|(l, r)| ia - l as i128 <= j && j <= ia + r as i128);
    causal_ok && window_ok
}

/// How many keys each virtual query row of head 0, batch 0 sees, counted by `backend`: with a
/// tiny softmax scale every visible score is ~0, so `lse = ln(count)` to ~1e-6. (Random inputs,
/// not zeros; the count comes from the kernel's own mask.)
pub fn visible_key_counts(backend: &dyn Backend, cfg: Config, n: usize, m: usize, seed: u64) -> Vec<usize> {
    let cfg = cfg.with_scale(1e-7);
    let case = Case::random(cfg, Weights::random(&cfg, seed), 1, n, m, DType::F32, seed);
    let (_, lse) = case.run(backend).unwrap_or_else(|e| panic!("visible_key_counts: {e}"));
    lse[..n * cfg.pseudo]
        .iter()
        .map(|&l| if l == f32::NEG_INFINITY { 0 } else { (l as f64).exp().round() as usize })
        .collect()
}

/// IHA-local's window against its definition on `backend`: each virtual query sees exactly
/// `W·P` keys once far enough in (fewer only at the start of the sequence: `i' + 1`), with a KV
/// prefix of `extra` tokens too; and the negative control: the old width `left = W·P` is caught
/// (it shows `W·P + 1` keys).
pub fn check_iha_local_window(backend: &dyn Backend, label: &str) {
    for (p, n, extra) in [(1, 40, 0), (2, 40, 0), (3, 90, 0), (4, 70, 3), (2, 21, 5)] {
        let cfg = Config::iha_local(2, p, 8, n).unwrap();
        let w = Config::iha_local_tokens(p, n).unwrap();
        assert_eq!(cfg.window.map(|x| (x.left, x.right)), Some((w * p - 1, 0)), "{label}: P = {p}, N = {n}");
        let m = n + extra;
        let want: Vec<usize> = (0..n * p).map(|i| (i + extra * p + 1).min(w * p)).collect();
        let counts = visible_key_counts(backend, cfg, n, m, 7);
        assert_eq!(counts, want, "{label}: keys seen per virtual query, P = {p}, N = {n}, M = {m}, W = {w}");
        assert!(counts.iter().filter(|&&c| c == w * p).count() >= n * p / 2, "{label}: too few full windows");
        let old = visible_key_counts(backend, cfg.with_window(w * p, 0), n, m, 7);
        assert!(old != want && old.contains(&(w * p + 1)), "{label}: negative control (old width) not detected");
    }
}

/// MEA's `Group` norm on `backend` (with and without a collapse, a KV prefix, f32): matches the
/// reference; and the negative controls: the same output compared with the reference of the
/// norm without `beta`, or without the centring (`Rms` then `+ beta`), is clearly off.
pub fn check_group_norm(backend: &dyn Backend, label: &str) {
    use headmix::reference::rel_err;
    for (h, d, collapse, seed) in [(3, 32, false, 1u64), (2, 64, true, 2), (4, 8, false, 3)] {
        let cfg = Config::mea(h, d);
        let mut w = Weights::random(&cfg, seed);
        w.r = collapse.then(|| (0..h * h).map(|i| if i / h == i % h { 1.0 } else { 0.5 / h as f32 }).collect());
        let Some(HeadNorm::Group { gamma, beta }) = w.norm.clone() else { panic!("MEA's default norm is Group") };
        let case = Case::random(cfg, w, 2, 9, 12, DType::F32, seed);
        let what = format!("{label}: mea group norm, H = {h}, d = {d}, collapse = {collapse}");
        case.check(backend, &what);
        let (out, _) = case.run(backend).unwrap();
        let with_norm = |norm: HeadNorm<Vec<f32>>| {
            let mut wrong = Case {
                weights: case.weights.clone(),
                q: case.q.clone(),
                k: case.k.clone(),
                v: case.v.clone(),
                problem: case.problem,
            };
            wrong.weights.norm = Some(norm);
            wrong
        };
        let no_beta = with_norm(HeadNorm::Group { gamma: gamma.clone(), beta: vec![0.0; beta.len()] });
        let err = rel_err(&out, &no_beta.reference(Rounding::Exact).out);
        assert!(err > 1e-2, "{what}: negative control (beta dropped) not detected: {err:.3e}");
        let mut rms_beta = with_norm(HeadNorm::Rms { gamma: gamma.clone() }).reference(Rounding::Exact).out;
        for (idx, row) in rms_beta.chunks_mut(d).enumerate() {
            row.iter_mut().zip(&beta[(idx % h) * d..][..d]).for_each(|(e, &b)| *e += b as f64);
        }
        let err = rel_err(&out, &rms_beta);
        assert!(err > 1e-2, "{what}: negative control (centring dropped) not detected: {err:.3e}");
    }
}

/// g++ 12 or newer (C++20 and `_Float16` on x86), or a one-line skip (a failure under
/// `HEADMIX_REQUIRE_EMU=1`).
pub fn gxx_or_skip(test: &str) -> bool {
    let version = std::process::Command::new("g++")
        .arg("-dumpversion")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().split('.').next()?.parse::<u32>().ok());
    let ok = version.is_some_and(|major| major >= 12);
    if !ok {
        let why = match version {
            Some(v) => format!("g++ {v} is older than 12"),
            None => "no g++".into(),
        };
        if std::env::var("HEADMIX_REQUIRE_EMU").is_ok_and(|v| v == "1") {
            panic!("{test}: HEADMIX_REQUIRE_EMU=1 but {why}");
        }
        eprintln!("skipping {test}: {why} for the CPU emulator of the CUDA kernels");
    }
    ok
}
