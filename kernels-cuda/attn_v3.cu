// attn_v3: FlashAttention-2 on sm_80+ (f16/bf16, head-dim capacity 32..128), with head mixing as
// a tensor-core pre-mix. Three entry points in one module:
//
//   hm_v3_mix      the pre-mix (memory-bound): y[b, l, h*P+p, :] = round(rope(sum_m w[m, h, p] x[b, l, m, :]))
//                  for every (h, p), as mma.sync of [d x S] x [S x 64 (h,p)] per token (the f32
//                  weights split into three 16-bit operands w = hi + mid + lo, three mma into one
//                  f32 accumulator: the stored x is exact in 16 bits, so the mix is f32-accurate);
//                  or, for
//                  selection weights that need RoPE, a copy of the one selected head, rotated.
//                  RoPE angles come from a two-level (cos, sin) table built once per call in f64
//                  on the host: no transcendental, no f64 on the device.
//   hm_attn_v3     attention over "row tables": virtual row i = t*P + p of head h is
//                  base + (b*L + t)*tok + sel[h*P + p]*d. For selection weights (MHA, GQA, any
//                  one-hot mixing) without RoPE the rows are the stored heads themselves (MHA
//                  reads exactly FlashAttention's bytes); otherwise they are the pre-mixed rows.
//                  FlashAttention-2 layout: 8 warps x 16 query rows = 128 virtual queries per
//                  block, 64-key tiles, K and V tiles loaded with 16-byte cp.async into a double-
//                  buffered shared-memory pipeline (tile t+1 in flight while tile t computes),
//                  fragments by ldmatrix, QK^T and PV by mma.sync.m16n8k16, online softmax in
//                  registers (softmax.cuh), mask by select (mask.cuh), tiles the mask does not cut
//                  skip the per-element mask. Writes the de-interleaved pseudo outputs (head norm
//                  applied here without a collapse) and lse.
//   hm_v3_collapse with a collapse r: acc[b, n, h', :] = sum_{h,p} r[h', h*P+p] op[b, n, h, p, :]
//                  from the pseudo outputs written once (no atomics); epilogue.cu norms and rounds.
//
// 32-bit index arithmetic throughout: validation bounds B*M*max(H,Hq,Hk)*P*d by i32::MAX, and
// every tensor and scratch buffer is at most that. Needs d % 8 == 0 and 16-byte aligned tensors
// (the host checks; else it runs v1). NaN policy: masked keys by select; tiles the mask cuts have
// their value rows sanitized (hm_sanitize_rows) and rows that see a sanitized key output NaN.

#define V3_BR HM_BR // virtual queries per block (8 warps x 16 rows; the kernel table's 128)
#define V3_BC HM_BC // virtual keys per KV tile (the kernel table's 64)
#define V3_NT HM_NT // 256
#define V3_PITCH (HM_HD + 8) // 16-bit elements per shared row: +16 B, conflict-free ldmatrix rows
#define V3_CH (HM_HD / 8)    // 16-byte chunks per row
#define V3_NS (V3_BC / 8)    // score n-tiles per warp
#define V3_NO (HM_HD / 8)    // output n-tiles per warp
#define V3M_NT 128           // pre-mix: threads per block
#define V3M_TOK 16           // pre-mix: tokens per block (weights split once per block)
#define V3M_HP 64            // pre-mix: (h, p) columns per block
#define V3C_NT 128           // collapse: threads per block

#if HM_DTYPE == 0
#error "attn_v3 runs f16/bf16 only (f32 uses attn_v1)"
#endif
#if HM_HD > 128 || HM_HD % 16 != 0
#error "attn_v3 needs a head-dim capacity that is a multiple of 16, at most 128"
#endif
#if V3_BR != 2 * V3_BC || V3_BR != 16 * (V3_NT / 32)
#error "attn_v3: the query tile is 16 rows per warp and fills the second K/V stage"
#endif
// K and V stages [2][2][BC][PITCH] 16-bit, badmask [2] u32, row offsets [2][2][BC] u32.
static_assert(HM_SMEM == 4 * V3_BC * V3_PITCH * 2 + 8 + 4 * V3_BC * 4,
              "attn_v3: the kernel table's shared memory (HM_SMEM) is not this carve-up");

