// Tiled flash forward of head-mixing attention.
//
// One workgroup owns (batch b, head h, a tile of BR virtual queries). It mixes the stored query
// heads of its tokens with aq into workgroup memory, then walks the key tiles its mask can see:
// each tile's stored key/value heads are mixed with ak/av straight into workgroup memory (the
// mixed pseudo-heads never reach a storage buffer), keys are rotated after mixing, scores go
// through an online softmax in f32 (log2 domain), and the output rows accumulate in registers.
// Tiles outside the causal / sliding-window band are never visited, so a window of W virtual
// keys costs O(W) per query tile. Outputs are de-interleaved on the way out.
//
// Constants prepended by the host: D (head dim), BR (query rows per tile), BC (keys per tile),
// WG (threads; a multiple of BR). Thread `lid` accumulates row lid / TPR, element pairs
// sub + TPR*u of it, where sub = lid % TPR.

const TPR: u32 = WG / BR;                    // threads per query row
const NPAIR: u32 = (HALF + TPR - 1u) / TPR;  // output element pairs per thread
const DS: u32 = D + 1u;                      // padded K/V row stride: column reads hit distinct banks

var<workgroup> qs: array<f32, BR * D>;       // mixed, rotated, pre-scaled queries
var<workgroup> ks: array<f32, BC * DS>;      // mixed, rotated keys of the current tile
var<workgroup> vs: array<f32, BC * DS>;      // mixed values of the current tile
var<workgroup> sp: array<f32, BR * BC>;      // scores, then probabilities
var<workgroup> row_m: array<f32, BR>;        // running max (log2 domain)
var<workgroup> row_l: array<f32, BR>;        // running sum of 2^(s - m)
var<workgroup> row_alpha: array<f32, BR>;    // rescale of the accumulators for this tile

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lin = wid.x + wid.y * nwg.x;
    if (lin >= params.q_tiles * params.heads * params.batch) {
        return; // padding workgroup of the 2-D grid (uniform per workgroup)
    }
    let tile = lin % params.q_tiles;
    let h = (lin / params.q_tiles) % params.heads;
    let b = lin / (params.q_tiles * params.heads);
    let i0 = tile * BR;
    let i_last = min(i0 + BR, params.nq) - 1u;
    let row = lid / TPR;
    let sub = lid % TPR;

    // 1. Queries: mix the stored heads of the tile's tokens, rotate at the query positions, and
    //    fold in scale*log2(e) so that scores come out in the log2 domain.
    for (var e = lid; e < BR * HALF; e += WG) {
        let r = e / HALF;
        let t = e % HALF;
        let i = i0 + r;
        var x = vec2<f32>(0.0);
        if (i < params.nq) {
            let n = i / params.p;
            let pq = i % params.p;
            let base = (b * params.n + n) * params.hq * D + t;
            for (var m = 0u; m < params.hq; m++) {
                let a = weights[params.aq_off + (m * params.heads + h) * params.p + pq];
                x += a * vec2<f32>(q_at(base + m * D), q_at(base + m * D + HALF));
            }
            if (params.rope != 0u) {
                x = rotate(x, q_pos(i), t);
            }
            x *= params.scale_log2;
        }
        qs[r * D + t] = x.x;
        qs[r * D + t + HALF] = x.y;
    }
    if (lid < BR) {
        row_m[lid] = NEG_BIG;
        row_l[lid] = 0.0;
    }

    var o: array<vec2<f32>, NPAIR>;

    // 2. The key tiles the mask lets the tile see: [first, last] from the band of its rows.
    let range = key_range(i0 + params.off, i_last + params.off);
    if (range.x <= range.y) {
        for (var kt = range.x / BC; kt <= range.y / BC; kt++) {
            let j0 = kt * BC;
            workgroupBarrier(); // the previous tile's readers are done with ks, vs, sp

            // 2a. Keys and values: mix the stored heads into workgroup memory, rotate keys.
            for (var e = lid; e < BC * HALF; e += WG) {
                let c = e / HALF;
                let t = e % HALF;
                let j = j0 + c;
                var kx = vec2<f32>(0.0);
                var vx = vec2<f32>(0.0);
                if (j < params.nk) {
                    let s_tok = j / params.p;
                    let pk = j % params.p;
                    let base = (b * params.m + s_tok) * params.hk * D + t;
                    for (var m = 0u; m < params.hk; m++) {
                        let w = (m * params.heads + h) * params.p + pk;
                        let ak = weights[params.ak_off + w];
                        let av = weights[params.av_off + w];
                        let src = base + m * D;
                        kx += ak * vec2<f32>(k_at(src), k_at(src + HALF));
                        vx += av * vec2<f32>(v_at(src), v_at(src + HALF));
                    }
                    if (params.rope != 0u) {
                        kx = rotate(kx, k_pos(j), t);
                    }
                }
                ks[c * DS + t] = kx.x;
                ks[c * DS + t + HALF] = kx.y;
                vs[c * DS + t] = vx.x;
                vs[c * DS + t + HALF] = vx.y;
            }
            workgroupBarrier();

            // 2b. Scores of the BR x BC block; masked pairs get NEG_BIG.
            for (var e = lid; e < BR * BC; e += WG) {
                let r = e / BC;
                let c = e % BC;
                let i = i0 + r;
                let j = j0 + c;
                var s = NEG_BIG;
                if (i < params.nq && j < params.nk && visible(i + params.off, j)) {
                    var acc = 0.0;
                    for (var t = 0u; t < D; t++) {
                        acc += qs[r * D + t] * ks[c * DS + t];
                    }
                    s = acc;
                }
                sp[e] = s;
            }
            workgroupBarrier();

            // 2c. Online softmax, one thread per row: new max, rescale factor, probabilities.
            if (lid < BR) {
                let m_old = row_m[lid];
                var m_new = m_old;
                for (var c = 0u; c < BC; c++) {
                    m_new = max(m_new, sp[lid * BC + c]);
                }
                var sum = 0.0;
                for (var c = 0u; c < BC; c++) {
                    let s = sp[lid * BC + c];
                    let pr = select(0.0, exp2(s - m_new), s > 0.5 * NEG_BIG);
                    sp[lid * BC + c] = pr;
                    sum += pr;
                }
                let alpha = exp2(m_old - m_new);
                row_alpha[lid] = alpha;
                row_l[lid] = row_l[lid] * alpha + sum;
                row_m[lid] = m_new;
            }
            workgroupBarrier();

            // 2d. Accumulate: o = alpha * o + P V for this thread's element pairs.
            let alpha = row_alpha[row];
            for (var u = 0u; u < NPAIR; u++) {
                let w = sub + TPR * u;
                if (w < HALF) {
                    var acc = o[u] * alpha;
                    for (var c = 0u; c < BC; c++) {
                        let pr = sp[row * BC + c];
                        acc += pr * vec2<f32>(vs[c * DS + 2u * w], vs[c * DS + 2u * w + 1u]);
                    }
                    o[u] = acc;
                }
            }
        }
    }
    workgroupBarrier(); // row_l / row_m final (also when no tile was visited)

    // 3. Normalise and de-interleave: virtual query i = n*P + p is pseudo-output p of token n.
    let i = i0 + row;
    if (i < params.nq) {
        let l = row_l[row];
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let n = i / params.p;
        let pq = i % params.p;
        let dst = (((b * params.n + n) * params.heads + h) * params.p + pq) * D;
        for (var u = 0u; u < NPAIR; u++) {
            let w = sub + TPR * u;
            if (w < HALF) {
                emit_pair(dst + 2u * w, o[u] * inv);
            }
        }
        if (sub == 0u) {
            lse[(b * params.heads + h) * params.nq + i] =
                select(neg_inf(), (row_m[row] + log2(l)) * LN2, l > 0.0);
        }
    }
}
