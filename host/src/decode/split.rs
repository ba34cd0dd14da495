//! Split-KV attention (flash-decoding) on the CPU, the plan device decode kernels follow.
//!
//! With few queries (decode), one block per `(batch, head)` leaves most of a GPU idle; instead the
//! cached keys are cut into chunks, each chunk computes its own softmax-normalised partial output
//! `o_c` and log-sum-exp `lse_c`, and a second pass combines them exactly:
//! `lse = log Σ_c exp(lse_c)`, `o = Σ_c exp(lse_c − lse) · o_c`. Chunks whose rows see no key have
//! `lse_c = −inf` and weigh nothing. Collapse and head norm run after the combine.
//!
//! Positions and masks are those of the whole call ([`Params::visible`], [`Params::q_pos`],
//! [`Params::k_pos`] on global indices), so a chunk is just a range of key tokens. Arithmetic is
//! exact in `T` (`Params::rounding` is not applied).
//!
//! Each chunk mixes its own stored keys/values into pseudo-heads (and rotates the keys) on the
//! fly: only the `Hk` stored heads are ever read from the cache, which is the point of the fused
//! design. (A device kernel may instead absorb `ak` into the queries, see the spec's design notes;
//! the partials and the combine are the same.) A chunk cut inside the window, or one the window
//! hides entirely, is handled by the mask alone.

use std::ops::Range;

use headmix_reference::mixing::{mix_into, row_max, selection};
use headmix_reference::rope::rotate;
use headmix_reference::{MixWeights, Output, Params, Real, apply_head_norm};
use rayon::prelude::*;

use crate::decode::{DecodeIo, DecodeProblem};
use crate::{Result, Weights};

/// Key tokens per chunk of the CPU's decode: a sequence of `M` held tokens is cut into
/// `ceil(M / 64)` chunks.
pub const DEFAULT_CHUNK_TOKENS: usize = 64;

/// Attention of every virtual query against one chunk of keys.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial<T> {
    /// `[B, H, N·P, d]`, normalised within the chunk (zeros where `lse` is `-inf`).
    pub o: Vec<T>,
    /// `[B, H, N·P]`.
    pub lse: Vec<T>,
}

/// Mixed, interleaved, rotated rows `s·P + p` of tokens `tokens` of batch `b`, head `h`.
fn mix_rows<T: Real>(
    p: &Params,
    x: &[T],
    heads: usize,
    len: usize,
    a: &[T],
    sel: Option<&[usize]>,
    b: usize,
    h: usize,
    tokens: Range<usize>,
    pos: Option<&dyn Fn(usize) -> usize>,
) -> Vec<T> {
    let (d, pp) = (p.d, p.p);
    let mut out = vec![T::ZERO; tokens.len() * pp * d];
    for (r, s) in tokens.clone().enumerate() {
        let src = &x[(b * len + s) * heads * d..][..heads * d];
        for q in 0..pp {
            let row = &mut out[(r * pp + q) * d..(r * pp + q + 1) * d];
            mix_into(row, src, a, sel, p.h, pp, h, q); // a gather for selection matrices
            if let (Some(rope), Some(pos)) = (p.rope, pos) {
                rotate(row, pos(s * pp + q) as f64, rope.base);
            }
        }
    }
    out
}

/// Partial attention over key tokens `keys` (a sub-range of `0..M`), one rayon task per
/// `(batch, head)`: mix (and rotate) the queries and this chunk's keys and values, then a
/// softmax normalised within the chunk.
pub fn chunk<T: Real>(p: &Params, q: &[T], k: &[T], v: &[T], w: &MixWeights<T>, keys: Range<usize>) -> Partial<T> {
    let (d, nq) = (p.d, p.nq());
    let scale = T::from_f64(p.scale);
    let j0 = keys.start * p.p;
    let [sq, sk, sv] = [(w.aq, p.hq), (w.ak, p.hk), (w.av, p.hk)].map(|(a, src)| selection(a, src, p.h, p.p));
    let heads: Vec<(Vec<T>, Vec<T>)> = (0..p.b * p.h)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / p.h, bh % p.h);
            let mut o = vec![T::ZERO; nq * d];
            let mut lse = vec![T::NEG_INFINITY; nq];
            // Queries and keys rotated at their global positions after mixing; values never.
            let qt = mix_rows(p, q, p.hq, p.n, w.aq, sq.as_deref(), b, h, 0..p.n, Some(&|i| p.q_pos(i)));
            let kt = mix_rows(p, k, p.hk, p.m, w.ak, sk.as_deref(), b, h, keys.clone(), Some(&|j| p.k_pos(j)));
            let vt = mix_rows(p, v, p.hk, p.m, w.av, sv.as_deref(), b, h, keys.clone(), None);
            let nk = kt.len() / d;
            let mut scores = vec![None; nk];
            for i in 0..nq {
                let qi = &qt[i * d..(i + 1) * d];
                for (jj, s) in scores.iter_mut().enumerate() {
                    *s = p.visible(i, j0 + jj).then(|| {
                        let kj = &kt[jj * d..(jj + 1) * d];
                        let mut dot = T::ZERO;
                        for t in 0..d {
                            dot += qi[t] * kj[t];
                        }
                        dot * scale
                    });
                }
                // NaN-aware: a NaN score makes the partial NaN (and the combined row).
                let Some(max) = row_max(scores.iter().flatten().copied()) else {
                    continue; // this chunk holds no key the row sees: zeros, lse = -inf
                };
                let oi = &mut o[i * d..(i + 1) * d];
                let mut sum = T::ZERO;
                for (jj, s) in scores.iter().enumerate() {
                    if let Some(s) = *s {
                        let e = (s - max).exp();
                        sum += e;
                        for t in 0..d {
                            oi[t] += e * vt[jj * d + t];
                        }
                    }
                }
                for t in 0..d {
                    oi[t] = oi[t] / sum;
                }
                lse[i] = max + sum.ln();
            }
            (o, lse)
        })
        .collect();
    let mut part = Partial { o: Vec::with_capacity(p.b * p.h * nq * d), lse: Vec::with_capacity(p.b * p.h * nq) };
    for (o, lse) in heads {
        part.o.extend(o);
        part.lse.extend(lse);
    }
    part
}

