//! Decode against a KV cache: prefill then decode (one and a few tokens at a time) equals the f64
//! reference forward over the whole sequence, for IHA global, IHA local (ring cache, generation
//! longer than its capacity), MEA dense, MEA compressed and GQA, ragged batches, with and without
//! RoPE; the flash-decoding split + combine equals the unsplit operator; typed errors on misuse;
//! cache-size accounting. Negative controls show each comparison can fail.
//!
//! Every sequence of a scenario has its own random tokens; the reference is run once per sequence
//! on all its tokens (`N = M = L`, causal), and every decode step is compared with the rows of the
//! tokens it produced. Outputs are poisoned with NaN before each call.

use headmix::backends::cpu::CpuBackend;
use headmix::cache::{CacheLayout, KvCache, KvCacheStack, cache_bytes, window_tokens};
use headmix::decode::{DecodeIo, decode_per_sequence, decode_split, split, validate_decode};
use headmix::reference::{self, HeadNorm, MixWeights, Output, Params, PosMode, Rope as RefRope, rel_err};
use headmix::timing::Owned;
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Method, Problem, Rng, Rope, Tensor, TensorMut, Weights};
use headmix_tests::{Weights64, check_property, device_or_skip, normals, tolerance};
use proptest::prelude::*;

const CASES: u32 = 64;

// ---------------------------------------------------------------------------------------------
// Scenarios: a configuration, ragged prompts, and the sizes of the decode steps after them.

#[derive(Clone, Debug)]
struct Scenario {
    kind: Method,
    h: usize,
    /// `Hk` of MEA compressed and GQA (else `H`).
    hk: usize,
    p: usize,
    d: usize,
    /// Left window edge in virtual tokens (IHA local).
    left: usize,
    rope: Option<PosMode>,
    pos_offset: usize,
    /// IHA without the collapse `r` (output `[B, N, H, P, d]`).
    no_collapse: bool,
    /// Prompt length per sequence (ragged).
    prompts: Vec<usize>,
    /// New tokens per decode call, the same for every sequence.
    steps: Vec<usize>,
    dtype: DType,
    seed: u64,
}

impl Scenario {
    fn cfg(&self) -> Config {
        let (h, p, d) = (self.h, self.p, self.d);
        let cfg = match self.kind {
            Method::Iha => Config::iha(h, p, d),
            Method::IhaLocal => Config::iha(h, p, d).with_window(self.left, 0),
            Method::Mea => Config::mea(h, d).with_causal(true),
            Method::MeaCompressed => Config::mea_compressed(h, self.hk, d).unwrap().with_causal(true),
            Method::Gqa => Config::gqa(h, self.hk, d).unwrap().with_causal(true),
            Method::Mha => Config::mha(h, d).with_causal(true),
            Method::Custom => unreachable!("scenarios use the named methods"),
        };
        let cfg = cfg.with_pos_offset(self.pos_offset);
        match self.rope {
            Some(mode) => cfg.with_rope(Rope { base: 10000.0, mode }),
            None => cfg,
        }
    }

    fn weights(&self) -> Weights {
        let mut w = Weights::random(&self.cfg(), self.seed ^ 0x5eed);
        if self.no_collapse {
            w.r = None;
        }
        w
    }

    fn batch(&self) -> usize {
        self.prompts.len()
    }

    fn len(&self, b: usize) -> usize {
        self.prompts[b] + self.steps.iter().sum::<usize>()
    }

    fn max_step(&self) -> usize {
        self.steps.iter().copied().max().unwrap_or(1)
    }

    /// A ring cache for a windowed layer, else a linear cache holding the longest sequence.
    fn cache(&self) -> KvCache {
        let cfg = self.cfg();
        if cfg.window.is_some() {
            KvCache::ring(&cfg, self.batch(), self.max_step(), self.dtype).unwrap()
        } else {
            let cap = (0..self.batch()).map(|b| self.len(b)).max().unwrap();
            KvCache::for_config(&cfg, self.batch(), cap, self.dtype).unwrap()
        }
    }

    /// [`Scenario::cache`] on a backend's device.
    fn cache_on(&self, on: &dyn Backend) -> KvCache {
        let cfg = self.cfg();
        if cfg.window.is_some() {
            KvCache::ring_on(on, &cfg, self.batch(), self.max_step(), self.dtype).unwrap()
        } else {
            let cap = (0..self.batch()).map(|b| self.len(b)).max().unwrap();
            KvCache::for_config_on(on, &cfg, self.batch(), cap, self.dtype).unwrap()
        }
    }
}

/// All tokens of one sequence: `q [L, Hq, d]`, `k, v [L, Hk, d]`, values representable in the dtype.
struct Seq {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn representable(dtype: DType, x: Vec<f32>) -> Vec<f32> {
    Owned::from_f32(dtype, &x).to_f32()
}

fn sequences(s: &Scenario) -> Vec<Seq> {
    let cfg = s.cfg();
    let mut rng = Rng::new(s.seed);
    (0..s.batch())
        .map(|b| {
            let l = s.len(b);
            let mut draw = |heads: usize| {
                let x = normals(&mut rng, l * heads * cfg.head_dim, 1.0).into_iter().map(|x| x as f32).collect();
                representable(s.dtype, x)
            };
            Seq { q: draw(cfg.q_heads), k: draw(cfg.kv_heads), v: draw(cfg.kv_heads) }
        })
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The f64 reference forward over a whole sequence of `len` tokens (batch 1, `N = M = len`).
fn reference_forward(cfg: &Config, w: &Weights, seq: &Seq, len: usize) -> Output<f64> {
    let problem = Problem::for_weights(cfg, w, 1, len, len, DType::F32).unwrap();
    let params = problem.params();
    reference::attention(&params, &f64s(&seq.q), &f64s(&seq.k), &f64s(&seq.v), &Weights64::of(w).mix())
}

/// How a decode call is made.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// `headmix::decode` (the backend's `decode`: split-KV on the host for the CPU).
    Api(&'a dyn Backend),
    /// The host split-KV decode with this many chunks per sequence.
    Split(usize),
    /// The generic path every backend inherits: unroll the cache, `Backend::run` per sequence.
    PerSequence(&'a dyn Backend),
}

fn run_decode(via: Via, cfg: &Config, w: &Weights, io: DecodeIo<'_>) -> headmix::Result<()> {
    match via {
        Via::Api(b) => headmix::decode(b, cfg, w, io),
        Via::Split(splits) => decode_split(cfg, w, io, splits),
        Via::PerSequence(b) => {
            let problem = validate_decode(cfg, w, &io)?;
            decode_per_sequence(b, &problem, w, io)
        }
    }
}

/// What a negative control breaks in the decode (never in the reference).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Control {
    None,
    /// Append each decode step's new tokens in reverse order (a slot or position mix-up).
    ReverseStep,
    /// Add 0.5 to the first appended key and value element of every decode step.
    PerturbCache,
}

/// Largest errors over every prompt and decode step: relative Frobenius error of the outputs and
/// `|lse − ref| / (1 + |ref|)` (infinite on NaN, or on a `-inf` mismatch).
#[derive(Debug, Default)]
struct Errors {
    out: f64,
    lse: f64,
}

fn worst(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::INFINITY } else { a.max(b) }
}

fn lse_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0, |m, (&g, &w)| {
        let e = if w == f64::NEG_INFINITY || g == f32::NEG_INFINITY {
            if g as f64 == w { 0.0 } else { f64::INFINITY }
        } else {
            (g as f64 - w).abs() / (1.0 + w.abs())
        };
        worst(m, e)
    })
}

/// Prefill every sequence (forward on its prompt, then append its prompt's keys/values to the
/// cache, ragged), then decode `steps` tokens at a time for the whole batch; compare everything
/// with the reference forward over the whole sequences.
fn run_scenario(s: &Scenario, prefill: &dyn Backend, via: Via, control: Control) -> Errors {
    run_scenario_on(s, prefill, via, control, None)
}

