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

    // Mixed, rotated, pre-scaled query.
    var qt: array<f32, D>;
    for (var t = 0u; t < HALF; t++) {
        var x = vec2<f32>(0.0);
        for (var m = 0u; m < params.hq; m++) {
            let a = weights[params.aq_off + (m * params.heads + h) * params.p + pq];
            let src = ((b * params.n + n) * params.hq + m) * D + t;
            x += a * vec2<f32>(q_at(src), q_at(src + HALF));
        }
        if (params.rope != 0u) {
            x = rotate(x, q_pos(i), t);
        }
        qt[t] = x.x * params.scale_log2;
        qt[t + HALF] = x.y * params.scale_log2;
    }

    // Online softmax over the visible keys, in the log2 domain.
    var o: array<f32, D>;
    var m_run = NEG_BIG;
    var l_run = 0.0;
    let ia = i + params.off;
    let range = key_range(ia, ia);
    for (var j = range.x; j <= range.y && range.x <= range.y; j++) {
        let s_tok = j / params.p;
        let pk = j % params.p;
        // Mixed, rotated key, dotted with the query pair by pair.
        var s = 0.0;
        for (var t = 0u; t < HALF; t++) {
            var x = vec2<f32>(0.0);
            for (var m = 0u; m < params.hk; m++) {
                let a = weights[params.ak_off + (m * params.heads + h) * params.p + pk];
                let src = ((b * params.m + s_tok) * params.hk + m) * D + t;
                x += a * vec2<f32>(k_at(src), k_at(src + HALF));
            }
            if (params.rope != 0u) {
                x = rotate(x, k_pos(j), t);
            }
            s += qt[t] * x.x + qt[t + HALF] * x.y;
        }
        let m_new = max(m_run, s);
        let alpha = exp2(m_run - m_new);
        let pr = exp2(s - m_new);
        l_run = l_run * alpha + pr;
        for (var t = 0u; t < D; t++) {
            var x = 0.0;
            for (var m = 0u; m < params.hk; m++) {
                let a = weights[params.av_off + (m * params.heads + h) * params.p + pk];
                x += a * v_at(((b * params.m + s_tok) * params.hk + m) * D + t);
            }
            o[t] = o[t] * alpha + pr * x;
        }
        m_run = m_new;
    }

    // De-interleave: virtual query i = n*P + p is pseudo-output p of token n.
    let inv = select(0.0, 1.0 / l_run, l_run > 0.0);
    let dst = (((b * params.n + n) * params.heads + h) * params.p + pq) * D;
    for (var t = 0u; t < D; t += 2u) {
        emit_pair(dst + t, vec2<f32>(o[t], o[t + 1u]) * inv);
    }
    lse[(b * params.heads + h) * params.nq + i] =
        select(neg_inf(), (m_run + log2(l_run)) * LN2, l_run > 0.0);
}