/// Exact log-sum-exp combine of partials over disjoint chunks that together cover the keys.
pub fn combine<T: Real>(parts: &[Partial<T>]) -> Partial<T> {
    let first = &parts[0];
    let rows = first.lse.len();
    let d = first.o.len() / rows.max(1);
    let mut o = vec![T::ZERO; first.o.len()];
    let mut lse = vec![T::NEG_INFINITY; rows];
    for r in 0..rows {
        // A chunk whose row read a NaN has lse NaN: the combined row is NaN (o and lse).
        if parts.iter().any(|c| c.lse[r] != c.lse[r]) {
            let nan = T::from_f64(f64::NAN);
            o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x = nan);
            lse[r] = nan;
            continue;
        }
        let max = parts.iter().fold(T::NEG_INFINITY, |m, c| if c.lse[r] > m { c.lse[r] } else { m });
        if max == T::NEG_INFINITY {
            continue; // no chunk sees a key: zeros and -inf
        }
        let total =
            parts.iter().filter(|c| c.lse[r] != T::NEG_INFINITY).fold(T::ZERO, |acc, c| acc + (c.lse[r] - max).exp());
        let l = max + total.ln();
        lse[r] = l;
        for c in parts.iter().filter(|c| c.lse[r] != T::NEG_INFINITY) {
            let wgt = (c.lse[r] - l).exp();
            for t in 0..d {
                o[r * d + t] += wgt * c.o[r * d + t];
            }
        }
    }
    Partial { o, lse }
}

/// De-interleave, collapse and head-norm a combined partial: the operator's [`Output`].
pub fn finish<T: Real>(p: &Params, part: &Partial<T>, w: &MixWeights<T>) -> Output<T> {
    let (hh, pp, d, nq) = (p.h, p.p, p.d, p.nq());
    let mut op = vec![T::ZERO; p.b * p.n * hh * pp * d];
    for b in 0..p.b {
        for h in 0..hh {
            for i in 0..nq {
                let (n, q) = (i / pp, i % pp);
                let src = ((b * hh + h) * nq + i) * d;
                let dst = (((b * p.n + n) * hh + h) * pp + q) * d;
                op[dst..dst + d].copy_from_slice(&part.o[src..src + d]);
            }
        }
    }
    let (mut out, width) = match w.r {
        None => (op, pp),
        Some(r) => {
            let mut out = vec![T::ZERO; p.b * p.n * hh * d];
            for bn in 0..p.b * p.n {
                for h in 0..hh {
                    for c in 0..hh * pp {
                        let coef = r[h * hh * pp + c];
                        for t in 0..d {
                            out[(bn * hh + h) * d + t] += coef * op[(bn * hh * pp + c) * d + t];
                        }
                    }
                }
            }
            (out, 1)
        }
    };
    if let Some(norm) = &w.norm {
        apply_head_norm(norm, &mut out, hh, d, width, p.eps);
    }
    Output { out, lse: part.lse.clone() }
}

/// The whole operator by split-KV: chunks of `chunk_tokens` key tokens (the last one shorter),
/// combined, finished.
pub fn attention<T: Real>(p: &Params, q: &[T], k: &[T], v: &[T], w: &MixWeights<T>, chunk_tokens: usize) -> Output<T> {
    let step = chunk_tokens.max(1);
    let parts: Vec<Partial<T>> = (0..p.m).step_by(step).map(|s| chunk(p, q, k, v, w, s..(s + step).min(p.m))).collect();
    finish(p, &combine(&parts), w)
}

/// Decode a validated problem on the host: per sequence, its `M` held tokens (the ring unrolled,
/// oldest first) are cut into chunks of `ceil(M / splits)` tokens (at most `splits` chunks;
/// default `splits = ceil(M / DEFAULT_CHUNK_TOKENS)`), each chunk attended separately, the
/// partials combined by log-sum-exp. f32 arithmetic (f16/bf16 widened, outputs rounded).
/// Outputs are written once every sequence is done.
pub fn decode_host(problem: &DecodeProblem, w: &Weights, io: DecodeIo<'_>, splits: Option<usize>) -> Result<()> {
    problem.check_io(w, &io)?;
    let c = &problem.cfg;
    let mix = w.mix();
    let q_row = problem.n * c.q_heads * c.head_dim;
    let q = io.q.data.to_f32();
    let mut out = Vec::with_capacity(io.out.data.len());
    let mut lse = Vec::with_capacity(problem.lse_len());
    for b in 0..problem.batch {
        let (k, v) = io.cache.sequence(b)?;
        let params = problem.sequence(b).params();
        let m = params.m;
        let chunks = splits.unwrap_or(m.div_ceil(DEFAULT_CHUNK_TOKENS)).clamp(1, m);
        let res =
            attention(&params, &q[b * q_row..(b + 1) * q_row], &k.to_f32(), &v.to_f32(), &mix, m.div_ceil(chunks));
        out.extend(res.out);
        lse.extend(res.lse);
    }
    let mut dst = io.out;
    dst.data.write_f32(&out);
    if let Some(l) = io.lse {
        l.copy_from_slice(&lse);
    }
    Ok(())
}
