// bwd_v1: the backward pass of head-mixing attention (docs/backward.md), FMA kernels with f32
// arithmetic for every dtype (f16/bf16 inputs widened, dq/dk/dv rounded once at the end).
// One module, ten entry points, launched in this order by host/src/backends/cuda/backward.rs
// (every kernel takes the call's HmArgs and HmBwd; the host's launch plan is also what the CPU
// emulator runs, kernels-cuda/emu/bwd_emu.cpp). The passes run over a chunk of heads
// [h0, h0 + hc) (HmBwd's h0, hc): the f32 pseudo-head scratch holds that chunk's rows only, so the
// backward's extra memory is bounded by the host's budget, not by H*P. With one chunk (hc = H)
// the sequence below runs once; with several, mix .. reduce run once per chunk, mix-back
// accumulates dq, dk, dv in f32 across chunks (in chunk order: the same sums in the same order,
// the same bits), and a collapse with a head norm first runs mix, fwd, ysum per chunk (y, every
// head's collapse, is complete only after all chunks) and norm once (y -> dy):
//
//   hm_bwd_v1_mix      mix (and rotate) q, k, v into f32 pseudo-head rows qt, kt, vt [B, hc, L*P, d],
//                      kept in f32 (the arithmetic of the reference and of the CPU backward: a 16-bit
//                      rounding here would move P away from the saved lse); a one-hot selection
//                      copies its head only.
//   hm_bwd_v1_fwd      only with a collapse, a head norm or a 16-bit dtype: recompute the pseudo
//                      outputs o_i = sum_j P_ij vt_j from the saved lse into op [B, hc, N*P, d].
//   hm_bwd_v1_ysum     (several chunks, collapse and norm) y [B, N, H, d] (+)= r[:, chunk] op.
//   hm_bwd_v1_norm     (several chunks, collapse and norm) head-norm backward y -> dy in place;
//                      partials of dgamma, dbeta.
//   hm_bwd_v1_pre      per token: y = r op (or op), head-norm backward -> dy (or dy read from the
//                      norm pass), dop = r^T dy, D_i = <dop_i, op_i>; per-tile partials of dr,
//                      dgamma, dbeta.
//   hm_bwd_v1_dq       query-major per (query tile, h, b): P from lse, dS = P (dP - D), dqr, then
//                      R(-theta): dqt. No atomics.
//   hm_bwd_v1_dkdv     key-major per (key tile, h, b): the scores recomputed, dvt = P^T do and
//                      dkr = dS^T qr, then R(-phi): dkt. No atomics.
//   hm_bwd_v1_mixback  dq, dk, dv: the transposes of the mixing (a selection adds only the
//                      pseudo-heads that selected the head: no multiply by 0), added to the f32
//                      accumulators of the previous chunks, rounded to the dtype by the last.
//   hm_bwd_v1_wgrad    per-tile partials of daq, dak, dav (<x, dxt> over the tile's tokens).
//   hm_bwd_v1_reduce   the chunk's weight-gradient columns: partials summed in tile order.
//
// No atomics anywhere: every sum has one owner thread and a fixed order, so two calls give the
// same bits. Scores live in the log2 domain as in the forward (softmax.cuh): p = 2^(s - lse*log2e).
// Masks: a pair the forward did not see carries nothing back (mask.cuh's key ranges and
// hm_visible; masked keys are skipped, never multiplied by 0).

#define BW_NW (HM_NT / 32)          // warps per block
#define BW_RPW (HM_BR / BW_NW)      // owned rows per warp (queries in dq, keys in dkdv)
#define BW_TPL ((HM_HD + 31) / 32)  // columns per lane
#define BW_PRE_TOK 8                // tokens per hm_bwd_v1_pre block (one partial per block)
#define BW_W_TOK 16                 // tokens per hm_bwd_v1_wgrad block (one partial per block)
#define HM_BWD_NPTR 30              // pointers at the head of HmBwd (the emulator relocates them)
#ifndef HM_BWD_TC
#define HM_BWD_TC 0 // 1: the bwd_v2 module (this file, then bwd_v2.cu's tensor-core dq, dk/dv)
#endif

#if HM_BR % BW_NW != 0 || HM_BC != 32
#error "bwd_v1: the kernel table's tiles are BR rows over the warps and BC = 32 columns (one per lane)"
#endif
// Attention passes: two owned-row tiles [BR][HD+1], two streamed tiles [BC][HD+1], the streamed
// rows' lse and D [2][BC], and per warp two broadcast rows [NW][2][BC] (f32).
#if !HM_BWD_TC // (bwd_v2 asserts its own carve-up, which holds this one)
static_assert(HM_SMEM == 4 * (2 * (HM_BR + HM_BC) * HM_HDP + 2 * HM_BC + 2 * BW_NW * HM_BC),
              "bwd_v1: the kernel table's shared memory (HM_SMEM) is not this carve-up");
#endif

