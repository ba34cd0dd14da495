// Decode against a device-resident KV cache: the N new tokens of each sequence (their N*P
// virtual queries per head, H*N*P in all) against the sequence's cached stored heads.
//
// One workgroup owns (sequence b, split s of the cache) and ALL heads: each tile of TC cached
// tokens is read from the cache once, its Hk stored key/value heads widened into workgroup
// memory, and mixed there into the pseudo-keys/values of every head in turn (keys rotated after
// mixing). Scores, an online softmax (log2 domain) and P V follow for the rows of that head.
// Flash-decoding: the visible band of cached tokens is cut into `splits` ranges of q_tiles
// tokens, one workgroup each; every workgroup writes its unnormalised partial (o, max, sum) and
// combine.wgsl merges them, normalises, de-interleaves and writes the output (the epilogue
// follows for collapse / head norm, exactly as after a forward).
//
// The cache is `[B, capacity, Hk, d]` (binding 3 keys, 4 values); `lens` (binding 8) holds each
// sequence's absolute length; held token t (0 = oldest held) lives in slot (first + t) % capacity,
// so a ring (IHA local) and a linear cache are read the same way. Positions and masks are those
// of a forward over the held tokens, bottom-right aligned (see host/src/decode.rs).
//
// Uniform fields with a decode meaning: m = capacity, q_tiles = cached tokens per split,
// dec_sel = selection bits (1 aq, 2 ak, 4 av: that matrix is a one-hot selection, so a weight 0
// skips the head instead of multiplying it by 0).
// Constants prepended by the host: D, WG, TC (cached tokens per tile), HK, H, P, NP (= N*P).

@group(0) @binding(8) var<storage, read> lens: array<u32>;

const R: u32 = H * NP;                    // rows: virtual queries of all heads, r = h*NP + i
const TP: u32 = TC * P;                   // virtual keys per tile
const KW: u32 = HK * D;                   // stored elements per cached token
const OPT: u32 = (R * HALF + WG - 1u) / WG; // output element pairs per thread

var<workgroup> qs: array<f32, R * D>;     // mixed, rotated, pre-scaled queries of every head
var<workgroup> kr: array<f32, TC * KW>;   // the tile's stored key heads (read once)
var<workgroup> vr: array<f32, TC * KW>;   // the tile's stored value heads (read once)
var<workgroup> kt: array<f32, TP * D>;    // pseudo-keys of the current head, rotated
var<workgroup> vt: array<f32, TP * D>;    // pseudo-values of the current head
var<workgroup> sp: array<f32, NP * TP>;   // scores, then probabilities, of the current head
var<workgroup> mrun: array<f32, R>;       // running row max (log2 domain)
var<workgroup> lrun: array<f32, R>;       // running row sum
var<workgroup> alpha: array<f32, NP>;     // this tile's rescale of the current head's rows

// The keys the query at key index ia sees among the `count` virtual keys from j0, as local
// [lo, hi): the causal / window mask is an interval (edges clamped by the host to capacity*P,
// so the sums stay below 2^32), and the loops run over it with no per-key test.
fn span(ia: u32, j0: u32, count: u32) -> vec2<u32> {
    var lo = j0;
    var hi = j0 + count;
    if (params.causal != 0u) {
        hi = min(hi, ia + 1u);
    }
    if (params.windowed != 0u) {
        lo = max(lo, select(0u, ia - params.win_left, ia >= params.win_left));
        hi = min(hi, ia + params.win_right + 1u);
    }
    return vec2<u32>(lo - j0, max(hi, lo) - j0);
}

