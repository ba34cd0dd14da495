//! The launch plan of one call: the uniform block the kernels read, the packed f32 weights buffer
//! (mixing, collapse, gamma, beta, RoPE table), the kernels to run and their grids.

use bytemuck::{Pod, Zeroable};

use super::Variant;
use super::kernels::{KernelKey, Kind, flash_threads, flash_tiles};
use crate::validate::Problem;
use crate::{Error, PosMode, Result, Weights};

/// Threads per workgroup of the naive kernel and of the epilogue.
const NAIVE_WG: u32 = 64;
pub(crate) const EPILOGUE_WG: u32 = 64;
pub(crate) const COMBINE_WG: u32 = 64;

/// The call's sizes and options, word for word the `Params` struct of `common.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct Uniforms {
    pub batch: u32,
    pub n: u32,
    pub m: u32,
    pub heads: u32,
    pub hq: u32,
    pub hk: u32,
    pub p: u32,
    /// Virtual queries per head, `N·P`.
    pub nq: u32,
    /// Virtual keys per head, `M·P`.
    pub nk: u32,
    /// `(M − N)·P`: key index of virtual query 0 (bottom-right alignment).
    pub off: u32,
    pub causal: u32,
    pub windowed: u32,
    /// Window edges, clamped to `nk` (exact: no key lies further away).
    pub win_left: u32,
    pub win_right: u32,
    /// 0 none, 1 virtual positions, 2 token positions.
    pub rope: u32,
    /// RoPE table layout: 0, one row per position `[pos0, ...)` (the forward); else the levels
    /// (bytes of the largest position) of the byte-level table (decode).
    pub rope_levels: u32,
    pub pos0: u32,
    /// Softmax scale times log2(e): scores come out in the log2 domain.
    pub scale_log2: f32,
    pub aq_off: u32,
    pub ak_off: u32,
    pub av_off: u32,
    pub r_off: u32,
    pub gamma_off: u32,
    pub rope_off: u32,
    /// Query tiles per head (flash kernel).
    pub q_tiles: u32,
    /// Key ranges (split-KV) per query tile; 1: no split, no combine pass.
    pub splits: u32,
    pub eps: f32,
    pub collapse: u32,
    pub norm: u32,
    /// 1: the attention kernel writes `out` itself (no collapse, no norm).
    pub direct: u32,
    /// Output vectors of length d (epilogue).
    pub n_vec: u32,
    /// The bits of -inf (WGSL has no infinite literals).
    pub neg_inf_bits: u32,
    /// Offset (in f32) of the split-KV partials in the scratch buffer.
    pub part_off: u32,
    /// Offset of the group norm's `beta` in `weights`.
    pub beta_off: u32,
    /// Offsets in `weights` of the selection tables of aq, ak, av (`[H, P]` stored-head indices
    /// as u32 bits), or [`DENSE`] for a dense matrix (NaN policy: a selection is a gather).
    pub sel_q: u32,
    pub sel_k: u32,
    pub sel_v: u32,
    /// Decode only: selection bits (1 aq, 2 ak, 4 av) of the mixing matrices.
    pub dec_sel: u32,
    pub pad: [u32; 2],
}

/// `sel_*` of a dense mixing matrix (the `DENSE` of common.wgsl).
pub(crate) const DENSE: u32 = u32::MAX;

/// One dispatch: the kernel and how many workgroups it needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dispatch {
    pub key: KernelKey,
    pub workgroups: u32,
}

/// Everything one forward call launches.
pub(crate) struct Plan {
    pub uniforms: Uniforms,
    pub weights: Vec<f32>,
    /// The attention kernel, the split-KV combine (when split) and the collapse / head-norm
    /// epilogue (when asked for), in launch order.
    pub passes: Vec<Dispatch>,
    /// Bytes of the f32 scratch buffer: pseudo outputs for the epilogue, split-KV partials.
    pub op_bytes: u64,
}

