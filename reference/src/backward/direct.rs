//! The backward by FlashAttention-2's algorithm, one batch element per rayon task and one head at
//! a time inside it (rows and keys of a head in parallel): probabilities recomputed from `lse`,
//! `D_i = <do_i, o_i>`, `dS = P ∘ (dP − D)`; `dq` query-major and `dk, dv` key-major, so no two
//! tasks write one value and the reduction order is fixed (deterministic). Extra memory: one head's
//! mixed tensors and their gradients per batch element in flight, plus `y, dy` with a norm.

use rayon::prelude::*;

use super::{Grads, Layer, axpy, dot, norm};
use crate::mixing::selection;
use crate::rope::rotate;
use crate::{Params, Real};

/// One head's mixed, interleaved, rotated tensors: rows `s·P + p` of `d` values.
struct Head<T> {
    qr: Vec<T>,
    kr: Vec<T>,
    vt: Vec<T>,
}

/// Head `h`'s mixed rows `xt[s·P + q] = sum_m a[m,h,q] x[s, m]`. A selection matrix (MHA, GQA:
/// every column one-hot with weight 1) reads only the selected head, as the forward does: an
/// unread head's non-finite value never enters as `0 · NaN` (the NaN policy).
fn mix<T: Real>(p: &Params, x: &[T], src: usize, len: usize, a: &[T], b: usize, h: usize) -> Vec<T> {
    let (d, pp) = (p.d, p.p);
    let sel = selection(a, src, p.h, pp).is_some();
    let mut xt = vec![T::ZERO; len * pp * d];
    for s in 0..len {
        for q in 0..pp {
            let row = &mut xt[(s * pp + q) * d..][..d];
            for m in 0..src {
                let w = a[(m * p.h + h) * pp + q];
                if !(sel && w == T::ZERO) {
                    axpy(w, &x[((b * len + s) * src + m) * d..][..d], row);
                }
            }
        }
    }
    xt
}

impl<T: Real> Head<T> {
    fn new(p: &Params, q: &[T], k: &[T], v: &[T], layer: &Layer<T>, b: usize, h: usize) -> Head<T> {
        let mut qr = mix(p, q, p.hq, p.n, layer.aq, b, h);
        let mut kr = mix(p, k, p.hk, p.m, layer.ak, b, h);
        let vt = mix(p, v, p.hk, p.m, layer.av, b, h);
        if let Some(rope) = p.rope {
            for (i, x) in qr.chunks_mut(p.d).enumerate() {
                rotate(x, p.q_pos(i) as f64, rope.base);
            }
            for (j, x) in kr.chunks_mut(p.d).enumerate() {
                rotate(x, p.k_pos(j) as f64, rope.base);
            }
        }
        Head { qr, kr, vt }
    }

    /// `P_ij = exp(s·<qr_i, kr_j> − lse_i)`.
    fn prob(&self, p: &Params, i: usize, j: usize, lse: T) -> T {
        let d = p.d;
        (dot(&self.qr[i * d..][..d], &self.kr[j * d..][..d]) * T::from_f64(p.scale) - lse).exp()
    }

    /// `o_i = sum_j P_ij vt_j`, recomputed from `lse_i`.
    fn output(&self, p: &Params, i: usize, lse: T) -> Vec<T> {
        let d = p.d;
        let mut o = vec![T::ZERO; d];
        if lse == T::NEG_INFINITY {
            return o;
        }
        for j in (0..p.nk()).filter(|&j| p.visible(i, j)) {
            axpy(self.prob(p, i, j, lse), &self.vt[j * d..][..d], &mut o);
        }
        o
    }
}

/// What the query-major pass keeps of virtual query `i`.
struct Row<T> {
    /// `do_i`.
    d_out: Vec<T>,
    /// `D_i = <do_i, o_i>`.
    d: T,
    /// `dqr_i`, before RoPE's transpose.
    dqr: Vec<T>,
    /// `<dy[n, ho], o_i>` for every output head `ho` (with a collapse).
    dr: Vec<T>,
}

