// headmix CUDA kernels: the online softmax, one source of truth for every kernel (FlashAttention's
// softmax.h). Scores live in the log2 domain (scaled by softmax_scale * log2 e), statistics in f32.
//
// Per query row a kernel keeps HmRow {m, l}: the running max of the scores seen so far and the
// running sum of exp2(score - m). Each KV tile:
//   1. reduce the tile's row max over the threads that share the row (hm_quad_max for the
//      mma layout, a warp reduction for v1), then alpha = hm_row_rescale(row, tile_max, &mu);
//   2. probabilities p = hm_prob(score, mu) (a masked score is -inf: p = 0), output *= alpha;
//   3. hm_row_add(row, alpha, sum of the tile's p).
// At the end hm_row_inv / hm_row_lse apply the fully-masked-row rule: a row that saw no key has
// l = 0 and outputs zeros with log-sum-exp -inf. A non-finite score (NaN query or visible key)
// makes l NaN, and the row's output and lse NaN (fmaxf skips the NaN in the max).
struct HmRow {
    float m; // running max (log2 domain), -inf before the first visible key
    float l; // this thread's part of the running sum (the kernel reduces it over the row at the end)
};

__device__ __forceinline__ void hm_row_init(HmRow& r) {
    r.m = HM_NEG_INF;
    r.l = 0.f;
}

// New running max from the tile's row max; *mu is what the probabilities subtract (0 while the
// row has seen nothing: no -inf - -inf); returns alpha, the factor of the old sum and output.
__device__ __forceinline__ float hm_row_rescale(HmRow& r, float tile_max, float* mu) {
    const float m_new = fmaxf(r.m, tile_max);
    *mu = m_new == HM_NEG_INF ? 0.f : m_new;
    const float alpha = exp2f(r.m - *mu); // 0 while the row had no visible key
    r.m = m_new;
    return alpha;
}

// A score in the log2 domain, masked by select. A visible score of -inf can only come from a
// non-finite query or key (or an overflow): it becomes NaN, so that the row that read it is
// non-finite (NaN policy) instead of giving that key weight 0.
__device__ __forceinline__ float hm_score(float dot, float scale_log2, bool visible) {
    return !visible ? HM_NEG_INF : dot == HM_NEG_INF ? __int_as_float(0x7fc00000) : dot * scale_log2;
}
__device__ __forceinline__ float hm_score_visible(float dot, float scale_log2) {
    return dot == HM_NEG_INF ? __int_as_float(0x7fc00000) : dot * scale_log2;
}

__device__ __forceinline__ float hm_prob(float score, float mu) {
    return exp2f(score - mu);
}

// exp2 of a scaled score in one FFMA and one MUFU (v3): p = 2^(raw * scale_log2 - mu), the
// tile max taken on raw scores (scale > 0). ex2.approx (max relative error 2^-22, subnormal
// results flushed to 0) on the device.
__device__ __forceinline__ float hm_ex2(float x) {
#ifdef HM_EMU
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}
__device__ __forceinline__ float hm_prob_scaled(float raw, float scale_log2, float mu) {
    return hm_ex2(fmaf(raw, scale_log2, -mu));
}

__device__ __forceinline__ void hm_row_add(HmRow& r, float alpha, float tile_sum) {
    r.l = r.l * alpha + tile_sum;
}

// 1 / l for the final normalisation; 0 for a row that saw no key (its output is zeros).
__device__ __forceinline__ float hm_row_inv(const HmRow& r) {
    return r.l == 0.f ? 0.f : 1.f / r.l;
}

// Natural-log log-sum-exp of the row; -inf for a row that saw no key.
__device__ __forceinline__ float hm_row_lse(const HmRow& r) {
    return r.l == 0.f ? HM_NEG_INF : (r.m + log2f(r.l)) * HM_LN2;
}

// Reductions over the 4 lanes that share a row of an mma.m16n8 accumulator (lanes 4g .. 4g+3).
__device__ __forceinline__ float hm_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float hm_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
