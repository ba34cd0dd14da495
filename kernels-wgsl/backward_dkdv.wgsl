// Backward, key-major pass (docs/backward.md step 5', dk/dv part): one workgroup per (batch b,
// head h, tile of T virtual keys), one thread per key. Each thread mixes its key (rotated) and
// value, then walks the query tiles that can see the key tile: each tile's queries are mixed and
// rotated into workgroup memory with their do_i, lse_i and D_i; P_ij is recomputed from lse, and
// dvt_j += P_ij do_i, dkr_j += dS_ij qr_i. At the end dkt_j = R(-phi_j) scale * dkr_j and dvt_j go to
// the f32 workspace [B, M, G, P, d] of the chunk. No atomics: each key is one thread's, a fixed order.
// Constants prepended by the host: D, T (= threads per workgroup).

var<workgroup> qs: array<vec2<f32>, T * HALF>; // mixed, rotated queries of the current tile
var<workgroup> dos: array<vec2<f32>, T * HALF>; // their do
var<workgroup> ls: array<f32, T>;               // their lse
var<workgroup> dds: array<f32, T>;              // their D

@compute @workgroup_size(T)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = tile_id(wid, nwg, bw.k_tiles, bw.k_splits);
    if (!id.valid) {
        return; // padding workgroup of the 2-D grid (uniform per workgroup)
    }
    let h = id.h;
    let b = id.b;
    let j0 = id.tile * T;
    let j_last = min(j0 + T, params.nk) - 1u;
    let j = j0 + lid;
    let valid = j < params.nk;

    var kv: array<vec2<f32>, HALF>;
    var vv: array<vec2<f32>, HALF>;
    var dk: array<vec2<f32>, HALF>;
    var dv: array<vec2<f32>, HALF>;
    if (valid) {
        for (var t = 0u; t < HALF; t++) {
            let x = mixed_key_value(b, h, j, t);
            kv[t] = x[0];
            vv[t] = x[1];
        }
    }

    // The queries (at key indices ia = i + off) that can see keys j0..j_last: causal ia >= j,
    // window j - win_right <= ia <= j + win_left.
    var ia_lo = params.off;
    var ia_hi = params.off + params.nq - 1u;
    if (params.causal != 0u) {
        ia_lo = max(ia_lo, j0);
    }
    if (params.windowed != 0u) {
        ia_lo = max(ia_lo, select(0u, j0 - params.win_right, j0 >= params.win_right));
        ia_hi = min(ia_hi, j_last + params.win_left);
    }
    if (ia_lo <= ia_hi) {
        // This split's share of the query tiles (split only to stay under lavapipe's loop budget).
        let first = (ia_lo - params.off) / T;
        let last = (ia_hi - params.off) / T;
        let tiles = split_tiles(first, last, bw.k_splits, id.split);
        for (var qt = tiles.x; qt < tiles.y; qt++) {
            let i0 = qt * T;
            workgroupBarrier(); // the previous tile's readers are done
            let i = i0 + lid;
            if (i < params.nq) {
                let at = do_vec(b * params.n + i / params.p, h, i % params.p);
                for (var t = 0u; t < HALF; t++) {
                    qs[lid * HALF + t] = mixed_query(b, h, i, t);
                    dos[lid * HALF + t] = ws_pair(at, t);
                }
                ls[lid] = lse_at(b, h, i);
                dds[lid] = op[bw.dd_off + (b * params.heads + h) * params.nq + i];
            }
            workgroupBarrier();
            if (valid) {
                for (var r = 0u; r < T; r++) {
                    let iq = i0 + r;
                    if (iq < params.nq && visible(iq + params.off, j)) {
                        var s = 0.0;
                        var dp = 0.0;
                        for (var t = 0u; t < HALF; t++) {
                            s += dot(qs[r * HALF + t], kv[t]);
                            dp += dot(dos[r * HALF + t], vv[t]);
                        }
                        let pr = exp(bw.scale * s - ls[r]);
                        let ds = pr * (dp - select(dds[r], 0.0, bw.fault == 2u));
                        for (var t = 0u; t < HALF; t++) {
                            dv[t] += select(pr, ds, bw.fault == 3u) * dos[r * HALF + t];
                            dk[t] += ds * qs[r * HALF + t];
                        }
                    }
                }
            }
        }
    }

    // dkt_j = R(-phi_j) (scale * dkr_j), dvt_j, de-interleaved into [B, M, H, P, d].
    if (valid) {
        let at = pseudo_at(b, params.m, j / params.p, h, j % params.p);
        var dkt = bw.dkt_off;
        var dvt = bw.dvt_off;
        if (bw.k_splits > 1u) {
            let kv = params.batch * params.nk * params.heads * D;
            dkt = bw.dkv_part_off + id.split * 2u * kv;
            dvt = dkt + kv;
        }
        for (var t = 0u; t < HALF; t++) {
            var x = bw.scale * dk[t];
            if (params.rope != 0u) {
                x = unrotate(x, k_pos(j), t);
            }
            ws_store_pair(dkt + at, t, x);
            ws_store_pair(dvt + at, t, dv[t]);
        }
    }
}