// Whether a mixing weight is used: a zero of a selection matrix skips its head (NaN policy 1).
fn uses(a: f32, bit: u32) -> bool {
    return a != 0.0 || (params.dec_sel & bit) == 0u;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lin = wid.x + wid.y * nwg.x;
    if (lin >= params.batch * params.splits) {
        return; // padding workgroup of the 2-D grid (uniform per workgroup)
    }
    let b = lin % params.batch;
    let split = lin / params.batch;

    // The sequence: held tokens, the oldest one's absolute position and slot, RoPE offset.
    let cap = params.m;
    let len = lens[b];
    let stored = min(len, cap);
    let first = len - stored;
    let slot0 = first % cap;
    let unit = select(P, 1u, params.rope == 2u);
    let pos0 = params.pos0 + first * unit;
    let off = (stored - params.n) * P; // key index of virtual query 0 (bottom-right)
    let nk = stored * P;

    // The band of cached tokens any of the rows can see, and this split's share of it.
    var lo = 0u;
    var hi = nk - 1u;
    if (params.windowed != 0u) {
        lo = select(0u, off - params.win_left, off >= params.win_left);
        hi = min(hi, off + NP - 1u + params.win_right);
    }
    if (params.causal != 0u) {
        hi = min(hi, off + NP - 1u);
    }
    let t_begin = lo / P + split * params.q_tiles;
    let t_end = min(hi / P + 1u, t_begin + params.q_tiles);

    // 1. Queries of every head: mix the stored query heads, rotate at the query positions,
    //    fold in scale*log2(e).
    for (var e = lid; e < R * HALF; e += WG) {
        let r = e / HALF;
        let t = e % HALF;
        let h = r / NP;
        let i = r % NP;
        let n = i / P;
        let pq = i % P;
        let base = (b * params.n + n) * params.hq * D + t;
        var x = vec2<f32>(0.0);
        for (var m = 0u; m < params.hq; m++) {
            let a = weights[params.aq_off + (m * H + h) * P + pq];
            if (uses(a, 1u)) {
                x += a * vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
            }
        }
        if (params.rope == 2u) {
            x = rotate(x, pos0 + n + (stored - params.n), t);
        } else if (params.rope != 0u) {
            x = rotate(x, pos0 + i + off, t);
        }
        x *= params.scale_log2;
        qs[r * D + t] = x.x;
        qs[r * D + t + HALF] = x.y;
    }
    for (var r = lid; r < R; r += WG) {
        mrun[r] = NEG_BIG;
        lrun[r] = 0.0;
    }
    var o: array<vec2<f32>, OPT>; // pairs e = lid + WG*u of the rows' outputs (zero-initialised)

    // 2. The split's cached tokens, TC at a time.
    for (var t0 = t_begin; t0 < t_end; t0 += TC) {
        workgroupBarrier(); // the previous tile's readers are done with kr, vr

        // 2a. Read the tile's stored heads once: element pairs in memory order.
        for (var e = lid; e < TC * KW / 2u; e += WG) {
            let c = e / (KW / 2u);
            let w = e % (KW / 2u);
            var kx = vec2<f32>(0.0);
            var vx = vec2<f32>(0.0);
            if (t0 + c < t_end) {
                let slot = (slot0 + t0 + c) % cap;
                let src = (b * cap + slot) * KW + 2u * w;
                kx = vec2<f32>(k_at(src), k_at(src + 1u));
                vx = vec2<f32>(v_at(src), v_at(src + 1u));
            }
            kr[c * KW + 2u * w] = kx.x;
            kr[c * KW + 2u * w + 1u] = kx.y;
            vr[c * KW + 2u * w] = vx.x;
            vr[c * KW + 2u * w + 1u] = vx.y;
        }

        for (var h = 0u; h < H; h++) {
            workgroupBarrier(); // the tile is loaded; the previous head is done with kt, vt, sp

            // 2b. Mix the tile into head h's pseudo-keys and values; rotate the keys.
            for (var e = lid; e < TP * HALF; e += WG) {
                let jj = e / HALF;
                let t = e % HALF;
                let c = jj / P;
                let pk = jj % P;
                var kx = vec2<f32>(0.0);
                var vx = vec2<f32>(0.0);
                for (var m = 0u; m < HK; m++) {
                    let wi = (m * H + h) * P + pk;
                    let ak = weights[params.ak_off + wi];
                    let av = weights[params.av_off + wi];
                    let src = (c * HK + m) * D + t;
                    if (uses(ak, 2u)) {
                        kx += ak * vec2<f32>(kr[src], kr[src + HALF]);
                    }
                    if (uses(av, 4u)) {
                        vx += av * vec2<f32>(vr[src], vr[src + HALF]);
                    }
                }
                let j = (t0 + c) * P + pk;
                if (params.rope == 2u) {
                    kx = rotate(kx, pos0 + t0 + c, t);
                } else if (params.rope != 0u) {
                    kx = rotate(kx, pos0 + j, t);
                }
                kt[jj * D + t] = kx.x;
                kt[jj * D + t + HALF] = kx.y;
                vt[jj * D + t] = vx.x;
                vt[jj * D + t + HALF] = vx.y;
            }
            workgroupBarrier();

            // 2c. Scores of head h's rows against the tile's virtual keys.
            for (var e = lid; e < NP * TP; e += WG) {
                let i = e / TP;
                let jj = e % TP;
                let r = h * NP + i;
                var s = 0.0;
                for (var t = 0u; t < D; t++) {
                    s += qs[r * D + t] * kt[jj * D + t];
                }
                sp[e] = s;
            }
            workgroupBarrier();

            // 2d. Online softmax per row over its visible span (masked keys are never read).
            for (var i = lid; i < NP; i += WG) {
                let r = h * NP + i;
                let sv = span(i + off, t0 * P, min(TC, t_end - t0) * P);
                var mx = mrun[r];
                for (var jj = sv.x; jj < sv.y; jj++) {
                    mx = max(mx, sp[i * TP + jj]);
                }
                let al = exp2(mrun[r] - mx);
                var sum = 0.0;
                for (var jj = sv.x; jj < sv.y; jj++) {
                    let pr = exp2(sp[i * TP + jj] - mx);
                    sp[i * TP + jj] = pr;
                    sum += pr;
                }
                lrun[r] = lrun[r] * al + sum;
                mrun[r] = mx;
                alpha[i] = al;
            }
            workgroupBarrier();

            // 2e. o = o * alpha + P V for this thread's pairs of head h's rows.
            for (var u = 0u; u < OPT; u++) {
                let e = lid + WG * u;
                let r = e / HALF;
                if (r / NP == h && r < R) {
                    let i = r % NP;
                    let w = e % HALF;
                    let sv = span(i + off, t0 * P, min(TC, t_end - t0) * P);
                    var x = o[u] * alpha[i];
                    for (var jj = sv.x; jj < sv.y; jj++) {
                        x += sp[i * TP + jj] * vec2<f32>(vt[jj * D + 2u * w], vt[jj * D + 2u * w + 1u]);
                    }
                    o[u] = x;
                }
            }
        }
    }

    // 3. The partials of every row of this split, for combine.wgsl.
    workgroupBarrier();
    for (var u = 0u; u < OPT; u++) {
        let e = lid + WG * u;
        let r = e / HALF;
        if (r < R) {
            let dst = partial_at(split, b, r / NP, r % NP) + 2u * (e % HALF);
            op[dst] = o[u].x;
            op[dst + 1u] = o[u].y;
        }
    }
    for (var r = lid; r < R; r += WG) {
        let dst = partial_at(split, b, r / NP, r % NP);
        op[dst + D] = mrun[r];
        op[dst + D + 1u] = lrun[r];
    }
}
