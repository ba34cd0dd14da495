//! The kernels' argument block, mirrored from `HmArgs` in `kernels-cuda/common.cuh`.

use crate::validate::Problem;
use headmix_reference::{NormKind, PosMode};

/// Passed by value to every kernel. Layout: 12 pointers, 18 `i32`, 4 `f32` (184 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmArgs {
    /// Device pointer of `q` `[B, N, Hq, d]`.
    pub q: u64,
    /// Device pointer of `k` `[B, M, Hk, d]`.
    pub k: u64,
    /// Device pointer of `v` `[B, M, Hk, d]`.
    pub v: u64,
    /// Device pointer of the output.
    pub out: u64,
    /// Device pointer of the lse `[B, H, N·P]` (0: not asked for).
    pub lse: u64,
    /// Device pointer of the f32 collapse accumulator `[B, N, H, d]` (0: no collapse).
    pub acc: u64,
    /// Device pointer of `aq` `[Hq, H, P]` (f32).
    pub aq: u64,
    /// Device pointer of `ak` `[Hk, H, P]` (f32).
    pub ak: u64,
    /// Device pointer of `av` `[Hk, H, P]` (f32).
    pub av: u64,
    /// Device pointer of the collapse `r` `[H, H·P]` (0: none).
    pub r: u64,
    /// Device pointer of the head-norm `gamma` `[H, d]` (0: none).
    pub gamma: u64,
    /// Device pointer of the group norm's `beta` `[H, d]` (0: none or Rms).
    pub beta: u64,
    /// Batch `B`.
    pub b: i32,
    /// Query tokens `N`.
    pub n: i32,
    /// Key/value tokens `M`.
    pub m: i32,
    /// Stored query heads `Hq`.
    pub hq: i32,
    /// Stored key/value heads `Hk`.
    pub hk: i32,
    /// Attention heads `H`.
    pub h: i32,
    /// Pseudo-heads per head `P`.
    pub p: i32,
    /// Head dimension `d`.
    pub d: i32,
    /// Causal mask (0/1).
    pub causal: i32,
    /// Sliding window present (0/1).
    pub has_window: i32,
    /// Window edge before the query, virtual tokens.
    pub window_left: i32,
    /// Window edge after the query, virtual tokens.
    pub window_right: i32,
    /// RoPE on (0/1).
    pub rope: i32,
    /// RoPE at token positions (1) or virtual positions (0).
    pub rope_token: i32,
    /// RoPE position offset `pos0`.
    pub pos0: i32,
    /// Collapse through `r` (0/1).
    pub collapse: i32,
    /// [`NORM_NONE`], [`NORM_RMS`] or [`NORM_GROUP`] (`HM_NORM_*` in `kernels-cuda/norm.cuh`).
    pub norm: i32,
    /// Write the lse (0/1).
    pub has_lse: i32,
    /// Softmax scale times `log2(e)` (the kernels work in the log2 domain).
    pub scale_log2: f32,
    /// RoPE base.
    pub rope_base: f32,
    /// Head-norm epsilon.
    pub eps: f32,
    /// Padding to the C struct's size.
    pub pad: f32,
}

const _: () = assert!(std::mem::size_of::<HmArgs>() == 184);

/// `HmArgs::norm` codes, as `HM_NORM_*` in `kernels-cuda/norm.cuh`.
pub const NORM_NONE: i32 = 0;
/// `HM_NORM_RMS`: per-head RMS norm.
pub const NORM_RMS: i32 = 1;
/// `HM_NORM_GROUP`: MEA's GroupNorm, one group per head (with `beta`).
pub const NORM_GROUP: i32 = 2;

/// The `HmArgs::norm` code of a head norm kind.
pub fn norm_code(kind: Option<NormKind>) -> i32 {
    match kind {
        None => NORM_NONE,
        Some(NormKind::Rms) => NORM_RMS,
        Some(NormKind::Group) => NORM_GROUP,
    }
}

