// attn_v2: tensor cores. Same contract, block decomposition and mask/tile skipping as attn_v1, but
// the two products run on mma.sync.m16n8k16 (f16/bf16 inputs, f32 accumulators), FlashAttention-2
// style: each of the 4 warps owns 16 query rows, keeps its scores, probabilities and output
// accumulators in registers (the score accumulators are re-packed as the A operand of P.V), and
// the softmax statistics live in registers too. Gains over v1: ~16x fewer instructions for
// QK^T and P.V, half the shared memory (16-bit tiles), no score round-trip through shared memory.
// f16/bf16 only, head-dim capacity <= 128, sm_80+ (bf16 mma). Rounding points are v1's: mixed
// q/k/v and probabilities in the storage precision, everything accumulated in f32.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4; two 16-bit values per register,
// the lower column/k index in the low half):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8  (k x n, "col"): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
//   C 16x8  (f32): c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)

#define V2_BR HM_BR                 // virtual queries per block: 4 warps x 16 rows (kernel table)
#define V2_BC HM_BC                 // virtual keys per KV tile (kernel table)
#define V2_HDP (HM_HD + 8)          // row pitch of the 16-bit tiles (16 B pad: conflict-free fragments)
#define V2_NS (V2_BC / 8)           // score n-tiles per warp
#define V2_NO (HM_HD / 8)           // output n-tiles per warp

#if HM_DTYPE == 0
#error "attn_v2 runs f16/bf16 only (f32 uses attn_v1)"
#endif
#if HM_NT != 128
#error "attn_v2 is written for 4 warps of 16 query rows"
#endif
#if HM_HD > 128 || HM_HD % 16 != 0
#error "attn_v2 needs a head-dim capacity that is a multiple of 16, at most 128"
#endif
static_assert(V2_BR == 16 * (HM_NT / 32) && V2_BC % 16 == 0, "attn_v2: 16 query rows per warp, keys in steps of 16");
static_assert(HM_SMEM == 2 * (V2_BR + 2 * V2_BC) * V2_HDP,
              "attn_v2: the kernel table's shared memory (HM_SMEM) is not this carve-up");

// D = A * B + D on the tensor cores, f32 accumulators.
__device__ __forceinline__ void v2_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if defined(HM_EMU)
    hm_emu_mma(c, a, b0, b1); // the CPU emulator's warp-level model of the instruction
#elif HM_DTYPE == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two f32 values rounded to the storage type, packed (lo in the low half).
__device__ __forceinline__ unsigned v2_pack(float lo, float hi) {
    return (unsigned)hm_from_f32(lo) | ((unsigned)hm_from_f32(hi) << 16);
}
// Two adjacent 16-bit values of a shared tile as one register (index even: 4-byte aligned).
__device__ __forceinline__ unsigned v2_ld2(const unsigned short* p) {
    return *(const unsigned*)p;
}

// Mix rows [row0, row0 + rows) of the stored heads x ([B, L, S, d], S source heads, L tokens) into
// the 16-bit tile dst [rows][V2_HDP] for virtual indices first + r (index = token*P + p), weights
// a[(m*H + h)*P + p], rotated at pos(index) when rope, rounded to the storage type. One thread
// handles a pair of columns: a RoPE pair (u, u + d/2) for u < d/2, else two tail columns >= d
// (zeros), so that every column [0, HD) is written exactly once and rotation needs no barrier.
__device__ __noinline__ void v2_mix_tile(const HmArgs& a, unsigned short* dst, int rows, long long first,
                                            long long count, const void* x, int L, int S, const float* w,
                                            int b, int h, bool is_query, bool rope) {
    const int d = a.d, half = a.d / 2, H = a.H, P = a.P;
    for (int e = threadIdx.x; e < rows * (HM_HD / 2); e += HM_NT) {
        const int r = e / (HM_HD / 2), u = e % (HM_HD / 2);
        const long long idx = first + r;
        int c0, c1;
        if (u < half) {
            c0 = u;
            c1 = u + half;
        } else {
            c0 = d + 2 * (u - half);
            c1 = c0 + 1;
        }
        float x0 = 0.f, x1 = 0.f;
        if (u < half && idx < count) {
            const int tok = (int)(idx / P), p = (int)(idx % P);
            const long long src = ((long long)(b * L + tok) * S) * d; // x[b, tok, 0, 0]
            for (int m = 0; m < S; ++m) {
                const float wm = w[(m * H + h) * P + p];
                x0 += wm * hm_load(x, src + (long long)m * d + c0);
                x1 += wm * hm_load(x, src + (long long)m * d + c1);
            }
            if (rope) hm_rope_pair(x0, x1, is_query ? hm_q_pos(a, idx) : hm_k_pos(a, idx), u, d, a.rope_base);
        }
        dst[r * V2_HDP + c0] = hm_from_f32(x0);
        dst[r * V2_HDP + c1] = hm_from_f32(x1);
    }
}