// Where the virtual rows of one tensor live (mirrored by args.rs).
struct HmRows {
    const void* base; // [B, L, *, d] storage type
    const int* sel;   // [H*P]: the head (in units of d) of pseudo-head (h, p) in a token's row
    int tok;          // elements per token
    int pad_;
};
struct HmV3Attn {
    HmRows q, k, v;
    void* op; // pseudo outputs [B, N, H, P, d]: out without a collapse, else a scratch buffer
    unsigned p_mul, p_shr; // division by P (V3DivP)
};
struct HmV3Mix {
    const void* x;       // stored heads [B, L, S, d]
    void* y;             // pre-mixed rows [B, L, H*P, d]
    const float* w;      // [S, H*P] f32 (aq, ak or av)
    const int* sel;      // null: dense mixing; else the one-hot selection [H*P]
    const float* rope_hi; // [nhi][d/2] (cos, sin) of (hi0 + r) * 128 * f_t, or null: no RoPE
    const float* rope_lo; // [128][d/2] (cos, sin) of lo * f_t
    int L, S;
    int query; // positions of queries (else keys)
    int rope_hi0;
};

// Division by P without a divide instruction in the key loop: q = umulhi(n, mul) >> shr for
// n < 2^31 (CUTLASS's FastDivmod; mul and shr computed on the host), q = n when P = 1.
struct V3DivP {
    unsigned P, mul, shr;
    __device__ __forceinline__ unsigned div(unsigned n) const { return P == 1 ? n : __umulhi(n, mul) >> shr; }
};

// Element offset of virtual row i of head h (32-bit: every buffer is below i32::MAX elements).
__device__ __forceinline__ unsigned v3_row(const HmRows& r, const V3DivP& dp, unsigned tok0, unsigned i, int hP,
                                           int d) {
    const unsigned tok = dp.div(i), p = i - tok * dp.P;
    return (tok0 + tok) * (unsigned)r.tok + (unsigned)__ldg(r.sel + hP + p) * (unsigned)d;
}

// Issue the cp.async of virtual rows [first, first + ROWS) into a [ROWS][V3_PITCH] tile: rows
// past `count` and columns past d are zero-filled (they add nothing and hold no garbage).
template <int ROWS>
__device__ __forceinline__ void v3_load_rows(unsigned dst, const HmRows& r, const V3DivP& dp, unsigned tok0,
                                             int first, int count, int hP, int d, int tid) {
#pragma unroll
    for (int k = 0; k < ROWS * V3_CH / V3_NT; ++k) {
        const int e = tid + k * V3_NT, row = e / V3_CH, ch = e - row * V3_CH, i = first + row;
        const bool ok = i < count && ch * 8 < d;
        const hm_elem* src = (const hm_elem*)r.base;
        if (ok) src += v3_row(r, dp, tok0, (unsigned)i, hP, d) + ch * 8;
        hm_cp_async16(dst + (row * V3_PITCH + ch * 8) * 2, src, ok);
    }
}

// The per-thread state of one block of hm_attn_v3 (FlashAttention-2 layout: this thread holds
// rows a = warp*16 + g and b = a + 8 of the query tile, columns 2t, 2t+1 of each n-tile).
struct V3Block {
    const HmArgs& a;
    const HmV3Attn& x;
    V3DivP dp;
    unsigned short* kv; // [stage][K | V][BC][PITCH]
    unsigned kv_s;      // its shared-space address
    int ksel1, vsel1;   // the stored head of k and v when P = 1
    unsigned* badmask;  // [2]: value rows of the tile that were sanitized
    unsigned* offs;     // [2 slots][K | V][BC]: element offsets of a tile's key/value rows (~0: none)
    int tid, lane, warp, g, t, mi, lr;
    int hP, d, nk;
    unsigned k_tok0;
    int t_first, nhead, nfull, flo, fhi, ntiles;
    int lo_a, hi_a, lo_b, hi_b; // keys rows a and b see
    unsigned qf[HM_HD / 16][4]; // the warp's Q fragments, loaded once
    float o[V3_NO][4];
    HmRow ra, rb;
    float mn_a, mn_b;   // least visible raw score (-inf: a non-finite q or k was read)
    bool bad_a, bad_b;  // a visible value row was sanitized (non-finite)

    __device__ __forceinline__ V3Block(const HmArgs& a_, const HmV3Attn& x_) : a(a_), x(x_) {}

    // Tile k of the processing order (the online softmax does not depend on it): the tiles the
    // mask does not cut, then those it cuts (before them, then after them).
    __device__ __forceinline__ int tile_of(int k) const {
        return k < nfull ? flo + k : k - nfull < nhead ? t_first + (k - nfull) : fhi + 1 + (k - nfull - nhead);
    }

