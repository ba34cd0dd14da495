// Split-KV combine: merge the partials (o, max, sum) that the flash kernel's `splits` key ranges
// wrote for one virtual query row, normalise, de-interleave and write the output (or the f32
// pseudo outputs when the epilogue follows) and the log-sum-exp. One workgroup per row.
// Constants prepended by the host: D (head dim), WG (threads per workgroup).

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= params.batch * params.heads * params.nq) {
        return;
    }
    let i = row % params.nq;
    let h = (row / params.nq) % params.heads;
    let b = row / (params.nq * params.heads);

    // The row's max over the splits, then its sum with each split rescaled to that max.
    var mx = NEG_BIG;
    for (var s = 0u; s < params.splits; s++) {
        mx = max(mx, op[partial_at(s, b, h, i) + D]);
    }
    var l = 0.0;
    var bad = false; // a split whose rows read a non-finite value stored a NaN sum
    for (var s = 0u; s < params.splits; s++) {
        let at = partial_at(s, b, h, i);
        let part = op[at + D + 1u];
        bad = bad || nonfinite(part);
        l += select(part, 0.0, nonfinite(part)) * exp2(op[at + D] - mx);
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);

    // Outputs: the rescaled sum of the splits' unnormalised outputs, de-interleaved.
    let n = i / params.p;
    let pq = i % params.p;
    let dst = (((b * params.n + n) * params.heads + h) * params.p + pq) * D;
    for (var w = lid; w < HALF; w += WG) {
        var x = vec2<f32>(0.0);
        for (var s = 0u; s < params.splits; s++) {
            let at = partial_at(s, b, h, i);
            x += exp2(op[at + D] - mx) * vec2<f32>(op[at + 2u * w], op[at + 2u * w + 1u]);
        }
        emit_pair(dst + 2u * w, select(x * inv, vec2<f32>(nan()), bad));
    }
    if (lid == 0u) {
        let lse_row = select(neg_inf(), (mx + log2(l)) * LN2, l > 0.0);
        lse[(b * params.heads + h) * params.nq + i] = select(lse_row, nan(), bad);
    }
}
