//! Property suites of the f64 reference: every identity of `docs/operator.md`, on random
//! shapes and fresh random values (normal, never zeros), plus negative controls showing that each
//! comparison detects a small perturbation.
//!
//! Tolerances (f64 everywhere): two computations of the same quantity agree to a relative
//! Frobenius error of [`TOL`] (`1e-11`), or [`TOL_ROPE`] (`1e-9`) when the two sides rotate with
//! independently written RoPE (angles up to ~1e5 rad lose ~1e-11 absolute); lse to
//! `tol · (1 + |lse|)`; `-inf` lse must match exactly.

use std::fmt::Debug;

use headmix::reference::rope::rotate;
use headmix::reference::{self, HeadNorm, MixWeights, NormKind, Output, Params, PosMode, Rope, rel_err, svd, unfused};
use headmix::{Config, DType, Problem, Rng};
use headmix_tests::{check_property, normals, spec_visible};
use proptest::prelude::*;

const TOL: f64 = 1e-11;
const TOL_ROPE: f64 = 1e-9;
const CASES: u32 = 64;

// ---------------------------------------------------------------------------------------------
// Random shapes and values.

#[derive(Clone, Debug)]
struct Shape {
    b: usize,
    n: usize,
    m: usize,
    h: usize,
    hq: usize,
    hk: usize,
    p: usize,
    d: usize,
    causal: bool,
    window: Option<(usize, usize)>,
    rope: Option<Rope>,
    pos0: usize,
    scale: Option<f64>,
    collapse: bool,
    norm: Option<NormKind>,
    seed: u64,
}

impl Shape {
    fn params(&self) -> Params {
        let mut p = Params::new(self.b, self.n, self.m, self.hq, self.hk, self.h, self.p, self.d);
        p.causal = self.causal;
        p.window = self.window;
        p.rope = self.rope;
        p.pos0 = self.pos0;
        if let Some(s) = self.scale {
            p.scale = s;
        }
        p
    }

    /// Number of virtual queries and keys per head.
    fn lq(&self) -> usize {
        self.n * self.p
    }
    fn lk(&self) -> usize {
        self.m * self.p
    }

    /// RoPE positions of the spec (context.md): queries bottom-right aligned.
    fn q_pos(&self, i: usize) -> f64 {
        let pos = match self.rope.map(|r| r.mode) {
            Some(PosMode::Token) => self.pos0 + i / self.p + (self.m - self.n),
            _ => self.pos0 + i + (self.m - self.n) * self.p,
        };
        pos as f64
    }
    fn k_pos(&self, j: usize) -> f64 {
        let pos = match self.rope.map(|r| r.mode) {
            Some(PosMode::Token) => self.pos0 + j / self.p,
            _ => self.pos0 + j,
        };
        pos as f64
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        spec_visible(i, j, self.n, self.m, self.p, self.causal, self.window)
    }
}

/// A window edge: zero, small, or huge (including one that overflows any index arithmetic).
fn edge() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), 1..24usize, Just(i32::MAX as usize), Just(usize::MAX)]
}

fn rope() -> impl Strategy<Value = Option<Rope>> {
    let mode = prop_oneof![Just(PosMode::Virtual), Just(PosMode::Token)];
    let base = prop_oneof![Just(10000.0f64), 1.5..1e5f64];
    proptest::option::of((mode, base).prop_map(|(mode, base)| Rope { base, mode }))
}

/// B 1..3, N 1..12, M N..N+8, H/Hq/Hk 1..5, P 1..4, d even 2..24, any mask, RoPE, offset, scale.
fn shapes() -> impl Strategy<Value = Shape> {
    let sizes = (1..=3usize, 1..=12usize, 0..=8usize, 1..=5usize, 1..=5usize, 1..=5usize, 1..=4usize, 1..=12usize);
    let options = (
        any::<bool>(),
        proptest::option::of((edge(), edge())),
        rope(),
        prop_oneof![Just(0usize), 0..64usize, Just(100_000usize)],
        proptest::option::of(0.05..2.0f64),
        any::<bool>(),
        proptest::option::of(prop_oneof![Just(NormKind::Group), Just(NormKind::Rms)]),
        any::<u64>(),
    );
    (sizes, options).prop_map(
        |((b, n, extra, h, hq, hk, p, half_d), (causal, window, rope, pos0, scale, collapse, norm, seed))| Shape {
            b,
            n,
            m: n + extra,
            h,
            hq,
            hk,
            p,
            d: 2 * half_d,
            causal,
            window,
            rope,
            pos0,
            scale,
            collapse,
            norm,
            seed,
        },
    )
}

/// Inputs and weights of one case, all f64.
#[derive(Clone, Debug)]
struct Data {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    aq: Vec<f64>,
    ak: Vec<f64>,
    av: Vec<f64>,
    r: Option<Vec<f64>>,
    norm: Option<HeadNorm<Vec<f64>>>,
}

impl Data {
    /// Dense random weights (`N(0, 1/fan_in)`) and normal inputs.
    fn random(s: &Shape) -> Data {
        let mut rng = Rng::new(s.seed);
        let (h, p, d) = (s.h, s.p, s.d);
        let q = normals(&mut rng, s.b * s.n * s.hq * d, 1.0);
        let k = normals(&mut rng, s.b * s.m * s.hk * d, 1.0);
        let v = normals(&mut rng, s.b * s.m * s.hk * d, 1.0);
        let aq = normals(&mut rng, s.hq * h * p, 1.0 / (s.hq as f64).sqrt());
        let ak = normals(&mut rng, s.hk * h * p, 1.0 / (s.hk as f64).sqrt());
        let av = normals(&mut rng, s.hk * h * p, 1.0 / (s.hk as f64).sqrt());
        let r = s.collapse.then(|| normals(&mut rng, h * h * p, 1.0 / ((h * p) as f64).sqrt()));
        let norm = s.norm.map(|kind| random_norm(&mut rng, kind, h, d));
        Data { q, k, v, aq, ak, av, r, norm }
    }

    fn mix(&self) -> MixWeights<'_, f64> {
        let norm = self.norm.as_ref().map(|n| n.as_slices());
        MixWeights { aq: &self.aq, ak: &self.ak, av: &self.av, r: self.r.as_deref(), norm }
    }

    fn direct(&self, p: &Params) -> Output<f64> {
        reference::attention(p, &self.q, &self.k, &self.v, &self.mix())
    }
}

/// A head norm of `kind` with `gamma = 1 + N(0, 0.2²)` and (for `Group`) `beta = N(0, 0.5²)`, `[H, d]`.
fn random_norm(rng: &mut Rng, kind: NormKind, h: usize, d: usize) -> HeadNorm<Vec<f64>> {
    let gamma = normals(rng, h * d, 0.2).into_iter().map(|g| 1.0 + g).collect();
    match kind {
        NormKind::Rms => HeadNorm::Rms { gamma },
        NormKind::Group => HeadNorm::Group { gamma, beta: normals(rng, h * d, 0.5) },
    }
}

