// headmix CUDA kernels: the mask, one source of truth for every kernel (FlashAttention's mask.h).
//
// Virtual indices, bottom-right aligned: query i sits at key index ia = i + (M - N) * P. The mask
// kind is compiled in (HM_MASK):
//   0: every key visible, 1: causal (j <= ia), 2: sliding window (ia - left <= j <= ia + right),
//   causal too when a.causal is set; 3: decided at run time from a.causal and a.has_window (one
//   module for every mask: what the baseline v1 uses).
// NaN policy: a key outside a row's mask never reaches the row. Scores are masked by select
// (never by adding -inf), and kernels that multiply a whole value tile by the probabilities
// (tensor cores) sanitize the value rows of tiles the mask cuts (hm_sanitize_rows below).
#ifndef HM_MASK
#define HM_MASK 3
#endif
__device__ __forceinline__ bool hm_visible(const HmArgs& a, long long ia, long long j) {
#if HM_MASK == 0
    return true;
#elif HM_MASK == 1
    return j <= ia;
#elif HM_MASK == 2
    if (a.causal && j > ia) return false;
    return j >= ia - (long long)a.window_left && j <= ia + (long long)a.window_right;
#else
    if (a.causal && j > ia) return false;
    if (a.has_window && (j < ia - (long long)a.window_left || j > ia + (long long)a.window_right)) return false;
    return true;
#endif
}

// The keys one query at key index ia sees, [*lo, *hi] within [0, nk) (empty when lo > hi).
// 64-bit: ia + right may pass i32::MAX. Called once per row, outside the key loop.
__device__ __forceinline__ void hm_row_keys(const HmArgs& a, long long ia, long long nk, long long* lo, long long* hi) {
    *lo = 0;
    *hi = nk - 1;
#if HM_MASK == 1
    *hi = min(*hi, ia);
#elif HM_MASK >= 2
    if (a.causal) *hi = min(*hi, ia);
    if (HM_MASK == 2 || a.has_window) {
        *lo = max(*lo, ia - (long long)a.window_left);
        *hi = min(*hi, ia + (long long)a.window_right);
    }
#endif
}

// The keys every query of [ia_first, ia_last] sees, [*lo, *hi]: KV tiles inside it need no
// per-element mask and no value sanitizing.
__device__ __forceinline__ void hm_common_keys(const HmArgs& a, long long ia_first, long long ia_last, long long nk,
                                               long long* lo, long long* hi) {
    long long l0, h0, l1, h1;
    hm_row_keys(a, ia_first, nk, &l0, &h0);
    hm_row_keys(a, ia_last, nk, &l1, &h1);
    *lo = max(l0, l1);
    *hi = min(h0, h1);
}

// The keys [*lo, *hi] that virtual queries [i_first, i_last] can see (empty when lo > hi): the
// KV tiles outside it are never visited.
__device__ __forceinline__ void hm_key_range(const HmArgs& a, long long i_first, long long i_last, long long* lo,
                                             long long* hi) {
    *lo = 0;
    *hi = (long long)a.M * a.P - 1;
#if HM_MASK != 0
    const long long off = (long long)(a.M - a.N) * a.P;
#endif
#if HM_MASK == 1
    *hi = min(*hi, i_last + off);
#elif HM_MASK >= 2
    if (a.causal) *hi = min(*hi, i_last + off);
    if (HM_MASK == 2 || a.has_window) {
        *lo = max(*lo, i_first + off - (long long)a.window_left);
        *hi = min(*hi, i_last + off + (long long)a.window_right);
    }
#endif
}

// Whether a 16-bit storage value (f16 or bf16 bits) is inf or NaN.
__device__ __forceinline__ bool hm_bits_nonfinite(unsigned short x) {
#if HM_DTYPE == 1
    return (x & 0x7c00u) == 0x7c00u;
#else
    return (x & 0x7f80u) == 0x7f80u;
#endif
}

// Sanitize a 16-bit value tile in shared memory before a tensor-core P.V: every non-finite
// element becomes 0 and its row is marked bad[row] = 1 (bad[] zeroed beforehand; racing writers
// all write 1). A row then reads a marked key it can see only through hm_visible, and the kernel
// makes that row's output NaN: masked keys' values never reach a row (0 * NaN in the mma would),
// visible ones still do. Called by every thread of the block; a barrier must follow.
__device__ __forceinline__ void hm_sanitize_rows(unsigned short* tile, int rows, int pitch, int cols, int* bad,
                                                 int tid, int nthreads) {
    for (int e = tid; e < rows * cols; e += nthreads) {
        const int r = e / cols, c = e - r * cols;
        if (hm_bits_nonfinite(tile[r * pitch + c])) {
            tile[r * pitch + c] = 0;
            bad[r] = 1;
        }
    }
}

// The same for 16-byte chunks (v3): ROWS x CH chunks of a [ROWS][pitch] tile, NT threads; a row
// with a non-finite element sets its bit in badmask[2] (64 rows; zeroed beforehand).
template <int ROWS, int CH, int NT>
__device__ __forceinline__ void hm_sanitize_chunks(unsigned short* tile, int pitch, unsigned* badmask, int tid) {
#pragma unroll
    for (int k = 0; k < (ROWS * CH + NT - 1) / NT; ++k) {
        const int e = tid + k * NT, row = e / CH, ch = e - row * CH;
        if (e >= ROWS * CH) break;
        unsigned* p = (unsigned*)(tile + row * pitch + ch * 8);
        bool any = false;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            unsigned x = p[w];
            const bool lo = hm_bits_nonfinite((unsigned short)(x & 0xffffu)), hi = hm_bits_nonfinite((unsigned short)(x >> 16));
            if (lo) x &= 0xffff0000u;
            if (hi) x &= 0x0000ffffu;
            if (lo || hi) {
                p[w] = x;
                any = true;
            }
        }
        if (any) atomicOr(badmask + (row >> 5), 1u << (row & 31));
    }
}
