// Shared pieces of the decode kernels (decode_v1.cu, decode_v2.cu) and their split combine
// (decode_combine.cu): the decode argument block, RoPE from a host table, the mask as an
// interval, the sequence's view of its cache (held tokens, ring slots, this split's band), the
// mixed and rotated queries, and the split partials each decode block writes.
//
// Indexing: the sequence's base is a 64-bit offset computed once; within a sequence 32-bit
// (capacity*Hk*d <= 2^31 - 1, checked by the host), so B*capacity*Hk*d may exceed 2^31.
// Held token t (0 = oldest) lives in slot (first + t) % capacity: a ring (IHA local) and a
// linear cache are read alike. The masks and RoPE positions are the forward's over the held
// tokens, bottom-right aligned.

#ifndef HM_NT
#define HM_NT 128
#endif

// The decode-only arguments (mirrored by `DecodeArgs` in host/src/backends/cuda/decode.rs).
struct HmDecodeArgs {
    const unsigned* lens;  // [B] absolute length of each sequence
    float* part;           // [splits, B, H, N*P, d + 2] partials (o unnormalised, max, sum); the
                           // collapse keeps merged rows in split 0's (decode_combine.cu)
    const float* rope_tab; // [levels, 256, d/2, 2] cos/sin of byte * 256^level * freq_t, or null
    int capacity, splits, tokens_per_split, tile_tokens;
    int rope_levels, selection, vec16, pad;
};

// Rotate (x0, x1) to `pos` by composing one table rotation per byte of the position.
__device__ __forceinline__ void hm_rope_tab(const HmDecodeArgs& x, float& x0, float& x1, unsigned pos, int t,
                                            int half) {
    float c = 1.f, s = 0.f;
    for (int l = 0; l < x.rope_levels; ++l) {
        const float2 e = ((const float2*)x.rope_tab)[(l * 256 + ((pos >> (8 * l)) & 255u)) * half + t];
        const float c2 = c * e.x - s * e.y;
        s = c * e.y + s * e.x;
        c = c2;
    }
    const float a0 = x0, a1 = x1;
    x0 = a0 * c - a1 * s;
    x1 = a1 * c + a0 * s;
}

// The keys the query at key index ia sees among the `count` virtual keys from j0, as local
// [*lo, *hi): the causal / window mask is an interval, from the run-time flags (one module
// serves every mask), so the loops run over it with no per-key test.
struct HmSpan {
    int lo, hi;
};
__device__ __forceinline__ HmSpan hm_dec_span(const HmArgs& a, int ia, int j0, int count) {
    long long l = j0, h = (long long)j0 + count;
    if (a.causal) h = min(h, (long long)ia + 1);
    if (a.has_window) {
        l = max(l, (long long)ia - a.window_left);
        h = min(h, (long long)ia + a.window_right + 1);
    }
    return HmSpan{(int)(l - j0), (int)(max(h, l) - j0)};
}

// Whether a mixing weight is used: a zero of a one-hot selection matrix skips its head.
__device__ __forceinline__ bool hm_uses(float w, int selection, int bit) { return w != 0.f || !(selection & bit); }