// The backward's buffers (mirrored by host/src/backends/cuda/backward.rs): pointers first.
// The pseudo-head scratch (qt .. dvt, D) holds the chunk's hc heads: head h0 + h at index h.
struct HmBwd {
    const void* dout;               // dL/dout, the shape of out (storage type)
    float *qt, *kt, *vt;            // [B, hc, L*P, d] f32 pseudo-head rows (qt, kt rotated)
    float* op;                      // [B, hc, N*P, d] recomputed pseudo outputs, or null (out is op)
    float* dop;                     // [B, hc, N*P, d] dL/d(pseudo output)
    float* D;                       // [B, hc, N*P] <dop_i, o_i>
    float *dqt, *dkt, *dvt;         // [B, hc, L*P, d] pseudo-gradients (after the RoPE transpose)
    void *dq, *dk, *dv;             // gradients of q, k, v (storage type)
    float *daq, *dak, *dav, *dr, *dgamma, *dbeta; // weight gradients (f32; dr.. null when absent)
    float* part;                    // per-tile partials of every weight gradient
    const int *selq, *selk, *selv;  // one-hot selections [H*P], or null (dense mixing)
    const float *rope_hi, *rope_lo; // RoPE (cos, sin) tables (plan::rope_tables), or null
    float *accq, *acck, *accv;      // f32 sums of dq, dk, dv over the chunks so far (null: one chunk)
    float* y;                       // [B, N, H, d] f32 y, then dy in place (several chunks with a
                                    // collapse and a norm), or null
    float* lse;                     // [B, hc, N*P] the chunk's saved lse: the call's lse with one
                                    // chunk, else a copy (hm_bwd_v1_mix; the passes index it as D)
    int rope_hi0;
    int pre_tiles;                  // B * ceil(N / BW_PRE_TOK)
    int wq_tiles, wk_tiles;         // B * ceil(N / BW_W_TOK), B * ceil(M / BW_W_TOK)
    int part_pre, part_g;           // float offsets in part: dr [pre_tiles][H][hc*P], dgamma and
                                    // dbeta [pre_tiles][2][H*d]
    int part_wq, part_wk, part_wv;  // ... daq [wq_tiles][Hq][hc*P], dak and dav [wk_tiles][Hk][hc*P]
    int h0, hc;                     // this launch's chunk of heads [h0, h0 + hc)
    int reduce;                     // hm_bwd_v1_reduce: bit g set = write gradient g (daq, dak, dav,
                                    // dr, dgamma, dbeta: bits 0 .. 5)
};
static_assert(sizeof(HmBwd) == HM_BWD_NPTR * 8 + 12 * 4, "HmBwd: pointers first, then 12 ints");

#ifdef HM_EMU
#define BW_SYNCWARP() hm_emu_syncwarp()
#else
#define BW_SYNCWARP() __syncwarp()
#endif

// (cos, sin) of the RoPE angle of position pos and frequency u (pos = hi*128 + lo, two tables).
__device__ __forceinline__ void bw_rope_cs(const HmBwd& x, unsigned pos, int u, int half, float* c, float* s) {
    const float* ph = x.rope_hi + 2 * (((pos >> 7) - (unsigned)x.rope_hi0) * half + u);
    const float* pl = x.rope_lo + 2 * ((pos & 127u) * half + u);
    const float ch = ph[0], sh = ph[1], cl = pl[0], sl = pl[1];
    *c = ch * cl - sh * sl;
    *s = sh * cl + ch * sl;
}
// RoPE positions of virtual query i and virtual key j (common.cuh's hm_q_pos / hm_k_pos in 32 bits:
// the host's tables cover pos0 .. pos0 + M*P - 1).
__device__ __forceinline__ unsigned bw_q_pos(const HmArgs& a, int i) {
    return (unsigned)a.pos0 + (a.rope_token ? (unsigned)(i / a.P + (a.M - a.N)) : (unsigned)(i + (a.M - a.N) * a.P));
}
__device__ __forceinline__ unsigned bw_k_pos(const HmArgs& a, int j) {
    return (unsigned)a.pos0 + (a.rope_token ? (unsigned)(j / a.P) : (unsigned)j);
}

// ---- 1. mix: qt, kt, vt ------------------------------------------------------------------------
// grid (max(N, M), 3 = q|k|v, B): one block per (token, tensor, batch element); the chunk's
// pseudo-heads hp = h0*P .. (h0 + hc)*P - 1.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_mix(const HmArgs a, const HmBwd x) {
    const int which = blockIdx.y, l = blockIdx.x, b = blockIdx.z;
    const int L = which == 0 ? a.N : a.M;
    if (l >= L) return;
    const int S = which == 0 ? a.Hq : a.Hk, HP = a.H * a.P, P = a.P, d = a.d, half = d / 2;
    const float* w = which == 0 ? a.aq : which == 1 ? a.ak : a.av;
    const int* sel = which == 0 ? x.selq : which == 1 ? x.selk : x.selv;
    const void* src = which == 0 ? a.q : which == 1 ? a.k : a.v;
    float* dst = which == 0 ? x.qt : which == 1 ? x.kt : x.vt;
    const bool rope = a.rope && which < 2;
    const long long xrow = ((long long)b * L + l) * S * d;
    auto mixed = [&](int hp, int t) -> float {
        if (sel) return hm_load(src, xrow + (long long)sel[hp] * d + t); // the selected head only
        float s = 0.f;
        for (int m = 0; m < S; ++m) s += w[m * HP + hp] * hm_load(src, xrow + (long long)m * d + t);
        return s;
    };
    const int per = rope ? half : d, CP = x.hc * P;
    for (int e = threadIdx.x; e < CP * per; e += HM_NT) {
        const int cl = e / per, t = e - cl * per, h = cl / P, p = cl - h * P, vi = l * P + p;
        const int hp = x.h0 * P + cl; // the pseudo-head's column of the weights
        float* row = dst + (((long long)b * x.hc + h) * L * P + vi) * d;
        if (which == 0 && t == 0 && x.lse != a.lse) // several chunks: the chunk's lse rows
            x.lse[((long long)b * x.hc + h) * L * P + vi] = a.lse[((long long)b * a.H + x.h0 + h) * L * P + vi];
        if (rope) {
            float c, s;
            bw_rope_cs(x, which == 0 ? bw_q_pos(a, vi) : bw_k_pos(a, vi), t, half, &c, &s);
            const float x0 = mixed(hp, t), x1 = mixed(hp, t + half);
            row[t] = x0 * c - x1 * s;
            row[t + half] = x1 * c + x0 * s;
        } else {
            row[t] = mixed(hp, t);
        }
    }
}

