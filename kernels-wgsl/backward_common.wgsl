// Shared declarations of the backward kernels (backward_*.wgsl), after common.wgsl: the backward's
// own uniform block (binding 8) and the mixing / RoPE helpers of the query-major and key-major
// passes. In the backward the bindings of common.wgsl hold:
//   1 weights (as the forward), 2-4 q, k, v (read, tensor dtype), 6 the forward's lse (read),
//   5 `out`: the gradients [dq | dk | dv] in the tensor dtype (written by backward_mix.wgsl only),
//   7 `op`: the f32 workspace, regions at the offsets below (see host/src/backends/wgpu/backward.rs).
// Vectors of length D are handled as HALF pairs (x[t], x[t + HALF]), the pairs RoPE rotates.

struct Bwd {
    op_off: u32, dout_off: u32, xh_off: u32, dy_off: u32,       // pseudo outputs o; dL/dout; norm's xh, dy
    dop_off: u32, dd_off: u32, dqt_off: u32, dkt_off: u32,      // dL/do [B,N,H,P,d]; D [B,H,N*P]; dqt [B,N,H,P,d]; dkt [B,M,H,P,d]
    dvt_off: u32, wpart_off: u32, wgrad_off: u32, n_wgrad: u32, // dvt; weight-gradient partials and result
    chunks: u32, chunk_rows: u32, k_tiles: u32, n_pseudo: u32,  // row chunks of the partials; key tiles; B*N*H*P
    scale: f32, dk_at: u32, dv_at: u32, n_out_vec: u32,         // softmax scale; dk, dv in `out`; output vectors
    mix_pairs: u32, pn: u32, sum_len: u32, fault: u32,          // mix-back threads; P without collapse, else 1;
                                                                 // sum_len: o + 2 kv (split sums); fault: a
                                                                 // deliberately wrong kernel (tests), 0 none
    q_splits: u32, k_splits: u32, dq_part_off: u32, dkv_part_off: u32, // key ranges of the dq pass, query ranges
                                                                 // of the dk/dv pass, and their partials (lavapipe)
}

@group(0) @binding(8) var<uniform> bw: Bwd;

// (cos, sin) of position `pos`, pair t (the forward's per-position table, rope_levels == 0).
fn rope_cs(pos: u32, t: u32) -> vec2<f32> {
    let idx = params.rope_off + ((pos - params.pos0) * HALF + t) * 2u;
    return vec2<f32>(weights[idx], weights[idx + 1u]);
}

// R(theta) x and its transpose R(-theta) x for the pair (x[t], x[t + HALF]).
fn rot(x: vec2<f32>, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.y * cs.x + x.x * cs.y);
}

fn unrot(x: vec2<f32>, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x.x * cs.x + x.y * cs.y, x.y * cs.x - x.x * cs.y);
}

// Pair t of the mixed query qt of (b, head h) at virtual query i = n*P + p, rotated to its position.
// Selection matrices are gathers (no 0 * x of unread heads).
fn mixed_query(b: u32, h: u32, i: u32, t: u32) -> vec2<f32> {
    let n = i / params.p;
    let pq = i % params.p;
    let base = (b * params.n + n) * params.hq * D + t;
    var x = vec2<f32>(0.0);
    if (params.sel_q != DENSE) {
        let m = selected(params.sel_q, h, pq);
        x = vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
    } else {
        for (var m = 0u; m < params.hq; m++) {
            let a = weights[params.aq_off + (m * params.heads + h) * params.p + pq];
            x += a * vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
        }
    }
    if (params.rope != 0u) {
        x = rot(x, rope_cs(q_pos(i), t));
    }
    return x;
}

// Pairs t of the mixed key (rotated) and value of (b, head h) at virtual key j = s*P + p.
fn mixed_key_value(b: u32, h: u32, j: u32, t: u32) -> array<vec2<f32>, 2> {
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
    if (params.rope != 0u) {
        kx = rot(kx, rope_cs(k_pos(j), t));
    }
    return array<vec2<f32>, 2>(kx, vx);
}

// Offset of the pseudo vector (b, token, head h, pseudo p) in a [B, T, H, P, d] region.
fn pseudo_at(b: u32, tokens: u32, tok: u32, h: u32, p: u32) -> u32 {
    return (((b * tokens + tok) * params.heads + h) * params.p + p) * D;
}

fn ws_pair(at: u32, t: u32) -> vec2<f32> {
    return vec2<f32>(op[at + t], op[at + t + HALF]);
}

fn ws_store_pair(at: u32, t: u32, x: vec2<f32>) {
    op[at + t] = x.x;
    op[at + t + HALF] = x.y;
}
