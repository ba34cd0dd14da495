//! The unfused pipeline, written independently of [`crate::attention`] so the two check each other:
//! materialise the mixed tensors, reshape to `N·P` virtual tokens, textbook attention, reshape back,
//! collapse, norm.

use rayon::prelude::*;

use crate::mixing::{mix_into, row_max, selection};
use crate::rope::rotate;
use crate::{HeadNorm, MixWeights, Output, Params, Real, Rounding};

/// Mask and scale of textbook attention over `[B, L, H, d]` tensors (bottom-right aligned).
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    pub causal: bool,
    /// `(left, right)` in tokens of the attention call.
    pub window: Option<(usize, usize)>,
}

/// Textbook multi-head attention `softmax(s·QKᵀ)V` per head, with the mask aligned to the
/// bottom-right corner (query row `i` sits at key column `i + Lk − Lq`).
/// `q: [B, Lq, H, d]`, `k, v: [B, Lk, H, d]`; returns `o [B, Lq, H, d]` and `lse [B, H, Lq]`.
pub fn mha<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
    scale: f64,
    mask: Mask,
) -> (Vec<T>, Vec<T>) {
    let rows: Vec<(Vec<T>, T)> = (0..b * h * lq)
        .into_par_iter()
        .map(|row| {
            let (bb, hh, i) = (row / (h * lq), (row / lq) % h, row % lq);
            // Wide integers: a window reach may be as large as `usize::MAX` ("unbounded").
            let col = i as i128 + lk as i128 - lq as i128;
            let allowed = |j: usize| {
                let j = j as i128;
                let causal_ok = !mask.causal || j <= col;
                let window_ok = match mask.window {
                    None => true,
                    Some((l, r)) => j >= col - l as i128 && j <= col + r as i128,
                };
                causal_ok && window_ok
            };
            let qi = &q[((bb * lq + i) * h + hh) * d..][..d];
            let scores: Vec<Option<f64>> = (0..lk)
                .map(|j| {
                    allowed(j).then(|| {
                        let kj = &k[((bb * lk + j) * h + hh) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>() * scale
                    })
                })
                .collect();
            // NaN-aware: a NaN score makes the row NaN (f64::max would drop it).
            let mut o = vec![T::ZERO; d];
            let Some(max) = row_max(scores.iter().flatten().cloned()) else {
                return (o, T::NEG_INFINITY);
            };
            let z: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
            let mut acc = vec![0.0f64; d];
            for (j, s) in scores.iter().enumerate() {
                if let Some(s) = s {
                    let pj = (s - max).exp() / z;
                    let vj = &v[((bb * lk + j) * h + hh) * d..][..d];
                    for t in 0..d {
                        acc[t] += pj * vj[t].to_f64();
                    }
                }
            }
            for t in 0..d {
                o[t] = T::from_f64(acc[t]);
            }
            (o, T::from_f64(max + z.ln()))
        })
        .collect();
    let mut o = vec![T::ZERO; b * lq * h * d];
    let mut lse = vec![T::ZERO; b * h * lq];
    for (row, (oi, l)) in rows.into_iter().enumerate() {
        let (bb, hh, i) = (row / (h * lq), (row / lq) % h, row % lq);
        o[((bb * lq + i) * h + hh) * d..][..d].copy_from_slice(&oi);
        lse[row] = l;
    }
    (o, lse)
}

/// `x: [B, S, Hs, d]` mixed by `a: [Hs, H, P]` into `[B, S, P, H, d]`, which *is* `[B, S·P, H, d]`.
/// A selection matrix gathers (see [`crate::mixing`]). Parallel over tokens; the benchmarks'
/// unfused pipeline runs this as its mix stage.
pub fn materialise<T: Real>(x: &[T], a: &[T], b: usize, s: usize, hs: usize, h: usize, p: usize, d: usize) -> Vec<T> {
    let sel = selection(a, hs, h, p);
    let mut y = vec![T::ZERO; b * s * p * h * d];
    y.par_chunks_mut(p * h * d).enumerate().for_each(|(bs, yt)| {
        let heads = &x[bs * hs * d..(bs + 1) * hs * d];
        for q in 0..p {
            for hh in 0..h {
                let dst = &mut yt[(q * h + hh) * d..][..d];
                mix_into(dst, heads, a, sel.as_deref(), h, p, hh, q);
            }
        }
    });
    y
}

fn round_all<T: Real>(r: Rounding, xs: &mut [T]) {
    for x in xs {
        *x = T::from_f64(r.round(x.to_f64()));
    }
}

/// The unfused pipeline; same arguments and result as [`crate::attention`]
/// (its `Rounding` is applied to the materialised tensors and the output only).
pub fn attention<T: Real>(p: &Params, q: &[T], k: &[T], v: &[T], w: &MixWeights<T>) -> Output<T> {
    let (b, h, pp, d) = (p.b, p.h, p.p, p.d);
    let (lq, lk) = (p.n * pp, p.m * pp);
    let mut qt = materialise(q, w.aq, b, p.n, p.hq, h, pp, d);
    let mut kt = materialise(k, w.ak, b, p.m, p.hk, h, pp, d);
    let mut vt = materialise(v, w.av, b, p.m, p.hk, h, pp, d);
    if let Some(rope) = p.rope {
        for (idx, x) in qt.chunks_mut(d).enumerate() {
            rotate(x, p.q_pos((idx / h) % lq) as f64, rope.base);
        }
        for (idx, x) in kt.chunks_mut(d).enumerate() {
            rotate(x, p.k_pos((idx / h) % lk) as f64, rope.base);
        }
    }
    for t in [&mut qt, &mut kt, &mut vt] {
        round_all(p.rounding, t);
    }
    let mask = Mask { causal: p.causal, window: p.window };
    let (o, lse) = mha(&qt, &kt, &vt, b, lq, lk, h, d, p.scale, mask);

    let mut out = collapse(&o, w.r, w.norm.as_ref(), p.eps, b, p.n, h, pp, d);
    round_all(p.rounding, &mut out);
    Output { out, lse }
}

/// After the attention: `o: [B, N, P, H, d]` (the `N·P` virtual tokens) reshaped back to pseudo
/// outputs `[B, N, H, P, d]`, collapsed by `r: [H, H·P]` into `[B, N, H, d]` when given, then
/// the head norm (`Group` or `Rms`, `gamma, beta: [H, d]`) when given (parallel over tokens; the
/// benchmarks' unfused pipeline runs this as its collapse stage).
pub fn collapse<T: Real>(
    o: &[T],
    r: Option<&[T]>,
    norm: Option<&HeadNorm<&[T]>>,
    eps: f64,
    b: usize,
    n: usize,
    h: usize,
    pp: usize,
    d: usize,
) -> Vec<T> {
    let per_token = if r.is_some() { h * d } else { h * pp * d };
    let mut out = vec![T::ZERO; b * n * per_token];
    out.par_chunks_mut(per_token).enumerate().for_each(|(bn, ot)| {
        // Reshape back: pseudo output (h, q) is virtual token q of head h.
        let mut op = vec![T::ZERO; h * pp * d];
        for q in 0..pp {
            for hh in 0..h {
                let src = &o[((bn * pp + q) * h + hh) * d..][..d];
                op[(hh * pp + q) * d..][..d].copy_from_slice(src);
            }
        }
        // Collapse as a matrix product per token: [H, H·P] × [H·P, d].
        match r {
            None => ot.copy_from_slice(&op),
            Some(r) => {
                for row in 0..h {
                    for t in 0..d {
                        let mut acc = 0.0f64;
                        for c in 0..h * pp {
                            acc += r[row * h * pp + c].to_f64() * op[c * d + t].to_f64();
                        }
                        ot[row * d + t] = T::from_f64(acc);
                    }
                }
            }
        }
        // Head norm: each d-vector of the token's output is one group (PyTorch GroupNorm(H, H·d)
        // for the collapsed [H·d]), statistics in f64.
        if let Some(norm) = norm {
            let width = if r.is_some() { 1 } else { pp };
            let centre = matches!(norm, HeadNorm::Group { .. });
            for (idx, x) in ot.chunks_mut(d).enumerate() {
                let hh = idx / width;
                let xs: Vec<f64> = x.iter().map(|e| e.to_f64()).collect();
                let mu = if centre { xs.iter().sum::<f64>() / d as f64 } else { 0.0 };
                let var = xs.iter().map(|e| (e - mu) * (e - mu)).sum::<f64>() / d as f64;
                let sd = (var + eps).sqrt();
                for t in 0..d {
                    let shift = norm.beta().map_or(0.0, |b| b[hh * d + t].to_f64());
                    x[t] = T::from_f64(norm.gamma()[hh * d + t].to_f64() * (xs[t] - mu) / sd + shift);
                }
            }
        }
    });
    out
}
