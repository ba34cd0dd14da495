//! The backward of the unfused pipeline, in f64, written independently of [`super::direct`]:
//! materialise `qt, kt, vt` as `[B, N·P, H, d]` tensors, textbook attention backward with the
//! softmax Jacobian (`dS = P ∘ (dP − rowsum(P ∘ dP))`, the probability rows materialised), then
//! the transpose of every step applied to whole tensors.

use super::{Grads, Layer, norm};
use crate::Params;
use crate::rope::rotate;
use crate::unfused::{Mask, materialise, mha};

/// Textbook attention backward over `[B, L, H, d]` tensors (bottom-right aligned mask, as
/// [`mha`]): returns `(dq, dk, dv)` for the upstream gradient `dout` of `o`.
pub fn mha_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    (b, lq, lk, h, d): (usize, usize, usize, usize, usize),
    scale: f64,
    mask: Mask,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let at = |bb: usize, t: usize, hh: usize, l: usize| ((bb * l + t) * h + hh) * d;
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..lq {
                let col = i as i128 + lk as i128 - lq as i128;
                let allowed = |j: usize| {
                    let j = j as i128;
                    (!mask.causal || j <= col)
                        && mask.window.is_none_or(|(l, r)| j >= col - l as i128 && j <= col + r as i128)
                };
                let qi = &q[at(bb, i, hh, lq)..][..d];
                let s: Vec<Option<f64>> = (0..lk)
                    .map(|j| {
                        allowed(j).then(|| {
                            let kj = &k[at(bb, j, hh, lk)..][..d];
                            (0..d).map(|t| qi[t] * kj[t]).sum::<f64>() * scale
                        })
                    })
                    .collect();
                let max = s.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().flatten().map(|x| (x - max).exp()).sum();
                let prob: Vec<f64> = s.iter().map(|x| x.map_or(0.0, |x| (x - max).exp() / z)).collect();
                let doi = &dout[at(bb, i, hh, lq)..][..d];
                let dp: Vec<f64> =
                    (0..lk).map(|j| (0..d).map(|t| doi[t] * v[at(bb, j, hh, lk) + t]).sum::<f64>()).collect();
                let pdp: f64 = (0..lk).map(|j| prob[j] * dp[j]).sum();
                for j in 0..lk {
                    if s[j].is_none() {
                        continue; // masked: no probability, no gradient
                    }
                    let ds = prob[j] * (dp[j] - pdp) * scale;
                    for t in 0..d {
                        dq[at(bb, i, hh, lq) + t] += ds * k[at(bb, j, hh, lk) + t];
                        dk[at(bb, j, hh, lk) + t] += ds * qi[t];
                        dv[at(bb, j, hh, lk) + t] += prob[j] * doi[t];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Transpose of [`materialise`]: `dx[b, s, m] = sum_{p, h} a[m, h, p] dxt[b, s, p, h]`,
/// `da[m, h, p] = sum_{b, s} <x[b, s, m], dxt[b, s, p, h]>`.
fn materialise_transpose(
    dxt: &[f64],
    x: &[f64],
    a: &[f64],
    (b, s, hs, h, p, d): (usize, usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let (mut dx, mut da) = (vec![0.0; x.len()], vec![0.0; a.len()]);
    for bs in 0..b * s {
        for m in 0..hs {
            for pp in 0..p {
                for hh in 0..h {
                    let w = (m * h + hh) * p + pp;
                    let g = &dxt[((bs * p + pp) * h + hh) * d..][..d];
                    let src = &x[(bs * hs + m) * d..][..d];
                    for t in 0..d {
                        dx[(bs * hs + m) * d + t] += a[w] * g[t];
                        da[w] += src[t] * g[t];
                    }
                }
            }
        }
    }
    (dx, da)
}

/// The gradients of the unfused pipeline for the upstream gradient `dout` (shape of the output).
pub fn backward(p: &Params, q: &[f64], k: &[f64], v: &[f64], layer: &Layer<f64>, dout: &[f64]) -> Grads<f64> {
    let (b, h, pp, d) = (p.b, p.h, p.p, p.d);
    let (lq, lk) = (p.n * pp, p.m * pp);
    let mut g = Grads::zeros(p, layer);

    // Forward, keeping every intermediate.
    let mut qt = materialise(q, layer.aq, b, p.n, p.hq, h, pp, d);
    let mut kt = materialise(k, layer.ak, b, p.m, p.hk, h, pp, d);
    let vt = materialise(v, layer.av, b, p.m, p.hk, h, pp, d);
    let rope_all = |x: &mut [f64], l: usize, pos: &dyn Fn(usize) -> usize, sign: f64| {
        if let Some(rope) = p.rope {
            for (idx, row) in x.chunks_mut(d).enumerate() {
                rotate(row, sign * pos((idx / h) % l) as f64, rope.base);
            }
        }
    };
    rope_all(&mut qt, lq, &|i| p.q_pos(i), 1.0);
    rope_all(&mut kt, lk, &|j| p.k_pos(j), 1.0);
    let mask = Mask { causal: p.causal, window: p.window };
    let (o, _lse) = mha(&qt, &kt, &vt, b, lq, lk, h, d, p.scale, mask);
    // o is [B, N, P, H, d]; the pseudo-outputs op are [B, N, H, P, d].
    let op_at = |bn: usize, hh: usize, ps: usize| ((bn * h + hh) * pp + ps) * d;
    let o_at = |bn: usize, hh: usize, ps: usize| ((bn * pp + ps) * h + hh) * d;
    let mut op = vec![0.0; o.len()];
    for bn in 0..b * p.n {
        for hh in 0..h {
            for ps in 0..pp {
                op[op_at(bn, hh, ps)..][..d].copy_from_slice(&o[o_at(bn, hh, ps)..][..d]);
            }
        }
    }
    // y = r · op per token, as an [H, H·P] × [H·P, d] product.
    let y = match layer.r {
        None => op.clone(),
        Some(r) => {
            let mut y = vec![0.0; b * p.n * h * d];
            for bn in 0..b * p.n {
                for row in 0..h {
                    for c in 0..h * pp {
                        for t in 0..d {
                            y[(bn * h + row) * d + t] += r[row * h * pp + c] * op[(bn * h * pp + c) * d + t];
                        }
                    }
                }
            }
            y
        }
    };

    // 8'. Norm transpose.
    let width = layer.width(p);
    let dy = match &layer.norm {
        None => dout.to_vec(),
        Some(nw) => {
            let mut dy = vec![0.0; y.len()];
            let (dgamma, mut dbeta) = (g.dgamma.as_mut().unwrap(), g.dbeta.as_mut());
            for (idx, x) in y.chunks(d).enumerate() {
                let hh = (idx / width) % h;
                let dx = norm::backward(
                    nw,
                    hh,
                    x,
                    &dout[idx * d..][..d],
                    p.eps,
                    &mut dgamma[hh * d..][..d],
                    dbeta.as_mut().map(|b| &mut b[hh * d..][..d]),
                );
                dy[idx * d..][..d].copy_from_slice(&dx);
            }
            dy
        }
    };
    // 7'. Collapse transpose: dop = rᵀ dy, dr = dy opᵀ summed over tokens.
    let dop = match layer.r {
        None => dy,
        Some(r) => {
            let mut dop = vec![0.0; op.len()];
            let dr = g.dr.as_mut().unwrap();
            for bn in 0..b * p.n {
                for row in 0..h {
                    for c in 0..h * pp {
                        for t in 0..d {
                            let (dyv, opv) = (dy[(bn * h + row) * d + t], op[(bn * h * pp + c) * d + t]);
                            dop[(bn * h * pp + c) * d + t] += r[row * h * pp + c] * dyv;
                            dr[row * h * pp + c] += dyv * opv;
                        }
                    }
                }
            }
            dop
        }
    };
    // 6'. Back to [B, N, P, H, d], then 5'. 4'. attention backward.
    let mut d_o = vec![0.0; o.len()];
    for bn in 0..b * p.n {
        for hh in 0..h {
            for ps in 0..pp {
                d_o[o_at(bn, hh, ps)..][..d].copy_from_slice(&dop[op_at(bn, hh, ps)..][..d]);
            }
        }
    }
    let (mut dqt, mut dkt, dvt) = mha_backward(&qt, &kt, &vt, &d_o, (b, lq, lk, h, d), p.scale, mask);
    // 3'. RoPE transpose.
    rope_all(&mut dqt, lq, &|i| p.q_pos(i), -1.0);
    rope_all(&mut dkt, lk, &|j| p.k_pos(j), -1.0);
    // 2'. 1'. Mixing transposes.
    (g.dq, g.daq) = materialise_transpose(&dqt, q, layer.aq, (b, p.n, p.hq, h, pp, d));
    (g.dk, g.dak) = materialise_transpose(&dkt, k, layer.ak, (b, p.m, p.hk, h, pp, d));
    (g.dv, g.dav) = materialise_transpose(&dvt, v, layer.av, (b, p.m, p.hk, h, pp, d));
    g
}