// ---- 2./4./5. the attention passes ----------------------------------------------------------------
// rows x [BR][HD+1] tile <- f32 rows [first, first + rows) of a [nl, d] slice, zero past nl and d.
__device__ __forceinline__ void bw_load(float* dst, const float* src, int first, int nl, int rows, int d) {
    for (int e = threadIdx.x; e < rows * HM_HD; e += HM_NT) {
        const int r = e / HM_HD, c = e - r * HM_HD, i = first + r;
        dst[r * HM_HDP + c] = i < nl && c < d ? src[(long long)i * d + c] : 0.f;
    }
}

// Dot product of two shared rows over the runtime d.
__device__ __forceinline__ float bw_dot(const float* x, const float* y, int d) {
    float s = 0.f;
    for (int c = 0; c < d; ++c) s = fmaf(x[c], y[c], s);
    return s;
}

// The queries [*lo, *hi] (within [0, nq)) that see at least one key of [j0, j1]: mask.cuh's
// hm_key_range read backwards (64-bit: windows reach i32::MAX).
__device__ __forceinline__ void bw_query_range(const HmArgs& a, long long j0, long long j1, long long* lo,
                                               long long* hi) {
    const long long off = (long long)(a.M - a.N) * a.P;
    *lo = 0;
    *hi = (long long)a.N * a.P - 1;
    if (a.causal) *lo = max(*lo, j0 - off);
    if (a.has_window) {
        *lo = max(*lo, j0 - (long long)a.window_right - off);
        *hi = min(*hi, j1 + (long long)a.window_left - off);
    }
}

// Rotate a warp's accumulated row by R(-angle) in place (the RoPE transpose), lanes over pairs.
__device__ __forceinline__ void bw_rope_back(const HmBwd& x, float* row, unsigned pos, int d, int lane) {
    const int half = d / 2;
    for (int u = lane; u < half; u += 32) {
        float c, s;
        bw_rope_cs(x, pos, u, half, &c, &s);
        const float x0 = row[u], x1 = row[u + half];
        row[u] = x0 * c + x1 * s;
        row[u + half] = x1 * c - x0 * s;
    }
}

