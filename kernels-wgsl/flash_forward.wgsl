// Tiled flash forward of head-mixing attention.
//
// One workgroup owns (batch b, head h, a tile of BR virtual queries). It mixes the stored query
// heads of its tokens with aq into workgroup memory, then walks the key tiles its mask can see:
// each tile's stored key/value heads are mixed with ak/av straight into workgroup memory (the
// mixed pseudo-heads never reach a storage buffer), keys are rotated after mixing, scores go
// through an online softmax in f32 (log2 domain), and the output rows accumulate in registers.
// Tiles outside the causal / sliding-window band are never visited, so a window of W virtual
// keys costs O(W) per query tile. Outputs are de-interleaved on the way out.
// Split-KV (decode: few query tiles, many keys): with params.splits > 1 the band's key tiles are
// cut into `splits` contiguous ranges, one workgroup each; each writes its unnormalised partial
// (o, max, sum) to `op` and combine.wgsl merges them.
//
// Constants prepended by the host: D (head dim), BR (query rows per tile), BC (keys per tile),
// WG (threads; BR divides WG and WG / BR divides BC). The TPR = WG / BR threads of one query row
// share its work: thread `sub` of the row scores columns sub + TPR*u of each key tile and
// accumulates output element pairs sub + TPR*u; each keeps the row's running max and its own
// part of the running sum in registers.

const TPR: u32 = WG / BR;                    // threads per query row
const CPT: u32 = BC / TPR;                   // score columns per thread
const NPAIR: u32 = (HALF + TPR - 1u) / TPR;  // output element pairs per thread
const DS: u32 = D + 1u;                      // padded row stride: column walks hit distinct banks

