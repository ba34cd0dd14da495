// Collapse epilogue: out[b, n, h, :] = norm?(acc[b, n, h, :]) rounded to the storage type (norm: norm.cuh).
// acc holds sum_{h', p} r[h, h'*P + p] * op[n, h', p] accumulated by the attention kernel in f32.
// One warp per output row (d <= 256, so at most 8 values per lane).

// HM_EPI_ROWS (rows per block) comes from the prelude (kernel_table.rs).

extern "C" __global__ void __launch_bounds__(32 * HM_EPI_ROWS) hm_collapse_epilogue(const HmArgs a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long rows = (long long)a.B * a.N * a.H;
    const long long row = (long long)blockIdx.x * HM_EPI_ROWS + warp;
    if (row >= rows) return;
    const int d = a.d, h = (int)(row % a.H);
    const float* src = a.acc + row * d;
    float x[8];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int t = lane + 32 * k;
        x[k] = t < d ? src[t] : 0.f;
        sum += x[k];
    }
    float mu = 0.f, inv = 1.f;
    if (a.norm) {
        // Two passes (norm.cuh): the row mean (group norm only), then the centred sum of squares.
        if (a.norm == HM_NORM_GROUP) sum = hm_warp_sum(sum);
        mu = hm_norm_mean(a, sum);
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float c = lane + 32 * k < d ? x[k] - mu : 0.f;
            sq += c * c;
        }
        inv = hm_norm_inv(a, hm_warp_sum(sq));
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int t = lane + 32 * k;
        if (t < d) hm_store(a.out, row * d + t, a.norm ? hm_norm_apply(a, h, t, x[k], mu, inv) : x[k]);
    }
}