/// [`run_scenario`] with the cache on `cache_on`'s device (host memory when `None`).
fn run_scenario_on(
    s: &Scenario,
    prefill: &dyn Backend,
    via: Via,
    control: Control,
    cache_on: Option<&dyn Backend>,
) -> Errors {
    let cfg = s.cfg();
    let w = s.weights();
    let (hq, hk, h, p, d) = (cfg.q_heads, cfg.kv_heads, cfg.heads, cfg.pseudo, cfg.head_dim);
    let seqs = sequences(s);
    let refs: Vec<Output<f64>> = (0..s.batch()).map(|b| reference_forward(&cfg, &w, &seqs[b], s.len(b))).collect();
    let out_tok = if w.r.is_some() { h * d } else { h * p * d };
    let mut errs = Errors::default();

    // Prefill: a forward on each prompt (batch 1), then its stored heads into the cache.
    let mut cache = match cache_on {
        Some(on) => s.cache_on(on),
        None => s.cache(),
    };
    for (b, seq) in seqs.iter().enumerate() {
        let n = s.prompts[b];
        let (q, k, v) = (
            Owned::from_f32(s.dtype, &seq.q[..n * hq * d]),
            Owned::from_f32(s.dtype, &seq.k[..n * hk * d]),
            Owned::from_f32(s.dtype, &seq.v[..n * hk * d]),
        );
        let out_shape = if w.r.is_some() { vec![1, n, h, d] } else { vec![1, n, h, p, d] };
        let mut out = Owned::filled(s.dtype, n * out_tok, f32::NAN);
        let mut lse = vec![f32::NAN; h * n * p];
        prefill
            .forward(
                &cfg,
                &w,
                Io {
                    q: q.tensor(&[1, n, hq, d]),
                    k: k.tensor(&[1, n, hk, d]),
                    v: v.tensor(&[1, n, hk, d]),
                    out: out.tensor_mut(&out_shape),
                    lse: Some(&mut lse),
                },
            )
            .unwrap_or_else(|e| panic!("prefill forward: {e} ({s:?})"));
        errs.out = worst(errs.out, rel_err(&out.to_f32(), &refs[b].out[..n * out_tok]));
        let len = s.len(b);
        for hh in 0..h {
            let want = &refs[b].lse[hh * len * p..][..n * p];
            errs.lse = worst(errs.lse, lse_err(&lse[hh * n * p..(hh + 1) * n * p], want));
        }
        cache.append_seq(b, &k.tensor(&[n, hk, d]), &v.tensor(&[n, hk, d])).unwrap();
    }

    // Decode: every sequence gets the same number of new tokens per call.
    let mut at: Vec<usize> = s.prompts.clone();
    for &n in &s.steps {
        let bsz = s.batch();
        let rows = |x: &dyn Fn(&Seq) -> &[f32], width: usize| -> Vec<f32> {
            (0..bsz).flat_map(|b| x(&seqs[b])[at[b] * width..(at[b] + n) * width].to_vec()).collect()
        };
        let q = rows(&|sq| &sq.q, hq * d);
        let (mut k, mut v) = (rows(&|sq| &sq.k, hk * d), rows(&|sq| &sq.v, hk * d));
        if control == Control::PerturbCache {
            k[0] += 0.5;
            v[0] += 0.5;
        }
        if control == Control::ReverseStep {
            for x in [&mut k, &mut v] {
                for seq in x.chunks_mut(n * hk * d) {
                    let mut toks: Vec<&[f32]> = seq.chunks(hk * d).collect();
                    toks.reverse();
                    let rev = toks.concat();
                    seq.copy_from_slice(&rev);
                }
            }
        }
        let (q, k, v) = (Owned::from_f32(s.dtype, &q), Owned::from_f32(s.dtype, &k), Owned::from_f32(s.dtype, &v));
        cache.append(&k.tensor(&[bsz, n, hk, d]), &v.tensor(&[bsz, n, hk, d])).unwrap();
        let out_shape = if w.r.is_some() { vec![bsz, n, h, d] } else { vec![bsz, n, h, p, d] };
        let mut out = Owned::filled(s.dtype, bsz * n * out_tok, f32::NAN);
        let mut lse = vec![f32::NAN; bsz * h * n * p];
        let io = DecodeIo {
            q: q.tensor(&[bsz, n, hq, d]),
            cache: &cache,
            out: out.tensor_mut(&out_shape),
            lse: Some(&mut lse),
        };
        run_decode(via, &cfg, &w, io).unwrap_or_else(|e| panic!("decode of {n} tokens: {e} ({s:?})"));
        let out = out.to_f32();
        for b in 0..bsz {
            let (t, len) = (at[b], s.len(b));
            let got = &out[b * n * out_tok..(b + 1) * n * out_tok];
            errs.out = worst(errs.out, rel_err(got, &refs[b].out[t * out_tok..(t + n) * out_tok]));
            for hh in 0..h {
                let want = &refs[b].lse[hh * len * p + t * p..][..n * p];
                let got = &lse[(b * h + hh) * n * p..][..n * p];
                errs.lse = worst(errs.lse, lse_err(got, want));
            }
            at[b] += n;
        }
    }
    errs
}

fn lse_tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { 1e-4 } else { 2e-2 }
}

fn assert_close(s: &Scenario, errs: &Errors, label: &str) {
    let tol = tolerance(s.dtype);
    assert!(errs.out <= tol, "{label}: output relative error {:.3e} above {tol:.0e} ({s:?})", errs.out);
    assert!(errs.lse <= lse_tol(s.dtype), "{label}: lse error {:.3e} ({s:?})", errs.lse);
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Head dims of a method's scenarios. MEA's Group norm over `d = 2` values `(a, b)` is a step
/// of width `sqrt(eps)` in `a - b` (`±gamma + beta` on either side): where `a` and `b` are close it
/// multiplies an f32 rounding of the attention output by up to `1 / sqrt(eps)` (seen: 2.4e-4
/// against 1e-5), so the norm's methods draw `d >= 4`, as the backward suites do.
fn head_dim(kind: Method) -> impl Strategy<Value = usize> {
    let dims = match kind {
        Method::Mea | Method::MeaCompressed => vec![4usize, 8, 16, 32],
        _ => vec![2usize, 4, 8, 16, 32],
    };
    prop::sample::select(dims)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::F32, DType::F32, DType::F16, DType::BF16])
}

fn rope() -> impl Strategy<Value = Option<PosMode>> {
    prop::sample::select(vec![None, Some(PosMode::Virtual), Some(PosMode::Virtual), Some(PosMode::Token)])
}

/// Heads `(H, Hk, P)` of a method.
fn heads(kind: Method) -> BoxedStrategy<(usize, usize, usize)> {
    match kind {
        Method::Iha | Method::IhaLocal => (1usize..=4, 1usize..=4).prop_map(|(h, p)| (h, h, p)).boxed(),
        Method::Mea => (1usize..=4).prop_map(|h| (h, h, 1)).boxed(),
        Method::MeaCompressed => (2usize..=4).prop_flat_map(|h| (Just(h), 1..h)).prop_map(|(h, hk)| (h, hk, 1)).boxed(),
        Method::Gqa => prop::sample::select(vec![(2usize, 1usize), (4, 2), (4, 1), (6, 3), (6, 2)])
            .prop_map(|(h, g)| (h, g, 1))
            .boxed(),
        Method::Mha => (1usize..=4).prop_map(|h| (h, h, 1)).boxed(),
        Method::Custom => unreachable!("scenarios use the named methods"),
    }
}

fn scenario(kind: Method) -> impl Strategy<Value = Scenario> {
    // IHA local: generation well past the ring's capacity (window + largest step).
    let (prompt, steps) = if kind == Method::IhaLocal { (1usize..=10, 4usize..=9) } else { (1usize..=8, 1usize..=6) };
    (
        heads(kind),
        head_dim(kind),
        1usize..=12,
        rope(),
        0usize..=40,
        any::<bool>(),
        (1usize..=3).prop_flat_map(move |b| prop::collection::vec(prompt.clone(), b)),
        prop::collection::vec(1usize..=3, steps),
        dtype(),
        any::<u64>(),
    )
        .prop_map(move |((h, hk, p), d, left, rope, pos_offset, no_collapse, prompts, steps, dtype, seed)| {
            Scenario {
                kind,
                h,
                hk,
                p,
                d,
                left: left.min(4 * p),
                rope,
                pos_offset,
                no_collapse: no_collapse && matches!(kind, Method::Iha | Method::IhaLocal),
                prompts,
                steps,
                dtype,
                seed,
            }
        })
}

