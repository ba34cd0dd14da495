// The mixing of stored heads into pseudo-heads (docs/operator.md, step 1), one element pair
// (x[t], x[t + d/2]) at a time, unrotated: shared by the forward kernels (flash_forward.wgsl,
// naive_forward.wgsl) and the backward (backward_common.wgsl), which then rotate, scale or check
// the pair as they need. NaN policy: a selection matrix (MHA, GQA, identity) is a gather, so a
// pseudo-head reads only its selected stored head (no 0 * x of unread heads).

// Pair t of the mixed query of batch b, head h at virtual query i = n*P + p.
fn mix_query(b: u32, h: u32, i: u32, t: u32) -> vec2<f32> {
    let n = i / params.p;
    let pq = i % params.p;
    let base = (b * params.n + n) * params.hq * D + t;
    if (params.sel_q != DENSE) {
        let m = selected(params.sel_q, h, pq); // the one stored head this column reads
        return vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
    }
    var x = vec2<f32>(0.0);
    for (var m = 0u; m < params.hq; m++) {
        let a = weights[params.aq_off + (m * params.heads + h) * params.p + pq];
        x += a * vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
    }
    return x;
}

// Pairs t of the mixed key and value of batch b, head h at virtual key j = s*P + p (one loop over
// the stored heads for both when both are dense).
fn mix_key_value(b: u32, h: u32, j: u32, t: u32) -> array<vec2<f32>, 2> {
    let s_tok = j / params.p;
    let pk = j % params.p;
    let base = (b * params.m + s_tok) * params.hk * D + t;
    var kx = vec2<f32>(0.0);
    var vx = vec2<f32>(0.0);
    if (params.sel_k != DENSE) {
        let src = base + selected(params.sel_k, h, pk) * D;
        kx = vec2<f32>(k_at(src), k_at(src + HALF));
    }
    if (params.sel_v != DENSE) {
        let src = base + selected(params.sel_v, h, pk) * D;
        vx = vec2<f32>(v_at(src), v_at(src + HALF));
    }
    if (params.sel_k == DENSE || params.sel_v == DENSE) {
        for (var m = 0u; m < params.hk; m++) {
            let w = (m * params.heads + h) * params.p + pk;
            let src = base + m * D;
            if (params.sel_k == DENSE) {
                kx += weights[params.ak_off + w] * vec2<f32>(k_at(src), k_at(src + HALF));
            }
            if (params.sel_v == DENSE) {
                vx += weights[params.av_off + w] * vec2<f32>(v_at(src), v_at(src + HALF));
            }
        }
    }
    return array<vec2<f32>, 2>(kx, vx);
}
