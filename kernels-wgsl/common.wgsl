// Shared declarations of the headmix WGSL kernels: the call's parameters, the bindings, the mask
// and the rotary embedding. The host prepends one dtype file (dtype_*.wgsl) and the constants
// `D` (head dim) and kernel tile sizes before compiling.

// One call's sizes and options (36 words; mirrors `Uniforms` in launch.rs).
struct Params {
    batch: u32, n: u32, m: u32, heads: u32,
    hq: u32, hk: u32, p: u32, nq: u32,           // nq = N*P virtual queries per head
    nk: u32, off: u32, causal: u32, windowed: u32, // nk = M*P virtual keys, off = (M-N)*P
    win_left: u32, win_right: u32, rope: u32, rope_levels: u32, // rope: 0 none, 1 virtual, 2 token
    pos0: u32, scale_log2: f32, aq_off: u32, ak_off: u32, // scale_log2 = softmax scale * log2(e)
    av_off: u32, r_off: u32, gamma_off: u32, rope_off: u32, // offsets into `weights`
    q_tiles: u32, splits: u32, eps: f32, collapse: u32, // splits: key ranges per query tile
    norm: u32, direct: u32, n_vec: u32, neg_inf_bits: u32, // norm: 0 none, 1 rms, 2 group
    part_off: u32, beta_off: u32, sel_q: u32, sel_k: u32, // part_off: split partials in `op`;
    sel_v: u32, dec_sel: u32, pad2: u32, pad3: u32,        // sel_*: selection tables (see mixed_pair);
                                                           // dec_sel: decode's selection bits
}

@group(0) @binding(0) var<uniform> params: Params;
// aq | ak | av | r | gamma | beta | RoPE table, all f32.
@group(0) @binding(1) var<storage, read> weights: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<Elem>;
@group(0) @binding(3) var<storage, read> k: array<Elem>;
@group(0) @binding(4) var<storage, read> v: array<Elem>;
@group(0) @binding(5) var<storage, read_write> out: array<Elem>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
// f32 scratch: pseudo outputs [B, N, H, P, d] when the epilogue (collapse / head norm) follows,
// then, from `part_off`, the split-KV partials [splits, B, H, N*P, d + 2] (o, max, sum).
@group(0) @binding(7) var<storage, read_write> op: array<f32>;

const HALF: u32 = D / 2u;
const LN2: f32 = 0.6931471805599453;
// Score of a masked pair; finite so that max/exp2 never meet inf - inf.
const NEG_BIG: f32 = -3.0e38;

fn neg_inf() -> f32 {
    return bitcast<f32>(params.neg_inf_bits);
}

// Whether virtual key `j` is visible to the query at key index `ia` (bottom-right aligned).
// Window edges are clamped to nk on the host, so the sums stay below 2^32.
fn visible(ia: u32, j: u32) -> bool {
    if (params.causal != 0u && j > ia) {
        return false;
    }
    if (params.windowed != 0u && (j + params.win_left < ia || j > ia + params.win_right)) {
        return false;
    }
    return true;
}

// First and last visible key of the queries at key indices ia0 <= ia1 (empty when x > y).
fn key_range(ia0: u32, ia1: u32) -> vec2<u32> {
    var lo = 0u;
    var hi = params.nk - 1u;
    if (params.windowed != 0u) {
        lo = select(0u, ia0 - params.win_left, ia0 >= params.win_left);
        hi = min(hi, ia1 + params.win_right);
    }
    if (params.causal != 0u) {
        hi = min(hi, ia1);
    }
    return vec2<u32>(lo, hi);
}

// RoPE positions of virtual query i and virtual key j.
fn q_pos(i: u32) -> u32 {
    if (params.rope == 2u) {
        return params.pos0 + i / params.p + (params.m - params.n);
    }
    return params.pos0 + i + params.off;
}

fn k_pos(j: u32) -> u32 {
    if (params.rope == 2u) {
        return params.pos0 + j / params.p;
    }
    return params.pos0 + j;
}

