// Backward, split sums (only when the dq or dk/dv pass split to stay under lavapipe's loop
// budget): dqt = the sum of the key splits' partials, dkt and dvt the sum of the query splits',
// added in split order (deterministic). One thread per element of the contiguous region
// [dqt | dkt | dvt] (sum_len = o + 2 kv elements). Constants: D, WG.

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if (idx >= bw.sum_len) {
        return;
    }
    let o_len = params.batch * params.nq * params.heads * D;
    if (idx < o_len) {
        if (bw.q_splits > 1u) {
            var acc = 0.0;
            for (var s = 0u; s < bw.q_splits; s++) {
                acc += op[bw.dq_part_off + s * o_len + idx];
            }
            op[bw.dqt_off + idx] = acc;
        }
    } else if (bw.k_splits > 1u) {
        let e = idx - o_len; // within [dkt | dvt]
        let kv2 = 2u * params.batch * params.nk * params.heads * D;
        var acc = 0.0;
        for (var s = 0u; s < bw.k_splits; s++) {
            acc += op[bw.dkv_part_off + s * kv2 + e];
        }
        op[bw.dkt_off + e] = acc;
    }
}
