//! The NaN / non-finite policy (crate docs, "Non-finite inputs"), per backend (CPU, wgpu flash,
//! wgpu flash split-KV, wgpu naive) and for decode:
//!
//! 1. a selection mixing matrix (MHA, GQA) is a gather: a NaN in one stored head reaches only
//!    the heads that read it; a dense matrix (IHA) spreads a NaN to every head of that token;
//! 2. a key outside a row's mask (causal future) never reaches the row, value included;
//! 3. a row that reads a non-finite value is non-finite, every other row is finite and equal to
//!    the reference;
//! 4. `Config::with_check_finite(true)` refuses the call naming the tensor and flat index.
//!
//! Each check has a negative control: the row checker rejects a deliberately wrong result.

use headmix::backends::wgpu::{Variant, WgpuBackend};
use headmix::reference::{self, MixWeights};
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Rng, Tensor, TensorMut, Weights};
use headmix_tests::device_or_skip;

/// The backends under test, each with a label.
fn backends(test: &str) -> Vec<(String, Box<dyn Backend>)> {
    let mut list: Vec<(String, Box<dyn Backend>)> = vec![("cpu".into(), headmix::open(BackendKind::Cpu).unwrap())];
    if device_or_skip(BackendKind::Wgpu, test).is_some() {
        let wb = || WgpuBackend::new().expect("wgpu opens");
        list.push(("wgpu flash".into(), Box::new(wb())));
        list.push(("wgpu flash split-KV".into(), Box::new(wb().with_kv_splits(Some(2)))));
        list.push(("wgpu naive".into(), Box::new(wb().with_variant(Variant::Naive))));
    }
    list
}

/// One forward call's inputs (f32 values).
struct Call {
    cfg: Config,
    w: Weights,
    n: usize,
    m: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Call {
    fn new(cfg: Config, w: Weights, n: usize, m: usize, seed: u64) -> Call {
        let mut rng = Rng::new(seed);
        let (d, hq, hk) = (cfg.head_dim, cfg.q_heads, cfg.kv_heads);
        let q = rng.normal_vec(n * hq * d, 1.0);
        let k = rng.normal_vec(m * hk * d, 1.0);
        let v = rng.normal_vec(m * hk * d, 1.0);
        Call { cfg, w, n, m, q, k, v }
    }

    fn out_len(&self) -> usize {
        let c = &self.cfg;
        self.n * c.heads * c.head_dim * if self.w.r.is_some() { 1 } else { c.pseudo }
    }

    /// Run on `backend` in `dtype` with NaN-poisoned outputs: (out, lse).
    fn run(&self, backend: &dyn Backend, dtype: DType) -> headmix::Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.cfg;
        let (q, k, v) =
            (Owned::from_f32(dtype, &self.q), Owned::from_f32(dtype, &self.k), Owned::from_f32(dtype, &self.v));
        let out_shape = if self.w.r.is_some() {
            vec![1, self.n, c.heads, c.head_dim]
        } else {
            vec![1, self.n, c.heads, c.pseudo, c.head_dim]
        };
        let mut out = Owned::filled(dtype, self.out_len(), f32::NAN);
        let mut lse = vec![f32::NAN; c.heads * self.n * c.pseudo];
        let qs = [1, self.n, c.q_heads, c.head_dim];
        let ks = [1, self.m, c.kv_heads, c.head_dim];
        backend.forward(
            &self.cfg,
            &self.w,
            Io {
                q: q.tensor(&qs),
                k: k.tensor(&ks),
                v: v.tensor(&ks),
                out: out.tensor_mut(&out_shape),
                lse: Some(&mut lse),
            },
        )?;
        Ok((out.to_f32(), lse))
    }

