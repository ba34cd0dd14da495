// Head norm (step 8 of the operator), shared by every kernel that finishes output rows.
// a.norm selects it: HM_NORM_NONE, HM_NORM_RMS (per-head RMS norm: gamma * x / sqrt(mean(x^2) + eps))
// or HM_NORM_GROUP (MEA's GroupNorm, one group per head = PyTorch GroupNorm(H, H*d):
// gamma * (x - mu) / sqrt(mean((x - mu)^2) + eps) + beta). gamma, beta: [H, d] f32.
//
// A row of d values is usually spread over threads, so the kernel does the reductions and these
// helpers the arithmetic, in two passes (centred variance: no cancellation for rows far from 0):
//   mu  = hm_norm_mean(a, sum over the row of x)                 (0 for RMS)
//   inv = hm_norm_inv(a, sum over the row of (x - mu)^2)         (only the row's d values)
//   y_t = hm_norm_apply(a, h, t, x_t, mu, inv)                   (head h, column t < d)

#define HM_NORM_NONE 0
#define HM_NORM_RMS 1
#define HM_NORM_GROUP 2

__device__ __forceinline__ float hm_norm_mean(const HmArgs& a, float row_sum) {
    return a.norm == HM_NORM_GROUP ? row_sum / (float)a.d : 0.f;
}

__device__ __forceinline__ float hm_norm_inv(const HmArgs& a, float row_centred_sq) {
    return 1.f / sqrtf(row_centred_sq / (float)a.d + a.eps);
}

__device__ __forceinline__ float hm_norm_apply(const HmArgs& a, int h, int t, float x, float mu, float inv) {
    const float y = a.gamma[h * a.d + t] * ((x - mu) * inv);
    return a.norm == HM_NORM_GROUP ? y + a.beta[h * a.d + t] : y;
}
