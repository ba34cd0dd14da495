// headmix CUDA kernels: shared helpers (no includes: NVRTC compiles this with no include path).
//
// The host prepends the `#define` prelude of one variant (HM_DTYPE, HM_HD, tile sizes: the variant
// scheme, kernels-cuda/README.md) and concatenates this file, the other headers and one kernel file.

#define HM_NEG_INF (__int_as_float(0xff800000))
#define HM_LOG2E 1.4426950408889634f
#define HM_LN2 0.6931471805599453f

// ---- Arguments -------------------------------------------------------------------------------
// One struct by value (the Rust side mirrors it with #[repr(C)], see host/src/backends/cuda/args.rs): pointers first so
// that the layout has no padding.
struct HmArgs {
    const void* q;      // [B, N, Hq, d]
    const void* k;      // [B, M, Hk, d]
    const void* v;      // [B, M, Hk, d]
    void* out;          // [B, N, H, P, d] (no collapse) or unused (collapse: see acc)
    float* lse;         // [B, H, N*P] or null
    float* acc;         // collapse accumulator [B, N, H, d] f32 (zeroed by the host), or null
    const float* aq;    // [Hq, H, P]
    const float* ak;    // [Hk, H, P]
    const float* av;    // [Hk, H, P]
    const float* r;     // [H, H*P] or null
    const float* gamma; // [H, d] or null
    const float* beta;  // [H, d] (group norm) or null
    int B, N, M, Hq, Hk, H, P, d;
    int causal, has_window, window_left, window_right;
    int rope, rope_token, pos0, collapse, norm, has_lse; // norm: HM_NORM_NONE / _RMS / _GROUP (norm.cuh)
    float scale_log2; // softmax scale * log2(e): scores live in the log2 domain
    float rope_base;
    float eps;
    float pad_;
};

// ---- Storage types and conversions (inline PTX / bit tricks instead of cuda_fp16.h) -----------
#if HM_DTYPE == 0
typedef float hm_elem;
__device__ __forceinline__ float hm_to_f32(float x) { return x; }
__device__ __forceinline__ float hm_from_f32(float x) { return x; }
#else
typedef unsigned short hm_elem;
#endif

#ifndef HM_EMU
__device__ __forceinline__ float hm_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short hm_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else // the CPU emulator (kernels-cuda/emu) supplies hm_f16_to_f32 / hm_f32_to_f16
#endif
__device__ __forceinline__ float hm_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned)h) << 16);
}
// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short hm_f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#if HM_DTYPE == 1
__device__ __forceinline__ float hm_to_f32(unsigned short x) { return hm_f16_to_f32(x); }
__device__ __forceinline__ unsigned short hm_from_f32(float x) { return hm_f32_to_f16(x); }
#elif HM_DTYPE == 2
__device__ __forceinline__ float hm_to_f32(unsigned short x) { return hm_bf16_to_f32(x); }
__device__ __forceinline__ unsigned short hm_from_f32(float x) { return hm_f32_to_bf16(x); }
#endif

// Round an f32 to the storage precision (what a low-precision kernel stores), as the reference's
// `Rounding` does for mixed q/k/v, probabilities and outputs.
__device__ __forceinline__ float hm_round(float x) {
#if HM_DTYPE == 0
    return x;
#else
    return hm_to_f32(hm_from_f32(x));
#endif
}

__device__ __forceinline__ float hm_load(const void* base, long long idx) {
    return hm_to_f32(((const hm_elem*)base)[idx]);
}
__device__ __forceinline__ void hm_store(void* base, long long idx, float x) {
    ((hm_elem*)base)[idx] = hm_from_f32(x);
}

// ---- Warp reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float hm_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float hm_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- Positions (virtual indices, bottom-right aligned; the mask itself is in mask.cuh) -------
// RoPE position of virtual query i / virtual key j (Token mode: the token's position).
__device__ __forceinline__ long long hm_q_pos(const HmArgs& a, long long i) {
    return a.rope_token ? (long long)a.pos0 + i / a.P + (a.M - a.N)
                        : (long long)a.pos0 + i + (long long)(a.M - a.N) * a.P;
}
__device__ __forceinline__ long long hm_k_pos(const HmArgs& a, long long j) {
    return a.rope_token ? (long long)a.pos0 + j / a.P : (long long)a.pos0 + j;
}

// Rotate-half pair (x0, x1) = (x[t], x[t + d/2]) to position pos, frequency base^(-2t/d). The
// angle is formed and reduced to [-pi, pi] in f64 (positions reach 2^31), then the fast f32
// sine/cosine, accurate to ~4e-7 absolute on that interval, rotates. Not inlined: two call sites
// share one copy of the f64 code.
__device__ __noinline__ void hm_rope_pair(float& x0, float& x1, long long pos, int t, int d, float base) {
    const double two_pi = 6.283185307179586;
    const double freq = exp2(-(double)(2 * t) / (double)d * log2((double)base));
    double ang = (double)pos * freq;
    ang -= rint(ang / two_pi) * two_pi;
    float s, c;
    __sincosf((float)ang, &s, &c);
    const float a0 = x0, a1 = x1;
    x0 = a0 * c - a1 * s;
    x1 = a1 * c + a0 * s;
}