/// Prefill + decode equals the reference, through the API (split-KV on the CPU), through the
/// host split decode with a random number of chunks, and through the generic per-sequence path.
fn prefill_decode_property(kind: Method) {
    let cpu = CpuBackend::new();
    let name = format!("prefill + decode {kind:?}");
    check_property(&name, CASES, (scenario(kind), 1usize..=6), |(s, splits)| {
        assert_close(&s, &run_scenario(&s, &cpu, Via::Api(&cpu), Control::None), "api");
        assert_close(&s, &run_scenario(&s, &cpu, Via::Split(splits), Control::None), "split");
        assert_close(&s, &run_scenario(&s, &cpu, Via::PerSequence(&cpu), Control::None), "per-sequence");
    });
}

#[test]
fn prefill_decode_iha_global() {
    prefill_decode_property(Method::Iha);
}

#[test]
fn prefill_decode_iha_local_ring() {
    prefill_decode_property(Method::IhaLocal);
}

#[test]
fn prefill_decode_mea_dense() {
    prefill_decode_property(Method::Mea);
}

#[test]
fn prefill_decode_mea_compressed() {
    prefill_decode_property(Method::MeaCompressed);
}

#[test]
fn prefill_decode_gqa() {
    prefill_decode_property(Method::Gqa);
}

fn fixed(kind: Method, rope: Option<PosMode>) -> Scenario {
    let (h, hk, p) = match kind {
        Method::Iha | Method::IhaLocal => (2, 2, 2),
        Method::Mea => (3, 3, 1),
        Method::MeaCompressed => (4, 2, 1),
        Method::Gqa => (4, 2, 1),
        Method::Mha => (3, 3, 1),
        Method::Custom => unreachable!("scenarios use the named methods"),
    };
    Scenario {
        kind,
        h,
        hk,
        p,
        d: 8,
        left: 3,
        rope,
        pos_offset: 5,
        no_collapse: false,
        prompts: vec![3, 6],
        steps: vec![1, 2, 1, 3, 1, 1],
        dtype: DType::F32,
        seed: 42,
    }
}

/// The ring cache of IHA local really is bounded by the window, and wraps during the generation.
#[test]
fn ring_cache_stays_window_sized() {
    let s = fixed(Method::IhaLocal, Some(PosMode::Virtual));
    let cfg = s.cfg();
    let cache = s.cache();
    // left = 3 virtual tokens at P = 2: ceil(3/2) = 2 past tokens, plus the largest step (3).
    assert_eq!(window_tokens(&cfg), Some(2));
    assert_eq!(cache.layout(), CacheLayout::Ring { window_tokens: 2 });
    assert_eq!(cache.shape().capacity, 5);
    assert!(s.len(0) > cache.shape().capacity + 2, "the generation must outgrow the ring");
    let cpu = CpuBackend::new();
    assert_close(&s, &run_scenario(&s, &cpu, Via::Api(&cpu), Control::None), "ring");
}

/// Positions stay absolute after the ring wraps: the decode's `pos0` of a sequence is the
/// position of its oldest held token (virtual: token · P; token mode: token), plus `pos_offset`.
/// (RoPE scores depend on position differences only, so the comparisons with the reference cannot
/// see a uniform shift; this checks the bookkeeping directly.)
#[test]
fn ring_positions_stay_absolute() {
    for (mode, unit) in [(PosMode::Virtual, 3), (PosMode::Token, 1)] {
        let cfg = Config::iha_window(2, 3, 4, 2).with_rope(Rope { base: 10000.0, mode }).with_pos_offset(7);
        let mut cache = KvCache::ring(&cfg, 2, 2, DType::F32).unwrap(); // 2 + 2 tokens
        let kv = Rng::new(1).normal_vec(9 * 2 * 4, 1.0);
        cache.append_seq(0, &Tensor::new(&kv, &[9, 2, 4]), &Tensor::new(&kv, &[9, 2, 4])).unwrap();
        cache.append_seq(1, &Tensor::new(&kv[..24], &[3, 2, 4]), &Tensor::new(&kv[..24], &[3, 2, 4])).unwrap();
        assert_eq!(cache.lens(), &[9, 3]);
        assert_eq!((cache.stored(0).unwrap(), cache.first_pos(0).unwrap()), (4, 5));
        assert_eq!((cache.stored(1).unwrap(), cache.first_pos(1).unwrap()), (3, 0));
        // The ring keeps tokens 5..9 of sequence 0, oldest first.
        let held = cache.sequence(0).unwrap().0.to_f32();
        assert_eq!(held, kv[5 * 8..9 * 8].to_vec());
        let q = vec![0.5f32; 2 * 2 * 4];
        let mut out = vec![0f32; 2 * 2 * 4];
        let io = DecodeIo {
            q: Tensor::new(&q, &[2, 1, 2, 4]),
            cache: &cache,
            out: TensorMut::new(&mut out, &[2, 1, 2, 4]),
            lse: None,
        };
        let problem = validate_decode(&cfg, &Weights::random(&cfg, 1), &io).unwrap();
        assert_eq!(problem.stored, vec![4, 3]);
        assert_eq!(problem.pos0, vec![7 + 5 * unit, 7]);
    }
}

/// One capacity short of `ceil(left/P) + max_new` is refused (it would lose a visible key).
#[test]
fn ring_cache_for_a_smaller_window_is_refused() {
    let wide = Config::iha(2, 2, 8).with_window(5, 0); // needs ceil(5/2) = 3 past tokens
    let narrow = Config::iha(2, 2, 8).with_window(4, 0); // keeps 2
    let cache = KvCache::ring(&narrow, 1, 1, DType::F32).unwrap();
    assert!(matches!(cache.check_config(&wide), Err(Error::Cache { .. })));
    assert!(cache.check_config(&narrow).is_ok());
    // No window, or one that looks right without causality: no ring.
    assert!(matches!(KvCache::ring(&Config::iha(2, 2, 8), 1, 1, DType::F32), Err(Error::Cache { .. })));
    let right = Config::iha(2, 2, 8).with_causal(false).with_window(4, 2);
    assert!(matches!(KvCache::ring(&right, 1, 1, DType::F32), Err(Error::Cache { .. })));
}

/// A long prompt appended whole to a ring keeps its last `capacity` tokens, and decoding right
/// after it is still exact.
#[test]
fn long_prompt_into_a_ring() {
    let mut s = fixed(Method::IhaLocal, Some(PosMode::Token));
    s.prompts = vec![17, 9];
    let cpu = CpuBackend::new();
    assert_close(&s, &run_scenario(&s, &cpu, Via::Api(&cpu), Control::None), "long prompt");
}

/// Long sequences: the CPU's default split (64-token chunks) really cuts them into several chunks.
#[test]
fn long_sequences_split_into_default_chunks() {
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::MeaCompressed] {
        let mut s = fixed(kind, Some(PosMode::Virtual));
        s.prompts = vec![150, 70];
        assert_close(&s, &run_scenario(&s, &cpu, Via::Api(&cpu), Control::None), "long");
    }
}

/// A slot of the batch is cleared and refilled with a new sequence while the other goes on.
#[test]
fn clearing_one_sequence_leaves_the_others() {
    let Small { cfg, w, mut cache } = small();
    let before = cache.sequence(1).unwrap().0.to_f32();
    cache.clear_seq(0).unwrap();
    assert_eq!(cache.lens(), &[0, 3]);
    assert!(matches!(cache.clear_seq(2), Err(Error::Cache { .. })));
    let kv = Rng::new(8).normal_vec(2 * 2 * 4, 1.0);
    cache.append_seq(0, &Tensor::new(&kv, &[2, 2, 4]), &Tensor::new(&kv, &[2, 2, 4])).unwrap();
    assert_eq!(cache.lens(), &[2, 3]);
    assert_eq!(cache.sequence(0).unwrap().0.to_f32(), kv);
    assert_eq!(cache.sequence(1).unwrap().0.to_f32(), before);
    let (res, _) = try_decode(&cfg, &w, &cache, &[2, 2, 2, 4], &[2, 2, 2, 4], 2 * 2 * 2 * 2);
    assert!(res.is_ok(), "{res:?}");
}