// Sequence b as a decode block (split `split` of it) sees its cache: the held tokens, the oldest
// one's slot and absolute position, the RoPE position unit, the query rows' key offset, the
// split's held tokens [t_begin, t_end) of the band the rows can see, and the cache rows.
struct HmDecSeq {
    unsigned cap, stored, slot0, unit, pos0;
    int off, t_begin, t_end;
    const hm_elem *kc, *vc; // the sequence's keys and values [capacity, Hk, d]
};
__device__ __forceinline__ HmDecSeq hm_dec_seq(const HmArgs& a, const HmDecodeArgs& x, int b, int split) {
    HmDecSeq s;
    const int P = a.P, NP = a.N * P;
    s.cap = (unsigned)x.capacity;
    const unsigned len = x.lens[b];
    s.stored = min(len, s.cap);
    const unsigned first = len - s.stored;
    s.slot0 = first % s.cap;
    s.unit = a.rope_token ? 1u : (unsigned)P;
    s.pos0 = (unsigned)a.pos0 + first * s.unit;
    const int M = (int)s.stored, nk = M * P;
    s.off = (M - a.N) * P;

    // The band of held tokens the rows can see, and this split's share.
    int lo = 0, hi = nk - 1;
    if (a.has_window) {
        lo = max(0, s.off - a.window_left);
        hi = (int)min((long long)hi, (long long)s.off + NP - 1 + a.window_right);
    }
    if (a.causal) hi = min(hi, s.off + NP - 1);
    s.t_begin = lo / P + split * x.tokens_per_split;
    s.t_end = min(hi / P + 1, s.t_begin + x.tokens_per_split);

    // 64-bit base of this sequence's rows; 32-bit offsets inside it.
    const long long seq_base = (long long)b * s.cap * (a.Hk * a.d);
    s.kc = (const hm_elem*)a.k + seq_base;
    s.vc = (const hm_elem*)a.v + seq_base;
    return s;
}

// The cache slot of held token t (0 = oldest, t < capacity: the ring wraps at most once).
__device__ __forceinline__ unsigned hm_dec_slot(const HmDecSeq& s, int t) {
    const unsigned slot = s.slot0 + (unsigned)t;
    return slot >= s.cap ? slot - s.cap : slot;
}

// Columns t and t + d/2 of virtual query i = n*P + pq of head h of sequence b: mixed from the
// stored query heads (selection zeros skipped) and, with RoPE, rotated to the query's position.
// Not rounded: each kernel rounds where its operands need it.
__device__ __forceinline__ void hm_dec_query(const HmArgs& a, const HmDecodeArgs& x, const HmDecSeq& s, int b,
                                             int h, int i, int t, float& x0, float& x1) {
    const int P = a.P, d = a.d, half = d / 2, n = i / P, pq = i % P;
    const hm_elem* src = (const hm_elem*)a.q + ((long long)b * a.N + n) * a.Hq * d + t;
    x0 = 0.f;
    x1 = 0.f;
    for (int m = 0; m < a.Hq; ++m) {
        const float w = a.aq[(m * a.H + h) * P + pq];
        if (hm_uses(w, x.selection, 1)) {
            x0 += w * hm_to_f32(src[m * d]);
            x1 += w * hm_to_f32(src[m * d + half]);
        }
    }
    if (a.rope) {
        const unsigned pos = a.rope_token ? s.pos0 + n + (s.stored - a.N) : s.pos0 + i + s.off;
        hm_rope_tab(x, x0, x1, pos, t, half);
    }
}

// The online-softmax state of the block's R rows before the first tile.
__device__ __forceinline__ void hm_dec_init_rows(float* mrun, float* lrun, int R) {
    for (int r = threadIdx.x; r < R; r += HM_NT) {
        mrun[r] = -3.0e38f;
        lrun[r] = 0.f;
    }
}

// This split's partials of sequence b (the layout decode_combine.cu merges): the unnormalised
// outputs os [R, d], the running max (log2 domain) and sum of each row.
__device__ __forceinline__ void hm_dec_write_partials(const HmArgs& a, const HmDecodeArgs& x, int split, int b,
                                                      const float* os, const float* mrun, const float* lrun) {
    const int d = a.d, R = a.H * a.N * a.P;
    const long long rows_all = (long long)a.B * R;
    float* part = x.part + ((long long)split * rows_all + (long long)b * R) * (d + 2);
    for (int e = threadIdx.x; e < R * d; e += HM_NT) {
        const int r = e / d, t = e - r * d;
        part[(long long)r * (d + 2) + t] = os[e];
    }
    for (int r = threadIdx.x; r < R; r += HM_NT) {
        part[(long long)r * (d + 2) + d] = mrun[r];
        part[(long long)r * (d + 2) + d + 1] = lrun[r];
    }
}