fn unsupported(why: String) -> Error {
    Error::Unsupported { backend: "wgpu", why }
}

pub(crate) fn to_u32(what: &'static str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::TooLarge { what, elements: x as u128, max: u32::MAX as u128 })
}

/// RoPE table of a forward call, built once on the host in f64: row `r` (position `pos0 + r`),
/// frequency index `t < d/2`, the pair (cos, sin) of `(pos0 + r) · base^(−2t/d)` rounded to f32,
/// the angle formed as the reference forms it. The kernels read one pair per rotated element (no
/// transcendental, no f64 on the device); `Uniforms::rope_levels` is 0 for this layout.
pub(crate) fn rope_position_table(rows: u32, pos0: usize, d: usize, base: f64) -> Vec<f32> {
    let half = d / 2;
    let freq: Vec<f64> = (0..half).map(|t| base.powf(-2.0 * t as f64 / d as f64)).collect();
    let mut table = Vec::with_capacity(rows as usize * half * 2);
    for r in 0..rows as usize {
        let pos = (pos0 + r) as f64;
        for f in &freq {
            let (sin, cos) = (pos * f).sin_cos();
            table.push(cos as f32);
            table.push(sin as f32);
        }
    }
    table
}

/// RoPE table by levels (decode over long caches): shared with the CUDA decode.
pub(crate) use crate::decode::plan::rope_table;

/// The plan of a validated problem on a device with `limits`.
pub(crate) fn plan(
    problem: &Problem,
    w: &Weights,
    variant: Variant,
    splits: Option<u32>,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
) -> Result<Plan> {
    let c = &problem.cfg;
    let d = c.head_dim;
    let nq = problem.n * c.pseudo;
    let nk = problem.m * c.pseudo;

    // Packed weights: aq | ak | av | r | gamma | beta | selection tables | RoPE table (all f32,
    // one binding); selection matrices (MHA, GQA, identity) become gathers.
    let rope_rows = rope_rows(problem)?;
    let rope = match c.rope {
        Some(r) => rope_position_table(rope_rows, c.pos_offset, d, r.base as f64),
        None => Vec::new(),
    };
    let packed = super::pack::pack(c, w, true, &rope)?;
    let direct = !problem.collapse && !problem.norm;
    let mut u = Uniforms {
        batch: to_u32("batch", problem.batch)?,
        n: to_u32("n", problem.n)?,
        m: to_u32("m", problem.m)?,
        nq: to_u32("N·P", nq)?,
        nk: to_u32("M·P", nk)?,
        off: to_u32("(M−N)·P", nk - nq)?,
        win_left: c.window.map_or(0, |w| w.left.min(nk)) as u32,
        win_right: c.window.map_or(0, |w| w.right.min(nk)) as u32,
        rope_levels: 0, // the per-position table
        collapse: problem.collapse as u32,
        direct: direct as u32,
        ..packed.uniforms(c, w)?
    };
    let ds = dispatches(problem, variant, splits, limits, loop_budget)?;
    u.q_tiles = ds.q_tiles;
    u.splits = ds.splits;
    u.n_vec = ds.epilogue.map_or(0, |e| e.workgroups);
    u.part_off = to_u32("scratch offset", ds.op_len)?;
    let passes = std::iter::once(ds.attention).chain(ds.combine).chain(ds.epilogue).collect();
    Ok(Plan { uniforms: u, weights: packed.weights, passes, op_bytes: 4 * (ds.op_len + ds.part_len) as u64 })
}

/// Workgroups the split-KV heuristic aims for: enough to fill a large GPU twice over.
const TARGET_WORKGROUPS: usize = 256;
/// Most key ranges per query tile, and fewest key tiles per range.
const MAX_SPLITS: usize = 32;
const MIN_TILES_PER_SPLIT: usize = 2;