/// Negative controls: new tokens cached out of order, and a perturbed cached element, are caught.
#[test]
fn negative_controls_decode_comparison_fails() {
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::IhaLocal, Method::Mea, Method::MeaCompressed, Method::Gqa] {
        let s = fixed(kind, Some(PosMode::Virtual));
        let tol = tolerance(s.dtype);
        let reversed = run_scenario(&s, &cpu, Via::Api(&cpu), Control::ReverseStep);
        assert!(reversed.out > 100.0 * tol, "{kind:?}: tokens out of order went unnoticed ({reversed:?})");
        let perturbed = run_scenario(&s, &cpu, Via::Split(2), Control::PerturbCache);
        assert!(perturbed.out > 100.0 * tol, "{kind:?}: a perturbed cache went unnoticed ({perturbed:?})");
        // And the same scenario uncontrolled passes.
        assert_close(&s, &run_scenario(&s, &cpu, Via::Api(&cpu), Control::None), "uncontrolled");
    }
}

/// A device backend that has nothing but `run` (here: the CPU's, under another kind), as wgpu and
/// CUDA are before they get decode kernels; counts its `run` calls.
struct RunOnly {
    cpu: CpuBackend,
    runs: std::sync::atomic::AtomicUsize,
}

impl Backend for RunOnly {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device_name(&self) -> String {
        "run-only test backend".into()
    }
    fn describe(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn run(&self, problem: &Problem, w: &Weights, io: Io<'_>) -> headmix::Result<()> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cpu.run(problem, w, io)
    }
}

/// Any backend decodes through the trait's default: one `run` per sequence per decode call.
#[test]
fn every_backend_decodes_through_the_default() {
    for kind in [Method::Iha, Method::IhaLocal, Method::MeaCompressed] {
        let s = fixed(kind, Some(PosMode::Virtual));
        let dev = RunOnly { cpu: CpuBackend::new(), runs: Default::default() };
        assert_close(&s, &run_scenario(&s, &dev, Via::Api(&dev), Control::None), "run-only backend");
        let runs = dev.runs.load(std::sync::atomic::Ordering::Relaxed);
        // One prefill forward and one run per decode step, per sequence.
        assert_eq!(runs, s.batch() * (1 + s.steps.len()), "{kind:?}");
    }
}

/// The same scenarios on the wgpu backend (its inherited generic decode), kept small for lavapipe.
#[test]
fn prefill_decode_wgpu() {
    let Some(gpu) = device_or_skip(BackendKind::Wgpu, "prefill_decode_wgpu") else { return };
    for kind in [Method::Iha, Method::IhaLocal, Method::Mea, Method::MeaCompressed, Method::Gqa] {
        for rope in [None, Some(PosMode::Virtual)] {
            let mut s = fixed(kind, rope);
            s.steps.truncate(4);
            assert_close(&s, &run_scenario(&s, gpu.as_ref(), Via::Api(gpu.as_ref()), Control::None), "wgpu");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Flash-decoding: split + log-sum-exp combine equals the unsplit operator.

#[derive(Clone, Debug)]
struct SplitCase {
    params: Params,
    collapse: bool,
    norm: bool,
    chunk: usize,
    seed: u64,
}

fn split_case() -> impl Strategy<Value = SplitCase> {
    (
        (1usize..=2, 1usize..=4, 0usize..=20),
        (1usize..=3, 1usize..=3, 1usize..=3, 1usize..=3),
        prop::sample::select(vec![2usize, 4, 8]),
        (any::<bool>(), prop::option::of((0usize..=12, 0usize..=6)), rope(), 0usize..=30),
        (any::<bool>(), any::<bool>()),
        1usize..=24,
        any::<u64>(),
    )
        .prop_map(
            |((b, n, extra), (h, hq, hk, p), d, (causal, window, rope, pos0), (collapse, norm), chunk, seed)| {
                let mut params = Params::new(b, n, n + extra, hq, hk, h, p, d);
                params.causal = causal;
                params.window = window;
                params.rope = rope.map(|mode| RefRope { base: 10000.0, mode });
                params.pos0 = pos0;
                SplitCase { params, collapse, norm, chunk, seed }
            },
        )
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    aq: Vec<f64>,
    ak: Vec<f64>,
    av: Vec<f64>,
    r: Option<Vec<f64>>,
    norm: Option<HeadNorm<Vec<f64>>>,
}

impl Inputs {
    fn new(c: &SplitCase) -> Inputs {
        let p = &c.params;
        let mut rng = Rng::new(c.seed);
        let mut x = |len: usize| normals(&mut rng, len, 1.0);
        Inputs {
            q: x(p.b * p.n * p.hq * p.d),
            k: x(p.b * p.m * p.hk * p.d),
            v: x(p.b * p.m * p.hk * p.d),
            aq: x(p.hq * p.h * p.p),
            ak: x(p.hk * p.h * p.p),
            av: x(p.hk * p.h * p.p),
            r: c.collapse.then(|| x(p.h * p.h * p.p)),
            norm: c.norm.then(|| HeadNorm::Group { gamma: x(p.h * p.d), beta: x(p.h * p.d) }),
        }
    }

    fn mix(&self) -> MixWeights<'_, f64> {
        let norm = self.norm.as_ref().map(|n| n.as_slices());
        MixWeights { aq: &self.aq, ak: &self.ak, av: &self.av, r: self.r.as_deref(), norm }
    }
}

fn lse_matches(got: &[f64], want: &[f64], tol: f64) -> bool {
    got.iter()
        .zip(want)
        .all(|(&g, &w)| if w == f64::NEG_INFINITY { g == w } else { (g - w).abs() <= tol * (1.0 + w.abs()) })
}

#[test]
fn split_combine_equals_unsplit() {
    check_property("split + combine", 64, split_case(), |c| {
        let inp = Inputs::new(&c);
        let want = reference::attention(&c.params, &inp.q, &inp.k, &inp.v, &inp.mix());
        let got = split::attention(&c.params, &inp.q, &inp.k, &inp.v, &inp.mix(), c.chunk);
        let err = rel_err(&got.out, &want.out);
        assert!(err < 1e-11, "split into chunks of {}: rel err {err:.3e} ({c:?})", c.chunk);
        assert!(lse_matches(&got.lse, &want.lse, 1e-11), "lse differs ({c:?})");
    });
}

/// A chunk the window hides entirely has `lse = -inf` and weighs nothing in the combine.
#[test]
fn split_chunks_outside_the_window_weigh_nothing() {
    let mut params = Params::new(1, 1, 12, 2, 2, 2, 2, 4);
    params.causal = true;
    params.window = Some((3, 0));
    let c = SplitCase { params, collapse: true, norm: false, chunk: 4, seed: 9 };
    let inp = Inputs::new(&c);
    let p = &c.params;
    let first = split::chunk(p, &inp.q, &inp.k, &inp.v, &inp.mix(), 0..4);
    assert!(first.lse.iter().all(|&l| l == f64::NEG_INFINITY), "the window hides tokens 0..4");
    assert!(first.o.iter().all(|&o| o == 0.0));
    let want = reference::attention(p, &inp.q, &inp.k, &inp.v, &inp.mix());
    let got = split::attention(p, &inp.q, &inp.k, &inp.v, &inp.mix(), 4);
    assert!(rel_err(&got.out, &want.out) < 1e-12);
}

/// Negative control: combining the partials by a plain average (ignoring their lse) is wrong, and
/// the comparison sees it.
#[test]
fn negative_control_naive_combine_fails() {
    let mut params = Params::new(1, 2, 16, 2, 2, 2, 2, 8);
    params.causal = true;
    let c = SplitCase { params, collapse: true, norm: false, chunk: 5, seed: 3 };
    let inp = Inputs::new(&c);
    let p = &c.params;
    let parts: Vec<split::Partial<f64>> =
        (0..p.m).step_by(5).map(|s| split::chunk(p, &inp.q, &inp.k, &inp.v, &inp.mix(), s..(s + 5).min(p.m))).collect();
    let mut naive = parts[0].clone();
    for r in 0..naive.lse.len() {
        let live: Vec<&split::Partial<f64>> = parts.iter().filter(|c| c.lse[r] != f64::NEG_INFINITY).collect();
        for t in 0..p.d {
            naive.o[r * p.d + t] = live.iter().map(|c| c.o[r * p.d + t]).sum::<f64>() / live.len() as f64;
        }
    }
    let want = reference::attention(p, &inp.q, &inp.k, &inp.v, &inp.mix());
    let bad = split::finish(p, &naive, &inp.mix());
    assert!(rel_err(&bad.out, &want.out) > 1e-3, "a naive combine went unnoticed");
    let good = split::finish(p, &split::combine(&parts), &inp.mix());
    assert!(rel_err(&good.out, &want.out) < 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Typed errors: nothing written, nothing corrupted.

const SENTINEL: f32 = 7.25;

struct Small {
    cfg: Config,
    w: Weights,
    cache: KvCache,
}

/// IHA, H = 2, P = 2, d = 4, batch 2, linear capacity 4, 3 tokens held.
fn small() -> Small {
    let cfg = Config::iha(2, 2, 4).with_rope(Rope::default());
    let w = Weights::random(&cfg, 1);
    let mut cache = KvCache::for_config(&cfg, 2, 4, DType::F32).unwrap();
    let mut rng = Rng::new(2);
    let k = rng.normal_vec(2 * 3 * 2 * 4, 1.0);
    let v = rng.normal_vec(2 * 3 * 2 * 4, 1.0);
    cache.append(&Tensor::new(&k, &[2, 3, 2, 4]), &Tensor::new(&v, &[2, 3, 2, 4])).unwrap();
    Small { cfg, w, cache }
}

/// Decode `n` new queries of `q_shape` into an output of `out_shape` filled with a sentinel;
/// returns the result and whether the output (and lse) were left untouched.
fn try_decode(
    cfg: &Config,
    w: &Weights,
    cache: &KvCache,
    q_shape: &[usize],
    out_shape: &[usize],
    lse_len: usize,
) -> (headmix::Result<()>, bool) {
    let q = Rng::new(5).normal_vec(q_shape.iter().product(), 1.0);
    let mut out = vec![SENTINEL; out_shape.iter().product()];
    let mut lse = vec![SENTINEL; lse_len];
    let io =
        DecodeIo { q: Tensor::new(&q, q_shape), cache, out: TensorMut::new(&mut out, out_shape), lse: Some(&mut lse) };
    let res = headmix::decode(&CpuBackend::new(), cfg, w, io);
    let untouched = out.iter().chain(&lse).all(|&x| x == SENTINEL);
    (res, untouched)
}

#[test]
fn decode_errors_are_typed_and_write_nothing() {
    let Small { cfg, w, cache } = small();
    // The valid call works and writes everything (the control of the checks below).
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[2, 1, 2, 4], &[2, 1, 2, 4], 2 * 2 * 2);
    assert!(res.is_ok() && !untouched, "{res:?}");

    // Wrong layer: a cache of another Hk or d.
    let other = Config::iha(2, 2, 6);
    let (res, untouched) = try_decode(&other, &Weights::random(&other, 1), &cache, &[2, 1, 2, 6], &[2, 1, 2, 6], 8);
    assert!(matches!(res, Err(Error::Cache { .. })) && untouched, "{res:?}");
    let gqa = Config::gqa(2, 1, 4).unwrap().with_causal(true);
    let (res, untouched) = try_decode(&gqa, &Weights::random(&gqa, 1), &cache, &[2, 1, 2, 4], &[2, 1, 2, 4], 4);
    assert!(matches!(res, Err(Error::Cache { .. })) && untouched, "{res:?}");
    // Queries of another batch, another head count; an output of the wrong shape; lse too short.
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[1, 1, 2, 4], &[2, 1, 2, 4], 8);
    assert!(matches!(res, Err(Error::Shape { .. })) && untouched, "{res:?}");
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[2, 1, 3, 4], &[2, 1, 2, 4], 8);
    assert!(matches!(res, Err(Error::Shape { .. })) && untouched, "{res:?}");
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[2, 1, 2, 4], &[2, 1, 2, 2, 4], 8);
    assert!(matches!(res, Err(Error::Shape { .. })) && untouched, "{res:?}");
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[2, 1, 2, 4], &[2, 1, 2, 4], 7);
    assert!(matches!(res, Err(Error::Length { .. })) && untouched, "{res:?}");
    // More new tokens than the cache holds.
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[2, 4, 2, 4], &[2, 4, 2, 4], 32);
    assert!(matches!(res, Err(Error::QueryLongerThanKeys { n: 4, m: 3 })) && untouched, "{res:?}");
    // Bad weights.
    let mut nan = w.clone();
    nan.ak[1] = f32::NAN;
    let (res, untouched) = try_decode(&cfg, &nan, &cache, &[2, 1, 2, 4], &[2, 1, 2, 4], 8);
    assert!(matches!(res, Err(Error::NonFinite { .. })) && untouched, "{res:?}");
    // Query dtype other than the cache's.
    let q = vec![half::bf16::ONE; 2 * 2 * 4];
    let mut out = vec![SENTINEL; 2 * 2 * 4];
    let io = DecodeIo {
        q: Tensor::new(&q, &[2, 1, 2, 4]),
        cache: &cache,
        out: TensorMut::new(&mut out, &[2, 1, 2, 4]),
        lse: None,
    };
    assert!(matches!(headmix::decode(&CpuBackend::new(), &cfg, &w, io), Err(Error::DType { .. })));
    assert!(out.iter().all(|&x| x == SENTINEL));
}

