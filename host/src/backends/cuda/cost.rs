//! Counted cost of each kernel version on a problem, and the roofline ceiling it implies: a
//! **model** (per key tile of a block: attention FLOP, mixing FLOP and the stored tile read from
//! L2, applied to each kernel's block structure; `kernels-cuda/README.md`), never a measurement. `headmix kernels` prints it beside the measured time when there is one.
//!
//! One count model per kernel version, in [`cost`]: a new version adds its arm there.
//!
//! What is counted, per call:
//! - FLOP by unit: tensor-core `mma` work and scalar f32 FMA work as the kernel executes it (whole
//!   visited tiles, masked elements included, padded head-dim columns for tensor cores), next to
//!   the useful attention FLOP `4·B·H·d·`visible pairs;
//! - bytes through L2: every global load and store the blocks issue for stored q/k/v tiles (each
//!   token's stored heads once per tile that reads it), outputs, log-sum-exp, f32 atomics (4 B
//!   each); the small mixing weights (L1-resident) are left out;
//! - bytes from HBM: the compulsory traffic, every input read once and every output written
//!   once (the 50 MB L2 holds the reuse between blocks), the collapse accumulator written back once;
//! - f32 atomics (the collapse scatter).

use super::kernel_table::Kernel;
use super::variants::Variant;
use crate::validate::Problem;

/// The figures of a device the model needs. Only [`H200`] is filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// Device name, for reports.
    pub name: &'static str,
    /// Dense f16/bf16 tensor-core TFLOP/s.
    pub tc_tflops: f64,
    /// f32 FMA TFLOP/s on the CUDA cores.
    pub fma_tflops: f64,
    /// Device-memory copy bandwidth, TB/s.
    pub hbm_tb_s: f64,
    /// L2 bandwidth, TB/s.
    pub l2_tb_s: f64,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// 32-bit registers per SM.
    pub regs_per_sm: u32,
    /// Shared memory per SM, bytes (what blocks can share out).
    pub smem_per_sm: u32,
    /// Shared memory the system reserves per block, bytes.
    pub smem_reserved_per_block: u32,
    /// The most dynamic + static shared memory one block may use, bytes.
    pub smem_per_block: u32,
    /// The most resident blocks per SM.
    pub max_blocks_per_sm: u32,
    /// The most resident warps per SM.
    pub max_warps_per_sm: u32,
}

/// NVIDIA H200 (sm_90, 132 SMs): 790 TFLOP/s dense bf16 and 4.3 TB/s copy (measured on the
/// machine headmix is benchmarked on), ~67 TFLOP/s f32 FMA and ~10 TB/s L2 (published figures of
/// the H100, the same chip); 64K registers and 228 KiB shared memory per SM.
pub const H200: Machine = Machine {
    name: "H200",
    tc_tflops: 790.0,
    fma_tflops: 67.0,
    hbm_tb_s: 4.3,
    l2_tb_s: 10.0,
    sms: 132,
    regs_per_sm: 65536,
    smem_per_sm: 228 * 1024,
    smem_reserved_per_block: 1024,
    smem_per_block: 227 * 1024,
    max_blocks_per_sm: 32,
    max_warps_per_sm: 64,
};

/// What one launch of one kernel does and moves (all per call, whole grid).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Blocks launched.
    pub blocks: u64,
    /// (block, key tile) pairs visited.
    pub key_tiles: u64,
    /// Useful attention FLOP, `4·B·H·d·` visible pairs (0 for the epilogue).
    pub useful_flop: f64,
    /// FLOP executed on the tensor cores.
    pub tc_flop: f64,
    /// FLOP executed as scalar f32 FMA (2 per FMA).
    pub fma_flop: f64,
    /// Bytes of global loads and stores through L2.
    pub l2_bytes: f64,
    /// Compulsory bytes from and to device memory.
    pub hbm_bytes: f64,
    /// f32 atomic reductions.
    pub atomics: f64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            blocks: self.blocks + o.blocks,
            key_tiles: self.key_tiles + o.key_tiles,
            useful_flop: self.useful_flop + o.useful_flop,
            tc_flop: self.tc_flop + o.tc_flop,
            fma_flop: self.fma_flop + o.fma_flop,
            l2_bytes: self.l2_bytes + o.l2_bytes,
            hbm_bytes: self.hbm_bytes + o.hbm_bytes,
            atomics: self.atomics + o.atomics,
        }
    }
}

