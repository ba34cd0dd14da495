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
use super::launch::{self, Dispatch, Uniforms, max_key_tiles, over_budget, to_u32};
use crate::validate::Problem;
use crate::{BackwardIo, DType, Error, NormKind, Result, Weights};

/// Threads per workgroup of the per-vector kernels (pre, mix-back, weight gradients).
const VEC_WG: u32 = 64;
/// Rows (tokens or output vectors) per weight-gradient partial.
const CHUNK_ROWS: u32 = 32;
/// Tile sizes (virtual queries / keys per tile = threads per workgroup) of the dq and dk/dv
/// passes, largest first: the largest whose workgroup memory fits is used.
const TILES: [u32; 4] = [32, 16, 8, 4];

/// The backward's own uniforms, word for word `Bwd` in `backward_common.wgsl` (binding 8).
/// Offsets are in f32 elements of the workspace (binding 7), except `dk_at`, `dv_at` (elements of
/// the gradient tensor buffer `[dq | dk | dv]`, binding 5).
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
}

/// Everything one backward call launches.
pub(crate) struct BackwardPlan {
    /// The forward's uniforms, weights and attention (+ combine) passes that recompute the pseudo
    /// outputs into the workspace; `None` when the saved f32 `out` is them (no collapse, no norm).
    pub recompute: Option<launch::Plan>,
    /// The shared uniforms and packed weights the backward kernels read.
    pub uniforms: Uniforms,
    pub weights: Vec<f32>,
    pub bw: BwdUniforms,
    /// The backward passes, in launch order.
    pub passes: Vec<Dispatch>,
    /// f32 elements of the workspace, with `o = B·N·H·P·d` (pseudo outputs), `t` = the output's
    /// size, `kv = B·M·H·P·d`: `o` (recomputed pseudo outputs, or the saved f32 `out`; plus the
    /// recompute's split-KV partials when it splits) + `t` (`dout` in f32) + `2t` (`xh`, `dy`,
    /// with a head norm) + `o` (`do`, with a collapse) + `B·H·N·P` (`D`) + `o` (`dqt`) + `2·kv`
    /// (`dkt`, `dvt`) + `(ceil(rows / 32) + 1)` times the weight-gradient count (partials, sums);
    /// under a loop budget (llvmpipe) also `q_splits · o` and `k_splits · 2 kv` split partials.
    pub ws_len: usize,
    /// Elements of `[dq | dk | dv]` (tensor dtype).
    pub grads_len: usize,
}