// Query-major pass over the keys of one block of BR virtual queries (warp w owns rows
// w*RPW .. w*RPW + RPW - 1; lane = key of the streamed tile for the scores, lane = columns for the
// products). RECOMPUTE: o_i = sum_j P_ij vt_j into op. Else dqr_i = scale sum_j dS_ij kr_j, rotated
// back into dqt.
template <bool RECOMPUTE> __device__ __forceinline__ void bw_query_pass(const HmArgs& a, const HmBwd& x, float* smem) {
    float* qs = smem;                    // [BR][HDP] qr rows
    float* dos = qs + HM_BR * HM_HDP;    // [BR][HDP] do rows
    float* ks = dos + HM_BR * HM_HDP;    // [BC][HDP]
    float* vs = ks + HM_BC * HM_HDP;     // [BC][HDP]
    float* wb = vs + HM_BC * HM_HDP + 2 * HM_BC; // [NW][2][BC]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, b = blockIdx.z, h = blockIdx.y;
    const int P = a.P, d = a.d, nq = a.N * P, nk = a.M * P, i0 = blockIdx.x * HM_BR;
    const long long off = (long long)(a.M - a.N) * P;
    const long long hq = ((long long)b * x.hc + h) * nq, hk = ((long long)b * x.hc + h) * nk; // chunk rows
    bw_load(qs, x.qt + hq * d, i0, nq, HM_BR, d);
    if (!RECOMPUTE) bw_load(dos, x.dop + hq * d, i0, nq, HM_BR, d);
    float lse2[BW_RPW], Dr[BW_RPW], acc[BW_RPW][BW_TPL];
    long long klo[BW_RPW], khi[BW_RPW];
#pragma unroll
    for (int r = 0; r < BW_RPW; ++r) {
        const int i = i0 + warp * BW_RPW + r;
        const bool ok = i < nq;
        lse2[r] = ok ? x.lse[hq + i] * HM_LOG2E : 0.f;
        Dr[r] = ok && !RECOMPUTE ? x.D[hq + i] : 0.f;
        hm_row_keys(a, i + off, nk, &klo[r], &khi[r]);
        if (!ok) khi[r] = -1;
#pragma unroll
        for (int u = 0; u < BW_TPL; ++u) acc[r][u] = 0.f;
    }
    long long jlo, jhi;
    hm_key_range(a, i0, min(i0 + HM_BR, nq) - 1, &jlo, &jhi);
    for (long long j0 = jlo / HM_BC * HM_BC; j0 <= jhi; j0 += HM_BC) {
        __syncthreads(); // the previous tile is consumed (and, the first time, the rows loaded)
        bw_load(ks, x.kt + hk * d, (int)j0, nk, HM_BC, d);
        bw_load(vs, x.vt + hk * d, (int)j0, nk, HM_BC, d);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < BW_RPW; ++r) {
            const int row = warp * BW_RPW + r;
            const long long j = j0 + lane;
            float w = 0.f;
            if (j >= klo[r] && j <= khi[r]) { // visible: P, and dS for the gradient
                const float s = hm_score_visible(bw_dot(qs + row * HM_HDP, ks + lane * HM_HDP, d), a.scale_log2);
                const float p = exp2f(s - lse2[r]);
                w = RECOMPUTE ? p : p * (bw_dot(dos + row * HM_HDP, vs + lane * HM_HDP, d) - Dr[r]);
            }
            wb[warp * 2 * HM_BC + lane] = w;
            BW_SYNCWARP();
            const float* src = RECOMPUTE ? vs : ks;
            for (int jj = 0; jj < HM_BC; ++jj) {
                const float wj = wb[warp * 2 * HM_BC + jj];
                if (wj == 0.f) continue; // masked (or zero): nothing of that key reaches the row
#pragma unroll
                for (int u = 0; u < BW_TPL; ++u) acc[r][u] = fmaf(wj, src[jj * HM_HDP + lane + 32 * u], acc[r][u]);
            }
            BW_SYNCWARP();
        }
    }
    // Every thread's loads of the owned rows done before warps reuse their rows of qs (a block
    // whose queries see no key ran no barrier yet: another warp's load could overwrite them).
    __syncthreads();
    // The warp's own rows: op (RECOMPUTE), or scale * acc rotated back into dqt.
    const float scale = a.scale_log2 * HM_LN2;
#pragma unroll
    for (int r = 0; r < BW_RPW; ++r) {
        const int row = warp * BW_RPW + r, i = i0 + row;
        if (i >= nq) continue; // warp-uniform
        float* sr = qs + row * HM_HDP; // this warp's row of qs (read by this warp only)
#pragma unroll
        for (int u = 0; u < BW_TPL; ++u) sr[lane + 32 * u] = RECOMPUTE ? acc[r][u] : acc[r][u] * scale;
        BW_SYNCWARP();
        if (!RECOMPUTE && a.rope) {
            bw_rope_back(x, sr, bw_q_pos(a, i), d, lane);
            BW_SYNCWARP();
        }
        float* dst = (RECOMPUTE ? x.op : x.dqt) + (hq + i) * d;
        for (int c = lane; c < d; c += 32) dst[c] = sr[c];
        BW_SYNCWARP();
    }
}

extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_fwd(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    bw_query_pass<true>(a, x, hm_smem);
}

#if !HM_BWD_TC // bwd_v2 has its tensor-core dq and dk/dv passes instead
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_dq(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    bw_query_pass<false>(a, x, hm_smem);
}

// Key-major pass: a block owns BR virtual keys of head h (warp w owns keys w*RPW ..), streams the
// query tiles that see any of them (lane = query for the scores): dvt_j = sum_i P_ij do_i,
// dkr_j = scale sum_i dS_ij qr_i, rotated back into dkt.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_dkdv(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    float* ks = hm_smem;                 // [BR][HDP] owned kr rows
    float* vs = ks + HM_BR * HM_HDP;     // [BR][HDP] owned vt rows
    float* qs = vs + HM_BR * HM_HDP;     // [BC][HDP] streamed qr rows
    float* dos = qs + HM_BC * HM_HDP;    // [BC][HDP] streamed do rows
    float* st = dos + HM_BC * HM_HDP;    // [2][BC] their lse (log2 domain) and D
    float* wb = st + 2 * HM_BC;          // [NW][2][BC]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, b = blockIdx.z, h = blockIdx.y;
    const int P = a.P, d = a.d, nq = a.N * P, nk = a.M * P, j0 = blockIdx.x * HM_BR;
    const long long off = (long long)(a.M - a.N) * P;
    const long long hq = ((long long)b * x.hc + h) * nq, hk = ((long long)b * x.hc + h) * nk; // chunk rows
    bw_load(ks, x.kt + hk * d, j0, nk, HM_BR, d);
    bw_load(vs, x.vt + hk * d, j0, nk, HM_BR, d);
    float ak[BW_RPW][BW_TPL], av[BW_RPW][BW_TPL];
#pragma unroll
    for (int r = 0; r < BW_RPW; ++r)