/// The roofline of a [`Cost`] on a [`Machine`]: each resource's time at its peak; the ceiling is
/// the slowest (every unit overlapped perfectly: a lower bound on the time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Roofline {
    /// Seconds of the tensor-core FLOP at the tensor-core peak.
    pub tc_s: f64,
    /// Seconds of the scalar FMA FLOP at the FMA peak.
    pub fma_s: f64,
    /// Seconds of the device-memory bytes at the HBM bandwidth.
    pub hbm_s: f64,
    /// Seconds of the L2 bytes at the L2 bandwidth.
    pub l2_s: f64,
    /// The largest of the four.
    pub seconds: f64,
    /// Which resource bounds it: `tensor cores`, `FMA`, `HBM` or `L2`.
    pub bound: &'static str,
    /// Useful FLOP over `seconds`, in TFLOP/s.
    pub tflops: f64,
}

impl Cost {
    /// This cost's roofline on `m`.
    pub fn roofline(&self, m: &Machine) -> Roofline {
        let tc_s = self.tc_flop / (m.tc_tflops * 1e12);
        let fma_s = self.fma_flop / (m.fma_tflops * 1e12);
        let hbm_s = self.hbm_bytes / (m.hbm_tb_s * 1e12);
        let l2_s = self.l2_bytes / (m.l2_tb_s * 1e12);
        let (seconds, bound) = [(tc_s, "tensor cores"), (fma_s, "FMA"), (hbm_s, "HBM"), (l2_s, "L2")]
            .into_iter()
            .fold((0.0, "-"), |best, x| if x.0 > best.0 { x } else { best });
        let tflops = if seconds > 0.0 { self.useful_flop / seconds / 1e12 } else { 0.0 };
        Roofline { tc_s, fma_s, hbm_s, l2_s, seconds, bound, tflops }
    }

    /// Executed FLOP (both units) per byte through L2.
    pub fn l2_intensity(&self) -> f64 {
        (self.tc_flop + self.fma_flop) / self.l2_bytes.max(1.0)
    }
}

/// The count model of a variant launched on a validated problem.
pub fn cost(v: &Variant, pb: &Problem) -> Cost {
    match v.kernel {
        // v1: per-head fused blocks, everything as FMA.
        Kernel::AttnV1 => per_head_fused(v, pb, false),
        // v2: per-head fused blocks, attention on the tensor cores, the mixing still scalar FMA.
        Kernel::AttnV2 => per_head_fused(v, pb, true),
        // v3: FlashAttention-2 over row tables; dense mixing and RoPE through the pre-mix.
        Kernel::AttnV3 => v3(v, pb),
        Kernel::CollapseEpilogue => epilogue(pb),
        // The backward: the sum of its passes.
        Kernel::BwdV1 | Kernel::BwdV2 => backward_passes(v, pb).into_iter().fold(Cost::default(), |a, (_, c)| a + c),
    }
}

