// decode v1: the N new tokens of each sequence (N*P virtual queries per head, H*N*P in all) against
// the sequence's device-resident KV cache of stored heads [B, capacity, Hk, d].
//
// One block per (split of the cache, sequence) owns ALL heads: each tile of TC cached tokens is
// read from memory once (16-byte vector loads when rows allow), widened into shared memory, and
// mixed there into the pseudo-keys/values of every head in turn (keys rotated after mixing, from
// a host table: no f64 in the loop). Scores, an online softmax in the log2 domain and P V follow,
// each row over its visible span of the tile (the causal / window mask is an interval).
// Flash-decoding: the visible band of held tokens is cut into `splits` ranges; each block writes
// its unnormalised partial (o, max, sum); hm_decode_combine_v1 merges them exactly and writes
// the de-interleaved outputs (head norm included), or with a collapse r hm_decode_collapse_v1
// merges a token's rows and collapses them in a fixed order, then norms. No atomics anywhere:
// decode is deterministic, bit for bit.
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
    float* part;           // [splits, B, H, N*P, d + 2] partials (o unnormalised, max, sum)
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

// Widen 16 bytes of storage into floats.
__device__ __forceinline__ void hm_widen16(const uint4 u, float* dst) {
#if HM_DTYPE == 0
    dst[0] = __uint_as_float(u.x);
    dst[1] = __uint_as_float(u.y);
    dst[2] = __uint_as_float(u.z);
    dst[3] = __uint_as_float(u.w);
#else
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[2 * i] = hm_to_f32((hm_elem)(w[i] & 0xffffu));
        dst[2 * i + 1] = hm_to_f32((hm_elem)(w[i] >> 16));
    }
#endif
}