#pragma unroll
        for (int u = 0; u < BW_TPL; ++u) ak[r][u] = av[r][u] = 0.f;
    long long ilo, ihi;
    bw_query_range(a, j0, min(j0 + HM_BR, nk) - 1, &ilo, &ihi);
    for (long long c0 = ilo / HM_BC * HM_BC; c0 <= ihi; c0 += HM_BC) {
        __syncthreads();
        bw_load(qs, x.qt + hq * d, (int)c0, nq, HM_BC, d);
        bw_load(dos, x.dop + hq * d, (int)c0, nq, HM_BC, d);
        if (threadIdx.x < HM_BC) {
            const long long i = c0 + threadIdx.x;
            st[threadIdx.x] = i < nq ? x.lse[hq + i] * HM_LOG2E : 0.f;
            st[HM_BC + threadIdx.x] = i < nq ? x.D[hq + i] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < BW_RPW; ++r) {
            const int row = warp * BW_RPW + r;
            const long long j = j0 + row, i = c0 + lane;
            float pw = 0.f, dw = 0.f;
            if (j < nk && i < nq && hm_visible(a, i + off, j)) {
                const float s = hm_score_visible(bw_dot(qs + lane * HM_HDP, ks + row * HM_HDP, d), a.scale_log2);
                pw = exp2f(s - st[lane]);
                dw = pw * (bw_dot(dos + lane * HM_HDP, vs + row * HM_HDP, d) - st[HM_BC + lane]);
            }
            wb[warp * 2 * HM_BC + lane] = pw;
            wb[warp * 2 * HM_BC + HM_BC + lane] = dw;
            BW_SYNCWARP();
            for (int ii = 0; ii < HM_BC; ++ii) {
                const float pi = wb[warp * 2 * HM_BC + ii], di = wb[warp * 2 * HM_BC + HM_BC + ii];
                if (pi == 0.f && di == 0.f) continue; // masked: that query gives this key nothing
#pragma unroll
                for (int u = 0; u < BW_TPL; ++u) {
                    av[r][u] = fmaf(pi, dos[ii * HM_HDP + lane + 32 * u], av[r][u]);
                    ak[r][u] = fmaf(di, qs[ii * HM_HDP + lane + 32 * u], ak[r][u]);
                }
            }
            BW_SYNCWARP();
        }
    }
    // As in the query pass: the owned rows' loads done before warps reuse them (a block of keys
    // no query sees ran no barrier yet).
    __syncthreads();
    const float scale = a.scale_log2 * HM_LN2;
#pragma unroll
    for (int r = 0; r < BW_RPW; ++r) {
        const int row = warp * BW_RPW + r, j = j0 + row;
        if (j >= nk) continue; // warp-uniform
        float* sk = ks + row * HM_HDP; // this warp's rows (read by this warp only from here on)
        float* sv = vs + row * HM_HDP;
#pragma unroll
        for (int u = 0; u < BW_TPL; ++u) {
            sk[lane + 32 * u] = ak[r][u] * scale;
            sv[lane + 32 * u] = av[r][u];
        }
        BW_SYNCWARP();
        if (a.rope) {
            bw_rope_back(x, sk, bw_k_pos(a, j), d, lane);
            BW_SYNCWARP();
        }
        for (int c = lane; c < d; c += 32) {
            x.dkt[(hk + j) * d + c] = sk[c];
            x.dvt[(hk + j) * d + c] = sv[c];
        }
        BW_SYNCWARP();
    }
}
#endif // !HM_BWD_TC

// ---- 3. pre: norm and collapse backward, dop, D ------------------------------------------------
// The head norm's backward of one output row of head h (a warp, lanes over columns): y and g
// (= dout) in registers, `sum` this lane's part of sum(y); dy[t] = (g' - m1 - xh m2) / sigma, and
// the dgamma, dbeta terms of the row added to dg[t], db[t] (rows the warp owns).
__device__ __forceinline__ void bw_norm_back(const HmArgs& a, int h, const float* y, const float* g, float sum,
                                             float* dy, float* dg, float* db, int lane, float inv_d) {
    const int d = a.d;
    const bool group = a.norm == HM_NORM_GROUP;
    const float mu = group ? hm_warp_sum(sum) * inv_d : 0.f;
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < BW_TPL; ++u)
        if (lane + 32 * u < d) ss += (y[u] - mu) * (y[u] - mu);
    const float inv = rsqrtf(hm_warp_sum(ss) * inv_d + a.eps); // hm_norm_inv without the division
    float xh[BW_TPL], gg[BW_TPL], s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int u = 0; u < BW_TPL; ++u) {
        const int t = lane + 32 * u;
        xh[u] = (y[u] - mu) * inv;
        gg[u] = t < d ? a.gamma[h * d + t] * g[u] : 0.f;
        if (t < d) {
            s1 += gg[u];
            s2 += gg[u] * xh[u];
        }
    }
    const float m1 = group ? hm_warp_sum(s1) * inv_d : 0.f, m2 = hm_warp_sum(s2) * inv_d;
#pragma unroll
    for (int u = 0; u < BW_TPL; ++u) {
        const int t = lane + 32 * u;
        if (t >= d) continue;
        dg[t] += g[u] * xh[u];
        if (group) db[t] += g[u];
        dy[t] = (gg[u] - m1 - xh[u] * m2) * inv;
    }
}