/// `a[m, h, p] = 1` iff `m == h` (the identity mixing of `H` source heads).
fn identity_mix(h: usize, p: usize) -> Vec<f64> {
    let mut a = vec![0.0; h * h * p];
    for m in 0..h {
        for q in 0..p {
            a[(m * h + m) * p + q] = 1.0;
        }
    }
    a
}

fn identity_matrix(h: usize) -> Vec<f64> {
    (0..h * h).map(|i| if i / h == i % h { 1.0 } else { 0.0 }).collect()
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64, ctx: &dyn Debug) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} above {tol:.0e}\n{ctx:?}");
}

fn assert_lse(what: &str, got: &[f64], want: &[f64], tol: f64, ctx: &dyn Debug) {
    assert_eq!(got.len(), want.len(), "{what}: lse lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert!(g == f64::NEG_INFINITY, "{what}: lse[{i}] = {g}, expected -inf\n{ctx:?}");
        } else {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: lse[{i}] = {g}, expected {w}\n{ctx:?}");
        }
    }
}

fn assert_same(what: &str, got: &Output<f64>, want: &Output<f64>, tol: f64, ctx: &dyn Debug) {
    assert_close(what, &got.out, &want.out, tol, ctx);
    assert_lse(what, &got.lse, &want.lse, tol, ctx);
}

/// A negative control: the comparison must report a clear difference.
fn assert_detects(what: &str, err: f64, threshold: f64) {
    assert!(err > threshold, "negative control {what}: error {err:.3e} not above {threshold:.0e}");
}

// ---------------------------------------------------------------------------------------------
// Independent building blocks: textbook attention, RoPE in complex form, head norm, pipeline.

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Textbook `softmax(scale · Q Kᵀ) V` per (batch, head) over the keys `vis(i, j)` allows.
/// `q: [B, Lq, H, d]`, `k, v: [B, Lk, H, d]`; returns `o [B, Lq, H, d]` and `lse [B, H, Lq]`.
fn textbook(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, lq, lk, h, d): (usize, usize, usize, usize, usize),
    scale: f64,
    vis: impl Fn(usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut o = vec![0.0; b * lq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * lq];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..lq {
                let qi = &q[((bb * lq + i) * h + hh) * d..][..d];
                let scores: Vec<(usize, f64)> = (0..lk)
                    .filter(|&j| vis(i, j))
                    .map(|j| (j, scale * dot(qi, &k[((bb * lk + j) * h + hh) * d..][..d])))
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
                let oi = &mut o[((bb * lq + i) * h + hh) * d..][..d];
                for &(j, s) in &scores {
                    let pj = (s - max).exp() / z;
                    let vj = &v[((bb * lk + j) * h + hh) * d..][..d];
                    for t in 0..d {
                        oi[t] += pj * vj[t];
                    }
                }
                lse[(bb * h + hh) * lq + i] = max + z.ln();
            }
        }
    }
    (o, lse)
}

/// RoPE as the spec states it: `(x_t + i·x_{t+d/2}) · e^{i·pos·base^(-2t/d)}`.
fn rope_complex(x: &mut [f64], pos: f64, base: f64) {
    let half = x.len() / 2;
    for t in 0..half {
        let theta = pos * (-(2.0 * t as f64 / x.len() as f64) * base.ln()).exp();
        let (c, s) = (theta.cos(), theta.sin());
        let (re, im) = (x[t], x[t + half]);
        x[t] = re * c - im * s;
        x[t + half] = re * s + im * c;
    }
}

/// Head norm of every `d`-vector, written from the spec's formulas; vector `idx` belongs to head
/// `(idx / width) % h`. Group: `gamma (x − mean) / sqrt(var + eps) + beta` (biased variance);
/// Rms: `gamma x / sqrt(mean(x²) + eps)`.
fn head_norm(x: &mut [f64], norm: &HeadNorm<Vec<f64>>, h: usize, d: usize, width: usize, eps: f64) {
    for (idx, v) in x.chunks_mut(d).enumerate() {
        let hh = (idx / width) % h;
        let mean = match norm {
            HeadNorm::Group { .. } => v.iter().sum::<f64>() / d as f64,
            HeadNorm::Rms { .. } => 0.0,
        };
        let second = v.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / d as f64;
        let sd = (second + eps).sqrt();
        for t in 0..d {
            let c = hh * d + t;
            v[t] = match norm {
                HeadNorm::Group { gamma, beta } => (v[t] - mean) / sd * gamma[c] + beta[c],
                HeadNorm::Rms { gamma } => v[t] / sd * gamma[c],
            };
        }
    }
}

/// PyTorch's `torch.nn.GroupNorm(num_groups, num_channels, eps)` with affine weight and bias, as
/// its documentation defines it: input `[N, C]`, the `C` channels cut into `num_groups` groups of
/// `C / num_groups` consecutive channels; per (sample, group) the mean and the biased variance;
/// `y[n, c] = (x[n, c] − E[x]) / sqrt(Var[x] + eps) · weight[c] + bias[c]`.
fn pytorch_group_norm(
    x: &[f64],
    num_groups: usize,
    num_channels: usize,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
) -> Vec<f64> {
    assert_eq!(x.len() % num_channels, 0);
    assert_eq!(num_channels % num_groups, 0);
    let per_group = num_channels / num_groups;
    let mut y = vec![0.0; x.len()];
    for sample in 0..x.len() / num_channels {
        for g in 0..num_groups {
            let chans = sample * num_channels + g * per_group..sample * num_channels + (g + 1) * per_group;
            let xs = &x[chans.clone()];
            let e = xs.iter().sum::<f64>() / per_group as f64;
            let var = xs.iter().map(|v| (v - e) * (v - e)).sum::<f64>() / per_group as f64;
            for (k, idx) in chans.enumerate() {
                let c = g * per_group + k;
                y[idx] = (x[idx] - e) / (var + eps).sqrt() * weight[c] + bias[c];
            }
        }
    }
    y
}

/// `qt, kt, vt` materialised as `[B, S·P, H, d]`, with the spec's RoPE positions applied.
fn mixed_rotated(s: &Shape, x: &Data) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, h, p, d) = (s.b, s.h, s.p, s.d);
    let mut qt = unfused::materialise(&x.q, &x.aq, b, s.n, s.hq, h, p, d);
    let mut kt = unfused::materialise(&x.k, &x.ak, b, s.m, s.hk, h, p, d);
    let vt = unfused::materialise(&x.v, &x.av, b, s.m, s.hk, h, p, d);
    if let Some(rope) = s.rope {
        for (idx, row) in qt.chunks_mut(d).enumerate() {
            rope_complex(row, s.q_pos((idx / h) % s.lq()), rope.base);
        }
        for (idx, row) in kt.chunks_mut(d).enumerate() {
            rope_complex(row, s.k_pos((idx / h) % s.lk()), rope.base);
        }
    }
    (qt, kt, vt)
}