    /// The f64 reference on the same inputs (it follows the policy too).
    fn reference(&self) -> Vec<f64> {
        let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let c = &self.cfg;
        let mut p = headmix::Problem::for_weights(c, &self.w, 1, self.n, self.m, DType::F32).unwrap().params();
        p.rounding = Default::default();
        let (aq, ak, av) = (f(&self.w.aq), f(&self.w.ak), f(&self.w.av));
        let r = self.w.r.as_deref().map(f);
        let norm = self.w.norm.as_ref().map(|n| n.map(|x| f(x)));
        let mix = MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm: norm.as_ref().map(|n| n.as_slices()) };
        reference::attention(&p, &f(&self.q), &f(&self.k), &f(&self.v), &mix).out
    }
}

/// Rows of length `d`: a row `bad(row)` says reads a non-finite value must hold one; every other
/// row must be finite and within `tol` of the reference.
fn check_rows(out: &[f32], reference: &[f64], d: usize, tol: f64, bad: impl Fn(usize) -> bool) -> Result<(), String> {
    for (row, (o, r)) in out.chunks(d).zip(reference.chunks(d)).enumerate() {
        let finite = o.iter().all(|x| x.is_finite());
        if bad(row) {
            if finite {
                return Err(format!("row {row} reads a non-finite value but is finite: {o:?}"));
            }
        } else {
            if !finite {
                return Err(format!("row {row} reads no non-finite value but is {o:?}"));
            }
            for (x, y) in o.iter().zip(r) {
                if !y.is_finite() || (*x as f64 - y).abs() > tol * (1.0 + y.abs()) {
                    return Err(format!("row {row}: {x} differs from the reference {y}"));
                }
            }
        }
    }
    Ok(())
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 5e-2,
    }
}

/// GQA (H = 4 heads over Hk = 2 stored heads, causal): a NaN in one key of stored head 1 at
/// token 2 reaches heads 2 and 3 from token 2 on, and nothing else.
fn gqa_nan_key() -> (Call, impl Fn(usize) -> bool) {
    let (n, h, d) = (6, 4, 8);
    let cfg = Config::gqa(h, 2, d).unwrap().with_causal(true);
    let mut call = Call::new(cfg, Weights::identity(&cfg), n, n, 1);
    call.k[(2 * 2 + 1) * d + 3] = f32::NAN; // token 2, stored head 1, element 3
    // Output [1, N, H, 1, d]: row = token * H + head.
    let bad = move |row: usize| row / h >= 2 && row % h >= 2;
    (call, bad)
}

#[test]
fn gqa_nan_key_reaches_only_the_heads_that_read_it() {
    let (call, bad) = gqa_nan_key();
    let reference = call.reference();
    check_rows(&reference.iter().map(|&x| x as f32).collect::<Vec<_>>(), &reference, 8, 1e-6, &bad)
        .expect("the reference follows the policy");
    for (label, be) in backends("gqa_nan_key_reaches_only_the_heads_that_read_it") {
        let (out, _) = call.run(be.as_ref(), DType::F32).unwrap();
        check_rows(&out, &reference, 8, tol(DType::F32), &bad).unwrap_or_else(|e| panic!("{label}: {e}"));
    }
}

/// Negative control: the same GQA weights with one entry 1 + ε are no longer a selection, so
/// the dense mix multiplies the NaN head by 0 into heads 0 and 1: the checker must refuse it.
#[test]
fn negative_control_gqa_as_dense_mix_spreads_the_nan() {
    let (mut call, bad) = gqa_nan_key();
    call.w.ak[0] = 1.0 + f32::EPSILON; // not a selection any more: every column mixes both heads
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let (out, _) = call.run(cpu.as_ref(), DType::F32).unwrap();
    let (plain, _) = gqa_nan_key();
    let reference = plain.reference();
    assert!(check_rows(&out, &reference, 8, tol(DType::F32), &bad).is_err(), "the checker accepted a spread NaN");
}

