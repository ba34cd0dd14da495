// bwd_v2: the two attention passes of the backward on the tensor cores (f16/bf16, head-dim
// capacity <= 128, sm_80+). The module is bwd_v1.cu (mix, recompute, pre, mix-back, weight
// gradients, reduce: unchanged) followed by this file, compiled with HM_BWD_TC = 1, which
// replaces bwd_v1's FMA dq and dk/dv passes by:
//
//   hm_bwd_v2_dq    per (64 virtual queries, h, b): S = Q K^T, dP = dO V^T, dS = P (dP - D),
//                   dQ += dS K; R(-theta) into dqt.
//   hm_bwd_v2_dkdv  per (64 virtual keys, h, b): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
//                   dK += dS^T Q; R(-phi) into dkt.
//
// Every product is mma.sync.m16n8k16 with f32 accumulators (FlashAttention-2's register layout:
// 4 warps x 16 owned rows, the score fragments reused as the A operand of the second product).
// The operands are the f32 pseudo-head rows split into two 16-bit parts, x = hi + lo, and each
// product is hi*hi + hi*lo + lo*hi (three mma, as bwd_v1's pre-mix does for weights): the scores
// stay f32-accurate, so P matches the saved lse and dP - D does not cancel into rounding noise.
// Tiles are loaded (f32 -> hi, lo) into shared memory and read by ldmatrix; masks by select
// (mask.cuh), masked pairs give P = dS = 0. No float atomics (an integer atomicOr marks sanitized
// rows, below: deterministic).
//
// NaN policy (docs/backward.md, "Non-finite inputs"): the second products (dS K, P^T dO, dS^T Q)
// multiply a whole streamed tile by weights that are 0 for masked pairs, and 0 * NaN is NaN in
// the mma. So in a tile the mask cuts, the streamed operands of those products are sanitized as
// they are loaded (bw2_load with a mask: a non-finite 16-bit part becomes 0, by select, and its
// row is noted), and in the rare tile that held one (__syncthreads_or), an owned row that sees a
// sanitized streamed row gets NaN gradients (it read a non-finite value). Tiles every owned row
// sees whole load as they are (a branch per loaded word): there 0 * NaN reaches only rows that
// read it.

#if HM_DTYPE == 0
#error "bwd_v2 runs f16/bf16 only (f32 uses bwd_v1)"
#endif
#if HM_HD > 128 || HM_HD % 16 != 0
#error "bwd_v2 needs a head-dim capacity that is a multiple of 16, at most 128"
#endif

#define BW2_BR 64                // owned rows per block: 4 warps x 16
#define BW2_BC (HM_HD > 64 ? 16 : 32) // streamed rows per tile (16 at d 128: dk and dv stay in registers)
#define BW2_PITCH (HM_HD + 8)    // 16-bit elements per shared row (+16 B: conflict-free ldmatrix)
#define BW2_NS (BW2_BC / 8)      // score n-tiles per warp
#define BW2_NO (HM_HD / 8)       // output n-tiles per warp
#if HM_NT != 128
#error "bwd_v2: 4 warps of 16 owned rows"
#endif
// Owned hi/lo planes of two tensors [4][BR][PITCH], streamed [4][BC][PITCH] (16-bit), the streamed
// rows' lse and D [2][BC] (f32) and key ranges [2][BC] (i32), the mask of sanitized streamed rows
// (u32, 16 bytes). bwd_v1's FMA passes fit inside it.
static_assert(HM_SMEM == 2 * BW2_PITCH * (4 * BW2_BR + 4 * BW2_BC) + 4 * 4 * BW2_BC + 16,
              "bwd_v2: the kernel table's shared memory (HM_SMEM) is not this carve-up");
static_assert(4 * (2 * (HM_BR + HM_BC) * HM_HDP + 2 * HM_BC + 2 * BW_NW * HM_BC) <= HM_SMEM,
              "bwd_v2: bwd_v1's recompute pass must fit the module's shared memory");