/// The unfused IHA recipe of the spec: materialise, reshape to `[B, N·P, H, d]`, plain masked
/// attention, reshape back to `[B, N, H, P, d]`, collapse, norm.
fn iha_pipeline(s: &Shape, x: &Data) -> Output<f64> {
    let (b, n, h, p, d) = (s.b, s.n, s.h, s.p, s.d);
    let (qt, kt, vt) = mixed_rotated(s, x);
    let scale = s.params().scale;
    let (o, lse) = textbook(&qt, &kt, &vt, (b, s.lq(), s.lk(), h, d), scale, |i, j| s.visible(i, j));
    let mut op = vec![0.0; b * n * h * p * d];
    for bb in 0..b {
        for nn in 0..n {
            for hh in 0..h {
                for q in 0..p {
                    let src = &o[((bb * s.lq() + nn * p + q) * h + hh) * d..][..d];
                    op[((((bb * n + nn) * h + hh) * p) + q) * d..][..d].copy_from_slice(src);
                }
            }
        }
    }
    let (mut out, width) = match &x.r {
        None => (op, p),
        Some(r) => {
            let mut out = vec![0.0; b * n * h * d];
            for bn in 0..b * n {
                for hh in 0..h {
                    for c in 0..h * p {
                        for t in 0..d {
                            out[(bn * h + hh) * d + t] += r[hh * h * p + c] * op[(bn * h * p + c) * d + t];
                        }
                    }
                }
            }
            (out, 1)
        }
    };
    if let Some(norm) = &x.norm {
        head_norm(&mut out, norm, h, d, width, s.params().eps);
    }
    Output { out, lse }
}

// ---------------------------------------------------------------------------------------------
// 1. The direct reference equals the unfused one.

#[test]
fn direct_equals_unfused() {
    check_property("direct_equals_unfused", CASES, shapes(), |s| {
        let x = Data::random(&s);
        let p = s.params();
        let un = unfused::attention(&p, &x.q, &x.k, &x.v, &x.mix());
        assert_same("direct vs unfused", &x.direct(&p), &un, TOL, &s);
    });
}