/// MHA, causal: a NaN in the value of token 4 (a future key for tokens 0..3) leaves those rows
/// finite and equal to the reference, in every dtype; rows of head 0 from token 4 on are NaN.
#[test]
fn nan_in_a_masked_future_value_never_reaches_earlier_rows() {
    let (n, h, d) = (6, 2, 8);
    let cfg = Config::mha(h, d).with_causal(true);
    let mut call = Call::new(cfg, Weights::identity(&cfg), n, n, 2);
    call.v[(4 * h) * d + 5] = f32::NAN; // token 4, head 0
    let bad = move |row: usize| row / h >= 4 && row % h == 0;
    let reference = call.reference();
    for (label, be) in backends("nan_in_a_masked_future_value_never_reaches_earlier_rows") {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (out, _) = call.run(be.as_ref(), dtype).unwrap();
            check_rows(&out, &reference, d, tol(dtype), &bad).unwrap_or_else(|e| panic!("{label} {dtype:?}: {e}"));
        }
    }
}

/// Negative control: attention that multiplies masked probabilities by 0 instead of skipping
/// the keys (0 · NaN) turns earlier rows NaN; the checker must refuse it.
#[test]
fn negative_control_masking_by_multiplication_is_caught() {
    let (n, d) = (4, 2);
    let v: Vec<f64> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, f64::NAN, 8.0];
    let mut out = vec![0f32; n * d];
    for i in 0..n {
        // Uniform scores; a masked key gets probability 0 and is still multiplied in.
        let visible = i + 1;
        for j in 0..n {
            let p = if j <= i { 1.0 / visible as f64 } else { 0.0 };
            for t in 0..d {
                out[i * d + t] += (p * v[j * d + t]) as f32;
            }
        }
    }
    let reference: Vec<f64> = (0..n * d).map(|_| 0.0).collect();
    let bad = |row: usize| row >= 3;
    assert!(check_rows(&out, &reference, d, 1e9, bad).is_err(), "the checker accepted 0 · NaN in a masked row");
}

/// A NaN query makes its own row (and lse) non-finite, never zeros with lse = −inf; other rows
/// are untouched.
#[test]
fn nan_query_makes_its_row_non_finite() {
    let (n, h, d) = (5, 2, 8);
    let cfg = Config::mha(h, d).with_causal(true);
    let mut call = Call::new(cfg, Weights::identity(&cfg), n, n, 3);
    call.q[(3 * h + 1) * d] = f32::NAN; // token 3, head 1
    let bad = move |row: usize| row == 3 * h + 1;
    let reference = call.reference();
    for (label, be) in backends("nan_query_makes_its_row_non_finite") {
        let (out, lse) = call.run(be.as_ref(), DType::F32).unwrap();
        check_rows(&out, &reference, d, tol(DType::F32), bad).unwrap_or_else(|e| panic!("{label}: {e}"));
        // lse [1, H, N]: head 1, query 3.
        assert!(!lse[n + 3].is_finite() && lse[n + 3] != f32::NEG_INFINITY, "{label}: lse {}", lse[n + 3]);
        assert!(lse.iter().enumerate().all(|(i, x)| i == n + 3 || x.is_finite()), "{label}: {lse:?}");
    }
}

/// IHA (dense mixing, P = 2, collapse r): a NaN in the key of stored head 0 at token 2 reaches
/// every head of that token, so every output row from token 2 on is NaN and earlier ones are
/// finite (causal over virtual tokens).
#[test]
fn dense_mixing_spreads_a_nan_to_every_head_of_its_token() {
    let (n, h, d) = (5, 3, 8);
    let cfg = Config::iha(h, 2, d);
    let mut call = Call::new(cfg, Weights::random(&cfg, 4), n, n, 5);
    call.k[(2 * h) * d + 1] = f32::NAN;
    let bad = move |row: usize| row / h >= 2; // collapsed output [1, N, H, d]
    let reference = call.reference();
    check_rows(&reference.iter().map(|&x| x as f32).collect::<Vec<_>>(), &reference, d, 1e-6, bad)
        .expect("the reference follows the policy");
    for (label, be) in backends("dense_mixing_spreads_a_nan_to_every_head_of_its_token") {
        let (out, _) = call.run(be.as_ref(), DType::F32).unwrap();
        check_rows(&out, &reference, d, tol(DType::F32), bad).unwrap_or_else(|e| panic!("{label}: {e}"));
    }
}

