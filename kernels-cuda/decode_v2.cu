// decode v2: decode_v1's problem (N new tokens per sequence against its device-resident cache of
// stored heads [B, capacity, Hk, d]) on the tensor cores, f16/bf16, sm_80+. Needs decode.cuh
// (shared with v1: HmDecodeArgs, the sequence's view of its cache, the mixed queries, RoPE from a
// host table, the mask as an interval, the partials) and tiles.cuh before it; decode_combine.cu
// after it (the split combine merges v2's partials as v1's).
//
// The absorbed form: head mixing is linear, so a tile is never mixed into pseudo-keys/values.
//   scores   S[(h,i), (c,m)] = q(h,i) . k(c,m)     one mma over ALL heads' pseudo-queries at once:
//                                                 [R x d] x [d x TC*Hk]; each stored key read once
//            s[(h,i), (c,p)] = sum_m ak[m,h,p] S[(h,i), (c,m)]          a small FMA contraction
//   values   W[(h,i), (c,m)] = sum_p prob[(h,i), (c,p)] av[m,h,p]       a small FMA contraction
//            o(h,i) += W[(h,i), :] . V[(c,m), :]   one mma: [R x TC*Hk] x [TC*Hk x d]
// RoPE is linear too: R(phi) sum_m ak k_m = sum_m ak R(phi) k_m, so the stored keys of a tile are
// rotated once, in place, to their token's position. In virtual-position mode pseudo-key p of
// token c sits at position c*P + p: the query is kept in P copies rotated by (its position - p)
// (rows (h,i,p') of the score mma), since q.R(c*P + p - pos_q) k = (R(pos_q - p) q).(R(c*P) k).
// Pipeline: the stored K and V tiles arrive by 16-byte cp.async into a double-buffered shared
// stage (tile t+1 in flight while tile t computes). Flash-decoding split and partials as v1.
// NaN policy: the contractions skip the zero weights of a selection (policy 1) and read only the
// visible keys (policy 2); a tile whose stored values hold a non-finite element takes the exact
// FMA path (v1's per-row spans), so no 0 * NaN of the value mma reaches a row that does not read it.
// Rounding: q rounded to the storage type at its position as v1, probabilities rounded as v1; the
// mixed k and v are never formed (f32 contractions). Operands that are not stored values (rotated
// keys, the virtual-mode query copies, W) are split hi + lo into two 16-bit operands, two or three
// mma into one f32 accumulator (as attn_v3's pre-mix), so they stay f32-accurate.

#if HM_DTYPE == 0
#error "decode_v2 runs f16/bf16 only (f32 uses decode_v1)"
#endif

#define D2_WARPS (HM_NT / 32)

// Shared-memory carve-up (bytes, every region 16-byte aligned), mirrored by `smem_v2` in
// host/src/backends/cuda/decode.rs.
struct D2Layout {
    int pitch;                       // 16-bit elements per row of q and of the K/V stages: d + 8
    int kc;                          // columns of a tile: TC * Hk stored heads (a multiple of 16)
    int rq, rqp;                     // score rows: R * PQ, padded to 16
    int rp;                          // output rows: R, padded to 16
    int wp;                          // 16-bit elements per row of W: kc + 8
    int q, ql, k, v, kl, s, w, wl, o, pr, st, end; // byte offsets of the regions
};
__device__ __forceinline__ D2Layout d2_layout(int d, int R, int PQ, int TC, int HK, int P, int rope) {
    D2Layout l;
    l.pitch = d + 8;
    l.kc = TC * HK;
    l.rq = R * PQ;
    l.rqp = (l.rq + 15) & ~15;
    l.rp = (R + 15) & ~15;
    l.wp = l.kc + 8;
    l.q = 0;                                             // [rqp][pitch] u16 pseudo-queries (hi)
    l.ql = l.q + l.rqp * l.pitch * 2;                    // [rqp][pitch] u16 their lo parts (RoPE only)
    l.k = l.ql + (rope ? l.rqp * l.pitch * 2 : 0);       // [2][kc][pitch] u16 stored key stages
    l.v = l.k + 2 * l.kc * l.pitch * 2;                  // [2][kc][pitch] u16 stored value stages
    l.kl = l.v + 2 * l.kc * l.pitch * 2;                 // [kc][pitch] u16 lo of the rotated keys (RoPE)
    l.s = l.kl + (rope ? l.kc * l.pitch * 2 : 0);        // [rqp][kc] f32 scores vs stored heads
    l.w = l.s + l.rqp * l.kc * 4;                        // [rp][wp] u16 absorbed value weights (hi)
    l.wl = l.w + l.rp * l.wp * 2;                        // [rp][wp] u16 their lo parts
    l.o = l.wl + l.rp * l.wp * 2;                        // [rp][d] f32 output accumulators
    l.pr = l.o + l.rp * d * 4;                           // [R][TC*P] f32 scores, probabilities
    l.st = l.pr + ((R * TC * P * 4 + 15) & ~15);         // [3][R] f32 max, sum, alpha; flag
    l.end = l.st + ((3 * R * 4 + 4 + 15) & ~15);
    return l;
}