/// The count model of the backward (`bwd_v1.cu`, `bwd_v2.cu`), per pass in launch order, for dense mixing
/// (selections skip the mixing FLOP): `V` visible (query, key) pairs per (batch, head); every
/// pass's f32 scratch rows counted as traffic; the attention passes read their streamed rows once
/// per owned tile (`BR` rows). Counted, not measured.
pub fn backward_passes(v: &Variant, pb: &Problem) -> Vec<(&'static str, Cost)> {
    let c = &pb.cfg;
    let t = v.tiles();
    let p = c.pseudo as i64;
    let (nq, nk) = (pb.n as i64 * p, pb.m as i64 * p);
    let (b, n, m, h) = (pb.batch as f64, pb.n as f64, pb.m as f64, c.heads as f64);
    let (hq, hk, pf, d, e) = (c.q_heads as f64, c.kv_heads as f64, p as f64, c.head_dim as f64, pb.dtype.size() as f64);
    let cols = b * h;
    // Visible pairs of one (batch, head), and the streamed tiles of both attention passes.
    let visible: f64 = (0..nq)
        .map(|i| {
            let (lo, hi) = key_range(pb, i, i);
            (hi - lo + 1).max(0) as f64
        })
        .sum();
    // Streamed rows per tile: bwd_v2's tensor-core passes stream 16 above d 64 (bwd_v2.cu's BW2_BC).
    let bc = if v.kernel == Kernel::BwdV2 && v.hd > 64 { 16 } else { t.bc as i64 };
    // (owned blocks of `br` queries, streamed key tiles of `bc`) over all (batch, head) columns.
    let tiles = |br: i64| {
        let mut key_tiles = 0u64;
        for i0 in (0..nq).step_by(br as usize) {
            let (lo, hi) = key_range(pb, i0, (i0 + br).min(nq) - 1);
            if lo <= hi {
                key_tiles += (hi / bc - lo / bc + 1) as u64;
            }
        }
        ((nq as u64).div_ceil(br as u64) as f64 * cols, key_tiles as f64 * cols)
    };
    let (q_blocks, key_tiles) = tiles(t.br as i64);
    // bwd_v2: the tensor-core passes own 64 rows (the recompute pass keeps bwd_v1's tiles).
    let tc = v.kernel == Kernel::BwdV2;
    let br_tc = if tc { 64 } else { t.br as i64 };
    let (q_blocks_tc, key_tiles_tc) = tiles(br_tc);
    let k_blocks_tc = (nk as u64).div_ceil(br_tc as u64) as f64 * cols;
    // Query tiles the key pass streams: the same (owned, streamed) tile pairs seen from the keys
    // (the key pass owns BR keys and streams BC queries, as the query pass owns BR queries).
    let query_tiles = key_tiles_tc;
    let rows = |l: f64| 4.0 * b * h * l * pf * d; // one f32 scratch tensor of L tokens
    let stored = b * (n * hq + 2.0 * m * hk) * d * e;
    let mix_flop = 2.0 * b * (n * hq + 2.0 * m * hk) * h * pf * d;
    let recompute = pb.collapse || pb.norm || pb.dtype != crate::DType::F32;
    let hp = h * pf;
    let out_rows = if pb.collapse { b * n * h } else { b * n * hp };
    // The mix and its transpose (mix-back) read and write the same tensors at the same cost.
    let mix = Cost {
        blocks: (pb.n.max(pb.m) * 3 * pb.batch) as u64,
        fma_flop: mix_flop,
        l2_bytes: stored + rows(n + 2.0 * m),
        hbm_bytes: stored + rows(n + 2.0 * m),
        ..Cost::default()
    };
    let mut passes = vec![("mix", mix)];
    // `products` matrix products of 2 FLOP per visible pair and column each; on the tensor cores
    // (bwd_v2) every (owned, streamed) tile pair runs them whole at the padded capacity, three
    // mma per product (hi*hi + hi*lo + lo*hi).
    let attn = |products: f64, tensor: bool, blocks: f64, pairs: f64, own: f64, streamed: f64, written: f64| {
        let useful = 2.0 * products * visible * d * cols;
        let tc_flop = if tensor { 3.0 * 2.0 * products * (br_tc * bc) as f64 * v.hd as f64 * pairs } else { 0.0 };
        Cost {
            blocks: blocks as u64,
            key_tiles: pairs as u64,
            useful_flop: useful,
            tc_flop,
            fma_flop: if tensor { 0.0 } else { useful },
            l2_bytes: own + streamed + written,
            hbm_bytes: own + rows(n + 2.0 * m).min(own + streamed) + written,
            ..Cost::default()
        }
    };
    let stream_k = 2.0 * key_tiles * bc as f64 * 4.0 * d;
    if recompute {
        passes.push(("fwd (recompute o)", attn(2.0, false, q_blocks, key_tiles, rows(n), stream_k, rows(n))));
    }
    let collapse_flop = if pb.collapse { 6.0 * b * n * h * hp * d } else { 0.0 };
    let norm_flop = if pb.norm { 12.0 * out_rows * d } else { 0.0 };
    passes.push((
        "pre (norm, collapse, D)",
        Cost {
            blocks: (pb.n.div_ceil(8) * pb.batch) as u64,
            fma_flop: collapse_flop + norm_flop + 2.0 * b * n * hp * d,
            l2_bytes: rows(n) * 2.0 + out_rows * d * e,
            hbm_bytes: rows(n) * 2.0 + out_rows * d * e,
            ..Cost::default()
        },
    ));
    let stream_k_tc = 2.0 * key_tiles_tc * bc as f64 * 4.0 * d;
    // dq: S, dP, dS K; dk, dv: S^T, dP^T, P^T dO, dS^T Q.
    passes.push(("dq (query-major)", attn(3.0, tc, q_blocks_tc, key_tiles_tc, 2.0 * rows(n), stream_k_tc, rows(n))));
    let stream_q = 2.0 * query_tiles * bc as f64 * 4.0 * d;
    passes
        .push(("dk, dv (key-major)", attn(4.0, tc, k_blocks_tc, query_tiles, 2.0 * rows(m), stream_q, 2.0 * rows(m))));
    passes.push(("mix-back", mix));
    passes.push(("weight gradients", Cost { blocks: (pb.n.max(pb.m).div_ceil(16) * 3 * pb.batch) as u64, ..mix }));
    passes
}