// (cos, sin) of position `pos` for the pair (x[t], x[t + d/2]). They come from a host table built
// once per call in f64 and stored as f32 (cos, sin) pairs, in one of two layouts:
// - rope_levels == 0 (the forward and the backward): row `pos - pos0` of a table with one row per
//   position of the call, for t < d/2: one read, no transcendental;
// - rope_levels > 0 (decode over long caches, where a row per position would be large): one level
//   per byte of `pos`, composed as rotations: accurate for any position.
fn rope_cs(pos: u32, t: u32) -> vec2<f32> {
    var cs = vec2<f32>(1.0, 0.0);
    if (params.rope_levels == 0u) {
        let idx = params.rope_off + ((pos - params.pos0) * HALF + t) * 2u;
        cs = vec2<f32>(weights[idx], weights[idx + 1u]);
    }
    for (var l = 0u; l < params.rope_levels; l++) {
        let byte = (pos >> (8u * l)) & 255u;
        let idx = params.rope_off + ((l * 256u + byte) * HALF + t) * 2u;
        let e = vec2<f32>(weights[idx], weights[idx + 1u]);
        cs = vec2<f32>(cs.x * e.x - cs.y * e.y, cs.x * e.y + cs.y * e.x);
    }
    return cs;
}

// R(theta) x: the pair (x[t], x[t + d/2]) rotated to position `pos`.
fn rotate(x: vec2<f32>, pos: u32, t: u32) -> vec2<f32> {
    let cs = rope_cs(pos, t);
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.y * cs.x + x.x * cs.y);
}

// R(-theta) x: its transpose (the backward's RoPE step).
fn unrotate(x: vec2<f32>, pos: u32, t: u32) -> vec2<f32> {
    let cs = rope_cs(pos, t);
    return vec2<f32>(x.x * cs.x + x.y * cs.y, x.y * cs.x - x.x * cs.y);
}

// Tile range [x, y) of split `split` of `splits` over the tiles first..=last: contiguous shares
// (the split-KV forward and the backward's split passes under a loop budget).
fn split_tiles(first: u32, last: u32, splits: u32, split: u32) -> vec2<u32> {
    let per = (last - first + splits) / splits; // tiles per split
    let begin = first + split * per;
    return vec2<u32>(begin, min(last + 1u, begin + per));
}

// NaN policy (see the crate docs): a selection mixing matrix (MHA, GQA, identity) is a gather,
// so a pseudo-head reads only its selected stored head; a non-finite value the row reads (its
// query, a visible key or value) makes the row NaN through an explicit flag, never through
// arithmetic on NaN (which WGSL lets implementations assume away); masked keys never enter.

// sel_* of a dense matrix: the kernels loop over every stored head.
const DENSE: u32 = 0xffffffffu;

// Whether an f32 is NaN or infinite, by its bits (a float compare may be optimised away).
fn nonfinite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

fn nonfinite2(x: vec2<f32>) -> bool {
    return nonfinite(x.x) || nonfinite(x.y);
}

// A quiet NaN made at run time (WGSL has no NaN literal and a constant NaN is a compile error).
fn nan() -> f32 {
    return bitcast<f32>(params.neg_inf_bits | 0x00400000u);
}

// The stored head column (h, p) of a selection matrix reads: its table in `weights` at `sel`
// holds [H, P] head indices as u32 bits.
fn selected(sel: u32, h: u32, p: u32) -> u32 {
    return bitcast<u32>(weights[sel + h * params.p + p]);
}

// Write elements (e, e + 1) of pseudo-output storage: straight to `out` in its dtype when no
// epilogue follows, else to the f32 buffer `op`.
fn emit_pair(e: u32, x: vec2<f32>) {
    if (params.direct != 0u) {
        store_pair(e, x);
    } else {
        op[e] = x.x;
        op[e + 1u] = x.y;
    }
}

// Offset in `op` of the split-KV partial of (split, b, h, virtual query i): d unnormalised
// outputs, then the row max (log2 domain) and the row sum.
fn partial_at(split: u32, b: u32, h: u32, i: u32) -> u32 {
    return params.part_off + (((split * params.batch + b) * params.heads + h) * params.nq + i) * (D + 2u);
}