// Rotate (x0, x1) by a signed position (the virtual-mode query copies may sit below 0).
__device__ __forceinline__ void d2_rope(const HmDecodeArgs& x, float& x0, float& x1, int pos, int t, int half) {
    if (pos >= 0) {
        hm_rope_tab(x, x0, x1, (unsigned)pos, t, half);
    } else { // R(-p) = M R(p) M with M = diag(1, -1): rotate the mirrored pair, mirror back
        float y1 = -x1;
        hm_rope_tab(x, x0, y1, (unsigned)(-pos), t, half);
        x1 = -y1;
    }
}

// Whether either 16-bit half of a word is Inf/NaN (exponent all ones).
__device__ __forceinline__ bool d2_nonfinite2(unsigned w) {
#if HM_DTYPE == 1
    const unsigned e = 0x7c00u;
#else
    const unsigned e = 0x7f80u;
#endif
    return (w & e) == e || ((w >> 16) & e) == e;
}

// ldmatrix lane addresses (shared-space bytes) of one 16x16 block of 16-bit elements, pitch in
// elements. A operand [m][k] row-major; B stored [n][k] (two n-tiles); B stored [k][n] (.trans).
__device__ __forceinline__ unsigned d2_a_addr(unsigned base, int pitch, int r0, int k0, int lane) {
    const int i = lane >> 3, rr = lane & 7;
    return base + (unsigned)(((r0 + (i & 1) * 8 + rr) * pitch + k0 + (i >> 1) * 8) * 2);
}
__device__ __forceinline__ unsigned d2_bnk_addr(unsigned base, int pitch, int n0, int k0, int lane) {
    const int i = lane >> 3, rr = lane & 7;
    return base + (unsigned)(((n0 + (i >> 1) * 8 + rr) * pitch + k0 + (i & 1) * 8) * 2);
}
__device__ __forceinline__ unsigned d2_bkn_addr(unsigned base, int pitch, int k0, int n0, int lane) {
    const int i = lane >> 3, rr = lane & 7;
    return base + (unsigned)(((k0 + (i & 1) * 8 + rr) * pitch + n0 + (i >> 1) * 8) * 2);
}