// f32 rows [first, first + rows) of an [nl, d] slice -> 16-bit planes hi, lo [rows][PITCH] with
// x = hi + lo (to about 2^-16 relative in bf16, 2^-22 in f16); zeros past nl and d.
// bad != null: sanitize (NaN policy): an element whose high part is NaN or infinite (a non-finite
// input, or an f32 beyond the 16-bit range) is stored as 0 (by select, hi and lo) and its row's bit
// set in *bad (rows <= 32); returns whether this thread sanitized one.
__device__ __forceinline__ bool bw2_load(unsigned short* hi, unsigned short* lo, const float* src, int first, int nl,
                                         int rows, int d, unsigned* bad = nullptr) {
    bool any = false;
    // Four columns per thread and step (HM_HD / 4 a power of two: the division is a shift).
    for (int e = threadIdx.x; e < rows * (HM_HD / 4); e += HM_NT) {
        const int r = e / (HM_HD / 4), c = (e - r * (HM_HD / 4)) * 4, i = first + r;
        const float* s = src + (long long)i * d + c;
        unsigned h2[2], l2[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const float v0 = i < nl && c + 2 * k < d ? s[2 * k] : 0.f;
            const float v1 = i < nl && c + 2 * k + 1 < d ? s[2 * k + 1] : 0.f;
            const float r0 = hm_round(v0), r1 = hm_round(v1);
            h2[k] = hm_pack2(r0, r1);
            l2[k] = hm_pack2(v0 - r0, v1 - r1);
            if (bad) { // select, never multiply
                const unsigned m = (hm_bits_nonfinite((unsigned short)h2[k]) ? 0xffffu : 0u) |
                                   (hm_bits_nonfinite((unsigned short)(h2[k] >> 16)) ? 0xffff0000u : 0u);
                if (m) { // rare
                    h2[k] &= ~m, l2[k] &= ~m;
                    atomicOr(bad, 1u << r);
                    any = true;
                }
            }
        }
        *(unsigned*)(hi + r * BW2_PITCH + c) = h2[0];
        *(unsigned*)(hi + r * BW2_PITCH + c + 2) = h2[1];
        *(unsigned*)(lo + r * BW2_PITCH + c) = l2[0];
        *(unsigned*)(lo + r * BW2_PITCH + c + 2) = l2[1];
    }
    return any;
}

// Two n-tiles c[0], c[1] += A . B with both operands split hi + lo: hi*hi + hi*lo + lo*hi, small
// terms first. `bh`, `bl`: an ldmatrix x4 of B, registers 0-1 the first n-tile, 2-3 the second.
__device__ __forceinline__ void bw2_mma_split(float (*c)[4], const unsigned* ah, const unsigned* al,
                                              const unsigned* bh, const unsigned* bl) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        hm_mma16816(c[t], al, bh[2 * t], bh[2 * t + 1]);
        hm_mma16816(c[t], ah, bl[2 * t], bl[2 * t + 1]);
        hm_mma16816(c[t], ah, bh[2 * t], bh[2 * t + 1]);
    }
}

// c[16 x BC] += X[this warp's 16 rows] . Y[BC rows]^T over the head dim: A from the row-major X
// planes, B from Y stored [n][k] (ldmatrix, two n-tiles per x4); hi*hi + hi*lo + lo*hi.
// (Planes by shared-space address: the offsets fold into ldmatrix's immediate.)
__device__ __forceinline__ void bw2_abt(float (*c)[4], unsigned xhi, unsigned xlo, unsigned yhi, unsigned ylo, int warp,
                                        int lane) {
    const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < HM_HD / 16; ++kk) {
        unsigned ah[4], al[4];
        const int ao = (warp * 16 + lr + 8 * (mi & 1)) * BW2_PITCH + kk * 16 + 8 * (mi >> 1);
        hm_ldsm_x4(ah, xhi + 2 * ao);
        hm_ldsm_x4(al, xlo + 2 * ao);
#pragma unroll
        for (int np = 0; np < BW2_NS / 2; ++np) {
            unsigned bh[4], bl[4];
            const int bo = (np * 16 + lr + 8 * (mi >> 1)) * BW2_PITCH + kk * 16 + 8 * (mi & 1);
            hm_ldsm_x4(bh, yhi + 2 * bo);
            hm_ldsm_x4(bl, ylo + 2 * bo);
            bw2_mma_split(c + 2 * np, ah, al, bh, bl);
        }
    }
}

