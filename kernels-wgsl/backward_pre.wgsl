// Backward, pre pass (per token; docs/backward.md steps 8' and 7'), one thread per vector of D.
// Constants prepended by the host: D, WG, STAGE.
// STAGE 0 (only with a head norm), per output vector: y = the collapse of the recomputed pseudo
//   outputs o (or o itself), the norm's statistics again, xh, and dy = the norm's transpose applied
//   to dL/dout; writes xh and dy (dgamma, dbeta come from them in backward_wgrad.wgsl).
// STAGE 1, per pseudo vector (b, n, h, p): do = r^T dy (the collapse's transpose; dy itself
//   without a collapse, dL/dout itself without a norm), and D = <do, o> (FlashAttention-2's
//   rowsum(dO * O)); writes do (with a collapse) and D.

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let hp = params.heads * params.p;
    if (STAGE == 0u) {
        if (idx >= bw.n_out_vec) {
            return;
        }
        let h = (idx / bw.pn) % params.heads;
        var y: array<f32, D>;
        var mean = 0.0;
        for (var e = 0u; e < D; e++) {
            y[e] = 0.0;
        }
        if (params.collapse != 0u) {
            let tok = idx / params.heads;
            for (var c = 0u; c < hp; c++) {
                let w = weights[params.r_off + h * hp + c];
                let src = bw.op_off + (tok * hp + c) * D;
                for (var e = 0u; e < D; e++) {
                    y[e] += w * op[src + e];
                }
            }
        } else {
            for (var e = 0u; e < D; e++) {
                y[e] = op[bw.op_off + idx * D + e];
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
        let at = idx * D;
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
        let at = idx * D;
        for (var t = 0u; t < HALF; t++) {
            var x = vec2<f32>(0.0);
            if (params.collapse != 0u) {
                for (var h = 0u; h < params.heads; h++) {
                    let src = bw.dy_off + (tok * params.heads + h) * D + t;
                    x += weights[params.r_off + h * hp + c] * vec2<f32>(op[src], op[src + HALF]);
                }
                ws_store_pair(bw.dop_off + at, t, x);
            } else {
                x = ws_pair(bw.dy_off + at, t);
            }
            dd += dot(x, ws_pair(bw.op_off + at, t));
        }
        op[bw.dd_off + (b * params.heads + hh) * params.nq + n * params.p + pp] = dd;
    }
}
