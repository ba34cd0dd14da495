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
// Shared with decode_v2.cu (decode.cuh): the argument block, the sequence's view of its cache,
// the mixed queries, RoPE from a host table, the mask as an interval, the partials; the split
// combine is decode_combine.cu.

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

    // The sequence: held tokens, ring slots, RoPE offset, this split's band (decode.cuh).
    const HmDecSeq sq = hm_dec_seq(a, x, b, split);
    const unsigned pos0 = sq.pos0;
    const int off = sq.off, t_begin = sq.t_begin, t_end = sq.t_end;
    const hm_elem *kc = sq.kc, *vc = sq.vc;

    // 1. Queries of every head: mix, rotate at the query positions, fold in scale*log2(e).
    for (int e = tid; e < R * half; e += HM_NT) {
        const int r = e / half, t = e % half;
        float x0, x1;
        hm_dec_query(a, x, sq, b, r / NP, r % NP, t, x0, x1);
        // Rounded to the storage precision where v1 / a tensor-core kernel rounds (mixed q, k, v,
        // probabilities, outputs), so f16/bf16 results match the reference's rounding points.
        qs[r * d + t] = hm_round(x0) * a.scale_log2;
        qs[r * d + t + half] = hm_round(x1) * a.scale_log2;
    }
    for (int e = tid; e < R * d; e += HM_NT) os[e] = 0.f;
    hm_dec_init_rows(mrun, lrun, R);

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
                    const unsigned slot = hm_dec_slot(sq, t0 + c);
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
                    const unsigned slot = hm_dec_slot(sq, t0 + c);
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
    hm_dec_write_partials(a, x, split, b, os, mrun, lrun);
}