/// Rows of the longest weight-gradient sum and the number of weight-gradient elements.
fn wgrad_sizes(problem: &Problem, w: &Weights) -> (usize, usize) {
    let c = &problem.cfg;
    let (b, n, m, h, p, d) = (problem.batch, problem.n, problem.m, c.heads, c.pseudo, c.head_dim);
    let pn = if problem.collapse { 1 } else { p };
    let group = matches!(w.norm.as_ref().map(|n| n.kind()), Some(NormKind::Group));
    let n_wgrad = (c.q_heads + 2 * c.kv_heads) * h * p
        + if problem.collapse { h * h * p } else { 0 }
        + if problem.norm { h * d } else { 0 }
        + if group { h * d } else { 0 };
    ((b * n * pn).max(b * m), n_wgrad)
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

/// Plan a validated backward problem on a device with `limits`.
pub(crate) fn plan(
    problem: &Problem,
    w: &Weights,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
) -> Result<BackwardPlan> {
    let c = &problem.cfg;
    let (b, n, m, h, p, d) = (problem.batch, problem.n, problem.m, c.heads, c.pseudo, c.head_dim);
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
    let (weights, mut u) = (fwd.weights.clone(), fwd.uniforms);
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
    let (rows, n_wgrad) = wgrad_sizes(problem, w);
    let chunks = rows.div_ceil(CHUNK_ROWS as usize);

    // Under a loop budget (llvmpipe), the dq pass splits each query tile's key tiles and the dk/dv
    // pass each key tile's query tiles into the fewest ranges that fit (partials summed in order).
    let (mut q_splits, mut k_splits) = (1usize, 1usize);
    if let Some(budget) = loop_budget {
        let (d64, hq, hk, t64) = (d as u64, c.q_heads as u64, c.kv_heads as u64, t as u64);
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
            ("backward weight-gradient", loops::wgrad(d64, CHUNK_ROWS as u64, chunks as u64)),
            ("backward split-sum", q_splits.max(k_splits) as u64 + 1),
        ];
        if let Some((kernel, iterations)) = counts.into_iter().find(|x| x.1 > budget) {
            return Err(over_budget(kernel, iterations, budget));
        }
    }

    // Workspace layout (f32 elements).
    let o_len = b * n * h * p * d;
    let kv_len_p = b * m * h * p * d;
    let t_len: usize = problem.out_shape().iter().product();
    let mut cursor = if recompute { (fwd.op_bytes / 4) as usize } else { o_len };
    let mut alloc = |len: usize| -> Result<u32> {
        let off = to_u32("backward workspace offset", cursor)?;
        cursor += len;
        Ok(off)
    };
    let pn = if problem.collapse { 1 } else { p };
    let mut bw = BwdUniforms { op_off: 0, pn: pn as u32, chunk_rows: CHUNK_ROWS, ..Default::default() };
    bw.dout_off = alloc(t_len)?;
    if problem.norm {
        bw.xh_off = alloc(t_len)?;
        bw.dy_off = alloc(t_len)?;
    } else {
        bw.dy_off = bw.dout_off;
    }
    bw.dop_off = if problem.collapse { alloc(o_len)? } else { bw.dy_off };
    bw.dd_off = alloc(b * h * nq)?;
    // dqt, dkt, dvt contiguous (backward_sum.wgsl walks them as one region).
    bw.dqt_off = alloc(o_len)?;
    bw.dkt_off = alloc(kv_len_p)?;
    bw.dvt_off = alloc(kv_len_p)?;
    bw.dq_part_off = if q_splits > 1 { alloc(q_splits * o_len)? } else { 0 };
    bw.dkv_part_off = if k_splits > 1 { alloc(k_splits * 2 * kv_len_p)? } else { 0 };
    bw.wpart_off = alloc(chunks * n_wgrad)?;
    bw.wgrad_off = alloc(n_wgrad)?;
    let ws_len = cursor;
    to_u32("backward workspace elements (kernels index it with u32)", ws_len)?;
    bw.q_splits = to_u32("dq splits", q_splits)?;
    bw.k_splits = to_u32("dk/dv splits", k_splits)?;
    bw.sum_len = to_u32("pseudo-gradient elements", o_len + 2 * kv_len_p)?;
    bw.n_wgrad = to_u32("weight gradients", n_wgrad)?;
    bw.chunks = to_u32("weight-gradient chunks", chunks)?;
    bw.n_pseudo = to_u32("pseudo vectors", b * n * h * p)?;
    bw.n_out_vec = to_u32("output vectors", b * n * h * pn)?;
    bw.scale = c.softmax_scale();
    let (q_len, kv_len) = (b * n * c.q_heads * d, b * m * c.kv_heads * d);
    bw.dk_at = to_u32("dq elements", q_len)?;
    bw.dv_at = to_u32("dq + dk elements", q_len + kv_len)?;
    let grads_len = q_len + 2 * kv_len;
    to_u32("gradient elements", grads_len)?;
    bw.mix_pairs = to_u32("mix-back threads", grads_len / 2)?;
    u.q_tiles = to_u32("query tiles", q_tiles)?;
    bw.k_tiles = to_u32("key tiles", k_tiles)?;

    let threads = |what: &'static str, x: usize| to_u32(what, x.div_ceil(VEC_WG as usize));
    let mut passes = Vec::new();
    if problem.norm {
        passes.push(Dispatch {
            key: key(Kind::BwdPre { wg: VEC_WG, stage: 0 }),
            workgroups: threads("output vectors", b * n * h * pn)?,
        });
    }
    passes.push(Dispatch {
        key: key(Kind::BwdPre { wg: VEC_WG, stage: 1 }),
        workgroups: threads("vectors", b * n * h * p)?,
    });
    passes
        .push(Dispatch { key: key(Kind::BwdDq { t }), workgroups: to_u32("workgroups", q_tiles * h * b * q_splits)? });
    passes.push(Dispatch {
        key: key(Kind::BwdDkdv { t }),
        workgroups: to_u32("workgroups", k_tiles * h * b * k_splits)?,
    });
    if q_splits > 1 || k_splits > 1 {
        passes.push(Dispatch {
            key: key(Kind::BwdSum { wg: VEC_WG }),
            workgroups: threads("elements", o_len + 2 * kv_len_p)?,
        });
    }
    passes.push(Dispatch { key: key(Kind::BwdMix { wg: VEC_WG }), workgroups: threads("pairs", grads_len / 2)? });
    passes.push(Dispatch {
        key: key(Kind::BwdWgrad { wg: VEC_WG, stage: 0 }),
        workgroups: threads("partials", chunks * n_wgrad)?,
    });
    passes.push(Dispatch {
        key: key(Kind::BwdWgrad { wg: VEC_WG, stage: 1 }),
        workgroups: threads("gradients", n_wgrad)?,
    });

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
    for pass in passes.iter().chain(fwd.passes.iter()) {
        launch::grid(pass.workgroups, limits)?;
    }
    Ok(BackwardPlan { recompute: recompute.then_some(fwd), uniforms: u, weights, bw, passes, ws_len, grads_len })
}