    // Row offsets of tile k (threads 0..63, one key each: the one division by P per key per
    // block-tile, out of the other threads' load path) into slot k & 1.
    __device__ __forceinline__ void fill_offs(int k) {
        if (tid < V3_BC) {
            const int j = tile_of(k) * V3_BC + tid;
            unsigned ko = ~0u, vo = ~0u;
            if (j < nk) {
                const unsigned tok = dp.div((unsigned)j), p = (unsigned)j - tok * dp.P;
                const int ks = dp.P == 1 ? ksel1 : __ldg(x.k.sel + hP + p);
                const int vs = dp.P == 1 ? vsel1 : __ldg(x.v.sel + hP + p);
                ko = (k_tok0 + tok) * (unsigned)x.k.tok + (unsigned)ks * (unsigned)d;
                vo = (k_tok0 + tok) * (unsigned)x.v.tok + (unsigned)vs * (unsigned)d;
            }
            offs[(k & 1) * 2 * V3_BC + tid] = ko;
            offs[(k & 1) * 2 * V3_BC + V3_BC + tid] = vo;
        }
    }

    // Issue the cp.async of tile k's K and V rows (offsets from fill_offs) into stage k & 1.
    __device__ __forceinline__ void load_tile(int k) {
        const unsigned dst = kv_s + (k & 1) * 2 * V3_BC * V3_PITCH * 2;
        const unsigned* of = offs + (k & 1) * 2 * V3_BC;
        const hm_elem* kb = (const hm_elem*)x.k.base;
        const hm_elem* vb = (const hm_elem*)x.v.base;
#pragma unroll
        for (int r = 0; r < V3_BC * V3_CH / V3_NT; ++r) {
            const int e = tid + r * V3_NT, row = e / V3_CH, ch = e - row * V3_CH;
            const unsigned ko = of[row], vo = of[V3_BC + row];
            const bool ok = ko != ~0u && ch * 8 < d;
            const unsigned o = (row * V3_PITCH + ch * 8) * 2;
            hm_cp_async16(dst + o, kb + (ok ? ko + ch * 8 : 0u), ok);
            hm_cp_async16(dst + V3_BC * V3_PITCH * 2 + o, vb + (ok ? vo + ch * 8 : 0u), ok);
        }
    }

    // One KV tile (position k in the order): next tile in flight, this one waited for, then
    // S = Q K^T, online softmax, O += P V. MASKED: the mask cuts the tile (per-element select,
    // value rows sanitized); else every key of it is visible to every row of the block.
    template <bool MASKED> __device__ __forceinline__ void step(int k) {
        if (k + 1 < ntiles) load_tile(k + 1); // into the stage consumed at k - 1
        hm_cp_commit();                       // (an empty group on the last tile keeps the count)
        if (k + 2 < ntiles) fill_offs(k + 2); // slot k & 1, read by load_tile(k) at k - 1
        hm_cp_wait<1>();                      // tile k landed (this thread's copies) ...
        __syncthreads();                      // ... and every thread's
        const int j0 = tile_of(k) * V3_BC;
        const unsigned ks = kv_s + (k & 1) * 2 * V3_BC * V3_PITCH * 2;
        const unsigned vss = ks + V3_BC * V3_PITCH * 2;
        unsigned short* vs = kv + ((k & 1) * 2 + 1) * V3_BC * V3_PITCH;
        if (MASKED) { // no masked value may reach a row through 0 * NaN in the P V mma
            hm_sanitize_chunks<V3_BC, V3_CH, V3_NT>(vs, V3_PITCH, badmask, tid);
            __syncthreads();
        }

        // S = Q K^T: this warp's 16 rows x 64 keys; K fragments by ldmatrix ([key][d] is [n][k]).
        float s[V3_NS][4];
#pragma unroll
        for (int n = 0; n < V3_NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HM_HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < V3_NS / 2; ++np) {
                unsigned kb[4];
                hm_ldsm_x4(kb, ks + ((np * 16 + lr + 8 * (mi >> 1)) * V3_PITCH + kk * 16 + 8 * (mi & 1)) * 2);
                hm_mma16816(s[2 * np], qf[kk], kb[0], kb[1]);
                hm_mma16816(s[2 * np + 1], qf[kk], kb[2], kb[3]);
            }
        }