/// The first and last key a block of virtual queries `[i0, i1]` visits (`hm_key_range` of
/// `common.cuh`): empty when `lo > hi`.
pub fn key_range(pb: &Problem, i0: i64, i1: i64) -> (i64, i64) {
    let p = pb.cfg.pseudo as i64;
    let (nk, off) = (pb.m as i64 * p, (pb.m - pb.n) as i64 * p);
    let (mut lo, mut hi) = (0, nk - 1);
    if pb.cfg.causal {
        hi = hi.min(i1 + off);
    }
    if let Some(w) = pb.cfg.window {
        lo = lo.max(i0 + off - w.left.min(nk as usize) as i64);
        hi = hi.min(i1 + off + w.right.min(nk as usize) as i64);
    }
    (lo, hi)
}

/// Distinct tokens behind virtual indices `[j0, j1]` (index = token·P + p).
fn tokens(j0: i64, j1: i64, p: i64) -> u64 {
    (j1 / p - j0 / p + 1) as u64
}

/// A per-head fused kernel (v1, v2): one block per (tile of `BR` virtual queries, head, batch)
/// mixes its query tile once, then for every key tile of `BC` virtual keys its mask reaches reads
/// all `Hk` stored heads of the tile's tokens from L2 and mixes them (scalar FMA) into its head's
/// pseudo-keys and values; the two attention products run on the tensor cores or as FMA. With a
/// collapse each pseudo output row is scattered into all `H` heads with f32 atomics.
fn per_head_fused(v: &Variant, pb: &Problem, tensor_cores: bool) -> Cost {
    let c = &pb.cfg;
    let t = v.tiles();
    let (br, bc, p) = (t.br as i64, t.bc as i64, c.pseudo as i64);
    let (nq, nk) = (pb.n as i64 * p, pb.m as i64 * p);
    let (d, e) = (c.head_dim as f64, pb.dtype.size() as f64);
    // Tensor cores multiply the padded capacity; the FMA loops stop at the runtime d.
    let dx = if tensor_cores { v.hd as f64 } else { d };
    let (hq, hk, h) = (c.q_heads as f64, c.kv_heads as f64, c.heads as f64);

    // One (head, batch) column of blocks; every column is the same.
    let (mut q_tiles, mut key_tiles, mut q_tokens, mut kv_tokens) = (0u64, 0u64, 0u64, 0u64);
    for i0 in (0..nq).step_by(br as usize) {
        let i1 = (i0 + br).min(nq) - 1;
        q_tiles += 1;
        q_tokens += tokens(i0, i1, p);
        let (lo, hi) = key_range(pb, i0, i1);
        if lo > hi {
            continue;
        }
        let mut j0 = lo / bc * bc;
        while j0 <= hi {
            key_tiles += 1;
            kv_tokens += tokens(j0, (j0 + bc).min(nk) - 1, p);
            j0 += bc;
        }
    }
    let cols = (pb.batch * c.heads) as f64;
    let (q_tiles, key_tiles) = (q_tiles as f64 * cols, key_tiles as f64 * cols);
    let (q_tokens, kv_tokens) = (q_tokens as f64 * cols, kv_tokens as f64 * cols);

    let attention = 4.0 * (br * bc) as f64 * dx * key_tiles;
    let mixing = 2.0 * br as f64 * d * hq * q_tiles + 2.0 * 2.0 * bc as f64 * d * hk * key_tiles;
    let (tc_flop, fma_flop) = if tensor_cores { (attention, mixing) } else { (0.0, attention + mixing) };

    let (b, n, m) = (pb.batch as f64, pb.n as f64, pb.m as f64);
    let lse = 4.0 * pb.lse_len() as f64;
    let (atomics, out_l2, out_hbm) = if pb.collapse {
        // Every pseudo output row into every head's f32 accumulator; written back once.
        let atomics = b * n * p as f64 * h * h * d;
        (atomics, 4.0 * atomics, 4.0 * b * n * h * d)
    } else {
        (0.0, b * n * h * p as f64 * d * e, b * n * h * p as f64 * d * e)
    };
    let l2_bytes = q_tokens * hq * d * e + 2.0 * kv_tokens * hk * d * e + out_l2 + lse;
    let hbm_bytes = (b * n * hq * d + 2.0 * b * m * hk * d) * e + out_hbm + lse;
    Cost {
        blocks: q_tiles as u64,
        key_tiles: key_tiles as u64,
        useful_flop: pb.flops(),
        tc_flop,
        fma_flop,
        l2_bytes,
        hbm_bytes,
        atomics,
    }
}