var<workgroup> qs: array<f32, BR * DS>;      // mixed, rotated, pre-scaled queries
var<workgroup> ks: array<f32, BC * DS>;      // mixed, rotated keys of the current tile
var<workgroup> vs: array<f32, BC * DS>;      // mixed values of the current tile
var<workgroup> sp: array<f32, BR * BC>;      // probabilities of the current tile
var<workgroup> part: array<f32, WG>;         // per-thread maxima, then per-thread sums
// NaN policy: rows that read a non-finite value (query, visible key or value), and key columns
// of the current tile holding one (marked with the tile's number + 1, so never reset). The
// values themselves are zeroed in workgroup memory: all arithmetic stays finite.
var<workgroup> row_bad: array<atomic<u32>, BR>;
var<workgroup> col_bad: array<atomic<u32>, BC>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lin = wid.x + wid.y * nwg.x;
    if (lin >= params.q_tiles * params.heads * params.batch * params.splits) {
        return; // padding workgroup of the 2-D grid (uniform per workgroup)
    }
    let tile = lin % params.q_tiles;
    let h = (lin / params.q_tiles) % params.heads;
    let b = (lin / (params.q_tiles * params.heads)) % params.batch;
    let split = lin / (params.q_tiles * params.heads * params.batch);
    let i0 = tile * BR;
    let i_last = min(i0 + BR, params.nq) - 1u;
    let row = lid / TPR;
    let sub = lid % TPR;
    let i = i0 + row; // this thread's virtual query

    for (var e = lid; e < BR + BC; e += WG) {
        if (e < BR) {
            atomicStore(&row_bad[e], 0u);
        } else {
            atomicStore(&col_bad[e - BR], 0u);
        }
    }
    workgroupBarrier();

    // 1. Queries: mix the stored heads of the tile's tokens, rotate at the query positions, and
    //    fold in scale*log2(e) so that scores come out in the log2 domain.
    for (var e = lid; e < BR * HALF; e += WG) {
        let r = e / HALF;
        let t = e % HALF;
        let iq = i0 + r;
        var x = vec2<f32>(0.0);
        if (iq < params.nq) {
            x = mix_query(b, h, iq, t);
            if (params.rope != 0u) {
                x = rotate(x, q_pos(iq), t);
            }
            x *= params.scale_log2;
            if (nonfinite2(x)) {
                atomicOr(&row_bad[r], 1u);
                x = vec2<f32>(0.0);
            }
        }
        qs[r * DS + t] = x.x;
        qs[r * DS + t + HALF] = x.y;
    }

    var o: array<vec2<f32>, NPAIR>; // output accumulators (zero-initialised)
    var m_run = NEG_BIG;             // running max of the row (log2 domain)
    var l_part = 0.0;                // this thread's part of the running sum of 2^(s - m_run)

    // 2. The key tiles the mask lets the query tile see: [first, last] from the band of its rows,
    //    this split's share of them.
    let range = key_range(i0 + params.off, i_last + params.off);
    if (range.x <= range.y) {
        let tiles = split_tiles(range.x / BC, range.y / BC, params.splits, split);
        for (var kt = tiles.x; kt < tiles.y; kt++) {
            let j0 = kt * BC;
            workgroupBarrier(); // the previous tile's readers are done with ks, vs, sp, part

            // 2a. Keys and values: mix the stored heads into workgroup memory, rotate keys.
            for (var e = lid; e < BC * HALF; e += WG) {
                let c = e / HALF;
                let t = e % HALF;
                let j = j0 + c;
                var kx = vec2<f32>(0.0);
                var vx = vec2<f32>(0.0);
                if (j < params.nk) {
                    let kv = mix_key_value(b, h, j, t);
                    kx = kv[0];
                    vx = kv[1];
                    if (params.rope != 0u) {
                        kx = rotate(kx, k_pos(j), t);
                    }
                    if (nonfinite2(kx) || nonfinite2(vx)) {
                        atomicStore(&col_bad[c], kt + 1u); // this tile's column c
                        kx = vec2<f32>(0.0);
                        vx = vec2<f32>(0.0);
                    }
                }
                ks[c * DS + t] = kx.x;
                ks[c * DS + t + HALF] = kx.y;
                vs[c * DS + t] = vx.x;
                vs[c * DS + t + HALF] = vx.y;
            }
            workgroupBarrier();

            // 2b. This thread's CPT scores of its row, kept in registers; masked pairs (and rows
            //     or columns past the end) get NEG_BIG. Each query value is loaded once per t.
            var s: array<f32, CPT>;
            for (var t = 0u; t < D; t++) {
                let qv = qs[row * DS + t];
                for (var u = 0u; u < CPT; u++) {
                    s[u] += qv * ks[(sub + TPR * u) * DS + t];
                }
            }
            var m_mine = NEG_BIG;
            for (var u = 0u; u < CPT; u++) {
                let j = j0 + sub + TPR * u;
                if (i >= params.nq || j >= params.nk || !visible(i + params.off, j)) {
                    s[u] = NEG_BIG; // masked by select: the key never reaches the row
                } else if (atomicLoad(&col_bad[sub + TPR * u]) == kt + 1u || nonfinite(s[u])) {
                    atomicOr(&row_bad[row], 1u); // a visible non-finite key/value (or score)
                    s[u] = NEG_BIG;
                }
                m_mine = max(m_mine, s[u]);
            }
            part[lid] = m_mine;
            workgroupBarrier();

            // 2c. Online softmax: the row's new max from its threads' maxima, the rescale of the
            //     accumulators, and this thread's probabilities (shared for the P V product).
            var m_new = m_run;
            for (var q = 0u; q < TPR; q++) {
                m_new = max(m_new, part[row * TPR + q]);
            }
            let alpha = exp2(m_run - m_new);
            m_run = m_new;
            var sum = 0.0;
            for (var u = 0u; u < CPT; u++) {
                let pr = select(0.0, exp2(s[u] - m_new), s[u] > 0.5 * NEG_BIG);
                sp[row * BC + sub + TPR * u] = pr;
                sum += pr;
            }
            l_part = l_part * alpha + sum;
            for (var u = 0u; u < NPAIR; u++) {
                o[u] *= alpha;
            }
            workgroupBarrier();

            // 2d. Accumulate o += P V for this thread's element pairs.
            for (var c = 0u; c < BC; c++) {
                let pr = sp[row * BC + c];
                for (var u = 0u; u < NPAIR; u++) {
                    let w = min(sub + TPR * u, HALF - 1u); // pairs past HALF are never stored
                    o[u] += pr * vec2<f32>(vs[c * DS + 2u * w], vs[c * DS + 2u * w + 1u]);
                }
            }
        }
    }

    // 3. The row's sum from its threads' parts.
    workgroupBarrier(); // everyone is past the last tile's reads of part
    part[lid] = l_part;
    workgroupBarrier();
    var l = 0.0;
    for (var q = 0u; q < TPR; q++) {
        l += part[row * TPR + q];
    }
    let bad = atomicLoad(&row_bad[row]) != 0u; // NaN policy: the row read a non-finite value

    // 4a. Split-KV: store the partial for combine.wgsl.
    if (params.splits > 1u) {
        if (i < params.nq) {
            let dst = partial_at(split, b, h, i);
            for (var u = 0u; u < NPAIR; u++) {
                let w = sub + TPR * u;
                if (w < HALF) {
                    op[dst + 2u * w] = o[u].x;
                    op[dst + 2u * w + 1u] = o[u].y;
                }
            }
            if (sub == 0u) {
                op[dst + D] = m_run;
                op[dst + D + 1u] = select(l, nan(), bad); // combine.wgsl turns the row NaN
            }
        }
        return;
    }

    // 4b. Normalise and de-interleave: virtual query i = n*P + p is pseudo-output p of token n.
    if (i < params.nq) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let n = i / params.p;
        let pq = i % params.p;
        let dst = (((b * params.n + n) * params.heads + h) * params.p + pq) * D;
        for (var u = 0u; u < NPAIR; u++) {
            let w = sub + TPR * u;
            if (w < HALF) {
                emit_pair(dst + 2u * w, select(o[u] * inv, vec2<f32>(nan()), bad));
            }
        }
        if (sub == 0u) {
            let lse_row = select(neg_inf(), (m_run + log2(l)) * LN2, l > 0.0);
            lse[(b * params.heads + h) * params.nq + i] = select(lse_row, nan(), bad);
        }
    }
}