extern "C" __global__ void __launch_bounds__(HM_NT) hm_attn_v2(const HmArgs a) {
    extern __shared__ float hm_smem[];
    unsigned short* qs = (unsigned short*)hm_smem; // [BR][HDP] mixed, rotated queries (16-bit)
    unsigned short* ks = qs + V2_BR * V2_HDP;      // [BC][HDP] mixed, rotated keys
    unsigned short* vs = ks + V2_BC * V2_HDP;      // [BC][HDP] mixed values

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int P = a.P, d = a.d, H = a.H;
    const int nq = a.N * P, nk = a.M * P;
    const int i0 = blockIdx.x * V2_BR;
    const long long off = (long long)(a.M - a.N) * P;
    const int row_a = warp * 16 + g, row_b = row_a + 8; // this thread's two rows in the tile

    // ---- 1. queries: mix, rotate, round to 16-bit ------------------------------------------
    v2_mix_tile(a, qs, V2_BR, i0, nq, a.q, a.N, a.Hq, a.aq, b, h, true, a.rope != 0);

    // ---- 2. KV tiles inside the mask's key range -------------------------------------------
    long long jlo, jhi;
    hm_key_range(a, i0, min(i0 + V2_BR, nq) - 1, &jlo, &jhi);

    float o[V2_NO][4];
#pragma unroll
    for (int n = 0; n < V2_NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_a = HM_NEG_INF, m_b = HM_NEG_INF; // running max (log2 domain) of rows a, b
    float l_a = 0.f, l_b = 0.f;               // this thread's part of the running sums

    for (long long j0 = (jlo / V2_BC) * V2_BC; j0 <= jhi; j0 += V2_BC) {
        __syncthreads(); // previous tile consumed; on the first tile, the query tile complete
        v2_mix_tile(a, ks, V2_BC, j0, nk, a.k, a.M, a.Hk, a.ak, b, h, false, a.rope != 0);
        v2_mix_tile(a, vs, V2_BC, j0, nk, a.v, a.M, a.Hk, a.av, b, h, false, false);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[V2_NS][4];
#pragma unroll
        for (int n = 0; n < V2_NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HM_HD; kk += 16) {
            unsigned qa[4];
            qa[0] = v2_ld2(qs + row_a * V2_HDP + kk + 2 * t);
            qa[1] = v2_ld2(qs + row_b * V2_HDP + kk + 2 * t);
            qa[2] = v2_ld2(qs + row_a * V2_HDP + kk + 2 * t + 8);
            qa[3] = v2_ld2(qs + row_b * V2_HDP + kk + 2 * t + 8);
#pragma unroll
            for (int n = 0; n < V2_NS; ++n) {
                const unsigned short* kr = ks + (n * 8 + g) * V2_HDP + kk + 2 * t; // key n*8+g
                v2_mma(s[n], qa, v2_ld2(kr), v2_ld2(kr + 8));
            }
        }

        // Scale into the log2 domain and mask: element (row, key) of s[n][c] is
        // row = c < 2 ? row_a : row_b, key = j0 + n*8 + 2t + (c & 1).
        float mx_a = HM_NEG_INF, mx_b = HM_NEG_INF;
#pragma unroll
        for (int n = 0; n < V2_NS; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int i = i0 + (c < 2 ? row_a : row_b);
                const long long j = j0 + n * 8 + 2 * t + (c & 1);
                const bool ok = i < nq && j < nk && hm_visible(a, (long long)i + off, j);
                s[n][c] = ok ? s[n][c] * a.scale_log2 : HM_NEG_INF;
            }
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
        // Row max over the quad of threads that share the row (lanes 4g .. 4g+3).
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float mu_a = mn_a == HM_NEG_INF ? 0.f : mn_a; // nothing visible yet: no inf - inf
        const float mu_b = mn_b == HM_NEG_INF ? 0.f : mn_b;
        const float alpha_a = exp2f(m_a - mu_a), alpha_b = exp2f(m_b - mu_b);
        m_a = mn_a;
        m_b = mn_b;

        // Probabilities (f32 sums; rounded to the storage type as the P.V operand).
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int n = 0; n < V2_NS; ++n) {
            s[n][0] = exp2f(s[n][0] - mu_a);
            s[n][1] = exp2f(s[n][1] - mu_a);
            s[n][2] = exp2f(s[n][2] - mu_b);
            s[n][3] = exp2f(s[n][3] - mu_b);
            sum_a += s[n][0] + s[n][1];
            sum_b += s[n][2] + s[n][3];
        }
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;
#pragma unroll
        for (int n = 0; n < V2_NO; ++n) {
            o[n][0] *= alpha_a;
            o[n][1] *= alpha_a;
            o[n][2] *= alpha_b;
            o[n][3] *= alpha_b;
        }

        // O += P V: the score accumulators of key n-tiles 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < V2_BC / 16; ++kk) {
            unsigned pa[4];
            pa[0] = v2_pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = v2_pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = v2_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = v2_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const unsigned short* v0 = vs + (kk * 16 + 2 * t) * V2_HDP; // keys 2t, 2t+1 of the step
#pragma unroll
            for (int n = 0; n < V2_NO; ++n) {
                const int col = n * 8 + g;
                const unsigned b0 = (unsigned)v0[col] | ((unsigned)v0[V2_HDP + col] << 16);
                const unsigned b1 = (unsigned)v0[8 * V2_HDP + col] | ((unsigned)v0[9 * V2_HDP + col] << 16);
                v2_mma(o[n], pa, b0, b1);
            }
        }
    }

    // ---- 3. normalise, lse, then store (with head norm) or scatter through r ---------------
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const int ia = i0 + row_a, ib = i0 + row_b;
    if (a.has_lse && t == 0) {
        if (ia < nq) a.lse[(long long)(b * H + h) * nq + ia] = l_a > 0.f ? (m_a + log2f(l_a)) * HM_LN2 : HM_NEG_INF;
        if (ib < nq) a.lse[(long long)(b * H + h) * nq + ib] = l_b > 0.f ? (m_b + log2f(l_b)) * HM_LN2 : HM_NEG_INF;
    }
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f; // no key: zeros
#pragma unroll
    for (int n = 0; n < V2_NO; ++n) {
        o[n][0] = hm_round(o[n][0] * inv_a);
        o[n][1] = hm_round(o[n][1] * inv_a);
        o[n][2] = hm_round(o[n][2] * inv_b);
        o[n][3] = hm_round(o[n][3] * inv_b);
    }

    if (a.collapse) {
        // acc[b, n, hh, col] += r[hh, h*P + p] * op[n, h, p, col] for every head hh (f32 atomics).
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = c < 2 ? ia : ib;
            if (i >= nq) continue;
            const int n_tok = i / P, p = i % P;
            float* dst = a.acc + ((long long)(b * a.N + n_tok) * H) * d; // acc[b, n, 0, 0]
            for (int hh = 0; hh < H; ++hh) {
                const float coef = a.r[(hh * H + h) * P + p];
#pragma unroll
                for (int n = 0; n < V2_NO; ++n) {
                    const int col = n * 8 + 2 * t + (c & 1);
                    if (col < d) atomicAdd(dst + (long long)hh * d + col, coef * o[n][c]);
                }
            }
        }
        return;
    }

    // Head norm per pseudo output row (norm.cuh): the quad holds the whole row, reduce over it in
    // two passes (mean for the group norm, then the centred squares of the row's d columns).
    float mu_a = 0.f, mu_b = 0.f, sc_a = 1.f, sc_b = 1.f;
    if (a.norm) {
        float s_a = 0.f, s_b = 0.f;
        if (a.norm == HM_NORM_GROUP) {
#pragma unroll
            for (int n = 0; n < V2_NO; ++n) {
                s_a += o[n][0] + o[n][1]; // tail columns >= d hold zeros
                s_b += o[n][2] + o[n][3];
            }
            s_a += __shfl_xor_sync(0xffffffffu, s_a, 1);
            s_a += __shfl_xor_sync(0xffffffffu, s_a, 2);
            s_b += __shfl_xor_sync(0xffffffffu, s_b, 1);
            s_b += __shfl_xor_sync(0xffffffffu, s_b, 2);
        }
        mu_a = hm_norm_mean(a, s_a);
        mu_b = hm_norm_mean(a, s_b);
        float ss_a = 0.f, ss_b = 0.f;
#pragma unroll
        for (int n = 0; n < V2_NO; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                if (n * 8 + 2 * t + c < d) { // tail columns are not part of the row
                    const float ca = o[n][c] - mu_a, cb = o[n][2 + c] - mu_b;
                    ss_a += ca * ca;
                    ss_b += cb * cb;
                }
            }
        }
        ss_a += __shfl_xor_sync(0xffffffffu, ss_a, 1);
        ss_a += __shfl_xor_sync(0xffffffffu, ss_a, 2);
        ss_b += __shfl_xor_sync(0xffffffffu, ss_b, 1);
        ss_b += __shfl_xor_sync(0xffffffffu, ss_b, 2);
        sc_a = hm_norm_inv(a, ss_a);
        sc_b = hm_norm_inv(a, ss_b);
    }
    // De-interleave: virtual row i = n*P + p goes to out[b, n, h, p, :].
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int i = c < 2 ? ia : ib;
        if (i >= nq) continue;
        const int n_tok = i / P, p = i % P;
        const long long base = (((long long)(b * a.N + n_tok) * H + h) * P + p) * d;
        const float sc = c < 2 ? sc_a : sc_b, mu = c < 2 ? mu_a : mu_b;
#pragma unroll
        for (int n = 0; n < V2_NO; ++n) {
            const int col = n * 8 + 2 * t + (c & 1);
            if (col < d) {
                float x = o[n][c];
                if (a.norm) x = hm_norm_apply(a, h, col, x, mu, sc);
                hm_store(a.out, base + col, x);
            }
        }
    }
}