/// Whether `attn_v3` reads a tensor's stored heads (a one-hot selection without RoPE for q/k),
/// judged from the method: MHA and GQA weights are selections, every other method's are counted
/// as dense (the host decides from the weights themselves, `plan::V3Plan`; a custom one-hot
/// configuration is counted here with its pre-mix, an over-count).
fn v3_stored(pb: &Problem) -> (bool, bool, bool) {
    use crate::Method;
    let sel = matches!(pb.cfg.method, Method::Mha | Method::Gqa);
    let rope = pb.cfg.rope.is_some();
    (sel && !rope, sel && !rope, sel)
}

/// `attn_v3`: one block per (128 virtual queries, head, batch) reads its query rows once and the
/// key and value rows of every 64-key tile its mask reaches (FlashAttention-2's bytes over
/// virtual rows: intensity `4·BR·BC·hd / (2·BC·d·e)` = 128 FLOP/B at d = 128 in bf16, R = 128);
/// both products on the tensor cores. A tensor the host cannot read stored (dense mixing; q and
/// k with RoPE) is first pre-mixed (`hm_v3_mix`: read the `S` stored heads, write `H·P` rows
/// `[B, L, H·P, d]`, three 16-bit weight planes on the tensor cores). With a collapse the kernel
/// writes the pseudo outputs once and `hm_v3_collapse` sums them through `r` into the f32
/// accumulator (FMA, no atomics); the epilogue follows as its own variant.
fn v3(v: &Variant, pb: &Problem) -> Cost {
    let c = &pb.cfg;
    let t = v.tiles();
    let (br, bc, p) = (t.br as i64, t.bc as i64, c.pseudo as i64);
    let (nq, nk) = (pb.n as i64 * p, pb.m as i64 * p);
    let (d, e, hx) = (c.head_dim as f64, pb.dtype.size() as f64, v.hd as f64);
    let (hq, hk, h, hp) = (c.q_heads as f64, c.kv_heads as f64, c.heads as f64, (c.heads * c.pseudo) as f64);
    let (b, n, m) = (pb.batch as f64, pb.n as f64, pb.m as f64);

    let (mut q_tiles, mut key_tiles, mut q_rows, mut kv_rows) = (0u64, 0u64, 0u64, 0u64);
    for i0 in (0..nq).step_by(br as usize) {
        let i1 = (i0 + br).min(nq) - 1;
        q_tiles += 1;
        q_rows += (i1 - i0 + 1) as u64;
        let (lo, hi) = key_range(pb, i0, i1);
        if lo > hi {
            continue;
        }
        let mut j0 = lo / bc * bc;
        while j0 <= hi {
            key_tiles += 1;
            kv_rows += ((j0 + bc).min(nk) - j0) as u64;
            j0 += bc;
        }
    }
    let cols = (pb.batch * c.heads) as f64;
    let (q_tiles, key_tiles) = (q_tiles as f64 * cols, key_tiles as f64 * cols);
    let (q_rows, kv_rows) = (q_rows as f64 * cols, kv_rows as f64 * cols);

    // Attention: both products on whole tiles at the padded capacity.
    let mut tc_flop = 4.0 * (br * bc) as f64 * hx * key_tiles;
    let mut fma_flop = 0.0;
    let mut l2_bytes = (q_rows + 2.0 * kv_rows) * d * e;
    // Compulsory traffic: the stored tensors read once, or the pre-mix (stored heads read, rows
    // written) and its rows read back by the attention.
    let (q_st, k_st, v_st) = v3_stored(pb);
    let mut hbm_bytes = 0.0;
    for (stored, l, s) in [(q_st, n, hq), (k_st, m, hk), (v_st, m, hk)] {
        if stored {
            hbm_bytes += b * l * s * d * e;
        } else {
            let (x, y) = (b * l * s * d * e, b * l * hp * d * e);
            hbm_bytes += x + 2.0 * y;
            l2_bytes += x + y;
            tc_flop += 3.0 * 2.0 * b * l * s.max(16.0) * hp * hx; // three weight planes, S padded to 16
        }
    }
    let lse = 4.0 * pb.lse_len() as f64;
    let pseudo_out = b * n * hp * d * e;
    if pb.collapse {
        // Pseudo outputs written once and read by the collapse, which writes the f32 accumulator.
        let acc = 4.0 * b * n * h * d;
        fma_flop += 2.0 * b * n * h * hp * d;
        l2_bytes += 2.0 * pseudo_out + acc;
        hbm_bytes += 2.0 * pseudo_out + acc;
    } else {
        l2_bytes += pseudo_out;
        hbm_bytes += pseudo_out;
    }
    Cost {
        blocks: q_tiles as u64,
        key_tiles: key_tiles as u64,
        useful_flop: pb.flops(),
        tc_flop,
        fma_flop,
        l2_bytes: l2_bytes + lse,
        hbm_bytes: hbm_bytes + lse,
        atomics: 0.0,
    }
}