        // Raw scores; element c of s[n] is (row c < 2 ? a : b, key j0 + 8n + 2t + (c & 1)).
        // Masked: select -inf outside the row's keys. The tile max is taken on raw scores.
        float mx_a = HM_NEG_INF, mx_b = HM_NEG_INF;
#pragma unroll
        for (int n = 0; n < V3_NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float& e = s[n][c];
                float& mn = c < 2 ? mn_a : mn_b;
                if (MASKED) {
                    const int j = j0 + n * 8 + 2 * t + (c & 1);
                    const bool ok = c < 2 ? (j >= lo_a && j <= hi_a) : (j >= lo_b && j <= hi_b);
                    mn = ok ? fminf(mn, e) : mn;
                    e = ok ? e : HM_NEG_INF;
                } else {
                    mn = fminf(mn, e);
                }
            }
#pragma unroll
        for (int n = 0; n < V3_NS; ++n) {
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
        if (MASKED) { // rows that see a sanitized value row
            const unsigned long long bm = (unsigned long long)badmask[0] | ((unsigned long long)badmask[1] << 32);
            bad_a |= (bm & v3_range_bits(lo_a - j0, hi_a - j0)) != 0;
            bad_b |= (bm & v3_range_bits(lo_b - j0, hi_b - j0)) != 0;
        }
        float mu_a, mu_b;
        const float alpha_a = hm_row_rescale(ra, hm_quad_max(mx_a) * a.scale_log2, &mu_a);
        const float alpha_b = hm_row_rescale(rb, hm_quad_max(mx_b) * a.scale_log2, &mu_b);
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int n = 0; n < V3_NS; ++n) {
            s[n][0] = hm_prob_scaled(s[n][0], a.scale_log2, mu_a);
            s[n][1] = hm_prob_scaled(s[n][1], a.scale_log2, mu_a);
            s[n][2] = hm_prob_scaled(s[n][2], a.scale_log2, mu_b);
            s[n][3] = hm_prob_scaled(s[n][3], a.scale_log2, mu_b);
            sum_a += s[n][0] + s[n][1];
            sum_b += s[n][2] + s[n][3];
        }
        hm_row_add(ra, alpha_a, sum_a);
        hm_row_add(rb, alpha_b, sum_b);
#pragma unroll
        for (int n = 0; n < V3_NO; ++n) {
            o[n][0] *= alpha_a;
            o[n][1] *= alpha_a;
            o[n][2] *= alpha_b;
            o[n][3] *= alpha_b;
        }