#[test]
fn ring_decode_of_more_than_its_room_is_refused() {
    let cfg = Config::iha_window(2, 2, 4, 2); // left = 3 virtual: reaches 2 tokens back
    let w = Weights::random(&cfg, 1);
    let mut cache = KvCache::ring(&cfg, 1, 2, DType::F32).unwrap(); // capacity 2 + 2
    let kv = Rng::new(1).normal_vec(3 * 2 * 4, 1.0);
    cache.append(&Tensor::new(&kv, &[1, 3, 2, 4]), &Tensor::new(&kv, &[1, 3, 2, 4])).unwrap();
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[1, 3, 2, 4], &[1, 3, 2, 4], 2 * 3 * 2);
    assert!(matches!(res, Err(Error::Cache { .. })) && untouched, "{res:?}");
    let (res, untouched) = try_decode(&cfg, &w, &cache, &[1, 2, 2, 4], &[1, 2, 2, 4], 2 * 2 * 2);
    assert!(res.is_ok() && !untouched, "{res:?}");
}

#[test]
fn append_errors_are_typed_and_leave_the_cache_intact() {
    let Small { cfg, w, mut cache } = small();
    let before = cache.sequence(0).unwrap().0.to_f32();
    let kv = Rng::new(3).normal_vec(2 * 2 * 2 * 4, 1.0);
    // Overflow: 3 held + 2 > capacity 4 (and per sequence).
    let err = cache.append(&Tensor::new(&kv, &[2, 2, 2, 4]), &Tensor::new(&kv, &[2, 2, 2, 4]));
    assert!(matches!(err, Err(Error::Cache { .. })), "{err:?}");
    let err = cache.append_seq(1, &Tensor::new(&kv[..16], &[2, 2, 4]), &Tensor::new(&kv[..16], &[2, 2, 4]));
    assert!(matches!(err, Err(Error::Cache { .. })), "{err:?}");
    // Wrong head count, head dim, batch, dtype, lengths; a sequence out of range; nothing.
    let bad_shape = cache.append(&Tensor::new(&kv[..16], &[2, 1, 1, 8]), &Tensor::new(&kv[..16], &[2, 1, 1, 8]));
    assert!(matches!(bad_shape, Err(Error::Shape { .. })), "{bad_shape:?}");
    let bad_batch = cache.append(&Tensor::new(&kv[..8], &[1, 1, 2, 4]), &Tensor::new(&kv[..8], &[1, 1, 2, 4]));
    assert!(matches!(bad_batch, Err(Error::Shape { .. })), "{bad_batch:?}");
    let k16 = vec![half::f16::ONE; 16];
    let bad_dtype = cache.append(&Tensor::new(&k16, &[2, 1, 2, 4]), &Tensor::new(&k16, &[2, 1, 2, 4]));
    assert!(matches!(bad_dtype, Err(Error::DType { .. })), "{bad_dtype:?}");
    let bad_len = cache.append(&Tensor::new(&kv[..15], &[2, 1, 2, 4]), &Tensor::new(&kv[..15], &[2, 1, 2, 4]));
    assert!(matches!(bad_len, Err(Error::Length { .. })), "{bad_len:?}");
    let mismatched = cache.append(&Tensor::new(&kv[..16], &[2, 1, 2, 4]), &Tensor::new(&kv[..24], &[2, 1, 3, 4]));
    assert!(matches!(mismatched, Err(Error::Shape { .. })), "{mismatched:?}");
    let bad_seq = cache.append_seq(2, &Tensor::new(&kv[..8], &[1, 2, 4]), &Tensor::new(&kv[..8], &[1, 2, 4]));
    assert!(matches!(bad_seq, Err(Error::Cache { .. })), "{bad_seq:?}");
    let empty = cache.append(&Tensor::new(&kv[..0], &[2, 0, 2, 4]), &Tensor::new(&kv[..0], &[2, 0, 2, 4]));
    assert!(matches!(empty, Err(Error::Empty { .. })), "{empty:?}");
    // Nothing changed; one more token still fits and decodes.
    assert_eq!(cache.lens(), &[3, 3]);
    assert_eq!(cache.sequence(0).unwrap().0.to_f32(), before);
    cache.append(&Tensor::new(&kv[..16], &[2, 1, 2, 4]), &Tensor::new(&kv[..16], &[2, 1, 2, 4])).unwrap();
    assert_eq!(cache.lens(), &[4, 4]);
    let (res, _) = try_decode(&cfg, &w, &cache, &[2, 1, 2, 4], &[2, 1, 2, 4], 8);
    assert!(res.is_ok(), "{res:?}");
}

