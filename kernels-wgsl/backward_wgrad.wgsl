// Backward, weight gradients (docs/backward.md steps 8', 7', 1'): deterministic, no atomics.
// Every weight gradient is a sum over rows (tokens, or output vectors for dgamma / dbeta):
//   daq[m,h,p] = sum_{b,n} <q[n,m], dqt[n,h,p]>    dak, dav alike over (b, s) with k, v and dkt, dvt
//   dr[h, c]   = sum_{b,n} <dy[n,h], o[n,c]>        (c = h'*P + p)
//   dgamma[h,e] = sum dout[.,h,e] xh[.,h,e]         dbeta[h,e] = sum dout[.,h,e]
// Per chunk of heads h0 .. h0 + G, the chunk's outputs are numbered o in
// [daq | dak | dav] over its columns ([Hq, G, P], [Hk, G, P] twice), then dr [H, G*P] of its
// columns, then (last chunk only) dgamma, dbeta: n_wgrad in all; the host puts them in place.
// STAGE 0: one thread per (chunk of chunk_rows rows, o) writes the chunk's partial sum;
// STAGE 1: one thread per o adds the chunks' partials in chunk order. Constants: D, WG, STAGE.

// The contribution of row `row` to output o (0 past the gradient's rows).
fn term(o: u32, row: u32) -> f32 {
    let hp = params.heads * params.p;
    let nq_w = params.hq * hp;
    let nk_w = params.hk * hp;
    let toks_q = params.batch * params.n;
    let toks_k = params.batch * params.m;
    var acc = 0.0;
    if (o < nq_w + 2u * nk_w) {
        // daq, dak, dav: <x[row, m], g[row, h, p]>.
        var oo = o;
        var heads = params.hq;
        var rows = toks_q;
        var g_off = bw.dqt_off;
        var which = 0u;
        if (o >= nq_w + nk_w) {
            oo = o - nq_w - nk_w;
            heads = params.hk;
            rows = toks_k;
            g_off = bw.dvt_off;
            which = 2u;
        } else if (o >= nq_w) {
            oo = o - nq_w;
            heads = params.hk;
            rows = toks_k;
            g_off = bw.dkt_off;
            which = 1u;
        }
        if (row >= rows) {
            return 0.0;
        }
        let m = oo / hp;
        let c = oo % hp;
        let x_at = (row * heads + m) * D;
        let g_at = g_off + (row * hp + c) * D;
        for (var e = 0u; e < D; e++) {
            var x = 0.0;
            if (which == 0u) {
                x = q_at(x_at + e);
            } else if (which == 1u) {
                x = k_at(x_at + e);
            } else {
                x = v_at(x_at + e);
            }
            acc += x * op[g_at + e];
        }
        return acc;
    }
    var oo = o - nq_w - 2u * nk_w;
    if (params.collapse != 0u) {
        if (oo < bw.h_all * hp) {
            // dr[h, c] of the chunk's columns c: rows are tokens.
            if (row >= toks_q) {
                return 0.0;
            }
            let h = oo / hp;
            let c = oo % hp;
            let dy_at = bw.dy_off + (row * bw.h_all + h) * D;
            let o_at = o_vec(row, c / params.p, c % params.p);
            for (var e = 0u; e < D; e++) {
                acc += op[dy_at + e] * op[o_at + e];
            }
            return acc;
        }
        oo -= bw.h_all * hp;
    }
    // dgamma, then dbeta: [H, d] each; rows are the output vectors of head h (b, n[, p]).
    let hd = bw.h_all * D;
    if (row >= toks_q * bw.pn) {
        return 0.0;
    }
    let h = (oo % hd) / D;
    let e = oo % D;
    let vec_idx = ((row / bw.pn) * bw.h_all + h) * bw.pn + row % bw.pn;
    let g = op[bw.dout_off + vec_idx * D + e];
    if (oo < hd) {
        return g * op[bw.xh_off + vec_idx * D + e];
    }
    return g;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if (STAGE == 0u) {
        if (idx >= bw.chunks * bw.n_wgrad) {
            return;
        }
        let chunk = idx / bw.n_wgrad;
        let o = idx % bw.n_wgrad;
        var acc = 0.0;
        for (var r = 0u; r < bw.chunk_rows; r++) {
            acc += term(o, chunk * bw.chunk_rows + r);
        }
        op[bw.wpart_off + idx] = acc;
    } else {
        if (idx >= bw.n_wgrad) {
            return;
        }
        var acc = 0.0;
        for (var c = 0u; c < bw.chunks; c++) {
            acc += op[bw.wpart_off + c * bw.n_wgrad + idx];
        }
        op[bw.wgrad_off + idx] = acc;
    }
}