        // O += P V: score n-tiles 2kk, 2kk+1 are the A fragment of key step kk (rounded to the
        // storage type); V fragments by ldmatrix.trans ([key][d] is [k][n]).
#pragma unroll
        for (int kk = 0; kk < V3_BC / 16; ++kk) {
            unsigned pa[4];
            pa[0] = hm_pack2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = hm_pack2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = hm_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = hm_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < V3_NO / 2; ++np) {
                unsigned vb[4];
                hm_ldsm_x4_trans(vb, vss + ((kk * 16 + lr + 8 * (mi & 1)) * V3_PITCH + np * 16 + 8 * (mi >> 1)) * 2);
                hm_mma16816(o[2 * np], pa, vb[0], vb[1]);
                hm_mma16816(o[2 * np + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads(); // stage k & 1 consumed: the load issued at k + 1 may overwrite it
        if (MASKED && tid < 2) badmask[tid] = 0;
    }

    // Bits lo .. hi (clipped to the 64 keys of a tile) of a 64-bit mask.
    static __device__ __forceinline__ unsigned long long v3_range_bits(int lo, int hi) {
        lo = max(lo, 0);
        hi = min(hi, V3_BC - 1);
        if (lo > hi) return 0ull;
        return (~0ull >> (63 - hi)) & (~0ull << lo);
    }
};

extern "C" __global__ void __launch_bounds__(V3_NT) hm_attn_v3(const HmArgs a, const HmV3Attn x) {
    extern __shared__ float hm_smem[];
    V3Block k(a, x);
    // [stage][K | V][BC][PITCH] 16-bit; the query tile is first loaded into stage 1 (K1 V1 = 128
    // rows), read into registers, then stage 1 joins the pipeline. Then badmask[2].
    k.kv = (unsigned short*)hm_smem;
    k.kv_s = hm_smem_addr(k.kv);
    unsigned short* qs = k.kv + 2 * V3_BC * V3_PITCH;
    k.badmask = (unsigned*)(k.kv + 4 * V3_BC * V3_PITCH);
    k.offs = k.badmask + 2;
    k.tid = threadIdx.x;
    k.lane = k.tid & 31;
    k.warp = k.tid >> 5;
    k.g = k.lane >> 2;
    k.t = k.lane & 3;
    k.mi = k.lane >> 3; // ldmatrix: this lane addresses row lr of matrix mi
    k.lr = k.lane & 7;
    const int b = blockIdx.z, h = blockIdx.y, P = a.P;
    k.dp = V3DivP{(unsigned)P, x.p_mul, x.p_shr};
    k.hP = h * P;
    k.ksel1 = __ldg(x.k.sel + k.hP);
    k.vsel1 = __ldg(x.v.sel + k.hP);
    k.d = a.d;
    k.nk = a.M * P;
    const int nq = a.N * P, off = (a.M - a.N) * P;
    const int i0 = blockIdx.x * V3_BR, i_last = min(i0 + V3_BR, nq) - 1;
    k.k_tok0 = (unsigned)b * a.M;
    const int row_a = k.warp * 16 + k.g, row_b = row_a + 8;

    // ---- 0. which tiles: the key range of the block, the tiles the mask does not cut, the
    //         keys of this thread's rows (64-bit here, once; 32-bit in the loop) ---------------
    long long jlo, jhi, flo, fhi, rlo, rhi;
    hm_key_range(a, i0, i_last, &jlo, &jhi);
    k.t_first = (int)(jlo / V3_BC); // jlo >= 0: a shift
    const int t_last = (int)(jhi / V3_BC);
    k.ntiles = jlo <= jhi ? t_last - k.t_first + 1 : 0;
    hm_common_keys(a, (long long)i0 + off, (long long)i_last + off, k.nk, &flo, &fhi);
    // Full tiles: [ceil(flo / BC), floor((fhi + 1) / BC) - 1] within [t_first, t_last].
    k.flo = max(k.t_first, (int)((max(flo, 0ll) + V3_BC - 1) / V3_BC));
    k.fhi = min(t_last, (int)((fhi + 1) / V3_BC) - 1);
    if (fhi < flo || k.flo > k.fhi) { // no tile is full: every tile is a head tile
        k.flo = t_last + 1;
        k.fhi = t_last;
    }
    k.nhead = k.ntiles > 0 ? k.flo - k.t_first : 0;
    k.nfull = k.ntiles > 0 ? k.fhi - k.flo + 1 : 0;
    hm_row_keys(a, (long long)i0 + row_a + off, k.nk, &rlo, &rhi);
    k.lo_a = (int)rlo;
    k.hi_a = i0 + row_a < nq ? (int)rhi : -1;
    hm_row_keys(a, (long long)i0 + row_b + off, k.nk, &rlo, &rhi);
    k.lo_b = (int)rlo;
    k.hi_b = i0 + row_b < nq ? (int)rhi : -1;

    // ---- 1. prologue: query tile and the first KV tile in flight; Q fragments to registers ----
    v3_load_rows<V3_BR>(hm_smem_addr(qs), x.q, k.dp, (unsigned)b * a.N, i0, nq, k.hP, k.d, k.tid);
    hm_cp_commit();
    if (k.ntiles > 0) k.fill_offs(0);
    if (k.ntiles > 1) k.fill_offs(1);
    __syncthreads(); // the offsets of tiles 0 and 1
    if (k.ntiles > 0) k.load_tile(0);
    hm_cp_commit();
    hm_cp_wait<1>(); // the query group landed (this thread's part)
    __syncthreads(); // ... and every thread's
#pragma unroll
    for (int kk = 0; kk < HM_HD / 16; ++kk)
        hm_ldsm_x4(k.qf[kk], hm_smem_addr(qs + (k.warp * 16 + k.lr + 8 * (k.mi & 1)) * V3_PITCH + kk * 16 + 8 * (k.mi >> 1)));
    if (k.tid < 2) k.badmask[k.tid] = 0;
    __syncthreads(); // stage 1 is free for the pipeline

#pragma unroll
    for (int n = 0; n < V3_NO; ++n) k.o[n][0] = k.o[n][1] = k.o[n][2] = k.o[n][3] = 0.f;
    hm_row_init(k.ra);
    hm_row_init(k.rb);
    k.mn_a = k.mn_b = __int_as_float(0x7f800000);
    k.bad_a = k.bad_b = false;

    // ---- 2. the tiles the mask does not cut (the hot loop), then those it cuts -----------------
    int it = 0;
#pragma unroll 1
    for (; it < k.nfull; ++it) k.step<false>(it);
#pragma unroll 1
    for (; it < k.ntiles; ++it) k.step<true>(it);

    // ---- 3. normalise, lse, head norm, store the pseudo outputs -------------------------------
    const int t = k.t, d = k.d;
    HmRow ra = k.ra, rb = k.rb;
    ra.l = hm_quad_sum(ra.l);
    rb.l = hm_quad_sum(rb.l);
    // NaN policy: a row that read a non-finite value (a sanitized value row it sees, or a visible
    // score of -inf from a non-finite q or k) is NaN; NaN scores already made l NaN.
    const bool kinf_a = hm_quad_max(k.mn_a == HM_NEG_INF ? 1.f : 0.f) > 0.f; // over the row's 4 lanes
    const bool kinf_b = hm_quad_max(k.mn_b == HM_NEG_INF ? 1.f : 0.f) > 0.f;
    const bool vbad_a = hm_quad_max(k.bad_a ? 1.f : 0.f) > 0.f, vbad_b = hm_quad_max(k.bad_b ? 1.f : 0.f) > 0.f;
    const bool nan_a = kinf_a || vbad_a, nan_b = kinf_b || vbad_b;
    const int ia = i0 + row_a, ib = i0 + row_b;
    const float qnan = __int_as_float(0x7fc00000);
    if (a.has_lse && t == 0) {
        const unsigned base = (unsigned)(b * a.H + h) * (unsigned)nq;
        if (ia < nq) a.lse[base + ia] = kinf_a ? qnan : hm_row_lse(ra);
        if (ib < nq) a.lse[base + ib] = kinf_b ? qnan : hm_row_lse(rb);
    }
    const float inv_a = nan_a ? qnan : hm_row_inv(ra);
    const float inv_b = nan_b ? qnan : hm_row_inv(rb);
    float(&o)[V3_NO][4] = k.o;
#pragma unroll
    for (int n = 0; n < V3_NO; ++n) {
        o[n][0] = hm_round(o[n][0] * inv_a);
        o[n][1] = hm_round(o[n][1] * inv_a);
        o[n][2] = hm_round(o[n][2] * inv_b);
        o[n][3] = hm_round(o[n][3] * inv_b);
    }
    const bool norm = a.norm && !a.collapse; // with a collapse the epilogue norms the collapsed rows
    // Head norm per pseudo output row (norm.cuh): the quad holds the whole row, reduce over it in
    // two passes (mean for the group norm, then the centred squares of the row's d columns).
    float mu_a = 0.f, mu_b = 0.f, sc_a = 1.f, sc_b = 1.f;
    if (norm) {
        float s_a = 0.f, s_b = 0.f;
        if (a.norm == HM_NORM_GROUP) {
#pragma unroll
            for (int n = 0; n < V3_NO; ++n) {
                s_a += o[n][0] + o[n][1]; // tail columns >= d hold zeros
                s_b += o[n][2] + o[n][3];
            }
            s_a = hm_quad_sum(s_a);
            s_b = hm_quad_sum(s_b);
        }
        mu_a = hm_norm_mean(a, s_a);
        mu_b = hm_norm_mean(a, s_b);
        float ss_a = 0.f, ss_b = 0.f;
#pragma unroll
        for (int n = 0; n < V3_NO; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                if (n * 8 + 2 * t + c < d) { // tail columns are not part of the row
                    const float ca = o[n][c] - mu_a, cb = o[n][2 + c] - mu_b;
                    ss_a += ca * ca;
                    ss_b += cb * cb;
                }
            }
        }
        sc_a = hm_norm_inv(a, hm_quad_sum(ss_a));
        sc_b = hm_norm_inv(a, hm_quad_sum(ss_b));
    }
    // De-interleave: virtual row i = n*P + p goes to op[b, n, h, p, :]; two columns per store.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int i = half ? ib : ia;
        if (i >= nq) continue;
        const unsigned tok = k.dp.div((unsigned)i), p = (unsigned)i - tok * (unsigned)P;
        const unsigned base = (((unsigned)b * a.N + tok) * (unsigned)a.H * P + k.hP + p) * (unsigned)d;
        const float sc = half ? sc_b : sc_a, mu = half ? mu_b : mu_a;
#pragma unroll
        for (int n = 0; n < V3_NO; ++n) {
            const int col = n * 8 + 2 * t;
            if (col < d) { // d is even: col + 1 < d too
                float x0 = o[n][2 * half], x1 = o[n][2 * half + 1];
                if (norm) {
                    x0 = hm_norm_apply(a, h, col, x0, mu, sc);
                    x1 = hm_norm_apply(a, h, col + 1, x1, mu, sc);
                }
                *(unsigned*)((hm_elem*)x.op + base + col) = hm_pack2(x0, x1);
            }
        }
    }
}