// grid (ceil(N / BW_PRE_TOK), B). Dynamic shared memory (f32): op [CP][d] (the chunk's CP = hc*P
// pseudo rows), dy [R][d] (R = H with a collapse, else CP), dr partial [H][CP], dgamma and dbeta
// partials [H][d] (backward.rs sizes it). Warp w owns heads w, w + NW, ... in the norm phase and
// pseudo rows w, w + NW, ... in the collapse-transpose phase: every partial element has one owner
// and a fixed token order. (Launch bounds (NT, 1): ptxas's default register target, 64, spilled
// the d 256 variant.) With x.y set (several chunks, a collapse and a norm) dy is read from
// it (hm_bwd_v1_norm wrote it: y needs every chunk's op) and the norm phase is skipped.
extern "C" __global__ void __launch_bounds__(HM_NT, 1) hm_bwd_v1_pre(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    const int H = a.H, P = a.P, HP = H * P, d = a.d, N = a.N, nq = N * P, b = blockIdx.y;
    const int CP = x.hc * P, c0 = x.h0 * P; // the chunk's pseudo rows: cl local, c0 + cl global
    const bool col = a.collapse != 0, norm = a.norm != HM_NORM_NONE && x.y == nullptr;
    const int R = col ? H : CP;
    float* ops = hm_smem;        // [CP][d]
    float* dys = ops + CP * d;   // [R][d]
    float* drs = dys + R * d;    // [H][CP]
    float* dgs = drs + H * CP;   // [H][d]
    float* dbs = dgs + H * d;    // [H][d]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float inv_d = 1.f / (float)d; // no division (a slow-path call) in the token loop
    for (int e = threadIdx.x; e < H * CP + 2 * H * d; e += HM_NT) drs[e] = 0.f;
    const int n0 = blockIdx.x * BW_PRE_TOK, n1 = min(n0 + BW_PRE_TOK, N);
    for (int n = n0; n < n1; ++n) {
        __syncthreads(); // the previous token is done with ops and dys
        for (int e = threadIdx.x; e < CP * d; e += HM_NT) {
            const int cl = e / d, t = e - cl * d, hl = cl / P, i = n * P + (cl - hl * P);
            ops[e] = x.op ? x.op[(((long long)b * x.hc + hl) * nq + i) * d + t]
                          : hm_load(a.out, (((long long)b * N + n) * HP + c0 + cl) * d + t);
        }
        __syncthreads();
        // Output rows of head h (every head with a collapse, the chunk's without): y (collapse or
        // the pseudo output), the norm's backward -> dy.
        for (int r = warp; r < (col ? H : x.hc); r += BW_NW) {
            const int h = col ? r : x.h0 + r;
            for (int rr = 0; rr < (col ? 1 : P); ++rr) {
                const int row = col ? h : r * P + rr; // its row of dys (and of ops without a collapse)
                // Its row of dout (and of x.y, which is set with a collapse only).
                const long long go = (((long long)b * N + n) * (col ? H : HP) + (col ? h : h * P + rr)) * d;
                float y[BW_TPL], g[BW_TPL];
                float sum = 0.f;
#pragma unroll
                for (int u = 0; u < BW_TPL; ++u) {
                    const int t = lane + 32 * u;
                    y[u] = g[u] = 0.f;
                    if (t >= d) continue;
                    if (!col) {
                        y[u] = ops[row * d + t];
                    } else if (norm) {
                        for (int cl = 0; cl < CP; ++cl) {
                            const float rw = a.r[h * HP + c0 + cl];
                            if (rw != 0.f) y[u] = fmaf(rw, ops[cl * d + t], y[u]); // unread stays unread
                        }
                    }
                    g[u] = x.y ? x.y[go + t] : hm_load(x.dout, go + t);
                    sum += y[u];
                }
                if (norm) {
                    bw_norm_back(a, h, y, g, sum, dys + row * d, dgs + h * d, dbs + h * d, lane, inv_d);
                } else {
#pragma unroll
                    for (int u = 0; u < BW_TPL; ++u)
                        if (lane + 32 * u < d) dys[row * d + lane + 32 * u] = g[u];
                }
            }
        }
        __syncthreads();
        // Pseudo row c = (h', p) of the chunk: dop = r^T dy (or dy), D = <dop, op>,
        // dr[h][c] += <dy_h, op_c>.
        for (int cl = warp; cl < CP; cl += BW_NW) {
            const int c = c0 + cl, hl = cl / P, i = n * P + (cl - hl * P);
            float* dst = x.dop + (((long long)b * x.hc + hl) * nq + i) * d;
            float dot = 0.f;
            for (int t = lane; t < d; t += 32) {
                float g = 0.f;
                if (col) {
                    for (int h = 0; h < H; ++h) {
                        const float rw = a.r[h * HP + c];
                        if (rw != 0.f) g = fmaf(rw, dys[h * d + t], g);
                    }
                } else {
                    g = dys[cl * d + t];
                }
                dst[t] = g;
                dot = fmaf(g, ops[cl * d + t], dot);
            }
            dot = hm_warp_sum(dot);
            if (lane == 0) x.D[((long long)b * x.hc + hl) * nq + i] = dot;
            if (col)
                for (int h = 0; h < H; ++h) {
                    float s = 0.f;
                    for (int t = lane; t < d; t += 32) s = fmaf(dys[h * d + t], ops[cl * d + t], s);
                    s = hm_warp_sum(s);
                    if (lane == 0) drs[h * CP + cl] += s;
                }
        }
    }
    __syncthreads();
    const long long tile = (long long)b * ((N + BW_PRE_TOK - 1) / BW_PRE_TOK) + blockIdx.x;
    float* part = x.part + x.part_pre + tile * (H * CP);
    for (int e = threadIdx.x; e < H * CP; e += HM_NT) part[e] = drs[e];
    // dgamma, dbeta of the heads whose norm ran here: the chunk's, or every head's with a collapse.
    const int g0 = col ? 0 : x.h0, g1 = !norm ? g0 : col ? H : x.h0 + x.hc;
    float* pg = x.part + x.part_g + tile * (2 * H * d);
    for (int e = threadIdx.x; e < 2 * H * d; e += HM_NT) {
        const int h = (e < H * d ? e : e - H * d) / d;
        if (h >= g0 && h < g1) pg[e] = dgs[e];
    }
}