extern "C" __global__ void __launch_bounds__(HM_NT, 1) hm_decode_v2(const HmArgs a, const HmDecodeArgs x) {
    extern __shared__ float hm_smem[];
    char* sm = (char*)hm_smem;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int split = blockIdx.x, b = blockIdx.y;
    const int H = a.H, P = a.P, d = a.d, half = d / 2, HK = a.Hk;
    const int NP = a.N * P, R = H * NP, TC = x.tile_tokens, TP = TC * P, KW = HK * d, CH = d / 8;
    const int PQ = (a.rope && !a.rope_token) ? P : 1; // query copies per row (virtual-mode RoPE)
    const D2Layout L = d2_layout(d, R, PQ, TC, HK, P, a.rope);
    const int KC = L.kc, PI = L.pitch;
    hm_elem* qs = (hm_elem*)(sm + L.q);
    float* ss = (float*)(sm + L.s);
    hm_elem* ws = (hm_elem*)(sm + L.w);
    hm_elem* wl = (hm_elem*)(sm + L.wl);
    hm_elem* ql = (hm_elem*)(sm + L.ql);
    hm_elem* kl = (hm_elem*)(sm + L.kl);
    float* os = (float*)(sm + L.o);
    float* pr = (float*)(sm + L.pr);
    float* mrun = (float*)(sm + L.st);
    float* lrun = mrun + R;
    float* alpha = lrun + R;
    int* vbad = (int*)(alpha + R); // a stored value of the current tile is Inf/NaN
    const unsigned q_addr = hm_smem_addr(qs), k_addr = hm_smem_addr(sm + L.k), v_addr = hm_smem_addr(sm + L.v);
    const unsigned w_addr = hm_smem_addr(ws), wl_addr = hm_smem_addr(wl);
    const unsigned ql_addr = hm_smem_addr(ql), kl_addr = hm_smem_addr(kl);
    const int stage_bytes = KC * PI * 2;

    // The sequence (decode.cuh, as v1): held tokens, ring slots, RoPE offset, this split's band.
    const HmDecSeq sq = hm_dec_seq(a, x, b, split);
    const unsigned unit = sq.unit, pos0 = sq.pos0;
    const int off = sq.off, t_begin = sq.t_begin, t_end = sq.t_end;
    const hm_elem *kc = sq.kc, *vc = sq.vc;

    // Stage a tile of TC held tokens from t0: 16-byte cp.async per (token, head, chunk); tokens
    // past the split's end are zero-filled (finite: they meet the mma, never a row's output).
    auto load_tile = [&](int t0, int stage) {
        const int valid = min(TC, t_end - t0);
        for (int e = tid; e < KC * CH; e += HM_NT) {
            const int row = e / CH, ch = e - row * CH, c = row / HK, m = row - c * HK;
            const bool ok = c < valid;
            const unsigned slot = hm_dec_slot(sq, t0 + c);
            const unsigned src = ok ? slot * (unsigned)KW + (unsigned)(m * d + ch * 8) : 0u;
            const unsigned dst = (unsigned)(stage * stage_bytes + (row * PI + ch * 8) * 2);
            hm_cp_async16(k_addr + dst, kc + src, ok);
            hm_cp_async16(v_addr + dst, vc + src, ok);
        }
    };
    if (t_begin < t_end) load_tile(t_begin, 0);
    hm_cp_commit();

    // 1. Pseudo-queries of every head (rows (h, i, p') of the score mma): mix, rotate, round.
    for (int e = tid; e < L.rq * half; e += HM_NT) {
        const int rq = e / half, t = e - rq * half, r = rq / PQ, pq = rq - r * PQ;
        const int h = r / NP, i = r - h * NP;
        float x0, x1;
        hm_dec_query(a, x, sq, b, h, i, t, x0, x1);
        if (a.rope) {
            // The query as v1 / the spec rounds it (rotated to its position), then the copy for
            // pseudo-key pq rotated back by pq, split hi + lo.
            x0 = hm_round(x0);
            x1 = hm_round(x1);
            if (pq) d2_rope(x, x0, x1, -pq, t, half);
            const float h0 = hm_round(x0), h1 = hm_round(x1);
            ql[rq * PI + t] = hm_from_f32(x0 - h0);
            ql[rq * PI + t + half] = hm_from_f32(x1 - h1);
        }
        qs[rq * PI + t] = hm_from_f32(x0);
        qs[rq * PI + t + half] = hm_from_f32(x1);
    }
    for (int e = tid; e < (L.rqp - L.rq) * d; e += HM_NT) {
        const int rr = e / d;
        qs[(L.rq + rr) * PI + e - rr * d] = 0;
        if (a.rope) ql[(L.rq + rr) * PI + e - rr * d] = 0;
    }
    for (int e = tid; e < L.rp * d; e += HM_NT) os[e] = 0.f;
    for (int e = tid; e < (L.rp - R) * KC; e += HM_NT) {
        const int rr = e / KC;
        ws[(R + rr) * L.wp + e - rr * KC] = 0; // padding rows of W stay zero
        wl[(R + rr) * L.wp + e - rr * KC] = 0;
    }
    hm_dec_init_rows(mrun, lrun, R);
    if (tid == 0) *vbad = 0;

    // 2. The split's held tokens, TC at a time, tile k+1 in flight while tile k computes.
    for (int t0 = t_begin, kt = 0; t0 < t_end; t0 += TC, ++kt) {
        const int stage = kt & 1, valid = min(TC, t_end - t0);
        __syncthreads(); // the previous tile's readers are done with the stage the next load fills
        if (t0 + TC < t_end) load_tile(t0 + TC, stage ^ 1);
        hm_cp_commit(); // (an empty group on the last tile keeps the count)
        hm_cp_wait<1>(); // tile k landed (this thread's copies) ...
        __syncthreads(); // ... and everyone's
        hm_elem* kst = (hm_elem*)(sm + L.k + stage * stage_bytes);
        const hm_elem* vst = (const hm_elem*)(sm + L.v + stage * stage_bytes);

        // 2a. Rotate the stored keys in place to their token's position (pseudo-key 0 of it);
        // note whether a stored value is non-finite.
        if (a.rope)
            for (int e = tid; e < KC * half; e += HM_NT) {
                const int row = e / half, t = e - row * half, c = row / HK;
                const unsigned pos = pos0 + (unsigned)(t0 + c) * unit;
                float k0 = hm_to_f32(kst[row * PI + t]), k1 = hm_to_f32(kst[row * PI + t + half]);
                hm_rope_tab(x, k0, k1, pos, t, half);
                const float h0 = hm_round(k0), h1 = hm_round(k1);
                kst[row * PI + t] = hm_from_f32(h0);
                kst[row * PI + t + half] = hm_from_f32(h1);
                kl[row * PI + t] = hm_from_f32(k0 - h0);
                kl[row * PI + t + half] = hm_from_f32(k1 - h1);
            }
        {
            bool bad = false;
            for (int e = tid; e < valid * HK * (d / 2); e += HM_NT) {
                const int row = e / half, w = e - row * half;
                bad |= d2_nonfinite2(((const unsigned*)(vst + row * PI))[w]);
            }
            if (bad) *vbad = 1;
        }
        __syncthreads();

        // 2b. Scores of every pseudo-query against every stored head of the tile (tensor cores).
        for (int it = warp; it < (L.rqp / 16) * (KC / 16); it += D2_WARPS) {
            const int mt = it / (KC / 16), nt = it - mt * (KC / 16);
            float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
            for (int kk = 0; kk < d; kk += 16) {
                unsigned af[4], bf[4];
                hm_ldsm_x4(af, d2_a_addr(q_addr, PI, mt * 16, kk, lane));
                hm_ldsm_x4(bf, d2_bnk_addr(k_addr + (unsigned)(stage * stage_bytes), PI, nt * 16, kk, lane));
                hm_mma16816(c0, af, bf[0], bf[1]);
                hm_mma16816(c1, af, bf[2], bf[3]);
                if (a.rope) { // + q_lo k_hi + q_hi k_lo
                    unsigned al[4], bl[4];
                    hm_ldsm_x4(al, d2_a_addr(ql_addr, PI, mt * 16, kk, lane));
                    hm_mma16816(c0, al, bf[0], bf[1]);
                    hm_mma16816(c1, al, bf[2], bf[3]);
                    hm_ldsm_x4(bl, d2_bnk_addr(kl_addr, PI, nt * 16, kk, lane));
                    hm_mma16816(c0, af, bl[0], bl[1]);
                    hm_mma16816(c1, af, bl[2], bl[3]);
                }
            }
            float* s0 = ss + (mt * 16 + g) * KC + nt * 16 + 2 * tq;
            s0[0] = c0[0], s0[1] = c0[1], s0[8] = c1[0], s0[9] = c1[1];
            s0 += 8 * KC;
            s0[0] = c0[2], s0[1] = c0[3], s0[8] = c1[2], s0[9] = c1[3];
        }
        __syncthreads();

        // 2c. Scores of the virtual keys each row sees: the ak contraction (log2 domain).
        for (int e = tid; e < R * TP; e += HM_NT) {
            const int r = e / TP, jj = e - r * TP, h = r / NP, i = r - h * NP, c = jj / P, pk = jj - c * P;
            const HmSpan sp = hm_dec_span(a, i + off, t0 * P, valid * P);
            if (jj < sp.lo || jj >= sp.hi) continue;
            const float* srow = ss + (r * PQ + (PQ > 1 ? pk : 0)) * KC + c * HK;
            float s = 0.f;
            for (int m = 0; m < HK; ++m) {
                const float w = a.ak[(m * H + h) * P + pk];
                if (hm_uses(w, x.selection, 2)) s += w * srow[m];
            }
            // (a visible -inf can only come from a non-finite q or k: NaN, as the forward's hm_score)
            pr[e] = s == HM_NEG_INF ? __int_as_float(0x7fc00000) : s * a.scale_log2;
        }
        __syncthreads();

        // 2d. Online softmax per row over its visible keys (masked by select: probability 0).
        for (int r = tid; r < R; r += HM_NT) {
            const int i = r % NP;
            const HmSpan sp = hm_dec_span(a, i + off, t0 * P, valid * P);
            float* prow = pr + r * TP;
            float mx = mrun[r];
            for (int jj = sp.lo; jj < sp.hi; ++jj) mx = fmaxf(mx, prow[jj]);
            const float al = exp2f(mrun[r] - mx);
            float sum = 0.f;
            for (int jj = 0; jj < TP; ++jj) {
                const bool vis = jj >= sp.lo && jj < sp.hi;
                const float p = vis ? exp2f(prow[jj] - mx) : 0.f;
                prow[jj] = p;
                sum += p;
            }
            lrun[r] = lrun[r] * al + sum;
            mrun[r] = mx;
            alpha[r] = al;
        }
        __syncthreads();

        const bool exact = *vbad != 0;
        if (!exact) {
            // 2e. W = probabilities x av per stored head (rounded: an mma operand); rescale o.
            for (int e = tid; e < R * KC; e += HM_NT) {
                const int r = e / KC, col = e - r * KC, c = col / HK, m = col - c * HK, h = r / NP;
                const float* prow = pr + r * TP + c * P;
                float w = 0.f;
                for (int pk = 0; pk < P; ++pk) {
                    const float av = a.av[(m * H + h) * P + pk];
                    if (hm_uses(av, x.selection, 4)) w += hm_round(prow[pk]) * av;
                }
                const float wh = hm_round(w);
                ws[r * L.wp + col] = hm_from_f32(wh);
                wl[r * L.wp + col] = hm_from_f32(w - wh);
            }
            for (int e = tid; e < R * d; e += HM_NT) os[e] *= alpha[e / d];
            __syncthreads();

            // 2f. o += W V on the tensor cores; each warp owns 16x16 blocks of o in turn.
            for (int it = warp; it < (L.rp / 16) * (d / 16); it += D2_WARPS) {
                const int mt = it / (d / 16), nt = it - mt * (d / 16);
                float* o0 = os + (mt * 16 + g) * d + nt * 16 + 2 * tq;
                float* o1 = o0 + 8 * d;
                float c0[4] = {o0[0], o0[1], o1[0], o1[1]}, c1[4] = {o0[8], o0[9], o1[8], o1[9]};
                for (int kk = 0; kk < KC; kk += 16) {
                    unsigned af[4], bf[4];
                    hm_ldsm_x4(af, d2_a_addr(w_addr, L.wp, mt * 16, kk, lane));
                    hm_ldsm_x4_trans(bf, d2_bkn_addr(v_addr + (unsigned)(stage * stage_bytes), PI, kk, nt * 16, lane));
                    hm_mma16816(c0, af, bf[0], bf[1]);
                    hm_mma16816(c1, af, bf[2], bf[3]);
                    hm_ldsm_x4(af, d2_a_addr(wl_addr, L.wp, mt * 16, kk, lane)); // + W_lo V
                    hm_mma16816(c0, af, bf[0], bf[1]);
                    hm_mma16816(c1, af, bf[2], bf[3]);
                }
                o0[0] = c0[0], o0[1] = c0[1], o1[0] = c0[2], o1[1] = c0[3];
                o0[8] = c1[0], o0[9] = c1[1], o1[8] = c1[2], o1[9] = c1[3];
            }
        } else {
            // 2e'. A non-finite stored value: v1's exact path, each row over its visible keys
            // only, values mixed per element (selection zeros skipped).
            for (int e = tid; e < R * d; e += HM_NT) {
                const int r = e / d, t = e - r * d, h = r / NP, i = r - h * NP;
                const HmSpan sp = hm_dec_span(a, i + off, t0 * P, valid * P);
                float o = os[e] * alpha[r];
                for (int jj = sp.lo; jj < sp.hi; ++jj) {
                    const int c = jj / P, pk = jj - c * P;
                    float vm = 0.f;
                    for (int m = 0; m < HK; ++m) {
                        const float w = a.av[(m * H + h) * P + pk];
                        if (hm_uses(w, x.selection, 4)) vm += w * hm_to_f32(vst[(c * HK + m) * PI + t]);
                    }
                    o += hm_round(pr[r * TP + jj]) * hm_round(vm);
                }
                os[e] = o;
            }
        }
        __syncthreads();
        if (tid == 0) *vbad = 0; // read by everyone before the barrier above
    }
    hm_cp_wait<0>();

    // 3. This split's partials (decode.cuh: the layout decode_combine.cu merges).
    __syncthreads();
    hm_dec_write_partials(a, x, split, b, os, mrun, lrun);
}