/// The collapse epilogue: the host zero-fills the f32 accumulator `[B, N, H, d]`, the epilogue
/// reads it back and writes the output (head norm: a few FMA per element).
fn epilogue(pb: &Problem) -> Cost {
    let c = &pb.cfg;
    let rows = (pb.batch * pb.n * c.heads) as f64;
    let acc = 4.0 * rows * c.head_dim as f64;
    let out = rows * c.head_dim as f64 * pb.dtype.size() as f64;
    Cost {
        blocks: (rows as u64).div_ceil(super::kernel_table::EPI_ROWS as u64),
        fma_flop: if pb.norm { 6.0 * rows * c.head_dim as f64 } else { 0.0 },
        l2_bytes: 2.0 * acc + out,
        hbm_bytes: 2.0 * acc + out,
        ..Cost::default()
    }
}

/// Resident blocks per SM and what limits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// Resident blocks per SM.
    pub blocks: u32,
    /// Resident warps per SM (`blocks` × warps per block).
    pub warps: u32,
    /// `registers`, `shared memory`, `warps` or `blocks`.
    pub limit: &'static str,
}

/// Blocks of `threads` threads using `regs` registers per thread and `smem` bytes of shared
/// memory (static + dynamic) that fit one SM: registers are allocated per warp in units of 256,
/// each block also reserves [`Machine::smem_reserved_per_block`] bytes.
pub fn occupancy(m: &Machine, threads: usize, regs: u32, smem: usize) -> Occupancy {
    let warps = (threads as u32).div_ceil(32).max(1);
    let by_regs = if regs == 0 {
        u32::MAX
    } else {
        let per_warp = (regs * 32).div_ceil(256) * 256;
        (m.regs_per_sm / per_warp) / warps
    };
    let by_smem =
        if smem > m.smem_per_block as usize { 0 } else { m.smem_per_sm / (smem as u32 + m.smem_reserved_per_block) };
    let by_warps = m.max_warps_per_sm / warps;
    let (blocks, limit) =
        [(by_regs, "registers"), (by_smem, "shared memory"), (by_warps, "warps"), (m.max_blocks_per_sm, "blocks")]
            .into_iter()
            .fold((u32::MAX, "-"), |best, x| if x.0 < best.0 { x } else { best });
    Occupancy { blocks, warps: blocks * warps, limit }
}

#[cfg(test)]
mod tests {
    use super::super::kernel_table::MaskKind;
    use super::*;
    use crate::{Config, DType};

    fn problem(cfg: Config, batch: usize, n: usize, m: usize, dtype: DType, collapse: bool) -> Problem {
        Problem::new(&cfg, batch, n, m, dtype, collapse, false).unwrap()
    }

    #[test]
    fn occupancy_follows_the_sm90_limits() {
        // 255 registers, 128 threads: 4 warps × 8192 registers = 32K per block, two blocks.
        let o = occupancy(&H200, 128, 255, 0);
        assert_eq!((o.blocks, o.limit), (2, "registers"));
        // 32 registers: 16 blocks by registers, 16 by warps (64 / 4): warps or registers decide.
        assert_eq!(occupancy(&H200, 128, 32, 0).blocks, 16);
        // 100 KiB of shared memory: two blocks of 101 KiB in 228 KiB.
        let o = occupancy(&H200, 128, 32, 100 * 1024);
        assert_eq!((o.blocks, o.limit), (2, "shared memory"));
        // Tiny blocks: the 32-block limit.
        let o = occupancy(&H200, 32, 16, 0);
        assert_eq!((o.blocks, o.limit), (32, "blocks"));
        // Above the per-block maximum: nothing fits.
        assert_eq!(occupancy(&H200, 128, 32, 228 * 1024).blocks, 0);
    }

