// attn_v1: the readable baseline (plain FMA, f32 everywhere on chip). Gains over the unfused
// pipeline: the mixed pseudo-queries/keys/values never touch device memory, and KV tiles outside
// the causal/window range are never visited. Every later version must match it.
//
// One block per (tile of HM_BR virtual queries, head h, batch b); HM_NT threads.
//   1. queries: mix the tile's pseudo-queries from the stored query heads
//      (qt[i] = sum_m aq[m,h,p] q[b,n,m,:], i = n*P + p), rotate (RoPE after mixing), round to the
//      storage precision (what a tensor-core kernel would hold), pre-scale by softmax scale*log2(e);
//   2. for each KV tile of HM_BC virtual keys the mask can reach: mix its pseudo-keys and values
//      into shared memory (keys rotated after mixing), scores by FMA, online softmax in the log2
//      domain (f32), probabilities rounded to the storage precision, o = alpha*o + P.V in registers;
//   3. normalise by the row sums, write lse, then either store the de-interleaved pseudo outputs
//      (head norm applied here) or scatter them through r into the f32 collapse accumulator (the
//      epilogue kernel norms and rounds it).
// Shared memory (f32): q tile, k and v tiles, scores, three per-row statistics.
static_assert(HM_SMEM == 4 * (HM_BR * HM_HDP + 2 * HM_BC * HM_HDP + HM_BR * HM_SSP + 3 * HM_BR),
              "attn_v1: the kernel table's shared memory (HM_SMEM) is not this carve-up");
static_assert((HM_BR * HM_HD) % HM_NT == 0, "attn_v1: HM_OPT = BR*HD/NT output elements per thread must be exact");

