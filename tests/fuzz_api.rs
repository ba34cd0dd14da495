//! The API fuzz target (issue 11): random valid and invalid configurations, shapes, dtypes,
//! weights, scales, windows, positions and tensors for forward (CPU and wgpu), decode with a KV
//! cache, and compression. Every call runs under `catch_unwind`, and:
//!
//! * no call panics;
//! * an invalid call (decided by this file's own oracle, written from the documented rules, not
//!   by calling the validator) is a typed error and leaves the NaN-poisoned outputs untouched;
//! * a valid call succeeds (wgpu may say `Unsupported` for a device limit) and matches the f64
//!   reference.
//!
//! Sizes stay tiny so thousands of cases run in seconds; `PROPTEST_CASES` scales every suite.

use std::panic::{AssertUnwindSafe, catch_unwind};

use headmix::cache::KvCache;
use headmix::compress::compress_safetensors;
use headmix::compress::safetensors::{self, Dtype, tensor::TensorView};
use headmix::decode::DecodeIo;
use headmix::reference::{self, MixWeights, rel_err};
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Method, PosMode, Rng, Rope, Weights, Window};
use headmix_tests::{check_property, device_or_skip, tolerance};
use proptest::prelude::*;

const MAX: usize = i32::MAX as usize;

/// One forward call, valid or not.
#[derive(Clone, Debug)]
struct Spec {
    h: usize,
    hq: usize,
    hk: usize,
    p: usize,
    d: usize,
    b: usize,
    n: usize,
    m: usize,
    causal: bool,
    window: Option<(usize, usize)>,
    scale: Option<f32>,
    eps: f32,
    rope: Option<(f32, bool)>,
    pos0: usize,
    dtype: DType,
    /// 0 identity-like, 1 dense, 2 one weight missing, 3 a NaN weight, 4 dense with collapse and norm.
    weights: u8,
    /// 0 none, 1 q shape wrong, 2 k data short, 3 out shape wrong, 4 lse length wrong, 5 dtype mismatch.
    tensor_fault: u8,
    seed: u64,
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn spec() -> impl Strategy<Value = Spec> {
    let heads = (1usize..4, 0usize..4, 0usize..4, prop_oneof![9 => 1usize..4, 1 => Just(0)]);
    let dims = (
        prop_oneof![8 => Just(8usize), 3 => Just(4), 2 => Just(2), 1 => Just(0), 1 => Just(3), 1 => Just(258)],
        0usize..3,
        0usize..5,
        0usize..6,
    );
    let scale = prop_oneof![
        6 => Just(None),
        2 => Just(Some(0.3f32)),
        1 => Just(Some(0.0)),
        1 => Just(Some(-1.0)),
        1 => Just(Some(f32::NAN)),
        1 => Just(Some(f32::INFINITY)),
        1 => Just(Some(f32::MAX)),
    ];
    let eps = prop_oneof![8 => Just(1e-5f32), 1 => Just(0.0), 1 => Just(f32::NAN), 1 => Just(1e-40)];
    let window = prop_oneof![
        5 => Just(None),
        3 => (0usize..6, 0usize..6).prop_map(Some),
        1 => Just(Some((usize::MAX, 0))),
        1 => Just(Some((MAX, MAX))),
    ];
    let rope = prop_oneof![
        5 => Just(None),
        3 => any::<bool>().prop_map(|t| Some((10000.0f32, t))),
        1 => Just(Some((1.0f32, false))),
        1 => Just(Some((f32::NAN, true))),
    ];
    let pos0 = prop_oneof![6 => Just(0usize), 2 => 0usize..100, 1 => Just(MAX - 40), 1 => Just(MAX + 1), 1 => Just(usize::MAX)];
    let rest = (
        any::<bool>(),
        dtype(),
        prop_oneof![6 => Just(0u8), 6 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 3 => Just(4u8)],
        prop_oneof![12 => Just(0u8), 1 => 1u8..6],
        any::<u64>(),
    );
    (heads, dims, scale, eps, window, rope, pos0, rest).prop_map(
        |(
            (h, hq, hk, p),
            (d, b, n, m),
            scale,
            eps,
            window,
            rope,
            pos0,
            (causal, dtype, weights, tensor_fault, seed),
        )| {
            // Stored heads 0 (invalid) or a small count; b, n, m may be 0 (invalid).
            Spec {
                h,
                hq,
                hk,
                p,
                d,
                b,
                n,
                m,
                causal,
                window,
                scale,
                eps,
                rope,
                pos0,
                dtype,
                weights,
                tensor_fault,
                seed,
            }
        },
    )
}

/// Only valid choices (tiny sizes): half the cases, so the "matches the reference" side of
/// the contract is exercised as often as the refusals.
fn valid_spec() -> impl Strategy<Value = Spec> {
    let heads = (1usize..4, 1usize..4, 1usize..4, 1usize..4);
    let dims = (prop_oneof![Just(8usize), Just(4), Just(2), Just(16)], 1usize..3, 1usize..5, 0usize..4);
    let window = prop_oneof![2 => Just(None), 2 => (0usize..6, 0usize..6).prop_map(Some), 1 => Just(Some((MAX, MAX)))];
    let rope = prop_oneof![Just(None), any::<bool>().prop_map(|t| Some((10000.0f32, t)))];
    let rest = (any::<bool>(), dtype(), prop_oneof![Just(0u8), Just(1u8), Just(4u8)], any::<u64>());
    let scale = prop_oneof![Just(None), Just(Some(0.3f32)), Just(Some(1e30f32))];
    (heads, dims, scale, window, rope, prop_oneof![Just(0usize), 0usize..100, Just(MAX - 40)], rest).prop_map(
        |((h, hq, hk, p), (d, b, n, extra), scale, window, rope, pos0, (causal, dtype, weights, seed))| Spec {
            h,
            hq,
            hk,
            p,
            d,
            b,
            n,
            m: n + extra,
            causal,
            window,
            scale: scale.filter(|&x| x < 1.0),
            eps: 1e-5,
            rope,
            pos0,
            dtype,
            weights,
            tensor_fault: 0,
            seed,
        },
    )
}

/// Half valid calls, half drawn from every (mostly invalid) choice.
fn any_spec() -> impl Strategy<Value = Spec> {
    prop_oneof![valid_spec(), spec()]
}

/// Counts the valid cases of a suite, so it can assert that it exercised them.
static VALID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Spec {
    fn config(&self) -> Config {
        let mut c = Config::mha(self.h, self.d);
        c.method = Method::Custom;
        c.q_heads = self.hq;
        c.kv_heads = self.hk;
        c.pseudo = self.p;
        c.causal = self.causal;
        c.window = self.window.map(|(left, right)| Window { left, right });
        c.scale = self.scale;
        c.norm_eps = self.eps;
        c.rope =
            self.rope.map(|(base, token)| Rope { base, mode: if token { PosMode::Token } else { PosMode::Virtual } });
        c.pos_offset = self.pos0;
        c
    }

    fn weights(&self) -> Weights {
        let (h, p) = (self.h, self.p);
        let mut rng = Rng::new(self.seed ^ 1);
        let mut w = Weights {
            aq: headmix::replication(self.hq, h, p),
            ak: headmix::replication(self.hk, h, p),
            av: headmix::replication(self.hk, h, p),
            r: None,
            norm: None,
        };
        if self.weights == 1 || self.weights >= 3 {
            w.aq = rng.normal_vec(self.hq * h * p, 0.7);
            w.ak = rng.normal_vec(self.hk * h * p, 0.7);
            w.av = rng.normal_vec(self.hk * h * p, 0.7);
        }
        match self.weights {
            2 => {
                w.ak.pop();
            }
            3 if !w.av.is_empty() => w.av[0] = f32::NAN,
            4 => {
                w.r = Some(rng.normal_vec(h * h * p, 0.5));
                let gamma = rng.normal_vec(h * self.d, 1.0);
                w.norm = Some(if self.seed % 2 == 0 {
                    headmix::HeadNorm::Group { gamma, beta: rng.normal_vec(h * self.d, 0.5) }
                } else {
                    headmix::HeadNorm::Rms { gamma }
                });
            }
            _ => {}
        }
        w
    }

    /// The oracle: whether the call is valid, from the documented rules.
    fn valid(&self) -> bool {
        let c = self.config();
        let scale = c.scale.unwrap_or(1.0 / (self.d.max(1) as f32).sqrt());
        let w = self.weights();
        let weights_ok = w.aq.len() == self.hq * self.h * self.p
            && w.ak.len() == self.hk * self.h * self.p
            && w.av.len() == self.hk * self.h * self.p
            && w.aq.iter().chain(&w.ak).chain(&w.av).all(|x| x.is_finite());
        self.h >= 1
            && self.hq >= 1
            && self.hk >= 1
            && self.p >= 1
            && self.d >= 2
            && self.d % 2 == 0
            && self.d <= 256
            && self.b >= 1
            && self.n >= 1
            && self.n <= self.m
            && scale.is_finite()
            && scale > 0.0
            && (scale * std::f32::consts::LOG2_E).is_finite()
            && self.eps.is_finite()
            && self.eps >= f32::MIN_POSITIVE
            && self.rope.is_none_or(|(base, _)| base.is_finite() && base > 1.0)
            && self.pos0 <= MAX
            && self.window.is_none_or(|(l, r)| l <= MAX && r <= MAX)
            && weights_ok
            && self.tensor_fault == 0
    }
}

/// Run one forward call on `backend` under `catch_unwind` and check the contract.
fn forward_contract(backend: &dyn Backend, s: &Spec) {
    let cfg = s.config();
    let w = s.weights();
    let mut rng = Rng::new(s.seed);
    let (hq, hk, d) = (s.hq, s.hk, s.d);
    let mut q_shape = vec![s.b, s.n, hq, d];
    let kv_shape = vec![s.b, s.m, hk, d];
    let mut out_shape = if w.r.is_some() { vec![s.b, s.n, s.h, d] } else { vec![s.b, s.n, s.h, s.p, d] };
    let out_len: usize = out_shape.iter().product();
    let mut lse_len = s.b * s.h * s.n * s.p;
    let round = |x: Vec<f32>| Owned::from_f32(s.dtype, &x).to_f32();
    let q = round(rng.normal_vec(q_shape.iter().product(), 1.0));
    let mut k = round(rng.normal_vec(kv_shape.iter().product(), 1.0));
    let v = round(rng.normal_vec(kv_shape.iter().product(), 1.0));
    let mut out_dtype = s.dtype;
    match s.tensor_fault {
        1 => q_shape[2] += 1,
        2 => {
            k.pop();
        }
        3 => out_shape[2] += 1,
        4 => lse_len += 1,
        5 => out_dtype = if s.dtype == DType::F32 { DType::BF16 } else { DType::F32 },
        _ => {}
    }
    let (qo, ko, vo) = (Owned::from_f32(s.dtype, &q), Owned::from_f32(s.dtype, &k), Owned::from_f32(s.dtype, &v));
    let mut out = Owned::filled(out_dtype, out_len, f32::NAN);
    let mut lse = vec![f32::NAN; lse_len];
    let result = catch_unwind(AssertUnwindSafe(|| {
        backend.forward(
            &cfg,
            &w,
            Io {
                q: qo.tensor(&q_shape),
                k: ko.tensor(&kv_shape),
                v: vo.tensor(&kv_shape),
                out: out.tensor_mut(&out_shape),
                lse: Some(&mut lse),
            },
        )
    }));
    let result = result.unwrap_or_else(|_| panic!("{}: panicked on {s:?}", backend.kind()));
    let untouched = out.to_f32().iter().all(|x| x.is_nan()) && lse.iter().all(|x| x.is_nan());
    if !s.valid() {
        assert!(result.is_err(), "{}: accepted an invalid call {s:?}", backend.kind());
        assert!(untouched, "{}: wrote outputs before refusing {s:?}: {result:?}", backend.kind());
        return;
    }
    VALID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match result {
        Err(Error::Unsupported { .. }) if backend.kind() != BackendKind::Cpu => return,
        Err(e) => panic!("{}: refused a valid call {s:?}: {e}", backend.kind()),
        Ok(()) => {}
    }
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let params = headmix::Problem::for_weights(&cfg, &w, s.b, s.n, s.m, s.dtype).unwrap().params();
    let (aq, ak, av) = (f(&w.aq), f(&w.ak), f(&w.av));
    let (r, g) = (w.r.as_deref().map(f), w.norm.as_ref().map(|n| n.map(|x| f(x))));
    let mix = MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm: g.as_ref().map(|n| n.as_slices()) };
    let want = reference::attention(&params, &f(&q), &f(&k), &f(&v), &mix);
    let got = out.to_f32();
    let err = rel_err(&got, &want.out);
    assert!(err <= tolerance(s.dtype), "{}: relative error {err:.2e} on {s:?}", backend.kind());
}

