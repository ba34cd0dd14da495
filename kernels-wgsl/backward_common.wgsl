// Shared declarations of the backward kernels (backward_*.wgsl), after common.wgsl and
// mixing.wgsl: the backward's own uniform block (binding 8), the workspace's addressing and the
// tile bookkeeping of the query-major and key-major passes. In the backward the bindings of
// common.wgsl hold:
//   1 weights (as the forward), 2-4 q, k, v (read, tensor dtype), 6 the forward's lse (read),
//   5 `out`: the gradients [dq | dk | dv] in the tensor dtype (written by backward_mix.wgsl only),
//   7 `op`: the f32 workspace, regions at the offsets below (see host/src/backends/wgpu/backward.rs).
// Vectors of length D are handled as HALF pairs (x[t], x[t + HALF]), the pairs RoPE rotates.
//
// Chunks of heads: the passes run over heads h0 .. h0 + G of H (h_all); `params` describes the
// chunk (params.heads = G, the mixing weights and selection tables of its heads), so head indices
// `h` below are local to the chunk and the pseudo-head regions (dqt, dkt, dvt, do, D and the
// recomputed o) hold the chunk's heads only. Tensors of the whole call (lse, dout, xh, dy, the
// saved `out` as o) are indexed with h0 + h of h_all. With one chunk (h0 = 0, G = H) every index
// is the unchunked one.

struct Bwd {
    op_off: u32, dout_off: u32, xh_off: u32, dy_off: u32,       // pseudo outputs o; dL/dout; norm's xh, dy
    dop_off: u32, dd_off: u32, dqt_off: u32, dkt_off: u32,      // dL/do [B,N,G,P,d]; D [B,G,N*P]; dqt [B,N,G,P,d]; dkt [B,M,G,P,d]
    dvt_off: u32, wpart_off: u32, wgrad_off: u32, n_wgrad: u32, // dvt; weight-gradient partials and the chunk's sums
    chunks: u32, chunk_rows: u32, k_tiles: u32, n_pseudo: u32,  // row chunks of the partials; key tiles; B*N*G*P
    scale: f32, dk_at: u32, dv_at: u32, n_out_vec: u32,         // softmax scale; dk, dv in `out`; output vectors
    mix_pairs: u32, pn: u32, sum_len: u32, fault: u32,          // mix-back threads; P without collapse, else 1;
                                                                 // sum_len: o + 2 kv (split sums); fault: a
                                                                 // deliberately wrong kernel (tests), 0 none
    q_splits: u32, k_splits: u32, dq_part_off: u32, dkv_part_off: u32, // key ranges of the dq pass, query ranges
                                                                 // of the dk/dv pass, and their partials (lavapipe)
    h0: u32, h_all: u32, first: u32, last: u32,                 // the chunk's first head, H; first / last chunk
    acc_off: u32, o_heads: u32, o_h0: u32, pad: u32,            // f32 [dq | dk | dv] accumulators (several
                                                                 // chunks); o's layout: heads, first head
}

@group(0) @binding(8) var<uniform> bw: Bwd;

// The saved lse of (b, head h of the chunk, virtual query i).
fn lse_at(b: u32, h: u32, i: u32) -> f32 {
    return lse[(b * bw.h_all + bw.h0 + h) * params.nq + i];
}

// Offset of the pseudo vector (b, token, head h, pseudo p) in a region [B, T, G, P, d] of the chunk.
fn pseudo_at(b: u32, tokens: u32, tok: u32, h: u32, p: u32) -> u32 {
    return (((b * tokens + tok) * params.heads + h) * params.p + p) * D;
}

// Offset of the pseudo output o of (query token `tok` = b*N + n, head h, pseudo p): the chunk's
// recomputed o ([B, N, G, P, d]) or the saved f32 `out` ([B, N, H, P, d], from head h0).
fn o_vec(tok: u32, h: u32, p: u32) -> u32 {
    return bw.op_off + ((tok * bw.o_heads + bw.o_h0 + h) * params.p + p) * D;
}

// Offset of do of (token `tok`, head h, pseudo p): the chunk's r^T dy with a collapse, else dy
// itself (dL/dout without a norm), of the output's shape [B, N, H, P, d].
fn do_vec(tok: u32, h: u32, p: u32) -> u32 {
    if (params.collapse != 0u) {
        return bw.dop_off + ((tok * params.heads + h) * params.p + p) * D;
    }
    return bw.dy_off + ((tok * bw.h_all + bw.h0 + h) * params.p + p) * D;
}

// Pair t of the mixed query of (b, head h) at virtual query i, rotated to its position.
fn mixed_query(b: u32, h: u32, i: u32, t: u32) -> vec2<f32> {
    var x = mix_query(b, h, i, t);
    if (params.rope != 0u) {
        x = rotate(x, q_pos(i), t);
    }
    return x;
}

// Pairs t of the mixed key (rotated) and value of (b, head h) at virtual key j.
fn mixed_key_value(b: u32, h: u32, j: u32, t: u32) -> array<vec2<f32>, 2> {
    var kv = mix_key_value(b, h, j, t);
    if (params.rope != 0u) {
        kv[0] = rotate(kv[0], k_pos(j), t);
    }
    return kv;
}

fn ws_pair(at: u32, t: u32) -> vec2<f32> {
    return vec2<f32>(op[at + t], op[at + t + HALF]);
}

fn ws_store_pair(at: u32, t: u32, x: vec2<f32>) {
    op[at + t] = x.x;
    op[at + t + HALF] = x.y;
}

// The tile of the dq and dk/dv passes: one workgroup per (tile, head, batch, split) of a 2-D
// grid (`tiles` per head); `valid` is false for the grid's padding workgroups.
struct TileId {
    tile: u32,
    h: u32,
    b: u32,
    split: u32,
    valid: bool,
}

fn tile_id(wid: vec3<u32>, nwg: vec3<u32>, tiles: u32, splits: u32) -> TileId {
    let lin = wid.x + wid.y * nwg.x;
    let per_split = tiles * params.heads * params.batch;
    return TileId(lin % tiles, (lin / tiles) % params.heads, (lin / (tiles * params.heads)) % params.batch,
                  lin / per_split, lin < per_split * splits);
}

