// The split combine of the decode kernels (decode_v1.cu and decode_v2.cu write the same partials,
// [splits, B, H, N*P, d + 2]: the unnormalised output, max, sum of each row and split); compiled
// after either, with decode.cuh and norm.cuh. Without a collapse, hm_decode_combine_v1 (one warp
// per row) merges and writes the de-interleaved pseudo outputs; with a collapse r,
// hm_decode_collapse_v1 (one block per token) merges the token's rows, collapses them in a fixed
// order and norms. No atomics: decode is deterministic, bit for bit (kernels-cuda/README.md,
// "Determinism and atomics").

// Merge the splits' partials of virtual query row `row` = b*R + (h*N + n)*P + p: its lse, and the
// lane's columns t = lane + 32k of the normalised output, rounded to the storage precision, into
// o[k] (0 for t >= d). The splits are read in order: the result does not depend on the launch.
__device__ __forceinline__ void hm_dec_merge(const HmArgs& a, const HmDecodeArgs& x, int row, int lane, float o[8]) {
    const int H = a.H, d = a.d, NP = a.N * a.P, R = H * NP;
    const int rows_all = a.B * R; // below 2^31 (checked by the host): 32-bit division only
    const int b = row / R, r = row % R, h = r / NP, i = r % NP;
    float mx = -3.0e38f;
    for (int s = 0; s < x.splits; ++s) mx = fmaxf(mx, x.part[((long long)s * rows_all + row) * (d + 2) + d]);
    float l = 0.f;
    for (int s = 0; s < x.splits; ++s) {
        const float* at = x.part + ((long long)s * rows_all + row) * (d + 2);
        l += at[d + 1] * exp2f(at[d] - mx);
    }
    // A row that saw no key has l = 0 (zero output, lse -inf); a NaN l (a non-finite score) stays
    // NaN in both (NaN policy 3).
    const bool seen = !(l <= 0.f);
    const float inv = seen ? __fdividef(1.f, l) : 0.f; // no slow-path division call (keeps it off the stack)
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int t = lane + 32 * k;
        float v = 0.f;
        if (t < d)
            for (int s = 0; s < x.splits; ++s) {
                const float* at = x.part + ((long long)s * rows_all + row) * (d + 2);
                v += exp2f(at[d] - mx) * at[t];
            }
        o[k] = hm_round(v * inv);
    }
    if (lane == 0 && a.has_lse) a.lse[((long long)b * H + h) * NP + i] = seen ? (mx + log2f(l)) * HM_LN2 : HM_NEG_INF;
}

// Store one output row of head h held by a warp (lane's columns t = lane + 32k) at element dst of
// out, head-normed (norm.cuh) in two passes over the registers: mean (group only), then the
// centred sum of squares.
__device__ __forceinline__ void hm_dec_store_row(const HmArgs& a, const float o[8], int h, long long dst, int lane) {
    const int d = a.d;
    float mu = 0.f, rinv = 1.f;
    if (a.norm) {
        float ms = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) ms += o[k]; // t >= d holds 0
        mu = hm_norm_mean(a, hm_warp_sum(ms));
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (lane + 32 * k < d) sq += (o[k] - mu) * (o[k] - mu);
        rinv = hm_norm_inv(a, hm_warp_sum(sq));
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int t = lane + 32 * k;
        if (t < d) hm_store(a.out, dst + t, a.norm ? hm_norm_apply(a, h, t, o[k], mu, rinv) : o[k]);
    }
}

// Combine without a collapse: one warp per virtual query row (b, h, i): merge the splits'
// partials, write lse and the de-interleaved pseudo output (head norm included).
#define HM_DEC_ROWS 4
extern "C" __global__ void __launch_bounds__(32 * HM_DEC_ROWS) hm_decode_combine_v1(const HmArgs a,
                                                                                    const HmDecodeArgs x) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int H = a.H, P = a.P, NP = a.N * P, R = H * NP;
    const int row = blockIdx.x * HM_DEC_ROWS + warp;
    if (row >= a.B * R) return;
    const int b = row / R, r = row % R, h = r / NP, i = r % NP, n = i / P, p = i % P;
    float o[8];
    hm_dec_merge(a, x, row, lane, o);
    hm_dec_store_row(a, o, h, ((((long long)b * a.N + n) * H + h) * P + p) * a.d, lane);
}

// Combine with a collapse r, no atomics: one block per token (b, n). Its warps merge the token's
// H*P pseudo rows j = h*P + p (as the combine), each into the partial slot of split 0 of its row
// (read by this block only, and by this lane only before), then each collapsed row
// out[b, n, h'] = sum_j r[h', j] op_j is summed by the lanes owning its columns in the fixed
// order j = 0, 1, ..., head-normed and rounded. The result does not depend on the order in
// which blocks or warps run: decode is deterministic (bit for bit, run to run).
#define HM_DEC_CWARPS 8
extern "C" __global__ void __launch_bounds__(32 * HM_DEC_CWARPS) hm_decode_collapse_v1(const HmArgs a,
                                                                                       const HmDecodeArgs x) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int H = a.H, P = a.P, d = a.d, NP = a.N * P, R = H * NP, HP = H * P;
    const int b = blockIdx.x / a.N, n = blockIdx.x % a.N;
    const int row0 = b * R + n * P; // row of (h, p): row0 + h*NP + p
    for (int j = warp; j < HP; j += HM_DEC_CWARPS) {
        const int row = row0 + (j / P) * NP + j % P;
        float o[8];
        hm_dec_merge(a, x, row, lane, o);
        float* dst = x.part + (long long)row * (d + 2);
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (lane + 32 * k < d) dst[lane + 32 * k] = o[k];
    }
    __syncthreads(); // the token's merged rows are written (global memory, visible to the block)
    for (int hh = warp; hh < H; hh += HM_DEC_CWARPS) {
        const float* rr = a.r + hh * HP;
        float y[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < HP; ++j) {
            const float w = rr[j];
            const float* src = x.part + (long long)(row0 + (j / P) * NP + j % P) * (d + 2);
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (lane + 32 * k < d) y[k] += w * src[lane + 32 * k];
        }
        hm_dec_store_row(a, y, hh, (((long long)b * a.N + n) * H + hh) * d, lane);
    }
}