// ---- The pre-mix -----------------------------------------------------------------------------
// Shared memory: y tile f32 [64][HD+4], x stages 16-bit [2][Spad][HD+8], weights hi, mid and
// lo 16-bit [3][64][Spad+8] (Spad = S rounded up to 16; the host sizes the launch the same way).
#define V3M_YP (HM_HD + 4)
__device__ __forceinline__ int v3m_spad(int S) { return (S + 15) & ~15; }

// (cos, sin) of pos * f_u from the two-level table: pos = hi * 128 + lo.
__device__ __forceinline__ void v3_rope_cs(const HmV3Mix& m, unsigned pos, int u, int half, float* c, float* s) {
    const float* ph = m.rope_hi + 2 * (((pos >> 7) - (unsigned)m.rope_hi0) * half + u);
    const float* pl = m.rope_lo + 2 * ((pos & 127u) * half + u);
    const float ch = ph[0], sh = ph[1], cl = pl[0], sl = pl[1];
    *c = ch * cl - sh * sl;
    *s = sh * cl + ch * sl;
}

extern "C" __global__ void __launch_bounds__(V3M_NT) hm_v3_mix(const HmArgs a, const HmV3Mix m) {
    extern __shared__ float hm_smem[];
    const int S = m.S, Sp = v3m_spad(S), WP = Sp + 8, HP = a.H * a.P, d = a.d, P = a.P;
    float* ys = hm_smem;                                     // [64][YP]
    unsigned short* xs = (unsigned short*)(ys + V3M_HP * V3M_YP); // [2][Sp][PITCH]
    unsigned short* whi = xs + 2 * Sp * V3_PITCH;             // [64][WP]
    unsigned short* wmid = whi + V3M_HP * WP;                 // [64][WP]
    unsigned short* wlo = wmid + V3M_HP * WP;                 // [64][WP]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int mi = lane >> 3, lr = lane & 7;
    const int b = blockIdx.z, hp0 = blockIdx.y * V3M_HP, l0 = blockIdx.x * V3M_TOK;
    const int ntok = min(V3M_TOK, m.L - l0);
    const bool dense = m.sel == nullptr;
    const hm_elem* x = (const hm_elem*)m.x;

    if (dense) { // weights [S][HP] f32 -> [64 (h,p)][k = m] 16-bit hi + mid + lo (zero padding)
        for (int e = tid; e < V3M_HP * Sp; e += V3M_NT) {
            const int n = e / Sp, k = e - n * Sp;
            const float w = k < S && hp0 + n < HP ? m.w[k * HP + hp0 + n] : 0.f;
            const hm_elem hi = hm_from_f32(w), mid = hm_from_f32(w - hm_to_f32(hi));
            whi[n * WP + k] = hi;
            wmid[n * WP + k] = mid;
            wlo[n * WP + k] = hm_from_f32(w - hm_to_f32(hi) - hm_to_f32(mid));
        }
    }
    // One token's stored heads [S][d] -> stage (zero rows up to Sp, zero columns past d).
    const int chunks = Sp * V3_CH;
    auto load = [&](int tt, int stage) {
        const unsigned src0 = ((unsigned)b * m.L + l0 + tt) * (unsigned)S * d;
        for (int e = tid; e < chunks; e += V3M_NT) {
            const int r = e / V3_CH, ch = e - r * V3_CH;
            const bool ok = r < S && ch * 8 < d;
            hm_cp_async16(hm_smem_addr(xs + (stage * Sp + r) * V3_PITCH + ch * 8), x + (ok ? src0 + r * d + ch * 8 : 0u),
                          ok);
        }
    };
    load(0, 0);
    hm_cp_commit();
    for (int tt = 0; tt < ntok; ++tt) {
        if (tt + 1 < ntok) load(tt + 1, (tt + 1) & 1);
        hm_cp_commit();
        hm_cp_wait<1>();
        __syncthreads(); // token tt (and, the first time, the weights) in shared memory
        const unsigned short* xt = xs + (tt & 1) * Sp * V3_PITCH;
        if (dense) {
            // y^T [d x 64] = x^T [d x Sp] w [Sp x 64]: A = x^T from [m][c] by ldmatrix.trans, B from
            // [n][k] by ldmatrix; warps take 16-row blocks of the head dim.
            for (int mt = warp; mt < HM_HD / 16; mt += V3M_NT / 32) {
                float acc[8][4];
#pragma unroll
                for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
                for (int k0 = 0; k0 < Sp; k0 += 16) {
                    unsigned af[4];
                    hm_ldsm_x4_trans(af, hm_smem_addr(xt + (k0 + lr + 8 * (mi >> 1)) * V3_PITCH + mt * 16 + 8 * (mi & 1)));
#pragma unroll
                    for (int np = 0; np < 4; ++np) {
                        const int wo = (np * 16 + lr + 8 * (mi >> 1)) * WP + k0 + 8 * (mi & 1);
#pragma unroll
                        for (int part = 2; part >= 0; --part) { // lo first: small terms added first
                            unsigned bw[4];
                            hm_ldsm_x4(bw, hm_smem_addr(whi + part * V3M_HP * WP + wo));
                            hm_mma16816(acc[2 * np], af, bw[0], bw[1]);
                            hm_mma16816(acc[2 * np + 1], af, bw[2], bw[3]);
                        }
                    }
                }
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        ys[(n * 8 + 2 * t + (c & 1)) * V3M_YP + mt * 16 + g + 8 * (c >> 1)] = acc[n][c];
            }
        } else { // selection: the one selected head, nothing else read
            for (int e = tid; e < V3M_HP * HM_HD; e += V3M_NT) {
                const int n = e / HM_HD, c = e - n * HM_HD;
                ys[n * V3M_YP + c] = hp0 + n < HP ? hm_to_f32(xt[__ldg(m.sel + hp0 + n) * V3_PITCH + c]) : 0.f;
            }
        }
        __syncthreads(); // y tile complete
        const unsigned l = l0 + tt, dst0 = ((unsigned)b * m.L + l) * (unsigned)HP * d;
        hm_elem* y = (hm_elem*)m.y;
        if (m.rope_hi) {
            const int half = d / 2;
            for (int e = tid; e < V3M_HP * half; e += V3M_NT) {
                const int n = e / half, u = e - n * half, hp = hp0 + n;
                if (hp >= HP) break;
                const unsigned p = (unsigned)hp % (unsigned)P, vi = l * P + p, shift = (unsigned)(a.M - a.N);
                const unsigned pos = (unsigned)a.pos0 + (a.rope_token ? l + (m.query ? shift : 0u)
                                                                      : vi + (m.query ? shift * P : 0u));
                float c, s;
                v3_rope_cs(m, pos, u, half, &c, &s);
                const float x0 = ys[n * V3M_YP + u], x1 = ys[n * V3M_YP + u + half];
                y[dst0 + hp * d + u] = hm_from_f32(x0 * c - x1 * s);
                y[dst0 + hp * d + u + half] = hm_from_f32(x1 * c + x0 * s);
            }
        } else {
            for (int e = tid; e < V3M_HP * d; e += V3M_NT) {
                const int n = e / d, c = e - n * d;
                if (hp0 + n >= HP) break;
                y[dst0 + (hp0 + n) * d + c] = hm_from_f32(ys[n * V3M_YP + c]);
            }
        }
    }
}

// ---- The collapse (no atomics): one block per token ---------------------------------------
extern "C" __global__ void __launch_bounds__(V3C_NT) hm_v3_collapse(const HmArgs a, const void* op) {
    const unsigned row = blockIdx.x; // b * N + n
    const int H = a.H, HP = a.H * a.P, d = a.d;
    const hm_elem* src = (const hm_elem*)op + row * (unsigned)HP * d;
    float* dst = a.acc + row * (unsigned)H * d;
    for (int e = threadIdx.x; e < H * d; e += V3C_NT) {
        const int hh = e / d, c = e - hh * d;
        const float* rr = a.r + hh * HP;
        float sum = 0.f;
        for (int k = 0; k < HP; ++k) {
            const float w = rr[k];
            if (w != 0.f) sum += w * hm_to_f32(src[k * d + c]); // unread pseudo outputs stay unread
        }
        dst[e] = sum;
    }
}