#[test]
fn fuzz_forward_cpu() {
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    let before = VALID.load(std::sync::atomic::Ordering::Relaxed);
    check_property("fuzz_forward_cpu", 2000, any_spec(), |s| forward_contract(cpu.as_ref(), &s));
    let valid = VALID.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(valid >= 200, "only {valid} valid cases ran");
}

#[test]
fn fuzz_forward_wgpu() {
    let Some(wgpu) = device_or_skip(BackendKind::Wgpu, "fuzz_forward_wgpu") else { return };
    check_property("fuzz_forward_wgpu", 250, any_spec(), |s| forward_contract(wgpu.as_ref(), &s));
}

/// A decode call: cache shape, appends, new tokens; valid or not.
#[derive(Clone, Debug)]
struct DecodeSpec {
    fwd: Spec,
    batch: usize,
    capacity: usize,
    cache_d: usize,
    prompt: usize,
    new: usize,
}

fn decode_spec() -> impl Strategy<Value = DecodeSpec> {
    (
        any_spec(),
        prop_oneof![3 => 1usize..3, 1 => Just(0)],
        prop_oneof![4 => 8usize..12, 1 => 0usize..8, 1 => Just(usize::MAX / 4)],
        prop_oneof![8 => Just(None), 1 => Just(Some(3usize)), 1 => Just(Some(0))],
        0usize..6,
        prop_oneof![4 => 1usize..3, 1 => Just(0)],
    )
        .prop_map(|(fwd, batch, capacity, cache_d, prompt, new)| DecodeSpec {
            cache_d: cache_d.unwrap_or(fwd.d),
            fwd,
            batch,
            capacity,
            prompt,
            new,
        })
}