/// The dispatches of one call and the scratch they need.
#[derive(Clone, Copy, Debug)]
struct Dispatches {
    attention: Dispatch,
    combine: Option<Dispatch>,
    epilogue: Option<Dispatch>,
    q_tiles: u32,
    splits: u32,
    /// f32 elements of pseudo outputs (epilogue input) and of split-KV partials in the scratch.
    op_len: usize,
    part_len: usize,
}

/// Most key tiles one query tile of `br` rows visits: all of them, or the window's band.
pub(crate) fn max_key_tiles(problem: &Problem, br: usize, bc: usize) -> usize {
    let nk = problem.m * problem.cfg.pseudo;
    let all = nk.div_ceil(bc);
    match problem.cfg.window {
        Some(w) => all.min((br + w.left.min(nk) + w.right.min(nk)).div_ceil(bc) + 1),
        None => all,
    }
}

/// Most keys one virtual query sees.
fn max_keys(problem: &Problem) -> usize {
    let nk = problem.m * problem.cfg.pseudo;
    match problem.cfg.window {
        Some(w) => nk.min(w.left.min(nk) + w.right.min(nk) + 1),
        None => nk,
    }
}

/// Loop iterations, in all, that one invocation of a kernel runs at most: every loop of the
/// kernel counted as written (`rotate` has no loop: one table read).
/// Mesa's llvmpipe (lavapipe) silently ends the loops of an invocation once they have run 65535
/// iterations together, so on it the flash kernel splits the keys to stay under a budget and
/// the other kernels refuse calls above it (see `loop_budget` in backend.rs).
pub(crate) mod loops {
    use super::Problem;

    pub fn flash(p: &Problem, (br, bc, wg): (u32, u32, u32), tiles: usize) -> u64 {
        let c = &p.cfg;
        let (d, half) = (c.head_dim as u64, c.head_dim as u64 / 2);
        let (br, bc, wg) = (br as u64, bc as u64, wg as u64);
        let (tpr, hq, hk) = (wg / br, c.q_heads as u64, c.kv_heads as u64);
        let (cpt, npair) = (bc / tpr, half.div_ceil(tpr));
        let queries = (br * half).div_ceil(wg) * (1 + hq);
        let per_tile = 1                                  // key-tile loop
            + (bc * half).div_ceil(wg) * (1 + hk)         // 2a: mix keys and values
            + d * (1 + cpt) + cpt                         // 2b: scores, mask
            + tpr + cpt + npair                           // 2c: softmax
            + bc * (1 + npair); // 2d: P V
        let init = (br + bc).div_ceil(wg); // NaN-policy flags
        init + queries + tiles as u64 * per_tile + tpr + 2 * npair
    }

    pub fn naive(p: &Problem, keys: usize) -> u64 {
        let c = &p.cfg;
        let (d, half) = (c.head_dim as u64, c.head_dim as u64 / 2);
        let (hq, hk) = (c.q_heads as u64, c.kv_heads as u64);
        let per_key = 1 + half * (1 + hk) + d * (1 + hk);
        half * (1 + hq) + keys as u64 * per_key + d / 2
    }

    /// The decode kernel (decode.wgsl) over `tiles` cached tiles of `tc` tokens, for
    /// `(Hq, Hk, H, P, N·P, d)` and `rope` RoPE table levels.
    pub fn decode(
        wg: u32,
        tc: u32,
        (hq, hk, h, p, np, d): (usize, usize, usize, usize, usize, usize),
        rope: u64,
        tiles: u64,
    ) -> u64 {
        let (wg, tc) = (wg as u64, tc as u64);
        let (hq, hk, h, p, np, d) = (hq as u64, hk as u64, h as u64, p as u64, np as u64, d as u64);
        let (half, rows, tp) = (d / 2, h * np, tc * p);
        let opt = (rows * half).div_ceil(wg);
        let fixed = (rows * half).div_ceil(wg) * (1 + hq + rope) + 2 * rows.div_ceil(wg) + 2 * opt;
        let per_head = 1
            + (tp * half).div_ceil(wg) * (1 + hk + rope) // 2b: mix and rotate
            + (np * tp).div_ceil(wg) * (1 + d)           // 2c: scores
            + np.div_ceil(wg) * (1 + 2 * tp)             // 2d: softmax
            + opt + ((np * half).div_ceil(wg) + 1) * tp; // 2e: P V
        let per_tile = 1 + (tc * hk * half).div_ceil(wg) + h * per_head;
        fixed + tiles * per_tile
    }