/// The ring cache keeps what IHA-local's window `(W·P − 1, 0)` can reach: `W` past tokens for
/// `P > 1`, `W − 1` for `P = 1` (a window of `W` tokens, the query's own included).
#[test]
fn ring_window_tokens_follow_iha_local() {
    for (p, n) in [(1, 40), (2, 40), (3, 90), (4, 70), (2, 3)] {
        let cfg = Config::iha_local(2, p, 8, n).unwrap();
        let w = Config::iha_local_tokens(p, n).unwrap();
        let want = if p == 1 { w - 1 } else { w };
        assert_eq!(window_tokens(&cfg), Some(want), "P = {p}, N = {n}, W = {w}");
        let ring = KvCache::ring(&cfg, 1, 2, DType::F32).unwrap();
        assert_eq!(ring.layout(), CacheLayout::Ring { window_tokens: want });
    }
}

#[test]
fn cache_stack_checks_each_layer() {
    let global = Config::iha(2, 2, 8);
    let local = Config::iha_window(2, 2, 8, 3);
    let cfgs = [local, local, global];
    let mut stack = KvCacheStack::new(&cfgs, 2, 64, 1, DType::BF16).unwrap();
    assert_eq!(stack.len(), 3);
    assert_eq!(stack.layer(0, &local).unwrap().layout(), CacheLayout::Ring { window_tokens: 3 });
    assert_eq!(stack.layer(2, &global).unwrap().layout(), CacheLayout::Linear);
    // The global layer's cache given to... the global configuration is fine; a ring to a global
    // layer, or a layer of another head dim, is refused; so is a layer that does not exist.
    assert!(matches!(stack.layer(0, &global), Err(Error::Cache { .. })));
    assert!(matches!(stack.layer(2, &Config::iha(2, 2, 16)), Err(Error::Cache { .. })));
    assert!(matches!(stack.layer_mut(3, &global), Err(Error::Cache { .. })));
    assert!(stack.layer_mut(1, &local).is_ok());
    // Bytes: two rings of 3 + 1 tokens and one linear cache of 64 tokens, bf16 keys and values.
    assert_eq!(stack.bytes(), 2 * (2 * 2 * 4 * 2 * 8 * 2) + 2 * 2 * 64 * 2 * 8 * 2);
}

// ---------------------------------------------------------------------------------------------
// Cache-size accounting.

#[test]
fn cache_bytes_headmix_against_unfused() {
    let (b, t) = (3, 1000);
    // IHA: the unfused cache holds H·P mixed heads, P times the H source heads.
    let iha = Config::iha(8, 4, 64);
    let c = cache_bytes(&iha, b, t, DType::BF16);
    assert_eq!(c.headmix, 2 * b * t * 8 * 64 * 2);
    assert_eq!(c.unfused, 4 * c.headmix);
    assert_eq!(c.ratio(), 4.0);
    // MEA compressed: H / Hk.
    let mea = Config::mea_compressed(16, 4, 128).unwrap();
    let c = cache_bytes(&mea, b, t, DType::F16);
    assert_eq!(c.headmix, 2 * b * t * 4 * 128 * 2);
    assert_eq!(c.ratio(), 4.0);
    // MEA dense, GQA, MHA: no saving (GQA's unfused cache already holds only its G heads).
    assert_eq!(cache_bytes(&Config::mea(8, 64), b, t, DType::F32).ratio(), 1.0);
    assert_eq!(cache_bytes(&Config::gqa(8, 2, 64).unwrap(), b, t, DType::F32).ratio(), 1.0);
    assert_eq!(cache_bytes(&Config::mha(8, 64), b, t, DType::F32).ratio(), 1.0);
    // headmix's figure is what a cache of that many tokens really allocates.
    for cfg in [iha, mea, Config::gqa(8, 2, 64).unwrap()] {
        let cache = KvCache::for_config(&cfg, b, t, DType::BF16).unwrap();
        assert_eq!(cache.bytes(), cache_bytes(&cfg, b, t, DType::BF16).headmix, "{cfg:?}");
    }
    // A ring holds ceil(left/P) + max_new tokens however long the sequence.
    let local = Config::iha_window(8, 4, 64, 16);
    let ring = KvCache::ring(&local, b, 1, DType::BF16).unwrap();
    assert_eq!(ring.bytes(), cache_bytes(&local, b, 17, DType::BF16).headmix);
}

// ---------------------------------------------------------------------------------------------
// Device-resident caches (wgpu): the decode kernel reads the cache in place.

use headmix::backends::wgpu::WgpuBackend;
use headmix::cache::{CacheShape, HostTraffic};

/// The wgpu backend with `splits` forced cache splits (`None`: the heuristic), or `None` (skip).
fn wgpu_or_skip(test: &str, splits: Option<u32>) -> Option<WgpuBackend> {
    device_or_skip(BackendKind::Wgpu, test)?;
    Some(WgpuBackend::new().expect("wgpu opened once already").with_kv_splits(splits))
}

/// Every kind, ragged prompts, random dtype / RoPE / head dims, a random number of cache splits:
/// prefill on the CPU, decode on a wgpu cache equals the reference over the whole sequences.
#[test]
fn prefill_decode_wgpu_device_cache() {
    let Some(gpu) = wgpu_or_skip("prefill_decode_wgpu_device_cache", None) else { return };
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::IhaLocal, Method::Mea, Method::MeaCompressed, Method::Gqa, Method::Mha] {
        let name = format!("wgpu device-cache decode {kind:?}");
        check_property(&name, 4, (scenario(kind), 0usize..=4), |(s, splits)| {
            let dev = gpu_splits(&gpu, splits);
            let errs = run_scenario_on(&s, &cpu, Via::Api(&dev), Control::None, Some(&dev));
            assert_close(&s, &errs, &format!("wgpu device cache, splits {splits}"));
        });
    }
}

/// The backend with a forced split count (0: the heuristic) on the same device.
fn gpu_splits(gpu: &WgpuBackend, splits: usize) -> WgpuBackend {
    gpu.fork().with_kv_splits((splits > 0).then_some(splits as u32))
}

/// Every dtype on fixed scenarios of every kind, and a long IHA-local generation whose ring
/// wraps many times; split combine equals a single split.
#[test]
fn wgpu_device_decode_fixed_scenarios() {
    let Some(gpu) = wgpu_or_skip("wgpu_device_decode_fixed_scenarios", None) else { return };
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::IhaLocal, Method::Mea, Method::MeaCompressed, Method::Gqa, Method::Mha] {
        for (dtype, splits) in [(DType::F32, 1), (DType::F32, 3), (DType::F16, 2), (DType::BF16, 0)] {
            {
                let mut s = fixed(kind, Some(PosMode::Virtual));
                s.dtype = dtype;
                let dev = gpu_splits(&gpu, splits);
                let errs = run_scenario_on(&s, &cpu, Via::Api(&dev), Control::None, Some(&dev));
                assert_close(&s, &errs, &format!("{kind:?} {dtype:?} splits {splits}"));
            }
        }
    }
    // IHA local: 40 decode steps through a ring of ceil(left / P) + 3 tokens.
    let mut s = fixed(Method::IhaLocal, Some(PosMode::Virtual));
    s.steps = (0..30).map(|i| 1 + i % 3).collect();
    let cap = s.cache().shape().capacity;
    assert!(s.len(0) > 10 * cap, "the ring wraps many times ({} tokens, capacity {cap})", s.len(0));
    let errs = run_scenario_on(&s, &cpu, Via::Api(&gpu), Control::None, Some(&gpu));
    assert_close(&s, &errs, "long ring");
}