fn decode_contract(backend: &dyn Backend, s: &DecodeSpec) {
    let f = &s.fwd;
    let cfg = f.config();
    let w = f.weights();
    let res = catch_unwind(AssertUnwindSafe(|| -> headmix::Result<()> {
        let mut cache = KvCache::new(s.batch, s.capacity, f.hk, s.cache_d, f.dtype)?;
        let mut rng = Rng::new(f.seed);
        let tokens = s.prompt + s.new;
        let row = f.hk * s.cache_d;
        let kv = Owned::from_f32(f.dtype, &rng.normal_vec(s.batch * tokens * row, 1.0));
        let kv2 = Owned::from_f32(f.dtype, &rng.normal_vec(s.batch * tokens * row, 1.0));
        cache.append(
            &kv.tensor(&[s.batch, tokens, f.hk, s.cache_d]),
            &kv2.tensor(&[s.batch, tokens, f.hk, s.cache_d]),
        )?;
        let q = Owned::from_f32(f.dtype, &rng.normal_vec(s.batch * s.new * f.hq * f.d, 1.0));
        let out_shape =
            if w.r.is_some() { vec![s.batch, s.new, f.h, f.d] } else { vec![s.batch, s.new, f.h, f.p, f.d] };
        let mut out = Owned::filled(f.dtype, out_shape.iter().product(), f32::NAN);
        let res = headmix::decode(
            backend,
            &cfg,
            &w,
            DecodeIo {
                q: q.tensor(&[s.batch, s.new, f.hq, f.d]),
                cache: &cache,
                out: out.tensor_mut(&out_shape),
                lse: None,
            },
        );
        let untouched = out.to_f32().iter().all(|x| x.is_nan());
        if res.is_err() {
            assert!(untouched, "decode wrote outputs before refusing {s:?}: {res:?}");
            return res;
        }
        // Valid: each sequence equals the forward of its new queries against its held tokens.
        for b in 0..s.batch {
            let (k, v) = cache.sequence(b)?;
            let m = cache.stored(b)?;
            let pos0 = cache.first_pos(b)?
                * if matches!(cfg.rope.map(|r| r.mode), Some(PosMode::Token)) { 1 } else { f.p }
                + f.pos0;
            let seq_cfg = cfg.with_pos_offset(pos0);
            let params = headmix::Problem::for_weights(&seq_cfg, &w, 1, s.new, m, f.dtype)?.params();
            let g = |x: Vec<f32>| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let (aq, ak, av) = (g(w.aq.clone()), g(w.ak.clone()), g(w.av.clone()));
            let (r, gm) = (w.r.clone().map(g), w.norm.as_ref().map(|n| n.map(|x| g(x.clone()))));
            let mix =
                MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm: gm.as_ref().map(|n| n.as_slices()) };
            let qb = q.to_f32();
            let qrow = s.new * f.hq * f.d;
            let want = reference::attention(
                &params,
                &g(qb[b * qrow..(b + 1) * qrow].to_vec()),
                &g(k.to_f32()),
                &g(v.to_f32()),
                &mix,
            );
            let orow: usize = out_shape[1..].iter().product();
            let got = out.to_f32()[b * orow..(b + 1) * orow].to_vec();
            let err = rel_err(&got, &want.out);
            assert!(err <= tolerance(f.dtype), "decode relative error {err:.2e} on {s:?}");
        }
        Ok(())
    }));
    let res = res.unwrap_or_else(|_| panic!("{}: decode panicked on {s:?}", backend.kind()));
    // Every refusal is a typed error; a valid configuration with a fitting cache must succeed.
    let fits = s.batch >= 1 && s.capacity >= s.prompt + s.new && s.capacity < 1 << 20 && s.cache_d == f.d && s.new >= 1;
    let fwd_ok =
        Spec { n: s.new.max(1), m: (s.prompt + s.new).max(1), b: s.batch.max(1), tensor_fault: 0, ..f.clone() }.valid();
    if fits && fwd_ok && f.pos0 + (s.prompt + s.new) * f.p <= MAX {
        match res {
            Ok(()) => {}
            Err(Error::Unsupported { .. }) if backend.kind() != BackendKind::Cpu => {}
            Err(e) => panic!("{}: refused a valid decode {s:?}: {e}", backend.kind()),
        }
    }
}