    pub fn combine(p: &Problem, splits: usize, wg: u32) -> u64 {
        let half = p.cfg.head_dim as u64 / 2;
        2 * splits as u64 + half.div_ceil(wg as u64) * (1 + splits as u64)
    }

    pub fn epilogue(p: &Problem, wg: u32) -> u64 {
        let c = &p.cfg;
        let pairs = (c.head_dim as u64 / 2).div_ceil(wg as u64);
        let sources = if p.collapse { (c.heads * c.pseudo) as u64 } else { 0 };
        pairs * (2 + sources) + wg.ilog2() as u64 + 1
    }
}

pub(crate) fn over_budget(kernel: &str, iterations: u64, budget: u64) -> Error {
    unsupported(format!(
        "the {kernel} kernel would run {iterations} loop iterations per invocation, above this adapter's \
         {budget} (llvmpipe ends longer loops early); use shorter sequences or a hardware adapter"
    ))
}

/// The attention dispatch, the split-KV combine's and the epilogue's (when collapse or norm asks
/// for one), with tile sizes from the device limits. `splits`: forced key ranges per query tile,
/// or `None` for the heuristic (split only when the query tiles alone cannot fill the device).
fn dispatches(
    problem: &Problem,
    variant: Variant,
    splits: Option<u32>,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
) -> Result<Dispatches> {
    let c = &problem.cfg;
    let d = c.head_dim;
    let d32 = to_u32("head dim", d)?;
    let nq = problem.n * c.pseudo;
    let heads_batch = problem.batch * c.heads;
    let key = |kind| KernelKey { kind, dtype: problem.dtype, d: d32 };
    let (mut q_tiles, mut n_splits) = (0, 1);
    let attention = match variant {
        Variant::Flash => {
            let (br, bc, wg) = flash_tiles(limits, d32, nq).ok_or_else(|| {
                unsupported(format!(
                    "no flash tile for d = {d} fits {} bytes of workgroup memory with {} threads",
                    limits.max_compute_workgroup_storage_size,
                    flash_threads(limits)
                ))
            })?;
            let tiles = nq.div_ceil(br as usize);
            q_tiles = to_u32("query tiles", tiles)?;
            let base = tiles * heads_batch;
            let key_tiles = max_key_tiles(problem, br as usize, bc as usize);
            n_splits = match splits {
                Some(s) => s.max(1) as usize,
                None if base >= TARGET_WORKGROUPS => 1,
                None => TARGET_WORKGROUPS.div_ceil(base).min(MAX_SPLITS).min(key_tiles / MIN_TILES_PER_SPLIT).max(1),
            };
            if let Some(budget) = loop_budget {
                let per_workgroup = |tiles: usize| loops::flash(problem, (br, bc, wg), tiles);
                let iterations = |splits: usize| per_workgroup(key_tiles.div_ceil(splits));
                if splits.is_none() {
                    // Fewest splits whose share of key tiles stays under the budget.
                    let fixed = per_workgroup(0);
                    let tiles_per_split = budget.saturating_sub(fixed) / (per_workgroup(1) - fixed);
                    if tiles_per_split == 0 {
                        return Err(over_budget("flash", iterations(key_tiles.max(1)), budget));
                    }
                    n_splits = n_splits.max(key_tiles.div_ceil(tiles_per_split as usize));
                }
                if iterations(n_splits) > budget {
                    return Err(over_budget("flash", iterations(n_splits), budget));
                }
            }
            let workgroups = to_u32("workgroups", base * n_splits)?;
            Dispatch { key: key(Kind::Flash { br, bc, wg }), workgroups }
        }
        Variant::Naive => {
            if let Some(budget) = loop_budget {
                let iterations = loops::naive(problem, max_keys(problem));
                if iterations > budget {
                    return Err(over_budget("naive", iterations, budget));
                }
            }
            let workgroups = to_u32("workgroups", (heads_batch * nq).div_ceil(NAIVE_WG as usize))?;
            Dispatch { key: key(Kind::Naive { wg: NAIVE_WG }), workgroups }
        }
    };
    let combine = (n_splits > 1).then(|| -> Result<Dispatch> {
        Ok(Dispatch { key: key(Kind::Combine { wg: COMBINE_WG }), workgroups: to_u32("rows", heads_batch * nq)? })
    });
    let combine = combine.transpose()?;
    let direct = !problem.collapse && !problem.norm;
    let epilogue = if direct {
        None
    } else {
        let n_vec = problem.batch * problem.n * c.heads * if problem.collapse { 1 } else { c.pseudo };
        Some(Dispatch { key: key(Kind::Epilogue { wg: EPILOGUE_WG }), workgroups: to_u32("output vectors", n_vec)? })
    };
    if let Some(budget) = loop_budget {
        let tails = [
            ("combine", if combine.is_some() { loops::combine(problem, n_splits, COMBINE_WG) } else { 0 }),
            ("epilogue", if epilogue.is_some() { loops::epilogue(problem, EPILOGUE_WG) } else { 0 }),
        ];
        if let Some((kernel, iterations)) = tails.into_iter().find(|t| t.1 > budget) {
            return Err(over_budget(kernel, iterations, budget));
        }
    }
    let op_len = if direct { 0 } else { heads_batch * nq * d };
    let part_len = if n_splits > 1 { n_splits * heads_batch * nq * (d + 2) } else { 0 };
    to_u32("f32 scratch elements (kernels index it with u32)", op_len + part_len)?;
    Ok(Dispatches { attention, combine, epilogue, q_tiles, splits: to_u32("splits", n_splits)?, op_len, part_len })
}