/// The backward on host tensors: upload, run the passes, read back, then (only then, with no
/// error) write the caller's gradients.
pub(super) fn run(be: &WgpuBackend, problem: &Problem, w: &Weights, io: BackwardIo<'_>) -> Result<()> {
    be.check_faults()?;
    let limits = be.device().limits();
    let mut plan = plan(problem, w, &limits, be.loop_budget())?;
    plan.bw.fault = be.backward_fault;
    let es = problem.dtype.size() as u64;
    let grads_bytes = plan.grads_len as u64 * es;
    let wgrad_bytes = 4 * plan.bw.n_wgrad as u64;
    let dout = io.dout.data.to_f32();
    let out = plan.recompute.is_none().then(|| io.out.data.to_f32());
    let bytes = be.scoped(|| {
        use wgpu::BufferUsages as U;
        let device = be.device();
        let q = be.upload("q", io.q.data.bytes(), U::STORAGE);
        let k = be.upload("k", io.k.data.bytes(), U::STORAGE);
        let v = be.upload("v", io.v.data.bytes(), U::STORAGE);
        let lse = be.upload("lse", bytemuck::cast_slice(io.lse), U::STORAGE);
        let ws =
            be.buffer("headmix backward workspace", 4 * plan.ws_len as u64, U::STORAGE | U::COPY_DST | U::COPY_SRC);
        be.queue.write_buffer(&ws, 4 * plan.bw.dout_off as u64, bytemuck::cast_slice(&dout));
        if let Some(out) = &out {
            be.queue.write_buffer(&ws, 4 * plan.bw.op_off as u64, bytemuck::cast_slice(out));
        }
        let grads = be.buffer("headmix gradients", grads_bytes, U::STORAGE | U::COPY_SRC);
        let uniforms = be.upload("headmix uniforms", bytemuck::bytes_of(&plan.uniforms), U::UNIFORM);
        let bwu = be.upload("headmix backward uniforms", bytemuck::bytes_of(&plan.bw), U::UNIFORM);
        let weights = be.upload("headmix weights", bytemuck::cast_slice(&plan.weights), U::STORAGE);
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
        let mut groups = Vec::new();
        let mut passes = Vec::new();
        if let Some(fwd) = &plan.recompute {
            // The forward writes its pseudo outputs to the workspace at 0 and its lse to a scratch
            // buffer (the caller's saved lse stays the statistic of the backward).
            let fu = be.upload("headmix uniforms", bytemuck::bytes_of(&fwd.uniforms), U::UNIFORM);
            let lse_scratch = be.buffer("headmix recomputed lse", 4 * problem.lse_len() as u64, U::STORAGE);
            let unused = be.buffer("headmix unused binding", 16, U::STORAGE);
            groups.push(bind(&be.kernels.layout, &[&fu, &weights, &q, &k, &v, &unused, &lse_scratch, &ws]));
            for pass in &fwd.passes {
                passes.push((
                    groups.len() - 1,
                    be.kernels.pipeline(&pass.key)?,
                    launch::grid(pass.workgroups, &limits)?,
                ));
            }
        }
        groups.push(bind(&be.kernels.backward_layout.0, &[&uniforms, &weights, &q, &k, &v, &grads, &lse, &ws, &bwu]));
        for pass in &plan.passes {
            passes.push((groups.len() - 1, be.kernels.pipeline(&pass.key)?, launch::grid(pass.workgroups, &limits)?));
        }
        let mut enc = device.create_command_encoder(&Default::default());
        for (group, pipeline, (x, y)) in &passes {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("headmix backward"),
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &groups[*group], &[]);
            pass.dispatch_workgroups(*x, *y, 1);
        }
        let staging = be.buffer("read back", grads_bytes + wgrad_bytes, U::MAP_READ | U::COPY_DST);
        enc.copy_buffer_to_buffer(&grads, 0, &staging, 0, grads_bytes);
        enc.copy_buffer_to_buffer(&ws, 4 * plan.bw.wgrad_off as u64, &staging, grads_bytes, wgrad_bytes);
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
    let mut at = 0;
    let mut take = |dst: &mut [f32]| {
        dst.copy_from_slice(&g[at..at + dst.len()]);
        at += dst.len();
    };
    take(dw.daq);
    take(dw.dak);
    take(dw.dav);
    for dst in [dw.dr, dw.dgamma, dw.dbeta].into_iter().flatten() {
        take(dst);
    }
    Ok(())
}