/// What one batch element contributes.
struct Part<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    g: Grads<T>,
}

/// The gradients by FlashAttention-2's algorithm. `out` and `lse` are the forward's (`lse` as
/// returned, `[B, H, N·P]`); `out` is read only when given and when it is the pseudo-output itself
/// (no collapse, no norm), else `o` is recomputed (a caller holding `out` rounded to a low
/// precision may pass `None` for a more accurate `D`). Panics on inconsistent lengths
/// (validation is the caller's).
pub fn backward<T: Real>(
    p: &Params,
    q: &[T],
    k: &[T],
    v: &[T],
    layer: &Layer<T>,
    out: Option<&[T]>,
    lse: &[T],
    dout: &[T],
) -> Grads<T> {
    backward_with_fault(p, q, k, v, layer, out, lse, dout, Fault::None)
}

/// A deliberately wrong step, for the negative controls of the gradient checks only: each must
/// make the finite-difference check fail.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// RoPE's transpose rotates by `+theta` (the forward rotation) instead of `-theta`.
    RopeNotTransposed,
    /// `dS = P ∘ dP`: FlashAttention-2's `- D_i` left out.
    NoRowTerm,
    /// The key-major pass ignores the mask (every query row reaches every key).
    MaskIgnoredForKeys,
    /// Mixing back reads the weights of the mirrored head `H-1-h`.
    MixWrongHead,
}

#[doc(hidden)]
pub fn backward_with_fault<T: Real>(
    p: &Params,
    q: &[T],
    k: &[T],
    v: &[T],
    layer: &Layer<T>,
    out: Option<&[T]>,
    lse: &[T],
    dout: &[T],
    fault: Fault,
) -> Grads<T> {
    let width = layer.width(p);
    assert_eq!(dout.len(), p.b * p.n * p.h * width * p.d, "dout length");
    if let Some(out) = out {
        assert_eq!(out.len(), dout.len(), "out length");
    }
    assert_eq!(lse.len(), p.b * p.h * p.nq(), "lse length");
    let parts: Vec<Part<T>> =
        (0..p.b).into_par_iter().map(|b| batch(p, q, k, v, layer, out, lse, dout, b, fault)).collect();
    let mut g = Grads::zeros(p, layer);
    g.dq.clear();
    g.dk.clear();
    g.dv.clear();
    let add = |acc: &mut Vec<T>, x: &[T]| acc.iter_mut().zip(x).for_each(|(a, x)| *a += *x);
    for part in parts {
        g.dq.extend_from_slice(&part.dq);
        g.dk.extend_from_slice(&part.dk);
        g.dv.extend_from_slice(&part.dv);
        add(&mut g.daq, &part.g.daq);
        add(&mut g.dak, &part.g.dak);
        add(&mut g.dav, &part.g.dav);
        for (acc, x) in [(&mut g.dr, &part.g.dr), (&mut g.dgamma, &part.g.dgamma), (&mut g.dbeta, &part.g.dbeta)] {
            if let (Some(acc), Some(x)) = (acc.as_mut(), x.as_ref()) {
                add(acc, x);
            }
        }
    }
    g
}