    #[test]
    fn per_head_counts_match_the_closed_form_of_a_dense_problem() {
        // MHA, no mask, M = N = 256, d = 64, bf16, v2 (64 x 64 tiles): every block visits every
        // key tile; L2 reads each stored head's k and v once per (query tile, head).
        let pb = problem(Config::mha(4, 64).with_causal(false), 2, 256, 256, DType::BF16, false);
        let v = Variant::attention(Kernel::AttnV2, DType::BF16, 64, MaskKind::None).unwrap();
        let c = cost(&v, &pb);
        let (q_tiles, k_tiles) = (256 / 64, 256 / 64);
        assert_eq!(c.blocks, (q_tiles * 4 * 2) as u64);
        assert_eq!(c.key_tiles, (q_tiles * k_tiles * 4 * 2) as u64);
        assert_eq!(c.tc_flop, pb.flops(), "dense, no padding: executed = useful");
        // Per (block, key tile): 64 tokens × Hk = 4 stored heads × d × 2 bytes, k and v.
        let kv = (2 * 64 * 4 * 64 * 2) as f64 * c.key_tiles as f64;
        let q = (64 * 4 * 64 * 2) as f64 * c.blocks as f64;
        let out = (2 * 256 * 4 * 64 * 2) as f64;
        let lse = (4 * pb.lse_len()) as f64;
        assert_eq!(c.l2_bytes, kv + q + out + lse);
        assert_eq!(c.hbm_bytes, (3 * 2 * 256 * 4 * 64 * 2) as f64 + out + lse);
        // The mixing loops over all S = 4 stored heads even though MHA is one-hot.
        assert_eq!(
            c.fma_flop,
            (2 * 64 * 64 * 4) as f64 * c.blocks as f64 + (4 * 64 * 64 * 4) as f64 * c.key_tiles as f64
        );
    }

    #[test]
    fn causal_blocks_skip_the_tiles_above_the_diagonal() {
        let pb = problem(Config::iha(2, 2, 64), 1, 128, 128, DType::BF16, true);
        let v = Variant::attention(Kernel::AttnV2, DType::BF16, 64, MaskKind::Causal).unwrap();
        let c = cost(&v, &pb);
        // 256 virtual rows / 64 = 4 query tiles; tile i visits i + 1 key tiles: 10 per head.
        assert_eq!(c.key_tiles, 10 * 2);
        assert!(c.tc_flop > pb.flops(), "the diagonal tiles are executed whole");
        assert_eq!(c.atomics, (128 * 2 * 2 * 2 * 64) as f64, "N·P·H·H·d f32 atomics");
        // Brute force over the reference's visible pairs: every visible pair lies in a visited tile.
        let r = key_range(&pb, 64, 127);
        assert_eq!(r, (0, 127));
    }

    #[test]
    fn v3_reads_flash_attention_bytes_for_mha_and_pays_the_pre_mix_for_dense_mixing() {
        // MHA, no mask, N = M = 256, d = 128, bf16: 2 query tiles of 128 per head, each visiting 4
        // key tiles of 64: FlashAttention-2's N·d·e + 2·ceil(N/128)·M·d·e per (batch, head).
        let pb = problem(Config::mha(4, 128).with_causal(false), 2, 256, 256, DType::BF16, false);
        let v = Variant::attention(Kernel::AttnV3, DType::BF16, 128, MaskKind::None).unwrap();
        let c = cost(&v, &pb);
        assert_eq!((c.blocks, c.key_tiles), (2 * 4 * 2, 2 * 4 * 4 * 2));
        let per_head = (256 * 128 * 2 + 2 * 2 * 256 * 128 * 2) as f64;
        let out = (2 * 256 * 4 * 128 * 2) as f64;
        let lse = (4 * pb.lse_len()) as f64;
        assert_eq!(c.l2_bytes, per_head * 8.0 + out + lse);
        assert_eq!(c.tc_flop, pb.flops(), "dense, no padding, no pre-mix: executed = useful");
        // The attention's own intensity is R = 128 FLOP/B (without the q rows and the outputs).
        let kv = (2 * 64 * 128 * 2) as f64 * c.key_tiles as f64;
        assert_eq!(c.tc_flop / kv, 128.0);
        assert_eq!(c.atomics, 0.0);
        // IHA (dense mixing, RoPE): the same attention walk plus the pre-mix of q, k and v.
        let pb = problem(Config::iha(4, 1, 128).with_causal(false), 2, 256, 256, DType::BF16, true);
        let d = cost(&v, &pb);
        assert!(d.tc_flop > pb.flops() && d.l2_bytes > per_head * 8.0, "the pre-mix is counted");
        assert!(d.fma_flop > 0.0 && d.atomics == 0.0, "the collapse runs as FMA, no atomics");
    }

