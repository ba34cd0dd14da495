//! The wgpu backward (`docs/backward.md`; the passes are described in `kernels-wgsl/README.md`,
//! "WGSL backward"): the launch plan (workspace layout, the backward's uniforms, the passes and
//! their loop counts) and the call on host tensors.
//!
//! Passes: [forward recompute: the flash forward (and split-KV combine) writing the pseudo outputs
//! `o` to the f32 workspace] → pre (head norm's transpose; `do`, `D`) → dq (query-major) → dk/dv
//! (key-major) → mix-back into `dq, dk, dv` → weight gradients (per-chunk partials, then their sum
//! in chunk order). Deterministic: no atomics anywhere, every sum in a fixed order.

use bytemuck::{Pod, Zeroable};

use super::Variant;
use super::WgpuBackend;
use super::kernels::{KernelKey, Kind};
use super::launch::{self, DENSE, Dispatch, Uniforms, max_key_tiles, over_budget, to_u32};
use crate::validate::Problem;
use crate::{BackwardIo, DType, Error, NormKind, Result, Weights};

/// Threads per workgroup of the per-vector kernels (pre, mix-back, weight gradients).
const VEC_WG: u32 = 64;
/// Rows (tokens or output vectors) per weight-gradient partial.
const CHUNK_ROWS: u32 = 32;
/// Tile sizes (virtual queries / keys per tile = threads per workgroup) of the dq and dk/dv
/// passes, largest first: the largest whose workgroup memory fits is used.
const TILES: [u32; 4] = [32, 16, 8, 4];

/// The backward's own uniforms, word for word `Bwd` in `backward_common.wgsl` (binding 8), one
/// block per chunk of heads. Offsets are in f32 elements of the workspace (binding 7), except
/// `dk_at`, `dv_at` (elements of the gradient tensor buffer `[dq | dk | dv]`, binding 5).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct BwdUniforms {
    pub op_off: u32,
    pub dout_off: u32,
    pub xh_off: u32,
    pub dy_off: u32,
    pub dop_off: u32,
    pub dd_off: u32,
    pub dqt_off: u32,
    pub dkt_off: u32,
    pub dvt_off: u32,
    pub wpart_off: u32,
    pub wgrad_off: u32,
    pub n_wgrad: u32,
    pub chunks: u32,
    pub chunk_rows: u32,
    pub k_tiles: u32,
    pub n_pseudo: u32,
    pub scale: f32,
    pub dk_at: u32,
    pub dv_at: u32,
    pub n_out_vec: u32,
    pub mix_pairs: u32,
    pub pn: u32,
    pub sum_len: u32,
    /// A deliberately wrong kernel (tests' negative controls), 0: none.
    pub fault: u32,
    pub q_splits: u32,
    pub k_splits: u32,
    pub dq_part_off: u32,
    pub dkv_part_off: u32,
    /// The chunk's first head and `H`.
    pub h0: u32,
    pub h_all: u32,
    /// 1 for the first / last chunk (both with one chunk).
    pub first: u32,
    pub last: u32,
    /// The f32 accumulators `[dq | dk | dv]` of the mix-back over several chunks.
    pub acc_off: u32,
    /// Layout of `o`: heads of its region and the chunk's first head there (the chunk's own
    /// recomputed `o`: `G`, 0; the saved f32 `out`: `H`, `h0`).
    pub o_heads: u32,
    pub o_h0: u32,
    pub pad: u32,
}

/// How the backward cuts its heads into chunks: `heads` forces the chunk size (tests,
/// `HEADMIX_WGPU_BWD_CHUNK_HEADS`); otherwise `budget` (f32 elements, default: the stored `q, k, v`)
/// bounds the pseudo-head scratch of a chunk, see [`chunk_heads`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Chunking {
    pub heads: Option<usize>,
    pub budget: Option<usize>,
}

/// The environment variable that forces the chunk size, e.g. `HEADMIX_WGPU_BWD_CHUNK_HEADS=1`.
pub(crate) const CHUNK_HEADS_VAR: &str = "HEADMIX_WGPU_BWD_CHUNK_HEADS";

impl Chunking {
    /// The rule of a backend: its forced chunk size, else the environment's, else the budget.
    pub(crate) fn of(forced: Option<usize>) -> Chunking {
        let env = || std::env::var(CHUNK_HEADS_VAR).ok().and_then(|v| v.trim().parse::<usize>().ok());
        Chunking { heads: forced.or_else(env).filter(|&g| g > 0), budget: None }
    }
}

/// Heads per chunk: `H` (one chunk, the unchunked passes) when the pseudo-head scratch of all
/// heads, `h · per_head`, is at most `budget + acc` (chunking would add `acc`, the f32
/// accumulators of `dq, dk, dv`, and could not save more); else the most heads whose scratch fits
/// `budget`, at least one. So the scratch plus the accumulators stay within `budget + acc` (twice
/// the stored `q, k, v` in f32 by default) unless one head alone exceeds `budget`.
pub(crate) fn chunk_heads(h: usize, per_head: usize, acc: usize, budget: usize) -> usize {
    if h * per_head <= budget + acc { h } else { (budget / per_head.max(1)).clamp(1, h) }
}