extern "C" __global__ void __launch_bounds__(HM_NT) hm_attn_v1(const HmArgs a) {
    extern __shared__ float hm_smem[];
    float* qs = hm_smem;                // [BR][HDP] mixed, rotated, scaled queries; later the outputs
    float* ks = qs + HM_BR * HM_HDP;    // [BC][HDP] mixed, rotated keys
    float* vs = ks + HM_BC * HM_HDP;    // [BC][HDP] mixed values
    float* ss = vs + HM_BC * HM_HDP;    // [BR][SSP] scores, then probabilities
    float* row_m = ss + HM_BR * HM_SSP; // [BR] running max (log2 domain)
    float* row_l = row_m + HM_BR;       // [BR] running sum of exp2(score - max)
    float* row_x = row_l + HM_BR;       // [BR] scratch: rescale factor, then 1/l, then the norm's 1/sd

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int b = blockIdx.z, h = blockIdx.y;
    const int P = a.P, d = a.d, H = a.H, half = a.d / 2;
    const int nq = a.N * P, nk = a.M * P;
    const int i0 = blockIdx.x * HM_BR;
    const long long off = (long long)(a.M - a.N) * P; // query i sits at key index i + off

    // ---- 1. queries: mix, rotate, round, scale ---------------------------------------------
    for (int e = tid; e < HM_BR * HM_HD; e += HM_NT) {
        const int r = e / HM_HD, t = e % HM_HD, i = i0 + r;
        float x = 0.f; // rows past nq and the tail t >= d stay zero (they add nothing to dots)
        if (i < nq && t < d) {
            const int n = i / P, p = i % P;
            const long long src = ((long long)(b * a.N + n) * a.Hq) * d + t; // q[b, n, 0, t]
            for (int m = 0; m < a.Hq; ++m) x += a.aq[(m * H + h) * P + p] * hm_load(a.q, src + (long long)m * d);
        }
        qs[r * HM_HDP + t] = x;
    }
    for (int r = tid; r < HM_BR; r += HM_NT) {
        row_m[r] = HM_NEG_INF;
        row_l[r] = 0.f;
    }
    __syncthreads();
    if (a.rope) {
        for (int e = tid; e < HM_BR * half; e += HM_NT) {
            const int r = e / half, t = e % half, i = i0 + r;
            if (i < nq) hm_rope_pair(qs[r * HM_HDP + t], qs[r * HM_HDP + t + half], hm_q_pos(a, i), t, d, a.rope_base);
        }
        __syncthreads();
    }
    for (int e = tid; e < HM_BR * HM_HD; e += HM_NT) {
        const int r = e / HM_HD, t = e % HM_HD;
        qs[r * HM_HDP + t] = hm_round(qs[r * HM_HDP + t]) * a.scale_log2;
    }
    // (the barrier at the top of the first KV tile orders these writes before the score reads)

    // ---- 2. KV tiles inside the key range the mask allows this query tile ------------------
    long long jlo, jhi;
    hm_key_range(a, i0, min(i0 + HM_BR, nq) - 1, &jlo, &jhi);

    float o[HM_OPT]; // this thread's elements e = tid + k*NT of the [BR][HD] output tile
#pragma unroll
    for (int k = 0; k < HM_OPT; ++k) o[k] = 0.f;

    for (long long j0 = (jlo / HM_BC) * HM_BC; j0 <= jhi; j0 += HM_BC) {
        __syncthreads(); // the previous tile is consumed (and the query tile complete)
        // Mix keys and values of virtual keys j0 .. j0+BC-1 (j = s*P + p).
        for (int e = tid; e < HM_BC * HM_HD; e += HM_NT) {
            const int c = e / HM_HD, t = e % HM_HD;
            const long long j = j0 + c;
            float xk = 0.f, xv = 0.f;
            if (j < nk && t < d) {
                const int s = (int)(j / P), p = (int)(j % P);
                const long long src = ((long long)(b * a.M + s) * a.Hk) * d + t; // k[b, s, 0, t]
                for (int m = 0; m < a.Hk; ++m) {
                    const int w = (m * H + h) * P + p;
                    xk += a.ak[w] * hm_load(a.k, src + (long long)m * d);
                    xv += a.av[w] * hm_load(a.v, src + (long long)m * d);
                }
            }
            ks[c * HM_HDP + t] = a.rope ? xk : hm_round(xk); // with RoPE: rounded after rotation
            vs[c * HM_HDP + t] = hm_round(xv);
        }
        __syncthreads();
        if (a.rope) {
            for (int e = tid; e < HM_BC * half; e += HM_NT) {
                const int c = e / half, t = e % half;
                const long long j = j0 + c;
                if (j < nk) {
                    float x0 = ks[c * HM_HDP + t], x1 = ks[c * HM_HDP + t + half];
                    hm_rope_pair(x0, x1, hm_k_pos(a, j), t, d, a.rope_base);
                    ks[c * HM_HDP + t] = hm_round(x0);
                    ks[c * HM_HDP + t + half] = hm_round(x1);
                }
            }
            __syncthreads();
        }
        // Scores in the log2 domain (q is pre-scaled); -inf where masked or past the end.
        for (int e = tid; e < HM_BR * HM_BC; e += HM_NT) {
            const int r = e / HM_BC, c = e % HM_BC, i = i0 + r;
            const long long j = j0 + c;
            float sc = HM_NEG_INF;
            if (i < nq && j < nk && hm_visible(a, (long long)i + off, j)) {
                sc = 0.f;
                for (int t = 0; t < d; ++t) sc += qs[r * HM_HDP + t] * ks[c * HM_HDP + t];
            }
            ss[r * HM_SSP + c] = sc;
        }
        __syncthreads();
        // Online softmax, one warp per row: new max, rescale factor, probabilities, row sum.
        for (int r = warp; r < HM_BR; r += HM_NT / 32) {
            float mx = HM_NEG_INF;
            for (int c = lane; c < HM_BC; c += 32) mx = fmaxf(mx, ss[r * HM_SSP + c]);
            mx = hm_warp_max(mx);
            const float m_old = row_m[r];
            const float m_new = fmaxf(m_old, mx);
            const float m_use = m_new == HM_NEG_INF ? 0.f : m_new; // nothing visible yet: no inf - inf
            float sum = 0.f;
            for (int c = lane; c < HM_BC; c += 32) {
                const float pr = exp2f(ss[r * HM_SSP + c] - m_use); // masked: exp2(-inf) = 0
                sum += pr;                                           // the sum is kept in f32
                ss[r * HM_SSP + c] = hm_round(pr); // P.V uses probabilities in storage precision
            }
            sum = hm_warp_sum(sum);
            if (lane == 0) {
                const float alpha = exp2f(m_old - m_use); // 0 while the row had no visible key
                row_x[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_m[r] = m_new;
            }
        }
        __syncthreads();
        // o = alpha * o + P.V. Registers, so k is unrolled; the key loop is not (small code).
#pragma unroll
        for (int k = 0; k < HM_OPT; ++k) o[k] *= row_x[(tid + k * HM_NT) / HM_HD];
#pragma unroll 1
        for (int c = 0; c < HM_BC; ++c) {
#pragma unroll
            for (int k = 0; k < HM_OPT; ++k) {
                const int e = tid + k * HM_NT, r = e / HM_HD, t = e % HM_HD;
                o[k] += ss[r * HM_SSP + c] * vs[c * HM_HDP + t];
            }
        }
    }
    __syncthreads(); // every thread is done with row_x and the q/k/v tiles

    // ---- 3. normalise, lse, then store or scatter ------------------------------------------
    for (int r = tid; r < HM_BR; r += HM_NT) {
        const float l = row_l[r];
        row_x[r] = l > 0.f ? 1.f / l : 0.f; // a row that sees no key outputs zeros
        const int i = i0 + r;
        if (a.has_lse && i < nq)
            a.lse[(long long)(b * H + h) * nq + i] = l > 0.f ? (row_m[r] + log2f(l)) * HM_LN2 : HM_NEG_INF;
    }
    __syncthreads();
    // The normalised outputs, rounded to the storage precision, go to qs (free now).
#pragma unroll
    for (int k = 0; k < HM_OPT; ++k) {
        const int e = tid + k * HM_NT, r = e / HM_HD, t = e % HM_HD;
        qs[r * HM_HDP + t] = hm_round(o[k] * row_x[r]);
    }
    __syncthreads();

    if (a.collapse) {
        // out[b, n, hh, :] += r[hh, h*P + p] * op[b, n, h, p, :] for every head hh: f32 atomics into
        // the zeroed accumulator [B, N, H, d]; the epilogue kernel norms and rounds it.
        for (int e = tid; e < HM_BR * HM_HD; e += HM_NT) {
            const int r = e / HM_HD, t = e % HM_HD, i = i0 + r;
            if (i < nq && t < d) {
                const int n = i / P, p = i % P;
                const float x = qs[r * HM_HDP + t];
                float* dst = a.acc + ((long long)(b * a.N + n) * H) * d + t; // acc[b, n, 0, t]
                for (int hh = 0; hh < H; ++hh) atomicAdd(dst + (long long)hh * d, a.r[(hh * H + h) * P + p] * x);
            }
        }
        return;
    }

    if (a.norm) {
        // Head norm per pseudo output vector (length d), one warp per row (norm.cuh): the mean
        // goes to row_m (free since lse), 1/sd to row_x.
        for (int r = warp; r < HM_BR; r += HM_NT / 32) {
            float sum = 0.f;
            if (a.norm == HM_NORM_GROUP) {
                for (int t = lane; t < d; t += 32) sum += qs[r * HM_HDP + t];
                sum = hm_warp_sum(sum);
            }
            const float mu = hm_norm_mean(a, sum);
            float sq = 0.f;
            for (int t = lane; t < d; t += 32) {
                const float c = qs[r * HM_HDP + t] - mu;
                sq += c * c;
            }
            sq = hm_warp_sum(sq);
            if (lane == 0) {
                row_m[r] = mu;
                row_x[r] = hm_norm_inv(a, sq);
            }
        }
        __syncthreads();
    }
    // De-interleave: virtual row i = n*P + p goes to out[b, n, h, p, :].
    for (int e = tid; e < HM_BR * HM_HD; e += HM_NT) {
        const int r = e / HM_HD, t = e % HM_HD, i = i0 + r;
        if (i < nq && t < d) {
            const int n = i / P, p = i % P;
            float x = qs[r * HM_HDP + t];
            if (a.norm) x = hm_norm_apply(a, h, t, x, row_m[r], row_x[r]);
            hm_store(a.out, (((long long)(b * a.N + n) * H + h) * P + p) * d + t, x);
        }
    }
}
