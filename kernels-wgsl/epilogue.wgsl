// Epilogue: collapse the pseudo outputs with r and/or apply the head norm with gamma, then write
// the output in the tensor dtype. One workgroup per output vector of length d.
// Input `op` is [B, N, H, P, d] f32; output `out` is [B, N, H, d] (collapse) or [B, N, H, P, d].
// Constants prepended by the host: D (head dim), WG (threads per workgroup, a power of two).

const NPAIR: u32 = (HALF + WG - 1u) / WG; // element pairs per thread

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let vec_idx = wid.x + wid.y * nwg.x;
    if (vec_idx >= params.n_vec) {
        return;
    }
    let hp = params.heads * params.p;
    var h = (vec_idx / params.p) % params.heads;
    if (params.collapse != 0u) {
        h = vec_idx % params.heads;
    }

    // 1. Gather (collapse: out[n, h] = sum_{h', p} r[h, h'*P + p] * op[n, h', p]).
    var vals: array<vec2<f32>, NPAIR>;
    var sq = 0.0;
    for (var u = 0u; u < NPAIR; u++) {
        let w = lid + WG * u;
        if (w < HALF) {
            var x = vec2<f32>(0.0);
            if (params.collapse != 0u) {
                let token = vec_idx / params.heads;
                for (var c = 0u; c < hp; c++) {
                    let src = (token * hp + c) * D + 2u * w;
                    x += weights[params.r_off + h * hp + c] * vec2<f32>(op[src], op[src + 1u]);
                }
            } else {
                let src = vec_idx * D + 2u * w;
                x = vec2<f32>(op[src], op[src + 1u]);
            }
            vals[u] = x;
            sq += dot(x, x);
        }
    }

    // 2. Head norm: gamma[h] * x / sqrt(mean(x^2) + eps), the mean reduced across the workgroup.
    var scale = 1.0;
    if (params.norm != 0u) {
        partial[lid] = sq;
        workgroupBarrier();
        for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
            if (lid < stride) {
                partial[lid] += partial[lid + stride];
            }
            workgroupBarrier();
        }
        scale = inverseSqrt(partial[0] / f32(D) + params.eps);
    }

    // 3. Write in the tensor dtype.
    for (var u = 0u; u < NPAIR; u++) {
        let w = lid + WG * u;
        if (w < HALF) {
            var x = vals[u] * scale;
            if (params.norm != 0u) {
                let g = params.gamma_off + h * D + 2u * w;
                x *= vec2<f32>(weights[g], weights[g + 1u]);
            }
            store_pair(vec_idx * D + 2u * w, x);
        }
    }
}