/// The counted extra device memory of a backward call, in f32 elements, by region (see
/// `kernels-wgsl/README.md`, "WGSL backward"). Pseudo-head regions hold one chunk's heads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Workspace {
    /// Pseudo outputs `o` (recomputed for a chunk, or the saved f32 `out`) and the recompute's
    /// split-KV partials.
    pub o: usize,
    /// `dout` in f32.
    pub dout: usize,
    /// `xh`, `dy` (head norm).
    pub norm: usize,
    /// `do` (collapse).
    pub dop: usize,
    /// `D`.
    pub dd: usize,
    /// `dqt`, `dkt`, `dvt`.
    pub dqt: usize,
    pub dkv: usize,
    /// Split partials of the dq and dk/dv passes (loop budget only).
    pub splits: usize,
    /// f32 accumulators of `dq, dk, dv` (several chunks only).
    pub acc: usize,
    /// Weight-gradient partials and the chunk's sums.
    pub wgrad: usize,
    /// The recompute's `lse` (its own buffer).
    pub lse: usize,
}

#[cfg(test)]
impl Workspace {
    /// Bytes of all of it.
    pub(crate) fn bytes(&self) -> u64 {
        let w = self;
        4 * (w.o + w.dout + w.norm + w.dop + w.dd + w.dqt + w.dkv + w.splits + w.acc + w.wgrad + w.lse) as u64
    }
}

/// The uniforms of one bind group: the forward recompute's (the shared layout) or the backward's.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bind {
    Forward(Uniforms),
    Backward(Uniforms, BwdUniforms),
}

/// One step of the command buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step {
    /// A dispatch with bind group `group`.
    Pass(usize, Dispatch),
    /// Copy chunk `c`'s weight gradients to the read-back buffer.
    ReadWgrad(usize),
}

/// One chunk of heads `h0 .. h0 + heads`, its weight gradients' count and place in the read-back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub h0: usize,
    pub heads: usize,
    pub n_wgrad: usize,
    pub wgrad_at: usize,
}

/// Everything one backward call launches.
pub(crate) struct BackwardPlan {
    /// Packed weights: the forward's, then (several chunks) each chunk's columns of aq, ak, av
    /// and of the selection tables.
    pub weights: Vec<f32>,
    pub groups: Vec<Bind>,
    pub steps: Vec<Step>,
    pub chunks: Vec<Chunk>,
    /// Whether the forward recomputes `o` (else the saved f32 `out` is uploaded at `op_off` 0).
    pub recompute: bool,
    /// Offsets of `dout` and the chunk's weight-gradient sums in the workspace.
    pub dout_off: u32,
    pub wgrad_off: u32,
    pub ws: Workspace,
    /// f32 elements of the workspace buffer (all of `ws` but `lse`).
    pub ws_len: usize,
    /// Elements of `[dq | dk | dv]` (tensor dtype) and of all weight gradients (f32).
    pub grads_len: usize,
    pub n_wgrad: usize,
    /// Counted pseudo-head scratch of one head (f32 elements), what the chunk rule weighs (read
    /// by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub per_head: usize,
}

/// Bytes of workgroup memory of the dq and dk/dv kernels at tile `t` (the larger of the two).
fn tile_storage_bytes(d: u32, t: u32) -> u64 {
    4 * (2 * t as u64 * d as u64 + 2 * t as u64)
}

/// Loop iterations per invocation of the backward kernels, counted as written (see
/// `launch::loops`): each must stay under the adapter's budget (llvmpipe) or the call is refused.
mod loops {
    /// The dq pass over `tiles` key tiles of `t` keys.
    pub fn dq(d: u64, hq: u64, hk: u64, t: u64, tiles: u64) -> u64 {
        let half = d / 2;
        half * (1 + hq) + tiles * (1 + half * (1 + hk) + t * (1 + 2 * half)) + half
    }

    /// The dk/dv pass over `tiles` query tiles of `t` queries.
    pub fn dkdv(d: u64, hq: u64, hk: u64, t: u64, tiles: u64) -> u64 {
        let half = d / 2;
        half * (1 + hk) + tiles * (1 + half * (1 + hq) + t * (1 + 2 * half)) + half
    }

    /// The pre pass: stage 0 (head norm) and stage 1 (`do`, `D`), the larger.
    pub fn pre(d: u64, h: u64, p: u64) -> u64 {
        (6 * d + h * p * (1 + d)).max(d / 2 * (1 + h))
    }

    /// Mix-back: every (head, pseudo-head) of a token.
    pub fn mix(h: u64, p: u64) -> u64 {
        h * (1 + p)
    }

    /// Weight gradients: a chunk's rows, or the chunks.
    pub fn wgrad(d: u64, chunk_rows: u64, chunks: u64) -> u64 {
        (chunk_rows * (1 + d)).max(chunks)
    }
}

/// Columns `h0 .. h0 + g` of a `[rows, H, P]` matrix (aq, ak, av), or of an `[H, P]` table
/// (`rows` = 1).
fn columns(x: &[f32], rows: usize, h: usize, p: usize, h0: usize, g: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| x[(r * h + h0) * p..(r * h + h0 + g) * p].iter().copied()).collect()
}