// o[16 x HD] += W[16 x BC] . Y[BC rows][HD]: W from this warp's score-layout accumulators (n-tiles
// 2kk, 2kk+1 are the A fragment of key step kk), split hi + lo; B from Y stored [k][n]
// (ldmatrix.trans).
__device__ __forceinline__ void bw2_ab(float (*o)[4], const float (*w)[4], unsigned yhi, unsigned ylo, int lane) {
    const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < BW2_BC / 16; ++kk) {
        float wh[8], wl[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float v = w[2 * kk + (e >> 2)][e & 3];
            wh[e] = hm_round(v);
            wl[e] = v - wh[e];
        }
        unsigned ah[4], al[4];
        ah[0] = hm_pack2(wh[0], wh[1]), ah[1] = hm_pack2(wh[2], wh[3]);
        ah[2] = hm_pack2(wh[4], wh[5]), ah[3] = hm_pack2(wh[6], wh[7]);
        al[0] = hm_pack2(wl[0], wl[1]), al[1] = hm_pack2(wl[2], wl[3]);
        al[2] = hm_pack2(wl[4], wl[5]), al[3] = hm_pack2(wl[6], wl[7]);
#pragma unroll
        for (int np = 0; np < BW2_NO / 2; ++np) {
            unsigned bh[4], bl[4];
            const int bo = (kk * 16 + lr + 8 * (mi & 1)) * BW2_PITCH + np * 16 + 8 * (mi >> 1);
            hm_ldsm_x4_trans(bh, yhi + 2 * bo);
            hm_ldsm_x4_trans(bl, ylo + 2 * bo);
            bw2_mma_split(o + 2 * np, ah, al, bh, bl);
        }
    }
}

// A warp's 16 accumulated rows (times `scale`) through f32 shared staging [BR][HD+1] (the streamed
// area, free by then), rotated back by R(-angle) when `rope`, into rows [r0, r0 + BR) of dst.
__device__ __forceinline__ void bw2_store(const HmArgs& a, const HmBwd& x, const float (*acc)[4], float* stage,
                                          float* dst, int r0, int nl, float scale, bool rope, bool keys, int warp,
                                          int lane) {
    const int g = lane >> 2, t = lane & 3, d = a.d;
#pragma unroll
    for (int n = 0; n < BW2_NO; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c)
            stage[(warp * 16 + g + 8 * (c >> 1)) * HM_HDP + n * 8 + 2 * t + (c & 1)] = acc[n][c] * scale;
    BW_SYNCWARP();
    for (int rr = 0; rr < 16; ++rr) {
        const int row = warp * 16 + rr, i = r0 + row;
        if (i >= nl) break; // warp-uniform
        float* sr = stage + row * HM_HDP;
        if (rope) {
            bw_rope_back(x, sr, keys ? bw_k_pos(a, i) : bw_q_pos(a, i), d, lane);
            BW_SYNCWARP();
        }
        for (int c = lane; c < d; c += 32) dst[(long long)i * d + c] = sr[c];
    }
    BW_SYNCWARP();
}