#[test]
fn fuzz_decode_cpu() {
    let cpu = headmix::open(BackendKind::Cpu).unwrap();
    check_property("fuzz_decode_cpu", 800, decode_spec(), |s| decode_contract(cpu.as_ref(), &s));
}

#[test]
fn fuzz_decode_wgpu() {
    let Some(wgpu) = device_or_skip(BackendKind::Wgpu, "fuzz_decode_wgpu") else { return };
    check_property("fuzz_decode_wgpu", 60, decode_spec(), |s| decode_contract(wgpu.as_ref(), &s));
}

/// A safetensors file of random projection names and shapes, then a compression.
#[test]
fn fuzz_compress() {
    let names = ["l.0.k_proj", "l.0.v_proj", "l.0.k_proj.weight", "l.0.v_proj.weight", "l.1.k_proj", "l.1.v_proj", "x"];
    let tensor = (0usize..names.len(), prop::collection::vec(0usize..5, 1..4));
    let strategy = (
        prop::collection::vec(tensor, 1..6),
        0usize..4,
        prop_oneof![Just(None), (0usize..4).prop_map(Some)],
        any::<u64>(),
    );
    check_property("fuzz_compress", 600, strategy, |(tensors, rank, heads, seed)| {
        let mut rng = Rng::new(seed);
        let mut seen = std::collections::HashSet::new();
        let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .filter(|(i, _)| seen.insert(*i))
            .map(|(i, shape)| {
                let len: usize = shape.iter().product();
                let bytes = rng.normal_vec(len, 1.0).iter().flat_map(|x| x.to_le_bytes()).collect();
                (names[i].to_string(), shape, bytes)
            })
            .collect();
        let views: Vec<(String, TensorView)> =
            owned.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        let file = safetensors::serialize(views, None).unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| compress_safetensors(&file, rank, heads)));
        assert!(res.is_ok(), "compress panicked on {owned:?} rank {rank} heads {heads:?}");
    });
}