// ---- 3a. ysum: y = r op over the chunks (several chunks with a collapse and a head norm) ---------
// grid (N, B): y[b, n, h, :] = (0 for the first chunk, else the previous chunks' sum) + sum over
// the chunk's pseudo rows c of r[h, c] op_c: pre's sum, in the same order (the same bits).
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_ysum(const HmArgs a, const HmBwd x) {
    const int n = blockIdx.x, b = blockIdx.y, H = a.H, P = a.P, HP = H * P, d = a.d, nq = a.N * P;
    const int CP = x.hc * P, c0 = x.h0 * P;
    for (int e = threadIdx.x; e < H * d; e += HM_NT) {
        const int h = e / d, t = e - h * d;
        float* yr = x.y + (((long long)b * a.N + n) * H + h) * d + t;
        float s = x.h0 == 0 ? 0.f : *yr;
        for (int cl = 0; cl < CP; ++cl) {
            const float rw = a.r[h * HP + c0 + cl];
            const int hl = cl / P;
            if (rw != 0.f) s = fmaf(rw, x.op[(((long long)b * x.hc + hl) * nq + n * P + (cl - hl * P)) * d + t], s);
        }
        *yr = s;
    }
}

// ---- 3b. norm: the head norm's backward over the complete y, in place (y -> dy) ------------------
// grid (ceil(N / BW_PRE_TOK), B), dynamic shared memory [2][H][d] f32 (the dgamma, dbeta partials;
// warp w owns heads w, w + NW, ...), partials laid out as pre's.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_norm(const HmArgs a, const HmBwd x) {
    extern __shared__ float hm_smem[];
    const int H = a.H, d = a.d, N = a.N, b = blockIdx.y;
    float* dgs = hm_smem;      // [H][d]
    float* dbs = dgs + H * d;  // [H][d]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float inv_d = 1.f / (float)d; // as pre's (the same bits)
    for (int e = threadIdx.x; e < 2 * H * d; e += HM_NT) dgs[e] = 0.f;
    __syncthreads();
    const int n0 = blockIdx.x * BW_PRE_TOK, n1 = min(n0 + BW_PRE_TOK, N);
    for (int n = n0; n < n1; ++n)
        for (int h = warp; h < H; h += BW_NW) {
            float* yr = x.y + (((long long)b * N + n) * H + h) * d;
            float y[BW_TPL], g[BW_TPL], sum = 0.f;
#pragma unroll
            for (int u = 0; u < BW_TPL; ++u) {
                const int t = lane + 32 * u;
                y[u] = g[u] = 0.f;
                if (t >= d) continue;
                y[u] = yr[t];
                g[u] = hm_load(x.dout, (((long long)b * N + n) * H + h) * d + t);
                sum += y[u];
            }
            bw_norm_back(a, h, y, g, sum, yr, dgs + h * d, dbs + h * d, lane, inv_d); // dy over y
        }
    __syncthreads();
    const long long tile = (long long)b * ((N + BW_PRE_TOK - 1) / BW_PRE_TOK) + blockIdx.x;
    float* pg = x.part + x.part_g + tile * (2 * H * d);
    for (int e = threadIdx.x; e < 2 * H * d; e += HM_NT) pg[e] = dgs[e];
}