/// Plan a validated backward problem on a device with `limits`.
pub(crate) fn plan(
    problem: &Problem,
    w: &Weights,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
    chunking: Chunking,
) -> Result<BackwardPlan> {
    let c = &problem.cfg;
    let (b, n, m, h, p, d) = (problem.batch, problem.n, problem.m, c.heads, c.pseudo, c.head_dim);
    let (hq, hk) = (c.q_heads, c.kv_heads);
    let (nq, nk) = (n * p, m * p);
    let d32 = to_u32("head dim", d)?;
    let key = |kind| KernelKey { kind, dtype: problem.dtype, d: d32 };
    let direct = !problem.collapse && !problem.norm;

    // The forward with its output in the f32 scratch (pseudo outputs, no epilogue): its plan gives
    // the shared uniforms and weights, and its passes recompute `o` unless the saved `out` is `o`
    // in f32 (a saved f16/bf16 `out` would put its rounding into D = <do, o>).
    let mut fwd_problem = *problem;
    fwd_problem.collapse = false;
    fwd_problem.norm = true; // not direct: the attention kernel writes `o` to the f32 scratch
    let mut fwd = launch::plan(&fwd_problem, w, Variant::Flash, None, limits, loop_budget)?;
    fwd.passes.retain(|pass| !matches!(pass.key.kind, Kind::Epilogue { .. }));
    let recompute = !(direct && problem.dtype == DType::F32);
    let (mut weights, mut u) = (fwd.weights.clone(), fwd.uniforms);
    u.collapse = problem.collapse as u32;
    u.direct = 0;
    u.splits = 1;

    // Tile of the dq and dk/dv passes.
    let t = TILES
        .into_iter()
        .find(|&t| {
            t <= limits.max_compute_invocations_per_workgroup
                && t <= limits.max_compute_workgroup_size_x
                && tile_storage_bytes(d32, t) <= limits.max_compute_workgroup_storage_size as u64
        })
        .ok_or_else(|| Error::Unsupported {
            backend: "wgpu",
            why: format!(
                "the backward's smallest tile for d = {d} needs {} bytes of workgroup memory, above this \
                     adapter's {}",
                tile_storage_bytes(d32, 4),
                limits.max_compute_workgroup_storage_size
            ),
        })?;
    let q_tiles = nq.div_ceil(t as usize);
    let k_tiles = nk.div_ceil(t as usize);
    let pn = if problem.collapse { 1 } else { p };
    let group = matches!(w.norm.as_ref().map(|n| n.kind()), Some(NormKind::Group));
    // Weight gradients: rows of the longest sum, and the count of a chunk of `g` heads
    // (`[daq | dak | dav]` of its columns, `dr` of its columns, and dgamma, dbeta with the last).
    let rows = (b * n * pn).max(b * m);
    let row_chunks = rows.div_ceil(CHUNK_ROWS as usize);
    let norm_wgrad = if problem.norm { h * d } else { 0 } + if group { h * d } else { 0 };
    let chunk_wgrad = |g: usize, last: bool| {
        (hq + 2 * hk) * g * p + if problem.collapse { h * g * p } else { 0 } + if last { norm_wgrad } else { 0 }
    };

    // Under a loop budget (llvmpipe), the dq pass splits each query tile's key tiles and the dk/dv
    // pass each key tile's query tiles into the fewest ranges that fit (partials summed in order).
    let (mut q_splits, mut k_splits) = (1usize, 1usize);
    if let Some(budget) = loop_budget {
        let (d64, hq, hk, t64) = (d as u64, hq as u64, hk as u64, t as u64);
        let key_tiles = max_key_tiles(problem, t as usize, t as usize);
        let query_tiles = match c.window {
            Some(win) => q_tiles.min((t as usize + win.left.min(nk) + win.right.min(nk)).div_ceil(t as usize) + 1),
            None => q_tiles,
        };
        // Fewest ranges of `tiles` whose share stays under the budget, or None.
        let fit = |cost: &dyn Fn(u64) -> u64, tiles: usize| -> Option<usize> {
            let (fixed, per) = (cost(0), cost(1) - cost(0));
            let per_split = budget.saturating_sub(fixed) / per;
            (per_split > 0).then(|| tiles.div_ceil(per_split as usize).max(1))
        };
        let dq = |x: u64| loops::dq(d64, hq, hk, t64, x);
        let dkdv = |x: u64| loops::dkdv(d64, hq, hk, t64, x);
        q_splits = fit(&dq, key_tiles).ok_or_else(|| over_budget("backward dq", dq(1), budget))?;
        k_splits = fit(&dkdv, query_tiles).ok_or_else(|| over_budget("backward dk/dv", dkdv(1), budget))?;
        let counts = [
            ("backward pre", loops::pre(d64, h as u64, p as u64)),
            ("backward mix-back", loops::mix(h as u64, p as u64)),
            ("backward weight-gradient", loops::wgrad(d64, CHUNK_ROWS as u64, row_chunks as u64)),
            ("backward split-sum", q_splits.max(k_splits) as u64 + 1),
        ];
        if let Some((kernel, iterations)) = counts.into_iter().find(|x| x.1 > budget) {
            return Err(over_budget(kernel, iterations, budget));
        }
    }

    // Chunks of heads: the pseudo-head scratch of one head (f32 elements; the forward's split-KV
    // partials, when it splits, come on top) against the budget.
    let (o_head, kv_head) = (b * n * p * d, b * m * p * d);
    let (q_len, kv_len) = (b * n * hq * d, b * m * hk * d);
    let grads_len = q_len + 2 * kv_len;
    let per_head = if recompute { o_head + b * nq } else { 0 } // o, recomputed lse
        + if problem.collapse { o_head } else { 0 } // do
        + b * nq + o_head + 2 * kv_head // D, dqt, dkt, dvt
        + if q_splits > 1 { q_splits * o_head } else { 0 }
        + if k_splits > 1 { k_splits * 2 * kv_head } else { 0 }
        + (row_chunks + 1) * chunk_wgrad(1, false);
    let g = match chunking.heads {
        Some(g) => g.clamp(1, h),
        None => chunk_heads(h, per_head, grads_len, chunking.budget.unwrap_or(grads_len)),
    };
    let n_chunks = h.div_ceil(g);
    let mut chunks = Vec::with_capacity(n_chunks);
    let mut wgrad_at = 0;
    for h0 in (0..h).step_by(g) {
        let heads = g.min(h - h0);
        let n_wgrad = chunk_wgrad(heads, h0 + heads == h);
        chunks.push(Chunk { h0, heads, n_wgrad, wgrad_at });
        wgrad_at += n_wgrad;
    }
    let n_wgrad = wgrad_at;

    // Per chunk: the shared uniforms over its heads (its columns of the mixing matrices and
    // selection tables appended to the weights), and the forward recompute of its `o` with the
    // unchunked plan's split-KV ranges (so each head's `o` is the unchunked one, bit for bit).
    let mut chunk_u = Vec::with_capacity(n_chunks);
    let mut chunk_fwd = Vec::with_capacity(n_chunks);
    for ch in &chunks {
        if n_chunks == 1 {
            chunk_u.push(u);
            chunk_fwd.push(recompute.then(|| (fwd.uniforms, fwd.passes.clone(), fwd.op_bytes)));
            continue;
        }
        let (aq, ak, av) = (
            columns(&w.aq, hq, h, p, ch.h0, ch.heads),
            columns(&w.ak, hk, h, p, ch.h0, ch.heads),
            columns(&w.av, hk, h, p, ch.h0, ch.heads),
        );
        let mut cu = u;
        cu.heads = to_u32("heads", ch.heads)?;
        let mut push = |x: &[f32]| -> Result<u32> {
            let off = to_u32("weights buffer", weights.len())?;
            weights.extend_from_slice(x);
            Ok(off)
        };
        cu.aq_off = push(&aq)?;
        cu.ak_off = push(&ak)?;
        cu.av_off = push(&av)?;
        for sel in [&mut cu.sel_q, &mut cu.sel_k, &mut cu.sel_v] {
            if *sel != DENSE {
                let table = &fwd.weights[*sel as usize..*sel as usize + h * p];
                *sel = push(&columns(table, 1, h, p, ch.h0, ch.heads))?;
            }
        }
        chunk_fwd.push(if recompute {
            let mut cp = fwd_problem;
            cp.cfg.heads = ch.heads;
            cp.cfg.rope = None; // the chunk reads the call's RoPE table (no second table)
            let cw = Weights { aq, ak, av, r: None, norm: None };
            let mut f = launch::plan(&cp, &cw, Variant::Flash, Some(fwd.uniforms.splits), limits, loop_budget)?;
            f.passes.retain(|pass| !matches!(pass.key.kind, Kind::Epilogue { .. }));
            let fu = &mut f.uniforms;
            (fu.aq_off, fu.ak_off, fu.av_off) = (cu.aq_off, cu.ak_off, cu.av_off);
            (fu.sel_q, fu.sel_k, fu.sel_v) = (cu.sel_q, cu.sel_k, cu.sel_v);
            (fu.rope, fu.rope_off) = (u.rope, u.rope_off);
            Some((f.uniforms, f.passes, f.op_bytes))
        } else {
            None
        });
        chunk_u.push(cu);
    }

    // Workspace layout (f32 elements); pseudo-head regions sized for the largest chunk.
    let t_len: usize = problem.out_shape().iter().product();
    let o = match recompute {
        true => chunk_fwd.iter().flatten().map(|f| (f.2 / 4) as usize).max().unwrap_or(0),
        false => b * n * h * p * d,
    };
    let mut ws = Workspace { o, ..Default::default() };
    let mut cursor = ws.o;
    let mut alloc = |len: usize, count: &mut usize| -> Result<u32> {
        let off = to_u32("backward workspace offset", cursor)?;
        cursor += len;
        *count += len;
        Ok(off)
    };
    let mut bw = BwdUniforms { op_off: 0, pn: pn as u32, chunk_rows: CHUNK_ROWS, ..Default::default() };
    bw.dout_off = alloc(t_len, &mut ws.dout)?;
    if problem.norm {
        bw.xh_off = alloc(t_len, &mut ws.norm)?;
        bw.dy_off = alloc(t_len, &mut ws.norm)?;
    } else {
        bw.dy_off = bw.dout_off;
    }
    bw.dop_off = if problem.collapse { alloc(g * o_head, &mut ws.dop)? } else { bw.dy_off };
    bw.dd_off = alloc(b * g * nq, &mut ws.dd)?;
    // dqt, dkt, dvt contiguous (backward_sum.wgsl walks them as one region).
    bw.dqt_off = alloc(g * o_head, &mut ws.dqt)?;
    bw.dkt_off = alloc(g * kv_head, &mut ws.dkv)?;
    bw.dvt_off = alloc(g * kv_head, &mut ws.dkv)?;
    bw.dq_part_off = if q_splits > 1 { alloc(q_splits * g * o_head, &mut ws.splits)? } else { 0 };
    bw.dkv_part_off = if k_splits > 1 { alloc(k_splits * 2 * g * kv_head, &mut ws.splits)? } else { 0 };
    bw.acc_off = if n_chunks > 1 { alloc(grads_len, &mut ws.acc)? } else { 0 };
    let max_wgrad = chunks.iter().map(|ch| ch.n_wgrad).max().unwrap_or(0);
    bw.wpart_off = alloc(row_chunks * max_wgrad, &mut ws.wgrad)?;
    bw.wgrad_off = alloc(max_wgrad, &mut ws.wgrad)?;
    let ws_len = cursor;
    ws.lse = if recompute { b * g * nq } else { 0 };
    to_u32("backward workspace elements (kernels index it with u32)", ws_len)?;
    bw.q_splits = to_u32("dq splits", q_splits)?;
    bw.k_splits = to_u32("dk/dv splits", k_splits)?;
    bw.chunks = to_u32("weight-gradient chunks", row_chunks)?;
    bw.scale = c.softmax_scale();
    bw.dk_at = to_u32("dq elements", q_len)?;
    bw.dv_at = to_u32("dq + dk elements", q_len + kv_len)?;
    to_u32("gradient elements", grads_len)?;
    bw.mix_pairs = to_u32("mix-back threads", grads_len / 2)?;
    bw.k_tiles = to_u32("key tiles", k_tiles)?;
    bw.h_all = to_u32("heads", h)?;

    // Bind groups and steps: per chunk, [recompute o], [pre 0], pre 1, dq, dk/dv, [split sums],
    // mix-back, weight gradients, their read-back. With a collapse and a norm over several
    // chunks, `y` needs every chunk's `o` before any `dy`: a first sweep recomputes `o` and adds
    // each chunk's columns to `y` (pre 0, the last chunk also the norm), then the second sweep
    // recomputes `o` again for `D` and `dr` (one more forward's attention work).
    let threads = |what: &'static str, x: usize| to_u32(what, x.div_ceil(VEC_WG as usize));
    let two_sweeps = n_chunks > 1 && problem.collapse && problem.norm;
    let mut groups = Vec::new();
    let mut fwd_steps = Vec::new();
    let mut steps = Vec::new();
    for (i, (ch, cu)) in chunks.iter().zip(&chunk_u).enumerate() {
        let mut cu = *cu;
        cu.q_tiles = to_u32("query tiles", q_tiles)?;
        let fwd_group = chunk_fwd[i].as_ref().map(|f| {
            groups.push(Bind::Forward(f.0));
            (groups.len() - 1, f.1.clone())
        });
        let gh = ch.heads;
        let mut cb = bw;
        cb.h0 = to_u32("heads", ch.h0)?;
        cb.first = (i == 0) as u32;
        cb.last = (i + 1 == n_chunks) as u32;
        (cb.o_heads, cb.o_h0) = if recompute { (gh as u32, 0) } else { (h as u32, cb.h0) };
        cb.n_wgrad = to_u32("weight gradients", ch.n_wgrad)?;
        cb.n_pseudo = to_u32("pseudo vectors", b * n * gh * p)?;
        let n_out_vec = if problem.collapse { b * n * h } else { b * n * gh * p };
        cb.n_out_vec = to_u32("output vectors", n_out_vec)?;
        cb.sum_len = to_u32("pseudo-gradient elements", gh * (o_head + 2 * kv_head))?;
        groups.push(Bind::Backward(cu, cb));
        let group = groups.len() - 1;
        let pass = |kind, workgroups: u32| Step::Pass(group, Dispatch { key: key(kind), workgroups });
        let fwd_passes = || fwd_group.iter().flat_map(|(fg, ps)| ps.iter().map(|d| Step::Pass(*fg, *d)));
        let pre0 = pass(Kind::BwdPre { wg: VEC_WG, stage: 0 }, threads("output vectors", n_out_vec)?);
        if two_sweeps {
            fwd_steps.extend(fwd_passes());
            fwd_steps.push(pre0);
        }
        steps.extend(fwd_passes());
        if problem.norm && !two_sweeps {
            steps.push(pre0);
        }
        steps.push(pass(Kind::BwdPre { wg: VEC_WG, stage: 1 }, threads("vectors", b * n * gh * p)?));
        steps.push(pass(Kind::BwdDq { t }, to_u32("workgroups", q_tiles * gh * b * q_splits)?));
        steps.push(pass(Kind::BwdDkdv { t }, to_u32("workgroups", k_tiles * gh * b * k_splits)?));
        if q_splits > 1 || k_splits > 1 {
            steps.push(pass(Kind::BwdSum { wg: VEC_WG }, threads("elements", gh * (o_head + 2 * kv_head))?));
        }
        steps.push(pass(Kind::BwdMix { wg: VEC_WG }, threads("pairs", grads_len / 2)?));
        steps.push(pass(Kind::BwdWgrad { wg: VEC_WG, stage: 0 }, threads("partials", row_chunks * ch.n_wgrad)?));
        steps.push(pass(Kind::BwdWgrad { wg: VEC_WG, stage: 1 }, threads("gradients", ch.n_wgrad)?));
        steps.push(Step::ReadWgrad(i));
    }
    let steps: Vec<Step> = fwd_steps.into_iter().chain(steps).collect();

    // Bindings under the adapter's limits, never truncated.
    let es = problem.dtype.size() as u128;
    let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as u128;
    for (what, bytes) in [
        ("backward f32 workspace", 4 * ws_len as u128),
        ("gradients dq, dk, dv", grads_len as u128 * es),
        ("weights", 4 * weights.len() as u128),
    ] {
        if bytes > max {
            return Err(Error::Unsupported {
                backend: "wgpu",
                why: format!(
                    "{what} needs {bytes} bytes, above this adapter's largest storage binding ({max} bytes); \
                     split the batch or the sequence"
                ),
            });
        }
    }
    for step in &steps {
        if let Step::Pass(_, pass) = step {
            launch::grid(pass.workgroups, limits)?;
        }
    }
    let (dout_off, wgrad_off) = (bw.dout_off, bw.wgrad_off);
    Ok(BackwardPlan {
        weights,
        groups,
        steps,
        chunks,
        recompute,
        dout_off,
        wgrad_off,
        ws,
        ws_len,
        grads_len,
        n_wgrad,
        per_head,
    })
}