/// Negative controls on the device path: a perturbed cache and reversed appends are caught.
#[test]
fn negative_controls_wgpu_device_decode() {
    let Some(gpu) = wgpu_or_skip("negative_controls_wgpu_device_decode", None) else { return };
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::IhaLocal, Method::MeaCompressed] {
        let s = fixed(kind, Some(PosMode::Virtual));
        for control in [Control::PerturbCache, Control::ReverseStep] {
            let errs = run_scenario_on(&s, &cpu, Via::Api(&gpu), control, Some(&gpu));
            assert!(errs.out > tolerance(s.dtype), "{kind:?} {control:?}: the broken decode passed ({:.3e})", errs.out);
        }
    }
}

fn owned_bytes(o: &Owned) -> Vec<u8> {
    o.tensor(&[owned_len(o)]).data.bytes().to_vec()
}

fn owned_len(o: &Owned) -> usize {
    match o {
        Owned::F32(x) => x.len(),
        Owned::F16(x) => x.len(),
        Owned::BF16(x) => x.len(),
    }
}

/// Held tokens of every sequence, byte for byte.
fn held_bytes(c: &KvCache) -> Vec<Vec<u8>> {
    (0..c.shape().batch)
        .flat_map(|b| {
            let (k, v) = c.sequence(b).unwrap();
            [owned_bytes(&k), owned_bytes(&v)]
        })
        .collect()
}

/// Device append (from host tensors, and device to device from buffers) equals host append
/// byte for byte: ragged prefill, batched steps, a ring wrapping many times, every dtype.
#[test]
fn wgpu_device_append_equals_host_append() {
    let Some(gpu) = wgpu_or_skip("wgpu_device_append_equals_host_append", None) else { return };
    let local = Config::iha_window(2, 2, 8, 3); // ring of 3 + max_new tokens
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for cfg in [Config::iha(2, 2, 8), local] {
            let (b, hk, d) = (3, cfg.kv_heads, cfg.head_dim);
            let make = |on: Option<&dyn Backend>| match (cfg.window.is_some(), on) {
                (true, Some(on)) => KvCache::ring_on(on, &cfg, b, 4, dtype).unwrap(),
                (true, None) => KvCache::ring(&cfg, b, 4, dtype).unwrap(),
                (false, Some(on)) => KvCache::for_config_on(on, &cfg, b, 64, dtype).unwrap(),
                (false, None) => KvCache::for_config(&cfg, b, 64, dtype).unwrap(),
            };
            let (mut host, mut dev, mut d2d) = (make(None), make(Some(&gpu)), make(Some(&gpu)));
            assert_eq!(dev.location(), BackendKind::Wgpu);
            let mut rng = Rng::new(7);
            let mut draw = |len: usize| Owned::from_f32(dtype, &rng.normal_vec(len, 1.0));
            let buffer = |o: &Owned| gpu.upload_tensor(o.tensor(&[owned_len(o)]).data).unwrap();
            // Ragged prefill, per sequence.
            for seq in 0..b {
                let n = [5, 1, 12][seq];
                let (k, v) = (draw(n * hk * d), draw(n * hk * d));
                let shape = [n, hk, d];
                host.append_seq(seq, &k.tensor(&shape), &v.tensor(&shape)).unwrap();
                dev.append_seq(seq, &k.tensor(&shape), &v.tensor(&shape)).unwrap();
                gpu.append_seq_buffers(&mut d2d, seq, &buffer(&k), &buffer(&v), n).unwrap();
            }
            // Batched steps of 1..=4 tokens.
            for step in 0..14 {
                let n = 1 + step % 4;
                let (k, v) = (draw(b * n * hk * d), draw(b * n * hk * d));
                let shape = [b, n, hk, d];
                host.append(&k.tensor(&shape), &v.tensor(&shape)).unwrap();
                dev.append(&k.tensor(&shape), &v.tensor(&shape)).unwrap();
                gpu.append_buffers(&mut d2d, &buffer(&k), &buffer(&v), n).unwrap();
            }
            assert_eq!(host.lens(), dev.lens());
            assert_eq!(host.lens(), d2d.lens());
            let want = held_bytes(&host);
            assert_eq!(held_bytes(&dev), want, "{dtype:?} {cfg:?}: host-tensor append");
            assert_eq!(held_bytes(&d2d), want, "{dtype:?} {cfg:?}: device-to-device append");
            // The device-to-device path uploaded nothing; reading back is counted.
            let t = d2d.host_traffic();
            assert_eq!(t.uploaded, 0);
            assert!(t.downloaded > 0);
        }
    }
}

/// A decode on a device cache moves no cache byte between host and device: the cache's own
/// counter does not move, and the backend's traffic per call does not depend on the cache length.
#[test]
fn wgpu_device_decode_moves_no_cache_bytes() {
    let Some(gpu) = wgpu_or_skip("wgpu_device_decode_moves_no_cache_bytes", None) else { return };
    let cfg = Config::iha(2, 2, 16);
    let w = Weights::random(&cfg, 3);
    let (hk, d) = (cfg.kv_heads, cfg.head_dim);
    let mut per_call = Vec::new();
    for len in [8usize, 300] {
        let mut cache = KvCache::for_config_on(&gpu, &cfg, 1, len, DType::F32).unwrap();
        let kv = Rng::new(1).normal_vec(len * hk * d, 1.0);
        cache.append(&Tensor::new(&kv, &[1, len, hk, d]), &Tensor::new(&kv, &[1, len, hk, d])).unwrap();
        let before = (cache.host_traffic(), gpu.host_traffic());
        let q = Rng::new(2).normal_vec(hk * d, 1.0);
        let mut out = vec![f32::NAN; 2 * d];
        let io = DecodeIo {
            q: Tensor::new(&q, &[1, 1, 2, d]),
            cache: &cache,
            out: TensorMut::new(&mut out, &[1, 1, 2, d]),
            lse: None,
        };
        headmix::decode(&gpu, &cfg, &w, io).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        let after = (cache.host_traffic(), gpu.host_traffic());
        assert_eq!(after.0, before.0, "the cache's own host traffic moved during decode");
        let moved = HostTraffic {
            uploaded: after.1.uploaded - before.1.uploaded,
            downloaded: after.1.downloaded - before.1.downloaded,
        };
        assert!(moved.uploaded + moved.downloaded < (cache.bytes() as u64).max(1), "{moved:?}");
        per_call.push(moved);
    }
    assert_eq!(per_call[0], per_call[1], "decode traffic depends on the cache length");
    // Negative control: the counters do see a read-back of the cache.
    let mut cache = KvCache::for_config_on(&gpu, &cfg, 1, 4, DType::F32).unwrap();
    let kv = vec![0.5f32; 4 * hk * d];
    cache.append(&Tensor::new(&kv, &[1, 4, hk, d]), &Tensor::new(&kv, &[1, 4, hk, d])).unwrap();
    let before = cache.host_traffic();
    cache.sequence(0).unwrap();
    assert!(cache.host_traffic().downloaded > before.downloaded);
}