impl HmArgs {
    /// Sizes and options of a validated problem with the head norm the weights carry (pointers
    /// left zero: the caller sets them, `gamma` and, for `Group`, `beta`). Validation bounds every
    /// size and the window edges by `i32::MAX`, so the casts are exact.
    pub fn from_problem(pb: &Problem, norm: Option<NormKind>) -> HmArgs {
        debug_assert_eq!(pb.norm, norm.is_some(), "the problem and the weights disagree on the norm");
        let c = &pb.cfg;
        let (wl, wr) =
            c.window.map(|w| (w.left.min(i32::MAX as usize), w.right.min(i32::MAX as usize))).unwrap_or((0, 0));
        HmArgs {
            b: pb.batch as i32,
            n: pb.n as i32,
            m: pb.m as i32,
            hq: c.q_heads as i32,
            hk: c.kv_heads as i32,
            h: c.heads as i32,
            p: c.pseudo as i32,
            d: c.head_dim as i32,
            causal: c.causal as i32,
            has_window: c.window.is_some() as i32,
            window_left: wl as i32,
            window_right: wr as i32,
            rope: c.rope.is_some() as i32,
            rope_token: matches!(c.rope.map(|r| r.mode), Some(PosMode::Token)) as i32,
            pos0: c.pos_offset as i32,
            collapse: pb.collapse as i32,
            norm: norm_code(norm),
            has_lse: 0,
            scale_log2: c.softmax_scale() * std::f32::consts::LOG2_E,
            rope_base: c.rope.map(|r| r.base).unwrap_or(10000.0),
            eps: c.norm_eps,
            ..HmArgs::default()
        }
    }
}

/// Where the virtual rows of one tensor live for `attn_v3` (`HmRows` in `attn_v3.cu`): virtual
/// row `t*P + p` of head `h` is `base + (b*L + t)*tok + sel[h*P + p]*d` (elements).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmRows {
    /// Device pointer to the rows' tensor (stored heads or pre-mixed rows).
    pub base: u64,
    /// Device pointer to `i32 [H*P]`.
    pub sel: u64,
    /// Elements per token of the tensor (`S*d` stored, `H*P*d` pre-mixed).
    pub tok: i32,
    /// Padding to 8 bytes.
    pub pad: i32,
}

/// The second argument of `hm_attn_v3` (`HmV3Attn`): the rows of q, k, v and where the pseudo
/// outputs go (`out` without a collapse, else a scratch `[B, N, H, P, d]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmV3Attn {
    /// Query rows.
    pub q: HmRows,
    /// Key rows.
    pub k: HmRows,
    /// Value rows.
    pub v: HmRows,
    /// Where the pseudo outputs go.
    pub op: u64,
    /// Division by `P` without a divide (`V3DivP`): see [`super::plan::fast_div`].
    pub p_mul: u32,
    /// The shift of the division by `P`.
    pub p_shr: u32,
}

/// The second argument of `hm_v3_mix` (`HmV3Mix`): one tensor's pre-mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmV3Mix {
    /// Stored heads `[B, L, S, d]`.
    pub x: u64,
    /// Pre-mixed rows `[B, L, H*P, d]`.
    pub y: u64,
    /// `f32 [S, H*P]`.
    pub w: u64,
    /// `i32 [H*P]` one-hot selection, or 0: dense mixing.
    pub sel: u64,
    /// RoPE tables (`f32 (cos, sin)` pairs), 0: no RoPE.
    pub rope_hi: u64,
    /// The low-position RoPE table (128 rows).
    pub rope_lo: u64,
    /// Tokens `L`.
    pub l: i32,
    /// Stored heads `S`.
    pub s: i32,
    /// 1 for queries (RoPE at query positions), 0 for keys and values.
    pub query: i32,
    /// The first row of `rope_hi` (position >> 7).
    pub rope_hi0: i32,
}

const _: () = assert!(std::mem::size_of::<HmRows>() == 24);
const _: () = assert!(std::mem::size_of::<HmV3Attn>() == 88);
const _: () = assert!(std::mem::size_of::<HmV3Mix>() == 64);
