// Backward, query-major pass (docs/backward.md step 5', dq part): one workgroup per (batch b,
// head h, tile of T virtual queries), one thread per query row. Each thread mixes and rotates its
// query (as the forward does), then walks the key tiles its mask can see: each tile's stored keys
// and values are mixed (keys rotated) into workgroup memory, P_ij = exp(S_ij - lse_i) is
// recomputed from the saved lse, dP_ij = <do_i, vt_j>, dS_ij = P_ij (dP_ij - D_i), and
// dqr_i += dS_ij kr_j. At the end dqt_i = R(-theta_i) scale * dqr_i goes to the f32 workspace
// [B, N, G, P, d] of the chunk (mixed back into dq by backward_mix.wgsl). No atomics: each row is one thread's
// (with key splits, each split's partial goes to its own slice, summed by backward_sum.wgsl).
// Constants prepended by the host: D, T (= threads per workgroup).

var<workgroup> ks: array<vec2<f32>, T * HALF>; // mixed, rotated keys of the current tile
var<workgroup> vs: array<vec2<f32>, T * HALF>; // mixed values of the current tile

@compute @workgroup_size(T)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = tile_id(wid, nwg, params.q_tiles, bw.q_splits);
    if (!id.valid) {
        return; // padding workgroup of the 2-D grid (uniform per workgroup)
    }
    let h = id.h;
    let b = id.b;
    let i0 = id.tile * T;
    let i_last = min(i0 + T, params.nq) - 1u;
    let i = i0 + lid;
    let valid = i < params.nq;

    // 1. This row: mixed rotated query, do_i, lse_i, D_i.
    var qv: array<vec2<f32>, HALF>;
    var dov: array<vec2<f32>, HALF>;
    var acc: array<vec2<f32>, HALF>;
    var lse_i = 0.0;
    var d_i = 0.0;
    if (valid) {
        let at = do_vec(b * params.n + i / params.p, h, i % params.p);
        for (var t = 0u; t < HALF; t++) {
            qv[t] = mixed_query(b, h, i, t);
            dov[t] = ws_pair(at, t);
        }
        lse_i = lse_at(b, h, i);
        d_i = op[bw.dd_off + (b * params.heads + h) * params.nq + i];
    }

    // 2. The key tiles the query tile's band can see, this split's share of them (split only to
    //    stay under lavapipe's loop budget; backward_sum.wgsl adds the splits in order).
    let range = key_range(i0 + params.off, i_last + params.off);
    if (range.x <= range.y) {
        let tiles = split_tiles(range.x / T, range.y / T, bw.q_splits, id.split);
        for (var kt = tiles.x; kt < tiles.y; kt++) {
            let j0 = kt * T;
            workgroupBarrier(); // the previous tile's readers are done
            for (var t = 0u; t < HALF; t++) {
                var kv = array<vec2<f32>, 2>(vec2<f32>(0.0), vec2<f32>(0.0));
                if (j0 + lid < params.nk) {
                    kv = mixed_key_value(b, h, j0 + lid, t);
                }
                ks[lid * HALF + t] = kv[0];
                vs[lid * HALF + t] = kv[1];
            }
            workgroupBarrier();
            if (valid) {
                for (var c = 0u; c < T; c++) {
                    let j = j0 + c;
                    if (j < params.nk && visible(i + params.off, j)) {
                        var s = 0.0;
                        var dp = 0.0;
                        for (var t = 0u; t < HALF; t++) {
                            s += dot(qv[t], ks[c * HALF + t]);
                            dp += dot(dov[t], vs[c * HALF + t]);
                        }
                        let pr = exp(bw.scale * s - lse_i);
                        let ds = pr * (dp - select(d_i, 0.0, bw.fault == 2u));
                        for (var t = 0u; t < HALF; t++) {
                            acc[t] += ds * ks[c * HALF + t];
                        }
                    }
                }
            }
        }
    }

    // 3. dqt_i = R(-theta_i) (scale * dqr_i), de-interleaved into [B, N, H, P, d].
    if (valid) {
        var dst = bw.dqt_off;
        if (bw.q_splits > 1u) {
            dst = bw.dq_part_off + id.split * (params.batch * params.nq * params.heads * D);
        }
        let at = dst + pseudo_at(b, params.n, i / params.p, h, i % params.p);
        for (var t = 0u; t < HALF; t++) {
            var x = bw.scale * acc[t];
            if (params.rope != 0u) {
                x = select(unrotate(x, q_pos(i), t), rotate(x, q_pos(i), t), bw.fault == 1u);
            }
            ws_store_pair(at, t, x);
        }
    }
}