#[test]
fn negative_control_direct_vs_unfused_flipped_weight() {
    let s = Shape {
        b: 2,
        n: 5,
        m: 7,
        h: 3,
        hq: 3,
        hk: 2,
        p: 2,
        d: 8,
        causal: true,
        window: Some((6, 1)),
        rope: Some(Rope { base: 10000.0, mode: PosMode::Virtual }),
        pos0: 3,
        scale: None,
        collapse: true,
        norm: Some(NormKind::Group),
        seed: 17,
    };
    let x = Data::random(&s);
    let p = s.params();
    let mut y = x.clone();
    y.ak[1] = -y.ak[1];
    let un = unfused::attention(&p, &y.q, &y.k, &y.v, &y.mix());
    assert_detects("flipped ak sign", rel_err(&x.direct(&p).out, &un.out), 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 2. MHA equals textbook softmax(QKᵀ/sqrt(d))V; 3. IHA with P = 1 and identity mixing equals MHA.

/// Shapes of plain MHA: `Hq = Hk = H`, `P = 1`, no RoPE, no norm.
fn mha_shapes() -> impl Strategy<Value = Shape> {
    shapes().prop_map(|s| Shape { hq: s.h, hk: s.h, p: 1, rope: None, norm: None, ..s })
}

fn mha_data(s: &Shape, collapse: bool) -> Data {
    let mut x = Data::random(s);
    x.aq = identity_mix(s.h, 1);
    x.ak = identity_mix(s.h, 1);
    x.av = identity_mix(s.h, 1);
    x.r = collapse.then(|| identity_matrix(s.h));
    x.norm = None;
    x
}

fn textbook_mha(s: &Shape, x: &Data, scale: f64) -> (Vec<f64>, Vec<f64>) {
    textbook(&x.q, &x.k, &x.v, (s.b, s.n, s.m, s.h, s.d), scale, |i, j| s.visible(i, j))
}

#[test]
fn mha_equals_textbook_softmax() {
    check_property("mha_equals_textbook_softmax", CASES, mha_shapes(), |s| {
        let x = mha_data(&s, s.collapse);
        let p = s.params();
        let (o, lse) = textbook_mha(&s, &x, p.scale);
        let got = x.direct(&p);
        assert_close("mha vs textbook", &got.out, &o, TOL, &s);
        assert_lse("mha vs textbook", &got.lse, &lse, TOL, &s);
    });
}

#[test]
fn negative_control_mha_wrong_scale() {
    let s = Shape { b: 1, n: 6, m: 6, h: 2, hq: 2, hk: 2, p: 1, d: 16, ..base_shape() };
    let x = mha_data(&s, false);
    let p = s.params();
    let (o, _) = textbook_mha(&s, &x, 1.0 / s.d as f64);
    assert_detects("scale 1/d instead of 1/sqrt(d)", rel_err(&x.direct(&p).out, &o), 1e-3);
}

/// The host's `Problem::params` against the expected ones (scale and eps pass through f32).
fn assert_same_params(got: &Params, want: &Params) {
    let key = |p: &Params| (p.b, p.n, p.m, p.hq, p.hk, p.h, p.p, p.d, p.causal, p.window, p.rope, p.pos0);
    assert_eq!(key(got), key(want), "host parameters");
    assert!((got.scale - want.scale).abs() <= 1e-7 * want.scale, "scale {} vs {}", got.scale, want.scale);
}

fn base_shape() -> Shape {
    Shape {
        b: 1,
        n: 4,
        m: 4,
        h: 2,
        hq: 2,
        hk: 2,
        p: 1,
        d: 8,
        causal: true,
        window: None,
        rope: None,
        pos0: 0,
        scale: None,
        collapse: false,
        norm: None,
        seed: 5,
    }
}

#[test]
fn iha_with_one_pseudo_head_and_identity_mixing_equals_mha() {
    check_property("iha_p1_identity_equals_mha", CASES, mha_shapes(), |s| {
        // The host's IHA configuration (causal, default scale), with a window sometimes.
        let mut cfg = Config::iha(s.h, 1, s.d);
        if let Some((l, r)) = s.window {
            cfg = cfg.with_window(l.min(i32::MAX as usize), r.min(i32::MAX as usize));
        }
        let problem = Problem::new(&cfg, s.b, s.n, s.m, DType::F32, true, false).unwrap();
        let p = problem.params();
        let s = Shape { causal: true, window: p.window, scale: None, pos0: 0, ..s };
        assert_same_params(&p, &s.params());
        let x = mha_data(&s, true);
        let (o, lse) = textbook_mha(&s, &x, p.scale);
        let got = x.direct(&p);
        assert_close("iha P=1 vs mha", &got.out, &o, TOL, &s);
        assert_lse("iha P=1 vs mha", &got.lse, &lse, TOL, &s);
    });
}

// ---------------------------------------------------------------------------------------------
// 4. IHA equals materialise, reshape, attend, reshape back, collapse.

#[test]
fn iha_equals_materialise_reshape_attend_collapse() {
    check_property("iha_equals_pipeline", CASES, shapes(), |s| {
        let x = Data::random(&s);
        let tol = if s.rope.is_some() { TOL_ROPE } else { TOL };
        assert_same("direct vs materialise pipeline", &x.direct(&s.params()), &iha_pipeline(&s, &x), tol, &s);
    });
}

#[test]
fn negative_control_pipeline_unaligned_mask() {
    // The pipeline with a top-left aligned mask (forgetting the (M − N)·P shift) must differ.
    let s = Shape { n: 3, m: 6, p: 2, h: 2, hq: 2, hk: 2, ..base_shape() };
    let x = Data::random(&s);
    let (qt, kt, vt) = mixed_rotated(&s, &x);
    let dims = (s.b, s.lq(), s.lk(), s.h, s.d);
    let (o, _) = textbook(&qt, &kt, &vt, dims, s.params().scale, |i, j| j <= i);
    let (o_good, _) = textbook(&qt, &kt, &vt, dims, s.params().scale, |i, j| s.visible(i, j));
    assert_detects("top-left aligned mask", rel_err(&o, &o_good), 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 5. GQA through ak/av replication equals GQA by head replication.

/// `(Shape, group)`: `H = Hk · group`, `Hq = H`, `P = 1`, no collapse.
fn gqa_shapes() -> impl Strategy<Value = (Shape, usize)> {
    (shapes(), 1..=4usize, 1..=3usize)
        .prop_map(|(s, g, group)| (Shape { h: g * group, hq: g * group, hk: g, p: 1, collapse: false, ..s }, group))
}

/// `ak[m, h, 0] = 1` iff `h / group == m`, written from the spec table.
fn group_replication(g: usize, group: usize) -> Vec<f64> {
    let h = g * group;
    let mut a = vec![0.0; g * h];
    for hh in 0..h {
        a[(hh / group) * h + hh] = 1.0;
    }
    a
}

/// `[B, M, G, d]` → `[B, M, G·group, d]`, head `h` a copy of head `h / group`.
fn repeat_heads(x: &[f64], bm: usize, g: usize, group: usize, d: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len() * group);
    for t in 0..bm {
        for hh in 0..g * group {
            y.extend_from_slice(&x[(t * g + hh / group) * d..][..d]);
        }
    }
    y
}

fn gqa_by_repetition(s: &Shape, x: &Data, group: usize) -> Output<f64> {
    let mut y = x.clone();
    y.k = repeat_heads(&x.k, s.b * s.m, s.hk, group, s.d);
    y.v = repeat_heads(&x.v, s.b * s.m, s.hk, group, s.d);
    y.ak = identity_mix(s.h, 1);
    y.av = identity_mix(s.h, 1);
    y.direct(&Params { hk: s.h, ..s.params() })
}

#[test]
fn gqa_mixing_equals_head_repetition() {
    check_property("gqa_mixing_equals_head_repetition", CASES, gqa_shapes(), |(s, group)| {
        let mut x = Data::random(&s);
        x.aq = identity_mix(s.h, 1);
        x.ak = group_replication(s.hk, group);
        x.av = x.ak.clone();
        let host: Vec<f64> = headmix::replication(s.hk, s.h, 1).iter().map(|&w| w as f64).collect();
        assert_eq!(host, x.ak, "headmix::replication is the spec's GQA replication");
        let want = gqa_by_repetition(&s, &x, group);
        assert_same("gqa mixing vs repetition", &x.direct(&s.params()), &want, TOL, &s);
        // And, without RoPE and norm, the textbook attention on the repeated heads.
        if s.rope.is_none() && s.norm.is_none() {
            let (kr, vr) =
                (repeat_heads(&x.k, s.b * s.m, s.hk, group, s.d), repeat_heads(&x.v, s.b * s.m, s.hk, group, s.d));
            let (o, _) = textbook(&x.q, &kr, &vr, (s.b, s.n, s.m, s.h, s.d), s.params().scale, |i, j| s.visible(i, j));
            assert_close("gqa vs textbook", &x.direct(&s.params()).out, &o, TOL, &s);
        }
    });
}

#[test]
fn negative_control_gqa_wrong_grouping() {
    // Interleaved grouping (h % G) instead of contiguous groups (h / group) must differ.
    let (g, group) = (2, 2);
    let s = Shape { h: 4, hq: 4, hk: g, p: 1, n: 5, m: 5, ..base_shape() };
    let mut x = Data::random(&s);
    x.aq = identity_mix(4, 1);
    x.ak = vec![0.0; g * 4];
    for hh in 0..4 {
        x.ak[(hh % g) * 4 + hh] = 1.0;
    }
    x.av = x.ak.clone();
    let want = gqa_by_repetition(&s, &x, group);
    assert_detects("h % G grouping", rel_err(&x.direct(&s.params()).out, &want.out), 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 6. A window at least as wide as the sequence equals no window.

#[test]
fn wide_window_equals_no_window() {
    let strategy = (shapes(), 0..3usize, 0..3usize, any::<bool>());
    check_property("wide_window_equals_no_window", CASES, strategy, |(s, el, er, huge)| {
        let x = Data::random(&s);
        let none = x.direct(&Params { window: None, ..s.params() });
        // Widest reach: the last query sits at key M·P − 1, the first at (M − N)·P.
        let (left, right) = if huge { (usize::MAX, usize::MAX) } else { (s.lk() - 1 + el, s.lq() - 1 + er) };
        let wide = Params { window: Some((left, right)), ..s.params() };
        assert_eq!(x.direct(&wide), none, "wide window changed the result: {s:?}");
        let un = unfused::attention(&wide, &x.q, &x.k, &x.v, &x.mix());
        assert_same("unfused wide window", &un, &none, TOL, &s);
    });
}

#[test]
fn negative_control_window_one_short() {
    let s = Shape { n: 4, m: 6, p: 2, h: 2, hq: 2, hk: 2, causal: true, ..base_shape() };
    let x = Data::random(&s);
    let none = x.direct(&s.params());
    let short = x.direct(&Params { window: Some((s.lk() - 2, 0)), ..s.params() });
    assert_detects("window one virtual token short", rel_err(&short.out, &none.out), 1e-4);
}

// ---------------------------------------------------------------------------------------------
// 7. RoPE in Token mode commutes with mixing.

/// Rotate stored heads `x: [B, S, Hs, d]` at token positions `pos(s)`.
fn rotate_stored(x: &[f64], s_len: usize, hs: usize, d: usize, base: f64, pos: impl Fn(usize) -> f64) -> Vec<f64> {
    let mut y = x.to_vec();
    for (idx, row) in y.chunks_mut(d).enumerate() {
        rope_complex(row, pos((idx / hs) % s_len), base);
    }
    y
}

fn rotate_then_mix(s: &Shape, x: &Data, base: f64) -> Output<f64> {
    let mut y = x.clone();
    let off = s.m - s.n;
    y.q = rotate_stored(&x.q, s.n, s.hq, s.d, base, |n| (s.pos0 + n + off) as f64);
    y.k = rotate_stored(&x.k, s.m, s.hk, s.d, base, |t| (s.pos0 + t) as f64);
    y.direct(&Params { rope: None, ..s.params() })
}

#[test]
fn token_rope_commutes_with_mixing() {
    let strategy = (shapes(), prop_oneof![Just(10000.0f64), 1.5..1e5f64]);
    check_property("token_rope_commutes_with_mixing", CASES, strategy, |(s, base)| {
        let s = Shape { rope: Some(Rope { base, mode: PosMode::Token }), ..s };
        let x = Data::random(&s);
        assert_same(
            "token rope vs rotate-then-mix",
            &x.direct(&s.params()),
            &rotate_then_mix(&s, &x, base),
            TOL_ROPE,
            &s,
        );
    });
}

#[test]
fn negative_control_virtual_rope_does_not_commute() {
    let s = Shape {
        p: 2,
        h: 2,
        hq: 2,
        hk: 2,
        n: 4,
        m: 5,
        rope: Some(Rope { base: 10000.0, mode: PosMode::Virtual }),
        ..base_shape()
    };
    let x = Data::random(&s);
    let err = rel_err(&x.direct(&s.params()).out, &rotate_then_mix(&s, &x, 10000.0).out);
    assert_detects("virtual-position rope with P = 2", err, 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 8. MEA with Hk = H and identity mixing equals MHA followed by the head norm.

#[test]
fn mea_identity_equals_mha_then_head_norm() {
    let kinds = prop_oneof![Just(NormKind::Group), Just(NormKind::Rms)];
    let strategy = (mha_shapes(), prop_oneof![Just(1e-5f64), 1e-8..1e-1f64], kinds);
    check_property("mea_identity_equals_mha_then_norm", CASES, strategy, |(s, eps, kind)| {
        let mut cfg = Config::mea(s.h, s.d).with_causal(s.causal).with_norm_eps(eps as f32);
        if let Some((l, r)) = s.window {
            cfg = cfg.with_window(l.min(i32::MAX as usize), r.min(i32::MAX as usize));
        }
        let problem = Problem::new(&cfg, s.b, s.n, s.m, DType::F32, false, true).unwrap();
        let p = problem.params();
        let s = Shape { window: p.window, scale: None, norm: Some(kind), pos0: 0, ..s };
        assert_same_params(&p, &s.params());
        let mut x = mha_data(&s, s.collapse);
        x.norm = Data::random(&s).norm;
        let (mut o, lse) = textbook_mha(&s, &x, p.scale);
        head_norm(&mut o, x.norm.as_ref().unwrap(), s.h, s.d, 1, p.eps);
        let got = x.direct(&p);
        assert_close("mea vs mha + norm", &got.out, &o, TOL, &s);
        assert_lse("mea vs mha + norm", &got.lse, &lse, TOL, &s);
    });
}

#[test]
fn negative_control_mea_perturbed_gamma() {
    let s = Shape { norm: Some(NormKind::Group), ..base_shape() };
    let mut x = mha_data(&s, false);
    x.norm = Data::random(&s).norm;
    let (mut o, _) = textbook_mha(&s, &x, s.params().scale);
    let mut norm = x.norm.clone().unwrap();
    if let HeadNorm::Group { gamma, .. } = &mut norm {
        gamma[3] *= 1.01;
    }
    head_norm(&mut o, &norm, s.h, s.d, 1, 1e-5);
    assert_detects("one gamma 1% off", rel_err(&x.direct(&s.params()).out, &o), 1e-4);
}

// ---------------------------------------------------------------------------------------------
// 8b. MEA's head norm is a GroupNorm (one group per head): against PyTorch's GroupNorm(H, H·d)
//     written from its definition, and Group = Rms + beta on zero-mean rows.

/// MEA with identity mixing and a `Group` norm: `[B, N, H, d]` output equals textbook MHA whose
/// output, viewed as `[B·N, H·d]` (the concatenated heads), goes through PyTorch's
/// `GroupNorm(H, H·d)` with `weight = gamma`, `bias = beta` flattened to `[H·d]`.
#[test]
fn mea_group_norm_equals_pytorch_group_norm() {
    let strategy = (mha_shapes(), prop_oneof![Just(1e-5f64), 1e-8..1e-1f64]);
    check_property("mea_group_norm_equals_pytorch", CASES, strategy, |(s, eps)| {
        let s = Shape { norm: Some(NormKind::Group), scale: None, collapse: false, ..s };
        let mut p = s.params();
        p.eps = eps;
        let mut x = mha_data(&s, false);
        x.norm = Data::random(&s).norm;
        let (o, _) = textbook_mha(&s, &x, p.scale);
        let Some(HeadNorm::Group { gamma, beta }) = &x.norm else { unreachable!() };
        let want = pytorch_group_norm(&o, s.h, s.h * s.d, gamma, beta, eps);
        assert_close("mea group norm vs torch GroupNorm(H, H*d)", &x.direct(&p).out, &want, TOL, &s);
        assert_close(
            "unfused vs torch GroupNorm(H, H*d)",
            &unfused::attention(&p, &x.q, &x.k, &x.v, &x.mix()).out,
            &want,
            TOL,
            &s,
        );
    });
}

/// The reference's norm alone against the direct formula and PyTorch's definition, on random
/// rows far from zero mean (offsets up to 50 sd), every eps, `H` up to 6 heads and `d` up to 64.
#[test]
fn group_norm_matches_formula_and_pytorch() {
    let strategy = (1..=6usize, 1..=32usize, 1..=5usize, 0.0..50.0f64, 1e-8..1e-1f64, any::<u64>());
    check_property(
        "group_norm_matches_formula_and_pytorch",
        4 * CASES,
        strategy,
        |(h, half_d, rows, offset, eps, seed)| {
            let d = 2 * half_d;
            let mut rng = Rng::new(seed);
            let x: Vec<f64> = normals(&mut rng, rows * h * d, 1.0).into_iter().map(|v| v + offset).collect();
            let norm = random_norm(&mut rng, NormKind::Group, h, d);
            let mut got = x.clone();
            reference::apply_head_norm(&norm.as_slices(), &mut got, h, d, 1, eps);
            let mut formula = x.clone();
            head_norm(&mut formula, &norm, h, d, 1, eps);
            let ctx = (h, d, rows, offset, eps);
            assert_close("group norm vs formula", &got, &formula, TOL, &ctx);
            let HeadNorm::Group { gamma, beta } = &norm else { unreachable!() };
            assert_close("group norm vs torch", &got, &pytorch_group_norm(&x, h, h * d, gamma, beta, eps), TOL, &ctx);
        },
    );
}

/// Values whose every row has zero mean over `d` give attention outputs with zero-mean rows
/// (convex combinations of mixed values), where centring does nothing: `Group` equals `Rms`
/// followed by `+ beta`, through the whole operator (any mixing, collapse, mask, RoPE).
#[test]
fn group_equals_rms_plus_beta_on_zero_mean_rows() {
    check_property("group_equals_rms_plus_beta", CASES, shapes(), |s| {
        let s = Shape { norm: Some(NormKind::Group), ..s };
        let mut x = Data::random(&s);
        for row in x.v.chunks_mut(s.d) {
            let mean = row.iter().sum::<f64>() / s.d as f64;
            row.iter_mut().for_each(|e| *e -= mean);
        }
        let p = s.params();
        let group = x.direct(&p);
        let Some(HeadNorm::Group { gamma, beta }) = x.norm.clone() else { unreachable!() };
        let mut y = x.clone();
        y.norm = Some(HeadNorm::Rms { gamma });
        let mut rms_plus_beta = y.direct(&p).out;
        let width = if s.collapse { 1 } else { s.p };
        for (idx, row) in rms_plus_beta.chunks_mut(s.d).enumerate() {
            let hh = (idx / width) % s.h;
            row.iter_mut().zip(&beta[hh * s.d..][..s.d]).for_each(|(e, b)| *e += b);
        }
        // Rows that see no key are zeros: both norms give beta there too.
        assert_close("group vs rms + beta on zero-mean rows", &group.out, &rms_plus_beta, TOL, &s);
    });
}

/// Negative controls of the group-norm checks: dropping `beta`, or dropping the centring (the
/// old per-head RMS norm plus `beta`), is detected by the PyTorch comparison.
#[test]
fn negative_control_group_norm_without_beta_or_centring() {
    let s = Shape { norm: Some(NormKind::Group), collapse: false, ..base_shape() };
    let p = s.params();
    let mut x = mha_data(&s, false);
    x.norm = Data::random(&s).norm;
    let (o, _) = textbook_mha(&s, &x, p.scale);
    let Some(HeadNorm::Group { gamma, beta }) = x.norm.clone() else { unreachable!() };
    let torch = pytorch_group_norm(&o, s.h, s.h * s.d, &gamma, &beta, p.eps);
    assert_close("the control's baseline", &x.direct(&p).out, &torch, TOL, &s);

    let mut no_beta = x.clone();
    no_beta.norm = Some(HeadNorm::Group { gamma: gamma.clone(), beta: vec![0.0; beta.len()] });
    assert_detects("group norm without beta", rel_err(&no_beta.direct(&p).out, &torch), 1e-2);

    let mut uncentred = x.clone();
    uncentred.norm = Some(HeadNorm::Rms { gamma });
    let mut rms_beta = uncentred.direct(&p).out;
    for (idx, row) in rms_beta.chunks_mut(s.d).enumerate() {
        row.iter_mut().zip(&beta[(idx % s.h) * s.d..][..s.d]).for_each(|(e, b)| *e += b);
    }
    assert_detects("group norm without centring (rms + beta)", rel_err(&rms_beta, &torch), 1e-2);
}

// ---------------------------------------------------------------------------------------------
// 9. Masks against brute force; masked keys have no influence; empty rows.

#[test]
fn visible_matches_spec_formula() {
    let strategy = (1..=12usize, 0..=8usize, 1..=4usize, any::<bool>(), proptest::option::of((edge(), edge())));
    check_property("visible_matches_spec_formula", 4 * CASES, strategy, |(n, extra, p, causal, window)| {
        let m = n + extra;
        let mut params = Params::new(1, n, m, 1, 1, 1, p, 2);
        params.causal = causal;
        params.window = window;
        let mut count = 0u64;
        for i in 0..n * p {
            let mut row = 0;
            for j in 0..m * p {
                let want = spec_visible(i, j, n, m, p, causal, window);
                assert_eq!(params.visible(i, j), want, "visible({i}, {j}) with {params:?}");
                row += want as u64;
            }
            // With M >= N every row sees its own diagonal key i' = i + (M − N)·P.
            assert!(row >= 1, "row {i} sees no key: {params:?}");
            count += row;
        }
        // The host's exact work count agrees (its windows are capped at i32::MAX by validation).
        let w = window.map(|(l, r)| (l.min(i32::MAX as usize), r.min(i32::MAX as usize)));
        let mut cfg = Config::iha(1, p, 2).with_causal(causal);
        if let Some((l, r)) = w {
            cfg = cfg.with_window(l, r);
        }
        let problem = Problem::new(&cfg, 1, n, m, DType::F32, false, false).unwrap();
        if w == window {
            assert_eq!(problem.visible_pairs(), count, "visible_pairs for {params:?}");
        }
    });
}

#[test]
fn negative_control_mask_without_alignment_shift() {
    let (n, m, p) = (3, 5, 2);
    let mut params = Params::new(1, n, m, 1, 1, 1, p, 2);
    params.causal = true;
    let differs =
        (0..n * p).flat_map(|i| (0..m * p).map(move |j| (i, j))).filter(|&(i, j)| params.visible(i, j) != (j <= i));
    assert!(differs.count() > 0, "a top-left aligned mask must disagree with the spec when M > N");
}

#[test]
fn masked_keys_have_no_influence() {
    let strategy = (shapes(), any::<prop::sample::Index>());
    check_property("masked_keys_have_no_influence", CASES, strategy, |(s, pick)| {
        // No collapse so that each output vector is one virtual query row. A group norm over
        // d = 2 maps every row to about ±gamma + beta whatever it saw: no norm there.
        let norm = s.norm.filter(|_| s.d > 2);
        let s = Shape { collapse: false, causal: s.causal || s.window.is_none(), norm, ..s };
        let x = Data::random(&s);
        let p = s.params();
        let before = x.direct(&p);
        // Perturb every head of one stored key/value token, by different amounts per element (a
        // shift constant over d would be removed by a group norm's centring).
        let tok = pick.index(s.m);
        let mut y = x.clone();
        for bb in 0..s.b {
            for e in 0..s.hk * s.d {
                y.k[(bb * s.m + tok) * s.hk * s.d + e] += 3.0 + (e % 3) as f64;
                y.v[(bb * s.m + tok) * s.hk * s.d + e] -= 5.0 * (1 + e % 2) as f64;
            }
        }
        let after = y.direct(&p);
        let mut changed = 0.0f64;
        for bb in 0..s.b {
            for nn in 0..s.n {
                for hh in 0..s.h {
                    for q in 0..s.p {
                        let i = nn * s.p + q;
                        let sees = (tok * s.p..(tok + 1) * s.p).any(|j| s.visible(i, j));
                        let at = ((((bb * s.n + nn) * s.h + hh) * s.p) + q) * s.d;
                        let (a, b) = (&before.out[at..at + s.d], &after.out[at..at + s.d]);
                        let l = (bb * s.h + hh) * s.lq() + i;
                        if sees {
                            changed = changed.max(rel_err(b, a));
                        } else {
                            assert_eq!(a, b, "row {i} of head {hh} changed though it cannot see token {tok}: {s:?}");
                            assert_eq!(before.lse[l], after.lse[l]);
                        }
                    }
                }
            }
        }
        let seen = (0..s.lq()).any(|i| (tok * s.p..(tok + 1) * s.p).any(|j| s.visible(i, j)));
        if seen {
            assert_detects("perturbed visible token", changed, 1e-6);
        }
    });
}

#[test]
fn rows_without_keys_are_zero_with_neg_inf_lse() {
    // With M >= N every virtual query sees its diagonal key, so empty rows only arise in the
    // textbook attention underneath the unfused pipeline when Lq > Lk (causal, bottom-right).
    let strategy = (1..=3usize, 1..=8usize, 1..=8usize, 1..=3usize, 1..=8usize, any::<u64>());
    check_property("rows_without_keys", CASES, strategy, |(b, lk, more, h, half_d, seed)| {
        let (lq, d) = (lk + more, 2 * half_d);
        let mut rng = Rng::new(seed);
        let q = normals(&mut rng, b * lq * h * d, 1.0);
        let k = normals(&mut rng, b * lk * h * d, 1.0);
        let v = normals(&mut rng, b * lk * h * d, 1.0);
        let mask = unfused::Mask { causal: true, window: None };
        let (o, lse) = unfused::mha(&q, &k, &v, b, lq, lk, h, d, 0.3, mask);
        for bb in 0..b {
            for hh in 0..h {
                for i in 0..lq {
                    let empty = i < lq - lk; // key column i + lk − lq < 0
                    let row = &o[((bb * lq + i) * h + hh) * d..][..d];
                    let l = lse[(bb * h + hh) * lq + i];
                    if empty {
                        assert!(row.iter().all(|&x| x == 0.0), "empty row {i} not zero");
                        assert_eq!(l, f64::NEG_INFINITY, "empty row {i}: lse {l}");
                    } else {
                        assert!(l.is_finite() && row.iter().any(|&x| x != 0.0), "row {i} sees keys");
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 10. RoPE against the complex-number rotation; norm and relative-position properties.

#[test]
fn rope_matches_complex_rotation() {
    let strategy = (1..=32usize, prop_oneof![Just(0.0f64), 0.0..100.0f64, 1e3..2e5f64], 1.5..1e5f64, any::<u64>());
    check_property("rope_matches_complex_rotation", 4 * CASES, strategy, |(half, pos, base, seed)| {
        let mut rng = Rng::new(seed);
        let x = normals(&mut rng, 2 * half, 1.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        rotate(&mut a, pos, base);
        rope_complex(&mut b, pos, base);
        let tol = 1e-13 * (1.0 + pos);
        assert!(reference::max_abs_err(&a, &b) <= tol, "rotate vs complex form at pos {pos}");
        let (na, nx) = (dot(&a, &a).sqrt(), dot(&x, &x).sqrt());
        assert!((na - nx).abs() <= 1e-12 * nx, "rotation changed the norm: {na} vs {nx}");
        if pos == 0.0 {
            assert_eq!(a, x, "position 0 is the identity");
        }
    });
}

#[test]
fn rope_scores_depend_on_relative_position_only() {
    let strategy = (1..=32usize, 0..5000usize, 0..5000usize, 0..5000usize, 1.5..1e5f64, any::<u64>());
    check_property("rope_relative_position", 4 * CASES, strategy, |(half, a, b, shift, base, seed)| {
        let mut rng = Rng::new(seed);
        let (q, k) = (normals(&mut rng, 2 * half, 1.0), normals(&mut rng, 2 * half, 1.0));
        let score = |pa: usize, pb: usize| {
            let (mut qa, mut kb) = (q.clone(), k.clone());
            rotate(&mut qa, pa as f64, base);
            rotate(&mut kb, pb as f64, base);
            dot(&qa, &kb)
        };
        let scale = dot(&q, &q).sqrt() * dot(&k, &k).sqrt();
        let (s0, s1) = (score(a, b), score(a + shift, b + shift));
        assert!((s0 - s1).abs() <= 1e-10 * scale, "<R(a)q, R(b)k> moved with a common shift: {s0} vs {s1}");
        // Equivalently, only the key rotated by b − a (or the query by a − b).
        let mut kr = k.clone();
        let mut qr = q.clone();
        if b >= a {
            rotate(&mut kr, (b - a) as f64, base);
            assert!((dot(&q, &kr) - s0).abs() <= 1e-10 * scale);
        } else {
            rotate(&mut qr, (a - b) as f64, base);
            assert!((dot(&qr, &k) - s0).abs() <= 1e-10 * scale);
        }
    });
}

#[test]
fn negative_control_rope_adjacent_pairing() {
    // Pairing (2t, 2t+1) instead of (t, t + d/2) must be detected.
    let mut rng = Rng::new(3);
    let x = normals(&mut rng, 8, 1.0);
    let mut a = x.clone();
    rotate(&mut a, 5.0, 10000.0);
    let mut b = x.clone();
    for t in 0..4 {
        let theta = 5.0 * 10000f64.powf(-2.0 * t as f64 / 8.0);
        let (c, s) = (theta.cos(), theta.sin());
        let (re, im) = (x[2 * t], x[2 * t + 1]);
        b[2 * t] = re * c - im * s;
        b[2 * t + 1] = re * s + im * c;
    }
    assert_detects("adjacent-pair rope", reference::max_abs_err(&a, &b), 1e-3);
    let mut c = x.clone();
    rope_complex(&mut c, -5.0, 10000.0);
    assert_detects("rope in the wrong direction", reference::max_abs_err(&a, &c), 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 11. lse equals log(sum exp) of the naive scores.

#[test]
fn lse_is_log_sum_exp_of_scores() {
    check_property("lse_is_log_sum_exp", CASES, shapes(), |s| {
        let x = Data::random(&s);
        let got = x.direct(&s.params());
        let (qt, kt, _) = mixed_rotated(&s, &x);
        let scale = s.params().scale;
        let (lq, lk, h, d) = (s.lq(), s.lk(), s.h, s.d);
        let mut want = vec![0.0; got.lse.len()];
        for bb in 0..s.b {
            for hh in 0..h {
                for i in 0..lq {
                    // No max shift: scores stay far below exp's overflow for these sizes.
                    let sum: f64 = (0..lk)
                        .filter(|&j| s.visible(i, j))
                        .map(|j| {
                            (scale
                                * dot(
                                    &qt[((bb * lq + i) * h + hh) * d..][..d],
                                    &kt[((bb * lk + j) * h + hh) * d..][..d],
                                ))
                            .exp()
                        })
                        .sum();
                    want[(bb * h + hh) * lq + i] = sum.ln();
                }
            }
        }
        let tol = if s.rope.is_some() { TOL_ROPE } else { TOL };
        assert_lse("lse vs log-sum-exp", &got.lse, &want, tol, &s);
    });
}

#[test]
fn negative_control_lse_with_one_extra_key() {
    let s = Shape { n: 4, m: 4, causal: true, ..base_shape() };
    let x = Data::random(&s);
    let got = x.direct(&s.params());
    let all = x.direct(&Params { causal: false, ..s.params() });
    // Row 0 of head 0 sees one key causally and all four without the mask.
    assert_detects("lse over an unmasked row", (got.lse[0] - all.lse[0]).abs(), 1e-3);
}

// ---------------------------------------------------------------------------------------------
// 12. SVD compression of MEA's KV cache.

fn frobenius(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

#[test]
fn svd_compression_error_and_full_rank() {
    let strategy = (1..=6usize, 1..=30usize, any::<prop::sample::Index>(), any::<u64>());
    check_property("svd_compression", CASES, strategy, |(h, dd, pick, seed)| {
        let mut rng = Rng::new(seed);
        let w = normals(&mut rng, h * dd, 1.0);
        let full = h.min(dd);
        let norm = frobenius(&w);

        let exact = svd::compress(&w, h, dd, full).expect("full rank compresses");
        let back = svd::reconstruct(&exact, h, dd);
        assert!(reference::max_abs_err(&back, &w) <= 1e-10 * norm, "full rank must reconstruct exactly");
        assert!(exact.error <= 1e-10 * norm && exact.rel_error <= 1e-10);

        let sv = &exact.singular_values;
        assert_eq!(sv.len(), full);
        assert!(sv.windows(2).all(|p| p[0] >= p[1]) && sv[full - 1] >= 0.0, "singular values not sorted: {sv:?}");
        let sum_sq: f64 = sv.iter().map(|x| x * x).sum();
        assert!((sum_sq.sqrt() - norm).abs() <= 1e-12 * norm, "‖A‖_F = sqrt(Σσ²)");

        let hk = 1 + pick.index(full);
        let c = svd::compress(&w, h, dd, hk).expect("compress");
        let dropped = sv[hk..].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((c.error - dropped).abs() <= 1e-12 * norm, "error {} vs dropped σ {dropped}", c.error);
        let measured = frobenius(&svd::reconstruct(&c, h, dd).iter().zip(&w).map(|(a, b)| a - b).collect::<Vec<_>>());
        assert!((c.error - measured).abs() <= 1e-10 * norm, "error {} vs measured {measured}", c.error);
        assert!((c.rel_error - c.error / norm).abs() <= 1e-12);
        assert_eq!(c.components.len(), hk * dd);
        assert_eq!(c.mix.len(), hk * h);
    });
}

#[test]
fn svd_rejects_bad_ranks() {
    let w = vec![1.0; 12];
    assert!(svd::compress(&w, 3, 4, 0).is_err());
    assert!(svd::compress(&w, 3, 4, 4).is_err());
    assert!(svd::compress(&w, 3, 5, 2).is_err(), "length mismatch");
}

/// `(B, N, M, H, Hk, D, d, seed)`: key and value projections of rank `Hk`, tokens of width `D`.
fn compressed_shapes() -> impl Strategy<Value = (Shape, usize, u64)> {
    (shapes(), 2..=5usize, any::<prop::sample::Index>(), 1..=6usize, any::<u64>()).prop_map(|(s, h, pick, dm, seed)| {
        let hk = 1 + pick.index(h);
        (Shape { h, hq: h, hk, p: 1, collapse: false, norm: Some(NormKind::Group), ..s }, dm, seed)
    })
}

/// Tokens `x: [B, S, D]` through projections `w: [Hs, D, d]`: `[B, S, Hs, d]`.
fn project(x: &[f64], w: &[f64], bs: usize, dm: usize, hs: usize, d: usize) -> Vec<f64> {
    let mut y = vec![0.0; bs * hs * d];
    for t in 0..bs {
        for hh in 0..hs {
            for e in 0..dm {
                for c in 0..d {
                    y[(t * hs + hh) * d + c] += x[t * dm + e] * w[(hh * dm + e) * d + c];
                }
            }
        }
    }
    y
}

/// A random `[H, D·d]` matrix of rank at most `rank`.
fn low_rank(rng: &mut Rng, h: usize, dd: usize, rank: usize) -> Vec<f64> {
    let a = normals(rng, h * rank, 1.0);
    let b = normals(rng, rank * dd, 1.0 / (rank as f64).sqrt());
    let mut w = vec![0.0; h * dd];
    for i in 0..h {
        for c in 0..rank {
            for j in 0..dd {
                w[i * dd + j] += a[i * rank + c] * b[c * dd + j];
            }
        }
    }
    w
}

/// Compressed MEA (component heads + `ak/av` from the SVD) vs MEA over the full key heads.
fn compressed_vs_full(s: &Shape, dm: usize, seed: u64, rank: usize) -> (Output<f64>, Output<f64>) {
    let mut rng = Rng::new(seed);
    let (h, hk, d) = (s.h, s.hk, s.d);
    let dd = dm * d;
    let wk = low_rank(&mut rng, h, dd, rank);
    let wv = low_rank(&mut rng, h, dd, rank);
    let xs = normals(&mut rng, s.b * s.m * dm, 1.0 / (dm as f64).sqrt());
    let full = Data {
        k: project(&xs, &wk, s.b * s.m, dm, h, d),
        v: project(&xs, &wv, s.b * s.m, dm, h, d),
        aq: identity_mix(h, 1),
        ak: identity_mix(h, 1),
        av: identity_mix(h, 1),
        r: None,
        ..Data::random(&Shape { hk: h, ..s.clone() })
    };
    let (ck, cv) = (svd::compress(&wk, h, dd, hk).unwrap(), svd::compress(&wv, h, dd, hk).unwrap());
    let compressed = Data {
        k: project(&xs, &ck.components, s.b * s.m, dm, hk, d),
        v: project(&xs, &cv.components, s.b * s.m, dm, hk, d),
        ak: ck.mix,
        av: cv.mix,
        ..full.clone()
    };
    (compressed.direct(&s.params()), full.direct(&Params { hk: h, ..s.params() }))
}

#[test]
fn svd_compressed_mea_equals_full_heads_for_low_rank_keys() {
    check_property("svd_compressed_mea", CASES, compressed_shapes(), |(s, dm, seed)| {
        // Keys and values that are exact combinations of Hk components (rank <= Hk).
        let rank = s.hk.min(dm * s.d);
        let s = Shape { hk: rank, ..s };
        let (got, want) = compressed_vs_full(&s, dm, seed, rank);
        let tol = if s.rope.is_some() { TOL_ROPE } else { 1e-10 };
        assert_same("compressed mea vs full heads", &got, &want, tol, &s);
    });
}

#[test]
fn negative_control_svd_truncation_below_rank() {
    let s = Shape { h: 4, hq: 4, hk: 1, p: 1, norm: Some(NormKind::Group), n: 5, m: 6, ..base_shape() };
    let (got, want) = compressed_vs_full(&s, 3, 9, 3);
    assert_detects("rank-1 cache of rank-3 keys", rel_err(&got.out, &want.out), 1e-3);
}