/// Negative control: a backend that writes its output before validating, or accepts what it
/// should refuse, fails the contract.
#[test]
fn negative_control_contract_catches_a_sloppy_backend() {
    struct Sloppy(Box<dyn Backend>);
    impl Backend for Sloppy {
        fn kind(&self) -> BackendKind {
            BackendKind::Cpu
        }
        fn device_name(&self) -> String {
            "sloppy".into()
        }
        fn describe(&self) -> Vec<(String, String)> {
            Vec::new()
        }
        fn run(&self, p: &headmix::Problem, w: &Weights, io: Io<'_>) -> headmix::Result<()> {
            self.0.run(p, w, io)
        }
        fn forward(&self, cfg: &Config, w: &Weights, mut io: Io<'_>) -> headmix::Result<()> {
            io.out.data.bytes_mut().iter_mut().for_each(|b| *b = 0); // written before validating
            let p = headmix::validate(cfg, w, &io.q, &io.k, &io.v, &io.out, io.lse.as_deref())?;
            self.0.run(&p, w, io)
        }
    }
    let sloppy = Sloppy(headmix::open(BackendKind::Cpu).unwrap());
    let valid = Spec {
        h: 2,
        hq: 2,
        hk: 2,
        p: 1,
        d: 8,
        b: 1,
        n: 3,
        m: 3,
        causal: true,
        window: None,
        scale: None,
        eps: 1e-5,
        rope: None,
        pos0: 0,
        dtype: DType::F32,
        weights: 1,
        tensor_fault: 0,
        seed: 1,
    };
    forward_contract(&sloppy, &valid); // valid calls are fine
    let invalid = Spec { scale: Some(f32::NAN), ..valid.clone() };
    let caught = catch_unwind(AssertUnwindSafe(|| forward_contract(&sloppy, &invalid)));
    assert!(caught.is_err(), "the contract missed outputs written before a refusal");
}
