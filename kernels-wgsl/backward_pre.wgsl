// Backward, pre pass (per token; docs/backward.md steps 8' and 7'), one thread per vector of D,
// over the chunk's heads h0 .. h0 + G (backward_common.wgsl). Constants: D, WG, STAGE.
// STAGE 0 (only with a head norm), per output vector: y = the collapse of the recomputed pseudo
//   outputs o (or o itself), the norm's statistics again, xh, and dy = the norm's transpose applied
//   to dL/dout; writes xh and dy (dgamma, dbeta come from them in backward_wgrad.wgsl). With a
//   collapse over several chunks, each chunk adds its columns to y (kept in the xh region, the
//   running sum continued in the unchunked order) and only the last chunk goes on to the norm.
// STAGE 1, per pseudo vector (b, n, h, p) of the chunk: do = r^T dy (the collapse's transpose; dy
//   itself without a collapse, dL/dout itself without a norm), and D = <do, o> (FlashAttention-2's
//   rowsum(dO * O)); writes do (with a collapse) and D.

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let hp = params.heads * params.p;   // the chunk's pseudo-heads
    let hp_all = bw.h_all * params.p;   // all pseudo-heads (columns of r)
    if (STAGE == 0u) {
        if (idx >= bw.n_out_vec) {
            return;
        }
        var y: array<f32, D>;
        var mean = 0.0;
        var vec_idx = idx; // this output vector in [B, N, H, pn, d]
        var h = 0u;
        if (params.collapse != 0u) {
            // y[tok, h] = sum_c r[h, c] o[tok, c] over the chunk's columns c, continuing the sum
            // of the chunks before (the xh region holds it between chunks).
            h = idx % bw.h_all;
            let tok = idx / bw.h_all;
            for (var e = 0u; e < D; e++) {
                // (fault 7, a negative control: each chunk restarts y)
                y[e] = select(op[bw.xh_off + idx * D + e], 0.0, bw.first != 0u || bw.fault == 7u);
            }
            for (var c = 0u; c < hp; c++) {
                let w = weights[params.r_off + h * hp_all + bw.h0 * params.p + c];
                let src = o_vec(tok, c / params.p, c % params.p);
                for (var e = 0u; e < D; e++) {
                    y[e] += w * op[src + e];
                }
            }
            if (bw.last == 0u) {
                for (var e = 0u; e < D; e++) {
                    op[bw.xh_off + idx * D + e] = y[e];
                }
                return;
            }
        } else {
            // The chunk's pseudo vector idx = (tok, head, p): y = o.
            let tok = idx / hp;
            h = bw.h0 + (idx / params.p) % params.heads;
            vec_idx = (tok * bw.h_all + h) * params.p + idx % params.p;
            let src = o_vec(tok, (idx / params.p) % params.heads, idx % params.p);
            for (var e = 0u; e < D; e++) {
                y[e] = op[src + e];
            }
        }
        // Statistics: group: mu = mean(y), sigma = sqrt(mean((y - mu)^2) + eps); rms: mu = 0.
        for (var e = 0u; e < D; e++) {
            mean += y[e];
        }
        let mu = select(0.0, mean / f32(D), params.norm == 2u);
        var sq = 0.0;
        for (var e = 0u; e < D; e++) {
            sq += (y[e] - mu) * (y[e] - mu);
        }
        // 1 / sqrt, not inverseSqrt (whose error may be several ulp): xh must have exactly the
        // norm's scale, or dy gains a component along y that cancels nowhere.
        let rho = sqrt(sq / f32(D) + params.eps);
        // g = gamma * dout; dy = (g - [mean(g)] - xh * mean(g * xh)) * inv.
        let at = vec_idx * D;
        var g_mean = 0.0;
        var gx_mean = 0.0;
        for (var e = 0u; e < D; e++) {
            let xh = (y[e] - mu) / rho;
            let g = weights[params.gamma_off + h * D + e] * op[bw.dout_off + at + e];
            g_mean += g;
            gx_mean += g * xh;
            op[bw.xh_off + at + e] = xh;
        }
        g_mean = select(0.0, g_mean / f32(D), params.norm == 2u);
        gx_mean /= f32(D);
        for (var e = 0u; e < D; e++) {
            let xh = op[bw.xh_off + at + e];
            let g = weights[params.gamma_off + h * D + e] * op[bw.dout_off + at + e];
            op[bw.dy_off + at + e] = (g - g_mean - xh * gx_mean) / rho;
        }
    } else {
        if (idx >= bw.n_pseudo) {
            return;
        }
        let tok = idx / hp;
        let c = idx % hp;
        let hh = c / params.p;
        let pp = c % params.p;
        let b = tok / params.n;
        let n = tok % params.n;
        // Summed in pairs (t, t + HALF) as the dq / dk/dv passes sum dP = <do, vt>, so that
        // D == dP to the bit where o_i is one value row (a row that sees one key: dS = 0 exactly).
        var dd = 0.0;
        let o_at = o_vec(tok, hh, pp);
        let do_at = do_vec(tok, hh, pp);
        for (var t = 0u; t < HALF; t++) {
            var x = vec2<f32>(0.0);
            if (params.collapse != 0u) {
                for (var h = 0u; h < bw.h_all; h++) {
                    let src = bw.dy_off + (tok * bw.h_all + h) * D + t;
                    x += weights[params.r_off + h * hp_all + bw.h0 * params.p + c] * vec2<f32>(op[src], op[src + HALF]);
                }
                ws_store_pair(do_at, t, x);
            } else {
                x = ws_pair(do_at, t);
            }
            dd += dot(x, ws_pair(o_at, t));
        }
        op[bw.dd_off + (b * params.heads + hh) * params.nq + n * params.p + pp] = dd;
    }
}