fn batch<T: Real>(
    p: &Params,
    q: &[T],
    k: &[T],
    v: &[T],
    layer: &Layer<T>,
    out: Option<&[T]>,
    lse: &[T],
    dout: &[T],
    b: usize,
    fault: Fault,
) -> Part<T> {
    let (hh, pp, d, nq) = (p.h, p.p, p.d, p.nq());
    let width = layer.width(p);
    let vec_len = p.n * hh * width * d; // out / dout of one batch element
    let dout_b = &dout[b * vec_len..][..vec_len];
    let out_b = out.map(|o| &o[b * vec_len..][..vec_len]);
    let mut g = Grads::zeros(&Params { b: 1, ..p.clone() }, layer);
    let lse_of = |h: usize, i: usize| lse[(b * hh + h) * nq + i];

    // 8'. Head norm: recompute y (every head's o, collapsed), then dy and the dgamma/dbeta terms.
    let dy: Vec<T> = match &layer.norm {
        None => dout_b.to_vec(),
        Some(nw) => {
            let mut y = vec![T::ZERO; vec_len];
            for h in 0..hh {
                let head = Head::new(p, q, k, v, layer, b, h);
                let o: Vec<Vec<T>> = (0..nq).into_par_iter().map(|i| head.output(p, i, lse_of(h, i))).collect();
                for (i, oi) in o.iter().enumerate() {
                    let (n, ps) = (i / pp, i % pp);
                    match layer.r {
                        Some(r) => {
                            for ho in 0..hh {
                                axpy(r[ho * hh * pp + h * pp + ps], oi, &mut y[(n * hh + ho) * d..][..d]);
                            }
                        }
                        None => y[((n * hh + h) * pp + ps) * d..][..d].copy_from_slice(oi),
                    }
                }
            }
            let mut dy = vec![T::ZERO; vec_len];
            let (dgamma, mut dbeta) = (g.dgamma.as_mut().unwrap(), g.dbeta.as_mut());
            for idx in 0..vec_len / d {
                let h = (idx / width) % hh;
                let dx = norm::backward(
                    nw,
                    h,
                    &y[idx * d..][..d],
                    &dout_b[idx * d..][..d],
                    p.eps,
                    &mut dgamma[h * d..][..d],
                    dbeta.as_mut().map(|b| &mut b[h * d..][..d]),
                );
                dy[idx * d..][..d].copy_from_slice(&dx);
            }
            dy
        }
    };
    // FlashAttention-2's D = rowsum(dO ∘ O) from the saved output when it is the pseudo-output.
    let saved_o = out_b.filter(|_| layer.r.is_none() && layer.norm.is_none());

    let mut dq = vec![T::ZERO; p.n * p.hq * d];
    let mut dk = vec![T::ZERO; p.m * p.hk * d];
    let mut dv = vec![T::ZERO; p.m * p.hk * d];
    let scale = T::from_f64(p.scale);
    for h in 0..hh {
        let head = Head::new(p, q, k, v, layer, b, h);
        // 7'. 6'. do_i: the collapse's transpose of dy, at virtual query i = n·P + ps.
        let d_out = |i: usize| -> Vec<T> {
            let (n, ps) = (i / pp, i % pp);
            match layer.r {
                Some(r) => {
                    let mut x = vec![T::ZERO; d];
                    for ho in 0..hh {
                        axpy(r[ho * hh * pp + h * pp + ps], &dy[(n * hh + ho) * d..][..d], &mut x);
                    }
                    x
                }
                None => dy[((n * hh + h) * pp + ps) * d..][..d].to_vec(),
            }
        };
        // 5'. Query-major: do_i, o_i, D_i, dqr_i, and the dr terms <dy[n, ho], o_i>.
        let rows: Vec<Row<T>> = (0..nq)
            .into_par_iter()
            .map(|i| {
                let l = lse_of(h, i);
                let doi = d_out(i);
                let oi = match saved_o {
                    Some(o) => o[((i / pp * hh + h) * pp + i % pp) * d..][..d].to_vec(),
                    None => head.output(p, i, l),
                };
                let mut dqr = vec![T::ZERO; d];
                let mut di = T::ZERO;
                if l != T::NEG_INFINITY {
                    di = if fault == Fault::NoRowTerm { T::ZERO } else { dot(&doi, &oi) };
                    for j in (0..p.nk()).filter(|&j| p.visible(i, j)) {
                        let pij = head.prob(p, i, j, l);
                        let ds = pij * (dot(&doi, &head.vt[j * d..][..d]) - di);
                        axpy(ds * scale, &head.kr[j * d..][..d], &mut dqr);
                    }
                }
                let drow = match layer.r {
                    Some(_) => (0..hh).map(|ho| dot(&dy[((i / pp) * hh + ho) * d..][..d], &oi)).collect(),
                    None => Vec::new(),
                };
                Row { d_out: doi, d: di, dqr, dr: drow }
            })
            .collect();
        if let Some(dr) = g.dr.as_mut() {
            for (i, row) in rows.iter().enumerate() {
                for ho in 0..hh {
                    dr[ho * hh * pp + h * pp + i % pp] += row.dr[ho];
                }
            }
        }
        // 5'. Key-major: dkr_j = s·sum_i dS_ij qr_i, dvt_j = sum_i P_ij do_i.
        let keys: Vec<(Vec<T>, Vec<T>)> = (0..p.nk())
            .into_par_iter()
            .map(|j| {
                let (mut dkr, mut dvt) = (vec![T::ZERO; d], vec![T::ZERO; d]);
                for i in (0..nq).filter(|&i| p.visible(i, j) || fault == Fault::MaskIgnoredForKeys) {
                    let l = lse_of(h, i);
                    if l == T::NEG_INFINITY {
                        continue;
                    }
                    let (doi, di) = (&rows[i].d_out, rows[i].d);
                    let pij = head.prob(p, i, j, l);
                    let ds = pij * (dot(doi, &head.vt[j * d..][..d]) - di);
                    axpy(ds * scale, &head.qr[i * d..][..d], &mut dkr);
                    axpy(pij, doi, &mut dvt);
                }
                (dkr, dvt)
            })
            .collect();
        // 3'. RoPE transpose: rotate back by -theta.
        let mut dqt: Vec<T> = rows.into_iter().flat_map(|r| r.dqr).collect();
        let mut dkt: Vec<T> = keys.iter().flat_map(|k| k.0.iter().copied()).collect();
        let dvt: Vec<T> = keys.into_iter().flat_map(|k| k.1).collect();
        if let Some(rope) = p.rope {
            let sign = if fault == Fault::RopeNotTransposed { 1.0 } else { -1.0 };
            for (i, x) in dqt.chunks_mut(d).enumerate() {
                rotate(x, sign * p.q_pos(i) as f64, rope.base);
            }
            for (j, x) in dkt.chunks_mut(d).enumerate() {
                rotate(x, sign * p.k_pos(j) as f64, rope.base);
            }
        }
        // 2'. 1'. Mix back into the stored heads, and the mixing weights' gradients.
        let hw = if fault == Fault::MixWrongHead { hh - 1 - h } else { h };
        mix_back(p, &dqt, q, p.hq, p.n, layer.aq, b, (h, hw), &mut dq, &mut g.daq);
        mix_back(p, &dkt, k, p.hk, p.m, layer.ak, b, (h, hw), &mut dk, &mut g.dak);
        mix_back(p, &dvt, v, p.hk, p.m, layer.av, b, (h, hw), &mut dv, &mut g.dav);
    }
    Part { dq, dk, dv, g }
}

/// The transpose of [`mix`] for head `h`: `dx[s, m] += sum_ps a[m,h,ps] dxt[s·P + ps]` and
/// `da[m, h, ps] += sum_s <x[s, m], dxt[s·P + ps]>` (`hw`, the head whose weights are read, is `h`
/// except under [`Fault::MixWrongHead`]).
fn mix_back<T: Real>(
    p: &Params,
    dxt: &[T],
    x: &[T],
    src: usize,
    len: usize,
    a: &[T],
    b: usize,
    (h, hw): (usize, usize),
    dx: &mut [T],
    da: &mut [T],
) {
    let (d, pp) = (p.d, p.p);
    let sel = selection(a, src, p.h, pp).is_some(); // as in `mix`: no 0 · NaN into unread heads
    for s in 0..len {
        for ps in 0..pp {
            let g = &dxt[(s * pp + ps) * d..][..d];
            for m in 0..src {
                let w = (m * p.h + h) * pp + ps;
                let weight = a[(m * p.h + hw) * pp + ps];
                if !(sel && weight == T::ZERO) {
                    axpy(weight, g, &mut dx[(s * src + m) * d..][..d]);
                }
                da[w] += dot(&x[((b * len + s) * src + m) * d..][..d], g);
            }
        }
    }
}