/// The backward on host tensors: upload, run the passes, read back, then (only then, with no
/// error) write the caller's gradients.
pub(super) fn run(be: &WgpuBackend, problem: &Problem, w: &Weights, io: BackwardIo<'_>) -> Result<()> {
    be.check_faults()?;
    let limits = be.device().limits();
    let plan = plan(problem, w, &limits, be.loop_budget(), Chunking::of(be.backward_chunk_heads))?;
    let es = problem.dtype.size() as u64;
    let grads_bytes = plan.grads_len as u64 * es;
    let wgrad_bytes = 4 * plan.n_wgrad as u64;
    let dout = io.dout.data.to_f32();
    let out = (!plan.recompute).then(|| io.out.data.to_f32());
    let bytes = be.scoped(|| {
        use wgpu::BufferUsages as U;
        let device = be.device();
        let q = be.upload("q", io.q.data.bytes(), U::STORAGE);
        let k = be.upload("k", io.k.data.bytes(), U::STORAGE);
        let v = be.upload("v", io.v.data.bytes(), U::STORAGE);
        let lse = be.upload("lse", bytemuck::cast_slice(io.lse), U::STORAGE);
        let ws =
            be.buffer("headmix backward workspace", 4 * plan.ws_len as u64, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        be.queue.write_buffer(&ws, 4 * plan.dout_off as u64, bytemuck::cast_slice(&dout));
        if let Some(out) = &out {
            be.queue.write_buffer(&ws, 0, bytemuck::cast_slice(out)); // o at offset 0
        }
        let grads = be.buffer("headmix gradients", grads_bytes, U::STORAGE | U::COPY_SRC);
        let weights = be.upload("headmix weights", bytemuck::cast_slice(&plan.weights), U::STORAGE);
        // The forward recompute writes its pseudo outputs to the workspace at 0 and its lse to a
        // scratch buffer (the caller's saved lse stays the statistic of the backward).
        let lse_scratch = be.buffer("headmix recomputed lse", 4 * plan.ws.lse.max(1) as u64, U::STORAGE);
        let unused = be.buffer("headmix unused binding", 16, U::STORAGE);
        let bind = |layout: &wgpu::BindGroupLayout, buffers: &[&wgpu::Buffer]| {
            let entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("headmix backward"),
                layout,
                entries: &entries,
            })
        };
        let mut groups = Vec::with_capacity(plan.groups.len());
        for group in &plan.groups {
            groups.push(match group {
                Bind::Forward(fu) => {
                    let fu = be.upload("headmix uniforms", bytemuck::bytes_of(fu), U::UNIFORM);
                    bind(&be.kernels.layout, &[&fu, &weights, &q, &k, &v, &unused, &lse_scratch, &ws])
                }
                Bind::Backward(cu, cb) => {
                    let cb = BwdUniforms { fault: be.backward_fault, ..*cb };
                    let cu = be.upload("headmix uniforms", bytemuck::bytes_of(cu), U::UNIFORM);
                    let cb = be.upload("headmix backward uniforms", bytemuck::bytes_of(&cb), U::UNIFORM);
                    bind(&be.kernels.backward_layout.0, &[&cu, &weights, &q, &k, &v, &grads, &lse, &ws, &cb])
                }
            });
        }
        let staging = be.buffer("read back", grads_bytes + wgrad_bytes, U::MAP_READ | U::COPY_DST);
        let mut enc = device.create_command_encoder(&Default::default());
        for step in &plan.steps {
            match *step {
                Step::Pass(group, dispatch) => {
                    let pipeline = be.kernels.pipeline(&dispatch.key)?;
                    let (x, y) = launch::grid(dispatch.workgroups, &limits)?;
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("headmix backward"),
                        timestamp_writes: None,
                    });
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &groups[group], &[]);
                    pass.dispatch_workgroups(x, y, 1);
                }
                Step::ReadWgrad(i) => {
                    let ch = &plan.chunks[i];
                    let (src, dst) = (4 * plan.wgrad_off as u64, grads_bytes + 4 * ch.wgrad_at as u64);
                    enc.copy_buffer_to_buffer(&ws, src, &staging, dst, 4 * ch.n_wgrad as u64);
                }
            }
        }
        enc.copy_buffer_to_buffer(&grads, 0, &staging, 0, grads_bytes);
        be.queue.submit([enc.finish()]);
        be.read_back(&staging)
    })?;

    // Only now, with the device work done and no error, touch the caller's outputs.
    let (mut dq, mut dk, mut dv, dw) = (io.dq, io.dk, io.dv, io.dw);
    let (q_bytes, kv_bytes) = (dq.data.bytes_mut().len(), dk.data.bytes_mut().len());
    dq.data.bytes_mut().copy_from_slice(&bytes[..q_bytes]);
    dk.data.bytes_mut().copy_from_slice(&bytes[q_bytes..q_bytes + kv_bytes]);
    dv.data.bytes_mut().copy_from_slice(&bytes[q_bytes + kv_bytes..q_bytes + 2 * kv_bytes]);
    let g: Vec<f32> = bytes[grads_bytes as usize..]
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().expect("4 bytes")))
        .collect();
    // Each chunk's gradients in their places: `[daq | dak | dav]` of its columns, `dr` of its
    // columns, and (last chunk) dgamma, dbeta.
    let c = &problem.cfg;
    let (h, p) = (c.heads, c.pseudo);
    let mut dr = dw.dr;
    let mut rest = [dw.dgamma, dw.dbeta];
    let mut mats = [(dw.daq, c.q_heads), (dw.dak, c.kv_heads), (dw.dav, c.kv_heads)];
    for ch in &plan.chunks {
        let mut at = ch.wgrad_at;
        let (cols, col0) = (ch.heads * p, ch.h0 * p);
        let mut put = |dst: &mut [f32], rows: usize| {
            for r in 0..rows {
                dst[r * h * p + col0..r * h * p + col0 + cols].copy_from_slice(&g[at..at + cols]);
                at += cols;
            }
        };
        for (dst, rows) in mats.iter_mut() {
            put(dst, *rows);
        }
        if let (true, Some(dst)) = (problem.collapse, dr.as_deref_mut()) {
            put(dst, h);
        }
        if ch.h0 + ch.heads == h {
            for dst in rest.iter_mut().flatten() {
                dst.copy_from_slice(&g[at..at + dst.len()]);
                at += dst.len();
            }
        }
        debug_assert_eq!(at, ch.wgrad_at + ch.n_wgrad);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, HeadNorm, Method};

    /// A dense custom configuration with a collapse: `h` heads mixed from `stored` stored heads.
    fn custom(h: usize, stored: usize, p: usize, d: usize) -> (Config, Weights) {
        let mut cfg = Method::Custom.config(h, h, 1, d, 0).unwrap();
        (cfg.q_heads, cfg.kv_heads, cfg.pseudo) = (stored, stored, p);
        let mix = vec![0.3; stored * h * p];
        let w = Weights { aq: mix.clone(), ak: mix.clone(), av: mix, r: Some(vec![0.1; h * h * p]), norm: None };
        (cfg, w)
    }

    fn plan_of(cfg: &Config, w: &Weights, n: usize, dtype: DType, chunking: Chunking) -> BackwardPlan {
        let problem = Problem::for_weights(cfg, w, 1, n, n, dtype).unwrap();
        plan(&problem, w, &wgpu::Limits::default(), None, chunking).unwrap()
    }

    /// Under a budget of four pseudo-heads' scratch, `P = 1, 2, 4` at `H = 8` run 4, 2, 1 heads
    /// per chunk and the counted workspace is the same to the byte: it does not grow with `P`.
    #[test]
    fn workspace_under_a_budget_does_not_grow_with_p() {
        let (n, d) = (2048, 16); // enough query tiles that the recompute never splits the keys
        let (cfg, w) = custom(8, 2, 1, d);
        let u = plan_of(&cfg, &w, n, DType::F32, Chunking::default()).per_head;
        let budget = Chunking { heads: None, budget: Some(4 * u + u / 2) };
        let mut bytes = Vec::new();
        for p in [1, 2, 4] {
            let (cfg, w) = custom(8, 2, p, d);
            let plan = plan_of(&cfg, &w, n, DType::F32, budget);
            assert_eq!(plan.per_head, p * u, "one head's scratch is P pseudo-heads'");
            assert_eq!(plan.chunks.len(), 2 * p, "P = {p}");
            assert!(plan.chunks.iter().all(|c| c.heads == 4 / p), "P = {p}: {:?}", plan.chunks);
            bytes.push(plan.ws.bytes());
        }
        assert!(bytes.iter().all(|&b| b == bytes[0]), "workspace bytes for P = 1, 2, 4: {bytes:?}");
        // Without the budget every head is one chunk and the workspace grows with P.
        let whole = |p| {
            let (cfg, w) = custom(8, 2, p, d);
            plan_of(&cfg, &w, n, DType::F32, Chunking { heads: Some(usize::MAX), budget: None }).ws.bytes()
        };
        assert!(whole(4) > 3 * whole(1), "the negative control: one chunk grows with P");
    }

    /// One chunk is today's plan: the same workspace to the element (the formula of
    /// `kernels-wgsl/README.md` before chunking) and the same passes.
    #[test]
    fn one_chunk_is_the_unchunked_plan() {
        let (n, d) = (40, 16);
        let mut norm_collapse = custom(3, 3, 2, d);
        norm_collapse.1.norm = Some(HeadNorm::Rms { gamma: vec![1.0; 3 * d] });
        let mea = (Config::mea(4, d), Weights::random(&Config::mea(4, d), 1));
        let cases = [
            (Config::mha(4, d), Weights::random(&Config::mha(4, d), 1)),
            (Config::iha(2, 3, d), Weights::random(&Config::iha(2, 3, d), 1)),
            mea,
            norm_collapse,
        ];
        for (cfg, w) in &cases {
            for dtype in [DType::F32, DType::BF16] {
                let problem = Problem::for_weights(cfg, w, 1, n, n, dtype).unwrap();
                let plan =
                    plan(&problem, w, &wgpu::Limits::default(), None, Chunking { heads: Some(99), budget: None })
                        .unwrap();
                let (h, p, hq, hk) = (cfg.heads, cfg.pseudo, cfg.q_heads, cfg.kv_heads);
                let (o, kv, t) = (n * h * p * d, n * h * p * d, problem.out_shape().iter().product::<usize>());
                let mut fwd_problem = problem;
                (fwd_problem.collapse, fwd_problem.norm) = (false, true);
                let fwd = launch::plan(&fwd_problem, w, Variant::Flash, None, &wgpu::Limits::default(), None).unwrap();
                let recompute = problem.collapse || problem.norm || dtype != DType::F32;
                let rows = (n * if problem.collapse { 1 } else { p }).max(n);
                let n_wgrad = (hq + 2 * hk) * h * p
                    + if problem.collapse { h * h * p } else { 0 }
                    + if problem.norm { h * d } else { 0 }
                    + if w.norm.as_ref().and_then(|x| x.beta()).is_some() { h * d } else { 0 };
                let today = if recompute { (fwd.op_bytes / 4) as usize } else { o }
                    + t
                    + if problem.norm { 2 * t } else { 0 }
                    + if problem.collapse { o } else { 0 }
                    + h * n * p
                    + o
                    + 2 * kv
                    + (rows.div_ceil(32) + 1) * n_wgrad;
                let label = format!("{:?} {dtype:?}", cfg.method);
                assert_eq!(plan.ws_len, today, "{label}");
                assert_eq!(plan.ws.lse, if recompute { h * n * p } else { 0 }, "{label}");
                assert_eq!(plan.chunks.len(), 1, "{label}");
                let passes = plan.steps.iter().filter(|s| matches!(s, Step::Pass(..))).count();
                let fwd_passes = if recompute { fwd.passes.len() - 1 } else { 0 }; // no epilogue
                assert_eq!(passes, fwd_passes + problem.norm as usize + 6, "{label}");
            }
        }
    }

    /// The default budget (the stored q, k, v in f32) at the size of BENCHMARKS.md's table
    /// (`B = 1`, `N = M = 4096`, `H = 8`, `d = 64`, bf16): MHA and MEA keep one chunk (chunking
    /// would add more accumulators than it saves), GQA and IHA `P = 2` run chunks whose scratch
    /// stays under the budget.
    #[test]
    fn default_budget_chunks_only_where_it_saves() {
        let (n, d) = (4096, 64);
        let gqa = Config::gqa(8, 2, d).unwrap();
        let cases = [(Config::mha(8, d), 1), (Config::mea(8, d), 1), (gqa, 4), (Config::iha(8, 2, d), 4)];
        for (cfg, chunks) in cases {
            let w = Weights::random(&cfg, 1);
            let plan = plan_of(&cfg, &w, n, DType::BF16, Chunking::default());
            assert_eq!(plan.chunks.len(), chunks, "{:?}", cfg.method);
            let stored = n * (cfg.q_heads + 2 * cfg.kv_heads) * d;
            if chunks > 1 {
                assert!(plan.chunks[0].heads * plan.per_head <= stored, "{:?}", cfg.method);
            }
        }
        assert_eq!(chunk_heads(8, 10, 0, 35), 3);
        assert_eq!(chunk_heads(8, 10, 50, 35), 8, "chunking would not save: one chunk");
        assert_eq!(chunk_heads(8, 100, 0, 35), 1, "at least one head");
    }

    /// The chunk size is read in one place: a backend's forced size, else the environment
    /// variable (a positive integer; anything else is ignored), else the budget.
    #[test]
    fn chunk_size_comes_from_the_backend_then_the_environment() {
        // SAFETY: no other test of this binary reads or writes this variable.
        let set = |v: Option<&str>| unsafe {
            match v {
                Some(v) => std::env::set_var(CHUNK_HEADS_VAR, v),
                None => std::env::remove_var(CHUNK_HEADS_VAR),
            }
        };
        set(None);
        assert_eq!(Chunking::of(None), Chunking::default());
        assert_eq!(Chunking::of(Some(3)).heads, Some(3));
        set(Some("2"));
        assert_eq!(Chunking::of(None).heads, Some(2));
        assert_eq!(Chunking::of(Some(3)).heads, Some(3), "the backend's setting wins");
        for junk in ["0", "two", ""] {
            set(Some(junk));
            assert_eq!(Chunking::of(None).heads, None, "{junk:?} is ignored");
        }
        set(None);
    }

    /// The counted workspace table of BENCHMARKS.md ("wgpu backward extra device memory"):
    /// `cargo test --release -p headmix --lib -- --ignored wgpu_backward_workspace_table --nocapture`.
    #[test]
    #[ignore = "prints a table"]
    fn wgpu_backward_workspace_table() {
        let (n, d) = (4096, 64);
        let mib = |x: usize| format!("{:.2} MiB", 4.0 * x as f64 / (1u64 << 20) as f64);
        let cases = [
            ("mha", Config::mha(8, d)),
            ("gqa (Hk = 2)", Config::gqa(8, 2, d).unwrap()),
            ("mea (Rms norm)", Config::mea(8, d)),
            ("iha P = 2 (collapse)", Config::iha(8, 2, d)),
            ("iha-local P = 2, W = 512", Config::iha_local(8, 2, d, n).unwrap()),
        ];
        for (name, cfg) in cases {
            let mut w = Weights::random(&cfg, 1);
            if cfg.method == Method::Mea {
                w.norm = Some(HeadNorm::Rms { gamma: vec![1.0; 8 * d] });
            }
            for (rule, chunking) in
                [("one chunk", Chunking { heads: Some(99), budget: None }), ("default", Chunking::default())]
            {
                let plan = plan_of(&cfg.with_causal(true), &w, n, DType::BF16, chunking);
                let ws = plan.ws;
                let g = plan.chunks[0].heads;
                println!(
                    "| {name} | {rule}: {} x {g} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    plan.chunks.len(),
                    mib(ws.o),
                    mib(ws.dout),
                    mib(ws.norm),
                    mib(ws.dop),
                    mib(ws.dqt),
                    mib(ws.dkv),
                    mib(ws.dd + ws.lse),
                    mib(ws.acc),
                    mib(ws.wgrad),
                    mib(ws.bytes() as usize / 4),
                );
            }
        }
    }
}
