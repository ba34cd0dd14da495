// Baseline forward: one thread per virtual query, no tiling, no workgroup memory. Every thread
// mixes its own query, then re-mixes every visible key and value from the stored heads. Kept
// deliberately simple: it is the yardstick the tiled kernel (flash_forward.wgsl) must beat.
// Constants prepended by the host: D (head dim), WG (threads per workgroup).

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if (idx >= params.batch * params.heads * params.nq) {
        return;
    }
    let i = idx % params.nq;
    let h = (idx / params.nq) % params.heads;
    let b = idx / (params.nq * params.heads);
    let n = i / params.p;
    let pq = i % params.p;

    // Mixed (gathered, for a selection matrix), rotated, pre-scaled query. NaN policy: a
    // non-finite value the row reads sets `bad` and is zeroed, so the arithmetic stays finite.
    var bad = false;
    var qt: array<f32, D>;
    for (var t = 0u; t < HALF; t++) {
        var x = mix_query(b, h, i, t);
        if (params.rope != 0u) {
            x = rotate(x, q_pos(i), t);
        }
        x *= params.scale_log2;
        if (nonfinite2(x)) {
            bad = true;
            x = vec2<f32>(0.0);
        }
        qt[t] = x.x;
        qt[t + HALF] = x.y;
    }

    // Online softmax over the visible keys only (masked keys are never visited), log2 domain.
    var o: array<f32, D>;
    var m_run = NEG_BIG;
    var l_run = 0.0;
    let ia = i + params.off;
    let range = key_range(ia, ia);
    for (var j = range.x; j <= range.y && range.x <= range.y; j++) {
        let s_tok = j / params.p;
        let pk = j % params.p;
        let base = (b * params.m + s_tok) * params.hk * D;
        // Mixed, rotated key, dotted with the query pair by pair.
        var s = 0.0;
        var key_bad = false;
        for (var t = 0u; t < HALF; t++) {
            var x = vec2<f32>(0.0);
            if (params.sel_k != DENSE) {
                let src = base + selected(params.sel_k, h, pk) * D + t;
                x = vec2<f32>(k_at(src), k_at(src + HALF));
            } else {
                for (var m = 0u; m < params.hk; m++) {
                    let a = weights[params.ak_off + (m * params.heads + h) * params.p + pk];
                    let src = base + m * D + t;
                    x += a * vec2<f32>(k_at(src), k_at(src + HALF));
                }
            }
            if (params.rope != 0u) {
                x = rotate(x, k_pos(j), t);
            }
            key_bad = key_bad || nonfinite2(x);
            s += qt[t] * x.x + qt[t + HALF] * x.y;
        }
        key_bad = key_bad || nonfinite(s);
        bad = bad || key_bad;
        s = select(s, NEG_BIG, key_bad);
        let m_new = max(m_run, s);
        let alpha = exp2(m_run - m_new);
        let pr = select(exp2(s - m_new), 0.0, key_bad);
        l_run = l_run * alpha + pr;
        for (var t = 0u; t < D; t++) {
            var x = 0.0;
            if (params.sel_v != DENSE) {
                x = v_at(base + selected(params.sel_v, h, pk) * D + t);
            } else {
                for (var m = 0u; m < params.hk; m++) {
                    let a = weights[params.av_off + (m * params.heads + h) * params.p + pk];
                    x += a * v_at(base + m * D + t);
                }
            }
            bad = bad || nonfinite(x);
            o[t] = o[t] * alpha + pr * select(x, 0.0, nonfinite(x));
        }
        m_run = m_new;
    }

    // De-interleave: virtual query i = n*P + p is pseudo-output p of token n.
    let inv = select(0.0, 1.0 / l_run, l_run > 0.0);
    let dst = (((b * params.n + n) * params.heads + h) * params.p + pq) * D;
    for (var t = 0u; t < D; t += 2u) {
        emit_pair(dst + t, select(vec2<f32>(o[t], o[t + 1u]) * inv, vec2<f32>(nan()), bad));
    }
    let lse_row = select(neg_inf(), (m_run + log2(l_run)) * LN2, l_run > 0.0);
    lse[(b * params.heads + h) * params.nq + i] = select(lse_row, nan(), bad);
}