/// Misuse of a device cache is a typed error that writes nothing: another backend, the wrong
/// layer, overflow.
#[test]
fn wgpu_device_cache_errors() {
    let Some(gpu) = wgpu_or_skip("wgpu_device_cache_errors", None) else { return };
    let cfg = Config::iha(2, 2, 8);
    let w = Weights::random(&cfg, 1);
    let mut cache = KvCache::for_config_on(&gpu, &cfg, 1, 4, DType::F32).unwrap();
    let kv = vec![0.25f32; 3 * 2 * 8];
    cache.append(&Tensor::new(&kv, &[1, 3, 2, 8]), &Tensor::new(&kv, &[1, 3, 2, 8])).unwrap();
    let q = vec![0.5f32; 16];
    let mut out = vec![f32::NAN; 16];
    fn io<'a>(q: &'a [f32], cache: &'a KvCache, out: &'a mut [f32]) -> DecodeIo<'a> {
        DecodeIo { q: Tensor::new(q, &[1, 1, 2, 8]), cache, out: TensorMut::new(out, &[1, 1, 2, 8]), lse: None }
    }
    // The CPU backend (and the host split path) refuse a device cache.
    let e = headmix::decode(&CpuBackend::new(), &cfg, &w, io(&q, &cache, &mut out)).unwrap_err();
    assert!(matches!(e, Error::Cache { .. }), "{e}");
    let e = decode_split(&cfg, &w, io(&q, &cache, &mut out), 2).unwrap_err();
    assert!(matches!(e, Error::Cache { .. }), "{e}");
    assert!(out.iter().all(|x| x.is_nan()), "an output was written");
    // The wrong layer.
    let other = Config::iha(2, 2, 16);
    let e = headmix::decode(&gpu, &other, &Weights::random(&other, 1), io(&q, &cache, &mut out)).unwrap_err();
    assert!(matches!(e, Error::Cache { .. } | Error::Shape { .. }), "{e}");
    // Overflow: 2 more tokens into 1 free slot; nothing written.
    let before = held_bytes(&cache);
    let two = vec![9.0f32; 2 * 2 * 8];
    let e = cache.append(&Tensor::new(&two, &[1, 2, 2, 8]), &Tensor::new(&two, &[1, 2, 2, 8])).unwrap_err();
    assert!(matches!(e, Error::Cache { .. }), "{e}");
    assert_eq!(cache.len(0).unwrap(), 3);
    assert_eq!(held_bytes(&cache), before);
    // Still usable afterwards.
    headmix::decode(&gpu, &cfg, &w, io(&q, &cache, &mut out)).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}

/// B = 8 sequences of 128k tokens with 32 stored heads of d = 128 (2^32 elements per tensor,
/// above 2^31) pass the cache's checks without allocating: kernels index one sequence with 32
/// bits and the sequence base with 64. One sequence beyond 2^31 elements is refused.
#[test]
fn b8_at_128k_builds() {
    let shape = CacheShape { batch: 8, capacity: 128 * 1024, kv_heads: 32, head_dim: 128, dtype: DType::BF16 };
    assert!(shape.elements() > i32::MAX as u128);
    shape.check().unwrap();
    let too_long = CacheShape { capacity: 1 << 20, ..shape };
    assert!(matches!(too_long.check(), Err(Error::TooLarge { .. })));
}

/// The decode timer of the benchmark: one device time per repetition, and the counted cache
/// bytes per call equal the stored-head cache size (each held token read once, for all heads).
#[test]
fn wgpu_time_decode_counts_the_cache_once() {
    let Some(gpu) = wgpu_or_skip("wgpu_time_decode_counts_the_cache_once", None) else { return };
    let cfg = Config::iha(2, 2, 16);
    let w = Weights::random(&cfg, 5);
    let (b, len) = (2, 40);
    let mut cache = KvCache::for_config_on(&gpu, &cfg, b, len, DType::BF16).unwrap();
    let kv = Owned::from_f32(DType::BF16, &Rng::new(3).normal_vec(b * len * 2 * 16, 1.0));
    cache.append(&kv.tensor(&[b, len, 2, 16]), &kv.tensor(&[b, len, 2, 16])).unwrap();
    let t = gpu.time_decode(&cfg, &w, &cache, 1, 3).unwrap();
    assert_eq!(t.timing.seconds.len(), 3);
    assert!(t.timing.seconds.iter().all(|s| s.is_finite() && *s >= 0.0), "{t:?}");
    assert_eq!(t.cache_bytes_read as usize, cache_bytes(&cfg, b, len, DType::BF16).headmix);
    // The CPU's host-clock timer counts the same bytes on a host cache.
    let host = cache.to_host().unwrap();
    let t = CpuBackend::new().time_decode(&cfg, &w, &host, 1, 2).unwrap();
    assert_eq!((t.timing.seconds.len(), t.timing.clock), (2, "wall clock"));
    assert_eq!(t.cache_bytes_read as usize, cache_bytes(&cfg, b, len, DType::BF16).headmix);
    // A window reads only its band: 3 tokens back plus the new one.
    let local = Config::iha_window(2, 2, 16, 3);
    let mut ring = KvCache::for_config_on(&gpu, &local, b, len, DType::BF16).unwrap();
    ring.append(&kv.tensor(&[b, len, 2, 16]), &kv.tensor(&[b, len, 2, 16])).unwrap();
    let bytes = gpu.time_decode(&local, &Weights::random(&local, 5), &ring, 1, 1).unwrap().cache_bytes_read;
    let band = window_tokens(&local).unwrap() + 1;
    assert_eq!(bytes as usize, cache_bytes(&local, b, band, DType::BF16).headmix);
}

/// The same scenarios on a CUDA device cache (runs where a GPU is present).
#[test]
fn prefill_decode_cuda_device_cache() {
    let Some(gpu) = device_or_skip(BackendKind::Cuda, "prefill_decode_cuda_device_cache") else { return };
    let cpu = CpuBackend::new();
    for kind in [Method::Iha, Method::IhaLocal, Method::Mea, Method::MeaCompressed, Method::Gqa, Method::Mha] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut s = fixed(kind, Some(PosMode::Virtual));
            s.dtype = dtype;
            let errs = run_scenario_on(&s, &cpu, Via::Api(gpu.as_ref()), Control::None, Some(gpu.as_ref()));
            assert_close(&s, &errs, &format!("cuda device cache {kind:?} {dtype:?}"));
        }
    }
}

/// Flash-decoding on the device: the split combine equals a single split (f32, to rounding), on
/// IHA global and a ring of IHA local, ragged; and the outputs really depend on the split count
/// only through rounding (a different cache gives a different answer: negative control).
#[test]
fn wgpu_split_combine_equals_single_split() {
    let Some(gpu) = wgpu_or_skip("wgpu_split_combine_equals_single_split", None) else { return };
    for cfg in [Config::iha(2, 3, 16), Config::iha_window(2, 2, 16, 5)] {
        let w = Weights::random(&cfg, 9);
        let (b, hk, d) = (3, cfg.kv_heads, cfg.head_dim);
        let lens = [70usize, 33, 91];
        let run = |splits: usize, seed: u64| -> Vec<f32> {
            let dev = gpu_splits(&gpu, splits);
            let mut cache = if cfg.window.is_some() {
                KvCache::ring_on(&dev, &cfg, b, 1, DType::F32).unwrap()
            } else {
                KvCache::for_config_on(&dev, &cfg, b, 96, DType::F32).unwrap()
            };
            for (s, &l) in lens.iter().enumerate() {
                let mut rng = Rng::new(seed + s as u64);
                let (k, v) = (rng.normal_vec(l * hk * d, 1.0), rng.normal_vec(l * hk * d, 1.0));
                cache.append_seq(s, &Tensor::new(&k, &[l, hk, d]), &Tensor::new(&v, &[l, hk, d])).unwrap();
            }
            let q = Rng::new(100).normal_vec(b * cfg.q_heads * d, 1.0);
            let mut out = vec![f32::NAN; b * cfg.heads * d];
            let mut lse = vec![f32::NAN; b * cfg.heads * cfg.pseudo];
            let io = DecodeIo {
                q: Tensor::new(&q, &[b, 1, cfg.q_heads, d]),
                cache: &cache,
                out: TensorMut::new(&mut out, &[b, 1, cfg.heads, d]),
                lse: Some(&mut lse),
            };
            headmix::decode(&dev, &cfg, &w, io).unwrap();
            out.extend(lse);
            out
        };
        let single = run(1, 1);
        for splits in [2, 5, 17] {
            let split = run(splits, 1);
            let err = rel_err(&split, &single.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(err <= 1e-5, "{cfg:?}: {splits} splits against one: {err:.2e}");
        }
        let other = run(5, 2);
        let err = rel_err(&other, &single.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(err > 1e-2, "negative control: another cache agreed ({err:.2e})");
    }
}