extern "C" __global__ void __launch_bounds__(HM_NT, 1) hm_decode_v1(const HmArgs a, const HmDecodeArgs x) {
    extern __shared__ float hm_smem[];
    float* smem = hm_smem;
    const int tid = threadIdx.x;
    const int split = blockIdx.x, b = blockIdx.y;
    const int H = a.H, P = a.P, d = a.d, half = d / 2, HK = a.Hk;
    const int NP = a.N * P, R = H * NP, TC = x.tile_tokens, TP = TC * P, KW = HK * d;

    // Shared memory: queries, stored tile, the current head's mixed tile, scores, row state.
    float* qs = smem;          // [R, d] mixed, rotated, pre-scaled queries of every head
    float* kr = qs + R * d;    // [TC, Hk, d] the tile's stored keys (read once)
    float* vr = kr + TC * KW;  // [TC, Hk, d] the tile's stored values
    float* kt = vr + TC * KW;  // [TP, d] pseudo-keys of the current head
    float* vt = kt + TP * d;   // [TP, d] pseudo-values of the current head
    float* sp = vt + TP * d;   // [NP, TP] scores, then probabilities
    float* os = sp + NP * TP;  // [R, d] output accumulators
    float* mrun = os + R * d;  // [R] running max (log2 domain)
    float* lrun = mrun + R;    // [R] running sum
    float* alpha = lrun + R;   // [NP] the current tile's rescale of the current head's rows

    // The sequence: held tokens, oldest one's absolute position and slot, RoPE offset.
    const unsigned cap = (unsigned)x.capacity, len = x.lens[b];
    const unsigned stored = min(len, cap), first = len - stored, slot0 = first % cap;
    const unsigned unit = a.rope_token ? 1u : (unsigned)P;
    const unsigned pos0 = (unsigned)a.pos0 + first * unit;
    const int M = (int)stored, off = (M - a.N) * P, nk = M * P;

    // The band of held tokens the rows can see, and this split's share.
    int lo = 0, hi = nk - 1;
    if (a.has_window) {
        lo = max(0, off - a.window_left);
        hi = (int)min((long long)hi, (long long)off + NP - 1 + a.window_right);
    }
    if (a.causal) hi = min(hi, off + NP - 1);
    const int t_begin = lo / P + split * x.tokens_per_split;
    const int t_end = min(hi / P + 1, t_begin + x.tokens_per_split);

    // 64-bit base of this sequence's rows; 32-bit offsets inside it.
    const long long seq_base = (long long)b * cap * KW;
    const hm_elem* kc = (const hm_elem*)a.k + seq_base;
    const hm_elem* vc = (const hm_elem*)a.v + seq_base;

    // 1. Queries of every head: mix, rotate at the query positions, fold in scale*log2(e).
    for (int e = tid; e < R * half; e += HM_NT) {
        const int r = e / half, t = e % half, h = r / NP, i = r % NP, n = i / P, pq = i % P;
        const hm_elem* src = (const hm_elem*)a.q + ((long long)b * a.N + n) * a.Hq * d + t;
        float x0 = 0.f, x1 = 0.f;
        for (int m = 0; m < a.Hq; ++m) {
            const float w = a.aq[(m * H + h) * P + pq];
            if (hm_uses(w, x.selection, 1)) {
                x0 += w * hm_to_f32(src[m * d]);
                x1 += w * hm_to_f32(src[m * d + half]);
            }
        }
        if (a.rope) {
            const unsigned pos = a.rope_token ? pos0 + n + (stored - a.N) : pos0 + i + off;
            hm_rope_tab(x, x0, x1, pos, t, half);
        }
        // Rounded to the storage precision where v1 / a tensor-core kernel rounds (mixed q, k, v,
        // probabilities, outputs), so f16/bf16 results match the reference's rounding points.
        qs[r * d + t] = hm_round(x0) * a.scale_log2;
        qs[r * d + t + half] = hm_round(x1) * a.scale_log2;
    }
    for (int e = tid; e < R * d; e += HM_NT) os[e] = 0.f;
    for (int r = tid; r < R; r += HM_NT) {
        mrun[r] = -3.0e38f;
        lrun[r] = 0.f;
    }

    // 2. The split's held tokens, TC at a time.
    for (int t0 = t_begin; t0 < t_end; t0 += TC) {
        __syncthreads(); // the previous tile's readers are done with kr, vr
        const int tiles_valid = min(TC, t_end - t0);

        // 2a. Read the tile once: 16-byte vectors when rows are multiples of 16 bytes.
        if (x.vec16) {
            const int per = KW * (int)sizeof(hm_elem) / 16, epv = 16 / (int)sizeof(hm_elem);
            for (int e = tid; e < TC * per; e += HM_NT) {
                const int c = e / per, w = e % per;
                float* kd = kr + c * KW + w * epv;
                float* vd = vr + c * KW + w * epv;
                if (c < tiles_valid) {
                    unsigned slot = slot0 + (unsigned)(t0 + c);
                    if (slot >= cap) slot -= cap;
                    const uint4 ku = ((const uint4*)(kc + slot * (unsigned)KW))[w];
                    const uint4 vu = ((const uint4*)(vc + slot * (unsigned)KW))[w];
                    hm_widen16(ku, kd);
                    hm_widen16(vu, vd);
                } else {
                    for (int i = 0; i < epv; ++i) kd[i] = vd[i] = 0.f;
                }
            }
        } else {
            for (int e = tid; e < TC * KW; e += HM_NT) {
                const int c = e / KW, w = e % KW;
                float kx = 0.f, vx = 0.f;
                if (c < tiles_valid) {
                    unsigned slot = slot0 + (unsigned)(t0 + c);
                    if (slot >= cap) slot -= cap;
                    kx = hm_to_f32(kc[slot * (unsigned)KW + w]);
                    vx = hm_to_f32(vc[slot * (unsigned)KW + w]);
                }
                kr[e] = kx;
                vr[e] = vx;
            }
        }

        for (int h = 0; h < H; ++h) {
            __syncthreads(); // the tile is loaded; the previous head is done with kt, vt, sp

            // 2b. Mix the tile into head h's pseudo-keys/values; rotate the keys.
            for (int e = tid; e < TP * half; e += HM_NT) {
                const int jj = e / half, t = e % half, c = jj / P, pk = jj % P;
                float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
                for (int m = 0; m < HK; ++m) {
                    const int wi = (m * H + h) * P + pk;
                    const float wk = a.ak[wi], wv = a.av[wi];
                    const float* ks = kr + (c * HK + m) * d + t;
                    const float* vs = vr + (c * HK + m) * d + t;
                    if (hm_uses(wk, x.selection, 2)) {
                        k0 += wk * ks[0];
                        k1 += wk * ks[half];
                    }
                    if (hm_uses(wv, x.selection, 4)) {
                        v0 += wv * vs[0];
                        v1 += wv * vs[half];
                    }
                }
                if (a.rope) {
                    const unsigned pos = a.rope_token ? pos0 + (unsigned)(t0 + c) : pos0 + (unsigned)((t0 + c) * P + pk);
                    hm_rope_tab(x, k0, k1, pos, t, half);
                }
                kt[jj * d + t] = hm_round(k0);
                kt[jj * d + t + half] = hm_round(k1);
                vt[jj * d + t] = hm_round(v0);
                vt[jj * d + t + half] = hm_round(v1);
            }
            __syncthreads();

            // 2c. Scores of head h's rows against the tile's virtual keys.
            for (int e = tid; e < NP * TP; e += HM_NT) {
                const int i = e / TP, jj = e % TP;
                const float* qr = qs + (h * NP + i) * d;
                const float* kk = kt + jj * d;
                float s = 0.f;
                for (int t = 0; t < d; ++t) s += qr[t] * kk[t];
                sp[e] = s;
            }
            __syncthreads();

            // 2d. Online softmax per row over the visible keys (masked by select, never read).
            for (int i = tid; i < NP; i += HM_NT) {
                const int r = h * NP + i;
                const HmSpan span = hm_dec_span(a, i + off, t0 * P, tiles_valid * P);
                const int lo = span.lo, hi = span.hi;
                float mx = mrun[r];
                for (int jj = lo; jj < hi; ++jj) mx = fmaxf(mx, sp[i * TP + jj]);
                const float al = exp2f(mrun[r] - mx);
                float sum = 0.f;
                for (int jj = lo; jj < hi; ++jj) {
                    const float pr = exp2f(sp[i * TP + jj] - mx);
                    sp[i * TP + jj] = pr;
                    sum += pr;
                }
                lrun[r] = lrun[r] * al + sum;
                mrun[r] = mx;
                alpha[i] = al;
            }
            __syncthreads();

            // 2e. o = o * alpha + P V for head h's rows.
            for (int e = tid; e < NP * d; e += HM_NT) {
                const int i = e / d, t = e % d;
                const HmSpan span = hm_dec_span(a, i + off, t0 * P, tiles_valid * P);
                const int lo = span.lo, hi = span.hi;
                float o = os[(h * NP + i) * d + t] * alpha[i];
                for (int jj = lo; jj < hi; ++jj) o += hm_round(sp[i * TP + jj]) * vt[jj * d + t];
                os[(h * NP + i) * d + t] = o;
            }
        }
    }

    // 3. This split's partials.
    __syncthreads();
    const long long rows_all = (long long)a.B * R;
    for (int e = tid; e < R * d; e += HM_NT) {
        const int r = e / d, t = e % d;
        x.part[((long long)split * rows_all + (long long)b * R + r) * (d + 2) + t] = os[e];
    }
    for (int r = tid; r < R; r += HM_NT) {
        float* dst = x.part + ((long long)split * rows_all + (long long)b * R + r) * (d + 2) + d;
        dst[0] = mrun[r];
        dst[1] = lrun[r];
    }
}

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