// One attention pass. KEYS = false (dq): owned queries X1 = qt, X2 = dop, streamed keys Y1 = kt,
// Y2 = vt. KEYS = true (dk, dv): owned keys X1 = kt, X2 = vt, streamed queries Y1 = qt, Y2 = dop.
template <bool KEYS> __device__ __forceinline__ void bw2_pass(const HmArgs& a, const HmBwd& x, unsigned short* sm) {
    unsigned short* x1h = sm;
    unsigned short* x1l = x1h + BW2_BR * BW2_PITCH;
    unsigned short* x2h = x1l + BW2_BR * BW2_PITCH;
    unsigned short* x2l = x2h + BW2_BR * BW2_PITCH;
    unsigned short* y1h = x2l + BW2_BR * BW2_PITCH;
    unsigned short* y1l = y1h + BW2_BC * BW2_PITCH;
    unsigned short* y2h = y1l + BW2_BC * BW2_PITCH;
    unsigned short* y2l = y2h + BW2_BC * BW2_PITCH;
    float* st = (float*)(y2l + BW2_BC * BW2_PITCH); // [2][BC]: streamed queries' lse (log2) and D
    int* sk = (int*)(st + 2 * BW2_BC);              // [2][BC]: the keys each streamed query sees
    unsigned* badm = (unsigned*)(sk + 2 * BW2_BC);  // streamed rows sanitized (bit r: row c0 + r)
    // Shared-space addresses: one base register, the planes at constant offsets (immediates).
    const unsigned base = hm_smem_addr(sm), ox = 2 * BW2_BR * BW2_PITCH, oy = 2 * BW2_BC * BW2_PITCH;
    const unsigned ax1h = base, ax1l = base + ox, ax2h = base + 2 * ox, ax2l = base + 3 * ox;
    const unsigned ay1h = base + 4 * ox, ay1l = ay1h + oy, ay2h = ay1h + 2 * oy, ay2l = ay1h + 3 * oy;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, P = a.P, d = a.d, nq = a.N * P, nk = a.M * P;
    const long long off = (long long)(a.M - a.N) * P;
    const long long hq = ((long long)b * x.hc + h) * nq, hk = ((long long)b * x.hc + h) * nk; // chunk rows
    const int nx = KEYS ? nk : nq, ny = KEYS ? nq : nk, r0 = blockIdx.x * BW2_BR;
    const float* X1 = KEYS ? x.kt + hk * d : x.qt + hq * d;
    const float* X2 = KEYS ? x.vt + hk * d : x.dop + hq * d;
    const float* Y1 = KEYS ? x.qt + hq * d : x.kt + hk * d;
    const float* Y2 = KEYS ? x.dop + hq * d : x.vt + hk * d;
    bw2_load(x1h, x1l, X1, r0, nx, BW2_BR, d);
    bw2_load(x2h, x2l, X2, r0, nx, BW2_BR, d);
    // This thread's owned rows ra and rb = ra + 8 (accumulator elements c < 2 and c >= 2).
    const int ra = r0 + warp * 16 + g, rb = ra + 8;
    float lse_a = 0.f, lse_b = 0.f, D_a = 0.f, D_b = 0.f;
    long long lo_a = 0, hi_a = -1, lo_b = 0, hi_b = -1;
    if (!KEYS) { // queries: their lse, D and key ranges
        if (ra < nq) {
            lse_a = x.lse[hq + ra] * HM_LOG2E, D_a = x.D[hq + ra];
            hm_row_keys(a, ra + off, nk, &lo_a, &hi_a);
        }
        if (rb < nq) {
            lse_b = x.lse[hq + rb] * HM_LOG2E, D_b = x.D[hq + rb];
            hm_row_keys(a, rb + off, nk, &lo_b, &hi_b);
        }
    }
    float acc1[BW2_NO][4], acc2[BW2_NO][4];
#pragma unroll
    for (int n = 0; n < BW2_NO; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc1[n][c] = acc2[n][c] = 0.f;
    // The streamed rows [slo, shi] some owned row sees; keys: [alo, ahi], the queries that see
    // every owned key (bw_query_range of the swapped ends: tiles inside it are not cut by the mask).
    long long slo, shi, alo = 0, ahi = -1;
    const int xlast = min(r0 + BW2_BR, nx) - 1;
    if (KEYS) {
        bw_query_range(a, r0, xlast, &slo, &shi);
        bw_query_range(a, xlast, r0, &alo, &ahi);
    } else {
        hm_key_range(a, r0, xlast, &slo, &shi);
    }
    bool bad_a = false, bad_b = false; // the row sees a sanitized streamed row (NaN policy)
    if (threadIdx.x == 0) *badm = 0;   // (ordered by the first barrier of the loop)
    for (long long c0 = slo / BW2_BC * BW2_BC; c0 <= shi; c0 += BW2_BC) {
        // Whether the mask cuts the tile (some owned row does not see all its streamed rows):
        // queries from this thread's two rows, OR-ed over the block by the barrier; keys against
        // [alo, ahi]. (A block-wide range for the queries too costs ptxas registers and a spill.)
        const long long ylast = min(c0 + BW2_BC, (long long)ny) - 1;
        const bool part =
            !KEYS && ((ra < nq && (lo_a > c0 || hi_a < ylast)) || (rb < nq && (lo_b > c0 || hi_b < ylast)));
        // (The barrier: the previous tile consumed; the first time, the owned planes written.)
        const bool cut = __syncthreads_or(part) || (KEYS && (c0 < alo || ylast > ahi));
        // Where it does, the streamed operands of the second products sanitized: Y1 (dS Y1), and
        // with KEYS Y2 (P^T Y2). (Without KEYS, Y2 = vt enters dP = dO V^T only, column by
        // column: masked by select.)
        unsigned* san = cut ? badm : nullptr;
        bool bad = bw2_load(y1h, y1l, Y1, (int)c0, ny, BW2_BC, d, san);
        bad |= bw2_load(y2h, y2l, Y2, (int)c0, ny, BW2_BC, d, KEYS ? san : nullptr);
        if (KEYS && threadIdx.x < BW2_BC) {
            const long long i = c0 + threadIdx.x;
            st[threadIdx.x] = i < nq ? x.lse[hq + i] * HM_LOG2E : 0.f;
            st[BW2_BC + threadIdx.x] = i < nq ? x.D[hq + i] : 0.f;
            long long klo, khi;
            hm_row_keys(a, i + off, nk, &klo, &khi); // clipped to [0, nk): fits an int
            sk[threadIdx.x] = (int)klo;
            sk[BW2_BC + threadIdx.x] = i < nq ? (int)khi : -1;
        }
        if (__syncthreads_or(bad)) { // (the barrier) rare: an element was sanitized
            // The owned rows that see a sanitized row read a non-finite value.
            for (unsigned m = *badm; m != 0; m &= m - 1) { // the sanitized rows, one by one
                const int col = __ffs(m) - 1;
                const long long y = c0 + col;
                // Keys: owned keys ra, rb among the streamed query's keys; queries: the streamed
                // key among the owned query's.
                bad_a |= KEYS ? ra >= sk[col] && ra <= sk[BW2_BC + col] : y >= lo_a && y <= hi_a;
                bad_b |= KEYS ? rb >= sk[col] && rb <= sk[BW2_BC + col] : y >= lo_b && y <= hi_b;
            }
            __syncthreads(); // every thread read the mask
            if (threadIdx.x == 0) *badm = 0; // (ordered by the next tile's first barrier)
        }
        float s[BW2_NS][4], dp[BW2_NS][4];
#pragma unroll
        for (int n = 0; n < BW2_NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[n][c] = dp[n][c] = 0.f;
        bw2_abt(s, ax1h, ax1l, ay1h, ay1l, warp, lane);  // S (or S^T)
        bw2_abt(dp, ax2h, ax2l, ay2h, ay2l, warp, lane); // dP (or dP^T)
        // P and dS by select: a pair the forward did not see carries nothing.
#pragma unroll
        for (int n = 0; n < BW2_NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = n * 8 + 2 * t + (c & 1);
                const long long y = c0 + col;
                const int row = c < 2 ? ra : rb;
                bool vis;
                float lse2, Dv;
                if (KEYS) { // owned key `row`, streamed query y
                    vis = row >= sk[col] && row <= sk[BW2_BC + col]; // (past nk: above every range)
                    lse2 = st[col];
                    Dv = st[BW2_BC + col];
                } else {
                    vis = c < 2 ? (y >= lo_a && y <= hi_a) : (y >= lo_b && y <= hi_b);
                    lse2 = c < 2 ? lse_a : lse_b;
                    Dv = c < 2 ? D_a : D_b;
                }
                const float p = vis ? exp2f(hm_score_visible(s[n][c], a.scale_log2) - lse2) : 0.f;
                dp[n][c] = vis ? p * (dp[n][c] - Dv) : 0.f;
                s[n][c] = p;
            }
        bw2_ab(acc1, dp, ay1h, ay1l, lane); // dQ += dS K   (keys: dK += dS^T Q)
        if (KEYS) bw2_ab(acc2, s, ay2h, ay2l, lane); // dV += P^T dO
    }
    // A row that read a sanitized (non-finite) value has NaN gradients (the lanes of its quad agree).
    const float qnan = __int_as_float(0x7fc00000);
#pragma unroll
    for (int n = 0; n < BW2_NO; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const bool nan = c < 2 ? bad_a : bad_b;
            acc1[n][c] = nan ? qnan : acc1[n][c];
            acc2[n][c] = nan ? qnan : acc2[n][c];
        }
    __syncthreads(); // the streamed area becomes the f32 staging of the results
    float* stage = (float*)y1h;
    const float scale = a.scale_log2 * HM_LN2;
    bw2_store(a, x, acc1, stage, KEYS ? x.dkt + hk * d : x.dqt + hq * d, r0, nx, scale, a.rope != 0, KEYS, warp, lane);
    if (KEYS) bw2_store(a, x, acc2, stage, x.dvt + hk * d, r0, nx, 1.f, false, true, warp, lane);
}

extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v2_dq(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    bw2_pass<false>(a, x, (unsigned short*)hm_smem);
}

extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v2_dkdv(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    bw2_pass<true>(a, x, (unsigned short*)hm_smem);
}