/// Opt-in validation: the first non-finite input is an error naming the tensor and flat index,
/// and the outputs keep their poison; off (the default), the same call runs.
#[test]
fn check_finite_names_the_tensor_and_index() {
    let (n, h, d) = (4, 2, 8);
    let cfg = Config::mha(h, d);
    for (tensor, index) in [("q", 9usize), ("k", 37), ("v", 0)] {
        let mut call = Call::new(cfg.with_check_finite(true), Weights::identity(&cfg), n, n, 6);
        let x = match tensor {
            "q" => &mut call.q,
            "k" => &mut call.k,
            _ => &mut call.v,
        };
        x[index] = if index % 2 == 0 { f32::INFINITY } else { f32::NAN };
        for (label, be) in backends("check_finite_names_the_tensor_and_index") {
            let mut out = vec![f32::NAN; call.out_len()];
            let (qs, ks) = ([1, n, h, d], [1, n, h, d]);
            let res = be.forward(
                &call.cfg,
                &call.w,
                Io {
                    q: Tensor::new(&call.q, &qs),
                    k: Tensor::new(&call.k, &ks),
                    v: Tensor::new(&call.v, &ks),
                    out: TensorMut::new(&mut out, &[1, n, h, 1, d]),
                    lse: None,
                },
            );
            match res {
                Err(Error::NonFinite { what, index: i, .. }) if what == tensor && i == index => {}
                other => panic!("{label}: {tensor}[{index}] gave {other:?}"),
            }
            assert!(out.iter().all(|x| x.is_nan()), "{label}: output written before the error");
            // Negative control: without the opt-in the call runs.
            let mut off = Call::new(cfg, Weights::identity(&cfg), n, n, 6);
            (off.q, off.k, off.v) = (call.q.clone(), call.k.clone(), call.v.clone());
            off.run(be.as_ref(), DType::F32).unwrap_or_else(|e| panic!("{label}: check off refused: {e}"));
        }
    }
}

/// Decode follows the policy: GQA with N = 2 new tokens; a NaN in the newest token's value
/// (stored head 1) reaches only the second new query (the first does not see it), heads 2, 3.
#[test]
fn decode_follows_the_nan_policy() {
    use headmix::cache::KvCache;
    use headmix::decode::DecodeIo;
    let (h, d, len) = (4, 8, 7);
    let cfg = Config::gqa(h, 2, d).unwrap().with_causal(true);
    let w = Weights::identity(&cfg);
    let mut call = Call::new(cfg, w.clone(), 2, len, 7);
    call.v[((len - 1) * 2 + 1) * d + 2] = f32::NAN;
    let bad = move |row: usize| row / h == 1 && row % h >= 2;
    let reference = call.reference(); // the forward N = 2 against M = len: the same attention
    for check in [false, true] {
        for (label, be) in backends("decode_follows_the_nan_policy") {
            let cfg = cfg.with_check_finite(check);
            let mut cache = KvCache::for_config(&cfg, 1, 16, DType::F32).unwrap();
            cache.append(&Tensor::new(&call.k, &[1, len, 2, d]), &Tensor::new(&call.v, &[1, len, 2, d])).unwrap();
            let mut out = vec![f32::NAN; 2 * h * d];
            let io = DecodeIo {
                q: Tensor::new(&call.q, &[1, 2, h, d]),
                cache: &cache,
                out: TensorMut::new(&mut out, &[1, 2, h, 1, d]),
                lse: None,
            };
            let res = headmix::decode(be.as_ref(), &cfg, &w, io);
            if check {
                let at = ((len - 1) * 2 + 1) * d + 2;
                assert_eq!(res, Err(Error::NonFinite { what: "cache v", index: at, value: f64::NAN }), "{label}");
                assert!(out.iter().all(|x| x.is_nan()), "{label}: output written before the error");
            } else {
                res.unwrap_or_else(|e| panic!("{label}: {e}"));
                check_rows(&out, &reference, d, tol(DType::F32), bad).unwrap_or_else(|e| panic!("{label} decode: {e}"));
            }
        }
    }
}
