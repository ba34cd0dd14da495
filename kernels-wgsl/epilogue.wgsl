// Epilogue: collapse the pseudo outputs with r and/or apply the head norm (gamma, and beta for the
// group norm), then write the output in the tensor dtype. One workgroup per output vector of length d.
// Input `op` is [B, N, H, P, d] f32; output `out` is [B, N, H, d] (collapse) or [B, N, H, P, d].
// Constants prepended by the host: D (head dim), WG (threads per workgroup, a power of two).

const NPAIR: u32 = (HALF + WG - 1u) / WG; // element pairs per thread

var<workgroup> partial: array<f32, WG>;

// Sum of `x` over the workgroup (every thread gets it).
fn workgroup_sum(lid: u32, x: f32) -> f32 {
    partial[lid] = x;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier(); // everyone has read partial[0] before it is reused
    return total;
}

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
    var sum = 0.0;
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
            sum += x.x + x.y;
        }
    }

    // 2. Head norm (params.norm: 0 none, 1 rms, 2 group), statistics in two passes:
    //    group: mu = mean(x), then gamma[h] * (x - mu) / sqrt(mean((x - mu)^2) + eps) + beta[h];
    //    rms:   mu = 0,       then gamma[h] * x / sqrt(mean(x^2) + eps).
    var mu = 0.0;
    var scale = 1.0;
    if (params.norm != 0u) {
        if (params.norm == 2u) {
            mu = workgroup_sum(lid, sum) / f32(D);
        }
        var sq = 0.0;
        for (var u = 0u; u < NPAIR; u++) {
            if (lid + WG * u < HALF) {
                let c = vals[u] - vec2<f32>(mu);
                sq += dot(c, c);
            }
        }
        scale = inverseSqrt(workgroup_sum(lid, sq) / f32(D) + params.eps);
    }

    // 3. Write in the tensor dtype.
    for (var u = 0u; u < NPAIR; u++) {
        let w = lid + WG * u;
        if (w < HALF) {
            var x = vals[u];
            if (params.norm != 0u) {
                let g = params.gamma_off + h * D + 2u * w;
                x = vec2<f32>(weights[g], weights[g + 1u]) * ((x - vec2<f32>(mu)) * scale);
            }
            if (params.norm == 2u) {
                let b = params.beta_off + h * D + 2u * w;
                x += vec2<f32>(weights[b], weights[b + 1u]);
            }
            store_pair(vec_idx * D + 2u * w, x);
        }
    }
}