/// Rows of the RoPE table: the positions of the call, `[pos0, pos0 + rows)` (virtual positions
/// reach `pos0 + M·P − 1`, token positions `pos0 + M − 1`); 0 without RoPE. Positions are u32 in
/// the kernels.
fn rope_rows(problem: &Problem) -> Result<u32> {
    let Some(rope) = problem.cfg.rope else { return Ok(0) };
    let rows = match rope.mode {
        PosMode::Virtual => problem.m * problem.cfg.pseudo,
        PosMode::Token => problem.m,
    };
    let max_pos = problem.cfg.pos_offset as u64 + rows as u64 - 1;
    if max_pos > u32::MAX as u64 {
        return Err(unsupported(format!("RoPE position {max_pos} above 2^32 - 1")));
    }
    to_u32("RoPE table rows", rows)
}

/// Whether a valid problem fits the device: every binding under the adapter's storage-binding
/// and buffer limits (never truncated), the tile in workgroup memory, the grids in range.
pub(crate) fn check_limits(
    problem: &Problem,
    variant: Variant,
    splits: Option<u32>,
    limits: &wgpu::Limits,
    loop_budget: Option<u64>,
) -> Result<()> {
    let c = &problem.cfg;
    let (b, n, m, h, p, d) = (problem.batch, problem.n, problem.m, c.heads, c.pseudo, c.head_dim);
    let es = problem.dtype.size() as u128;
    let rope_rows = rope_rows(problem)? as u128;
    let weights = ((c.q_heads + 2 * c.kv_heads) * h * p) as u128
        + if problem.collapse { (h * h * p) as u128 } else { 0 }
        + if problem.norm { 2 * (h * d) as u128 } else { 0 }
        + rope_rows * d as u128
        + 3 * (h * p) as u128; // selection tables
    let out_len: u128 = problem.out_shape().iter().map(|&x| x as u128).product();
    let ds = dispatches(problem, variant, splits, limits, loop_budget)?;
    let bindings = [
        ("q", (b * n * c.q_heads * d) as u128 * es),
        ("k", (b * m * c.kv_heads * d) as u128 * es),
        ("v", (b * m * c.kv_heads * d) as u128 * es),
        ("out", out_len * es),
        ("lse", 4 * problem.lse_len() as u128),
        ("f32 scratch (pseudo outputs, split-KV partials)", 4 * (ds.op_len + ds.part_len) as u128),
        ("weights", 4 * weights),
    ];
    let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) as u128;
    for (what, bytes) in bindings {
        if bytes > max {
            return Err(unsupported(format!(
                "{what} needs {bytes} bytes, above this adapter's largest storage binding ({max} bytes); \
                 split the batch or the sequence"
            )));
        }
    }
    if limits.max_storage_buffers_per_shader_stage < 7 {
        return Err(unsupported(format!(
            "the kernels bind 7 storage buffers, the adapter allows {}",
            limits.max_storage_buffers_per_shader_stage
        )));
    }
    for pass in std::iter::once(ds.attention).chain(ds.combine).chain(ds.epilogue) {
        grid(pass.workgroups, limits)?;
    }
    Ok(())
}

