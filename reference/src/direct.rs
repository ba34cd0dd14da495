//! The definition, step by step: one rayon task per `(batch, head)`.

use rayon::prelude::*;

use crate::mixing::{mix_into, row_max, selection};
use crate::rope::rotate;
use crate::{MixWeights, Output, Params, Real, apply_head_norm};

/// Mixed, interleaved pseudo-heads of one head: `[S·P, d]` with row `s·P + p` (a gather when
/// `sel` says the matrix is a selection, see [`crate::mixing`]).
fn mix_head<T: Real>(
    p: &Params,
    x: &[T],
    src_heads: usize,
    len: usize,
    a: &[T],
    sel: Option<&[usize]>,
    b: usize,
    h: usize,
) -> Vec<T> {
    let (d, pp) = (p.d, p.p);
    let mut xt = vec![T::ZERO; len * pp * d];
    for s in 0..len {
        let heads = &x[(b * len + s) * src_heads * d..][..src_heads * d];
        for q in 0..pp {
            let row = &mut xt[(s * pp + q) * d..(s * pp + q + 1) * d];
            mix_into(row, heads, a, sel, p.h, pp, h, q);
        }
    }
    xt
}

/// The selections of `aq`, `ak`, `av` (see [`crate::mixing::selection`]).
pub(crate) type Selections = [Option<Vec<usize>>; 3];

pub(crate) fn selections<T: Real>(p: &Params, w: &MixWeights<T>) -> Selections {
    [selection(w.aq, p.hq, p.h, p.p), selection(w.ak, p.hk, p.h, p.p), selection(w.av, p.hk, p.h, p.p)]
}

fn round_all<T: Real>(p: &Params, xs: &mut [T]) {
    for x in xs {
        *x = T::from_f64(p.rounding.round(x.to_f64()));
    }
}

/// Attention of one `(batch, head)`: returns `o [N·P, d]` and `lse [N·P]`.
fn head<T: Real>(
    p: &Params,
    q: &[T],
    k: &[T],
    v: &[T],
    w: &MixWeights<T>,
    sel: &Selections,
    b: usize,
    h: usize,
) -> (Vec<T>, Vec<T>) {
    let d = p.d;
    let mut qt = mix_head(p, q, p.hq, p.n, w.aq, sel[0].as_deref(), b, h);
    let mut kt = mix_head(p, k, p.hk, p.m, w.ak, sel[1].as_deref(), b, h);
    let mut vt = mix_head(p, v, p.hk, p.m, w.av, sel[2].as_deref(), b, h);
    if let Some(rope) = p.rope {
        for i in 0..p.nq() {
            rotate(&mut qt[i * d..(i + 1) * d], p.q_pos(i) as f64, rope.base);
        }
        for j in 0..p.nk() {
            rotate(&mut kt[j * d..(j + 1) * d], p.k_pos(j) as f64, rope.base);
        }
    }
    round_all(p, &mut qt);
    round_all(p, &mut kt);
    round_all(p, &mut vt);

    let scale = T::from_f64(p.scale);
    let mut o = vec![T::ZERO; p.nq() * d];
    let mut lse = vec![T::NEG_INFINITY; p.nq()];
    let mut s = vec![T::ZERO; p.nk()];
    for i in 0..p.nq() {
        // Scores of the visible keys only (a masked key is skipped, never multiplied by 0),
        // then a two-pass softmax. A NaN score makes the row's max NaN, so the row is NaN.
        let qi = &qt[i * d..(i + 1) * d];
        for j in 0..p.nk() {
            if p.visible(i, j) {
                let kj = &kt[j * d..(j + 1) * d];
                let mut dot = T::ZERO;
                for t in 0..d {
                    dot += qi[t] * kj[t];
                }
                s[j] = dot * scale;
            }
        }
        let Some(max) = row_max((0..p.nk()).filter(|&j| p.visible(i, j)).map(|j| s[j])) else {
            continue; // no visible key: zeros and lse = -inf
        };
        let mut sum = T::ZERO;
        let oi = &mut o[i * d..(i + 1) * d];
        for j in 0..p.nk() {
            if p.visible(i, j) {
                let e = (s[j] - max).exp();
                sum += e;
                let e = T::from_f64(p.rounding.round(e.to_f64()));
                let vj = &vt[j * d..(j + 1) * d];
                for t in 0..d {
                    oi[t] += e * vj[t];
                }
            }
        }
        for t in 0..d {
            oi[t] = oi[t] / sum;
        }
        lse[i] = max + sum.ln();
    }
    round_all(p, &mut o);
    (o, lse)
}

/// Head-mixing attention by the definition. `q: [B,N,Hq,d]`, `k, v: [B,M,Hk,d]`.
///
/// Returns the output (`[B,N,H,d]` with `w.r`, else `[B,N,H,P,d]`) and `lse [B,H,N·P]`.
/// Panics on inconsistent lengths: validation is the caller's job.
pub fn attention<T: Real>(p: &Params, q: &[T], k: &[T], v: &[T], w: &MixWeights<T>) -> Output<T> {
    assert_eq!(q.len(), p.b * p.n * p.hq * p.d, "q length");
    assert_eq!(k.len(), p.b * p.m * p.hk * p.d, "k length");
    assert_eq!(v.len(), p.b * p.m * p.hk * p.d, "v length");
    let (hh, pp, d) = (p.h, p.p, p.d);
    let sel = selections(p, w);
    let heads: Vec<(Vec<T>, Vec<T>)> =
        (0..p.b * hh).into_par_iter().map(|bh| head(p, q, k, v, w, &sel, bh / hh, bh % hh)).collect();

    // De-interleave: op[b, n, h, q] = o_h[n·P + q].
    let mut op = vec![T::ZERO; p.b * p.n * hh * pp * d];
    let mut lse = vec![T::NEG_INFINITY; p.b * hh * p.nq()];
    for (bh, (o, l)) in heads.iter().enumerate() {
        let (b, h) = (bh / hh, bh % hh);
        lse[bh * p.nq()..(bh + 1) * p.nq()].copy_from_slice(l);
        for n in 0..p.n {
            for q in 0..pp {
                let dst = (((b * p.n + n) * hh + h) * pp + q) * d;
                op[dst..dst + d].copy_from_slice(&o[(n * pp + q) * d..(n * pp + q + 1) * d]);
            }
        }
    }

    // Collapse: out[n, h] = sum_{h', q} r[h, h'·P + q] · op[n, h', q].
    let (mut out, width) = match w.r {
        None => (op, pp),
        Some(r) => {
            let mut out = vec![T::ZERO; p.b * p.n * hh * d];
            for bn in 0..p.b * p.n {
                for h in 0..hh {
                    let dst = &mut out[(bn * hh + h) * d..(bn * hh + h + 1) * d];
                    for c in 0..hh * pp {
                        let coef = r[h * hh * pp + c];
                        let src = &op[(bn * hh * pp + c) * d..(bn * hh * pp + c + 1) * d];
                        for t in 0..d {
                            dst[t] += coef * src[t];
                        }
                    }
                }
            }
            (out, 1)
        }
    };

    // Head norm, per output vector of length d; gamma (and beta) are per attention head.
    if let Some(norm) = &w.norm {
        apply_head_norm(norm, &mut out, hh, d, width, p.eps);
    }
    round_all(p, &mut out);
    Output { out, lse }
}