// ---- 6. mix-back: dq, dk, dv ----------------------------------------------------------------------
// grid (max(N, M), 3 = q|k|v, B): dx[b, l, m, :] = sum_{h,p} w[m, h, p] dxt[b, h, l*P + p, :], the
// sum over the chunk's (h, p) continuing the previous chunks' f32 sum (acc), in (h, p) order.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_mixback(const HmArgs a, const HmBwd x) {
    const int which = blockIdx.y, l = blockIdx.x, b = blockIdx.z;
    const int L = which == 0 ? a.N : a.M;
    if (l >= L) return;
    const int S = which == 0 ? a.Hq : a.Hk, HP = a.H * a.P, P = a.P, d = a.d, CP = x.hc * P, c0 = x.h0 * P;
    const float* w = which == 0 ? a.aq : which == 1 ? a.ak : a.av;
    const int* sel = which == 0 ? x.selq : which == 1 ? x.selk : x.selv;
    const float* g = which == 0 ? x.dqt : which == 1 ? x.dkt : x.dvt;
    void* dst = which == 0 ? x.dq : which == 1 ? x.dk : x.dv;
    float* acc = which == 0 ? x.accq : which == 1 ? x.acck : x.accv;
    const bool first = x.h0 == 0, last = x.h0 + x.hc == a.H;
    for (int e = threadIdx.x; e < S * d; e += HM_NT) {
        const int m = e / d, t = e - m * d;
        const long long o = (((long long)b * L + l) * S + m) * d + t;
        float s = first ? 0.f : acc[o];
        for (int cl = 0; cl < CP; ++cl) {
            const int hp = c0 + cl, h = cl / P, vi = l * P + (cl - h * P);
            const float gv = g[(((long long)b * x.hc + h) * L * P + vi) * d + t];
            if (sel) {
                if (sel[hp] == m) s += gv; // only the pseudo-heads that read this head
            } else {
                s = fmaf(w[m * HP + hp], gv, s);
            }
        }
        if (last) hm_store(dst, o, s);
        else acc[o] = s;
    }
}

// ---- 7. weight-gradient partials: daq, dak, dav ---------------------------------------------------
// grid (ceil(max(N, M) / BW_W_TOK), 3, B): part[tile][m][cl] = sum over the tile's tokens of
// <x[b, l, m, :], dxt[b, h, l*P + p, :]> for the chunk's pseudo-heads cl = (h - h0)*P + p.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_wgrad(const HmArgs a, const HmBwd x) {
    const int which = blockIdx.y, b = blockIdx.z;
    const int L = which == 0 ? a.N : a.M, tiles = (L + BW_W_TOK - 1) / BW_W_TOK;
    if ((int)blockIdx.x >= tiles) return;
    const int S = which == 0 ? a.Hq : a.Hk, P = a.P, d = a.d, CP = x.hc * P;
    const void* src = which == 0 ? a.q : which == 1 ? a.k : a.v;
    const float* g = which == 0 ? x.dqt : which == 1 ? x.dkt : x.dvt;
    const int seg = which == 0 ? x.part_wq : which == 1 ? x.part_wk : x.part_wv;
    float* part = x.part + seg + (long long)(b * tiles + blockIdx.x) * S * CP;
    const int l0 = blockIdx.x * BW_W_TOK, l1 = min(l0 + BW_W_TOK, L);
    for (int e = threadIdx.x; e < S * CP; e += HM_NT) {
        const int m = e / CP, cl = e - m * CP, h = cl / P, p = cl - h * P;
        float s = 0.f;
        for (int l = l0; l < l1; ++l) {
            const long long xr = (((long long)b * L + l) * S + m) * d;
            const float* gr = g + (((long long)b * x.hc + h) * L * P + l * P + p) * d;
            for (int t = 0; t < d; ++t) s = fmaf(hm_load(src, xr + t), gr[t], s);
        }
        part[e] = s;
    }
}

// ---- 8. reduce: weight gradients from their partials, in tile order ----------------------------------
// grid (ceil(largest gradient part / NT), 6 = daq|dak|dav|dr|dgamma|dbeta); gradient y runs when
// bit y of x.reduce is set: daq, dak, dav, dr the chunk's columns [h0*P, (h0 + hc)*P) of every row,
// dgamma, dbeta the chunk's heads' rows.
extern "C" __global__ void __launch_bounds__(HM_NT) hm_bwd_v1_reduce(const HmArgs a, const HmBwd x) {
    const int HP = a.H * a.P, CP = x.hc * a.P, Hd = a.H * a.d, grad = blockIdx.y;
    if (!((x.reduce >> grad) & 1)) return;
    float* dst;
    int rows, tiles, stride, off; // partial element e of tile t: part[off + t*stride + e]
    switch (grad) {
    case 0: dst = x.daq, rows = a.Hq, tiles = x.wq_tiles, stride = a.Hq * CP, off = x.part_wq; break;
    case 1: dst = x.dak, rows = a.Hk, tiles = x.wk_tiles, stride = a.Hk * CP, off = x.part_wk; break;
    case 2: dst = x.dav, rows = a.Hk, tiles = x.wk_tiles, stride = a.Hk * CP, off = x.part_wv; break;
    case 3: dst = x.dr, rows = a.H, tiles = x.pre_tiles, stride = a.H * CP, off = x.part_pre; break;
    case 4: dst = x.dgamma, rows = 0, tiles = x.pre_tiles, stride = 2 * Hd, off = x.part_g; break;
    default: dst = x.dbeta, rows = 0, tiles = x.pre_tiles, stride = 2 * Hd, off = x.part_g + Hd; break;
    }
    const bool cols = grad < 4; // a [rows][H*P] gradient (the chunk's columns), else [H][d]
    const int e = blockIdx.x * HM_NT + threadIdx.x;
    if (dst == nullptr || e >= (cols ? rows * CP : x.hc * a.d)) return;
    const int r = cols ? e / CP : 0;
    const int src = cols ? e : x.h0 * a.d + e, to = cols ? r * HP + x.h0 * a.P + (e - r * CP) : src;
    float s = 0.f;
    for (int t = 0; t < tiles; ++t) s += x.part[off + (long long)t * stride + src];
    dst[to] = s;
}