    #[test]
    fn the_roofline_names_the_slowest_resource() {
        let c = Cost { useful_flop: 790e12, tc_flop: 790e12, hbm_bytes: 8.6e12, ..Cost::default() };
        let r = c.roofline(&H200);
        assert!((r.seconds - 2.0).abs() < 1e-12 && r.bound == "HBM");
        assert!((r.tflops - 395.0).abs() < 1e-9);
        let c = Cost { useful_flop: 1.0, fma_flop: 67e12, l2_bytes: 1e12, ..Cost::default() };
        assert_eq!(c.roofline(&H200).bound, "FMA");
    }
}

/// The count model of one decode call's decode kernel (`decode_v1` or `decode_v2`, as `launch`
/// planned it; the split combine and epilogue move `O(rows·d)` and are left out). Cache tiles
/// are counted whole (a split's last tile is padded), every row over every key of a tile.
/// `hbm_bytes` is the stored-head cache read once (`launch.cache_bytes_read`) plus the queries
/// and the f32 partials written.
pub fn decode_cost(problem: &crate::DecodeProblem, launch: &super::decode::DecodeLaunch) -> Cost {
    use super::decode::DecodeKernel;
    let c = &problem.cfg;
    let (h, p, hk, d, n) = (c.heads as f64, c.pseudo as f64, c.kv_heads as f64, c.head_dim as f64, problem.n);
    let (tc, tps) = (launch.args.tile_tokens as usize, launch.args.tokens_per_split as usize);
    let (bands, _) = crate::decode::plan::bands(problem);
    let mut tiles = 0u64;
    let mut tokens = 0u64;
    for (lo, hi) in &bands {
        for s in 0..launch.args.splits as usize {
            let t = (hi - lo).saturating_sub(s * tps).min(tps);
            tiles += t.div_ceil(tc) as u64;
            tokens += t as u64;
        }
    }
    let np = (n * c.pseudo) as f64;
    let rows = h * np;
    let slots = (tiles * tc as u64) as f64; // cached tokens visited, tiles padded
    let (tc_flop, fma_flop) = match launch.kernel {
        // Per cached token and head: P pseudo-keys and values mixed from Hk heads (FMA), then
        // scores and P·V of the head's N·P rows against its P virtual keys.
        DecodeKernel::V1 => (0.0, slots * (4.0 * h * p * hk * d + 4.0 * h * np * p * d)),
        // Per cached token: one score mma of every pseudo-query row (16-row tiles; P copies and
        // three hi/lo products with virtual RoPE, three with token RoPE) against its Hk stored
        // heads, one W·V mma (hi + lo); the ak / av contractions as FMA.
        DecodeKernel::V2 => {
            let pq = if matches!(c.rope.map(|r| r.mode), Some(crate::PosMode::Virtual)) { p } else { 1.0 };
            let products = if c.rope.is_some() { 3.0 } else { 1.0 };
            let rqp = ((rows * pq) / 16.0).ceil() * 16.0;
            let rp = (rows / 16.0).ceil() * 16.0;
            (slots * (2.0 * rqp * hk * d * products + 2.0 * 2.0 * rp * hk * d), slots * 4.0 * rows * p * hk)
        }
    };
    let part = launch.args.splits as f64 * problem.batch as f64 * rows * (d + 2.0) * 4.0;
    let q = (problem.batch * n * c.q_heads * c.head_dim * problem.dtype.size()) as f64;
    let hbm = launch.cache_bytes_read as f64 + q + part;
    Cost {
        blocks: launch.grid.0 as u64 * launch.grid.1 as u64,
        key_tiles: tiles,
        useful_flop: tokens as f64 * 4.0 * h * np * p * d,
        tc_flop,
        fma_flop,
        l2_bytes: hbm,
        hbm_bytes: hbm,
        atomics: 0.0,
    }
}