/// A 2-D grid for `total` workgroups under the per-dimension limit (kernels linearise it).
pub(crate) fn grid(total: u32, limits: &wgpu::Limits) -> Result<(u32, u32)> {
    let max = limits.max_compute_workgroups_per_dimension.max(1);
    let x = total.clamp(1, max);
    let y = total.div_ceil(x);
    if y > max {
        return Err(unsupported(format!("{total} workgroups exceed the {max} x {max} grid")));
    }
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, DType, Rope};

    fn problem(cfg: Config, n: usize, m: usize) -> Problem {
        Problem::new(&cfg.with_pos_offset(0), 1, n, m, DType::F32, false, false)
            .map(|mut p| {
                p.cfg = cfg;
                p
            })
            .unwrap()
    }

    #[test]
    fn rope_table_rows_are_the_positions_of_the_call() {
        // Row r holds position pos0 + r: cos/sin of (pos0 + r)·base^(−2t/d) formed in f64.
        let (pos0, d, base) = (4_000_000_000usize, 8, 10000.0f64);
        let t = rope_position_table(3, pos0, d, base);
        assert_eq!(t.len(), 3 * (d / 2) * 2);
        for r in 0..3 {
            for k in 0..d / 2 {
                let ang = (pos0 + r) as f64 * base.powf(-2.0 * k as f64 / d as f64);
                let i = (r * d / 2 + k) * 2;
                assert_eq!((t[i], t[i + 1]), (ang.cos() as f32, ang.sin() as f32), "row {r} t {k}");
            }
        }
        // Virtual positions reach pos0 + M·P − 1, token positions pos0 + M − 1.
        let cfg = Config::iha(2, 3, 16).with_rope(Rope { base: 10000.0, mode: PosMode::Virtual });
        assert_eq!(rope_rows(&problem(cfg, 5, 7)).unwrap(), 21);
        let cfg = cfg.with_rope(Rope { base: 10000.0, mode: PosMode::Token });
        assert_eq!(rope_rows(&problem(cfg, 5, 7)).unwrap(), 7);
        assert_eq!(rope_rows(&problem(Config::iha(2, 3, 16), 5, 7)).unwrap(), 0, "no RoPE, no table");
        // A position past u32 is refused by name.
        let cfg = cfg.with_pos_offset(u32::MAX as usize - 3);
        let e = rope_rows(&problem(cfg, 5, 7)).unwrap_err().to_string();
        assert!(e.contains("RoPE position"), "{e}");
    }
}
