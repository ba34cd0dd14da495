// Backward, mix-back (docs/backward.md step 1'): the transposes of the mixing, per token, one
// thread per (token, stored head m, element pair):
//   dq[n, m] = sum_{h,p} aq[m,h,p] dqt[n,h,p],  dk[s, m] from ak and dkt,  dv[s, m] from av and dvt,
// written to `out` = [dq | dk | dv] in the tensor dtype. A selection matrix (MHA, GQA, identity)
// sums only the pseudo-heads that read head m (no 0 * x of unread pseudo-gradients).
// Over several chunks of heads, each chunk continues the sum in f32 from the accumulators of the
// chunks before (acc_off, [dq | dk | dv] in f32): the same additions in the same order as one
// chunk, so chunking leaves the result bit-identical; the last chunk writes `out`.
// Constants prepended by the host: D, WG.

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    if (idx >= bw.mix_pairs) {
        return;
    }
    let q_pairs = params.batch * params.n * params.hq * HALF;
    let kv_pairs = params.batch * params.m * params.hk * HALF;
    var e = idx;            // pair index within the tensor
    var heads = params.hq;  // stored heads of the tensor
    var a_off = params.aq_off;
    var sel = params.sel_q;
    var src = bw.dqt_off;
    var dst = 0u;
    if (idx >= q_pairs + kv_pairs) {
        e = idx - q_pairs - kv_pairs;
        heads = params.hk;
        a_off = params.av_off;
        sel = params.sel_v;
        src = bw.dvt_off;
        dst = bw.dv_at;
    } else if (idx >= q_pairs) {
        e = idx - q_pairs;
        heads = params.hk;
        a_off = params.ak_off;
        sel = params.sel_k;
        src = bw.dkt_off;
        dst = bw.dk_at;
    }
    let w = e % HALF;          // elements (2w, 2w + 1)
    let m = (e / HALF) % heads;
    let tok = e / (HALF * heads); // b * tokens + token
    let at_out = dst + (tok * heads + m) * D + 2u * w;
    let at_acc = bw.acc_off + at_out;
    var x = vec2<f32>(0.0);
    if (bw.first == 0u && bw.fault != 6u) { // fault 6 (negative control): drop the chunks before
        x = vec2<f32>(op[at_acc], op[at_acc + 1u]);
    }
    for (var h = 0u; h < params.heads; h++) {
        for (var p = 0u; p < params.p; p++) {
            let at = src + ((tok * params.heads + h) * params.p + p) * D + 2u * w;
            let g = vec2<f32>(op[at], op[at + 1u]);
            if (sel != DENSE && bw.fault != 5u) { // fault 5 (negative control): 0 * x of unread heads
                if (selected(sel, h, p) == m) {
                    x += g;
                }
            } else {
                var w_at = (m * params.heads + h) * params.p + p;
                if (bw.fault == 4u && heads == params.heads) {
                    w_at = (h * params.heads + m) * params.p + p; // negative control: a transposed
                }
                x += weights[a_off + w_at] * g;
            }
        }
    }
    if (bw.last != 0u) {
        store_pair(at_out, x);
    } else {
        op[at_acc] = x.x;
        op[at_acc + 1u] = x.y;
    }
}
