//! The kernels' argument block, mirrored from `HmArgs` in `kernels-cuda/common.cuh`.

use crate::validate::Problem;
use headmix_reference::{NormKind, PosMode};

/// Passed by value to every kernel. Layout: 12 pointers, 18 `i32`, 4 `f32` (184 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HmArgs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub acc: u64,
    pub aq: u64,
    pub ak: u64,
    pub av: u64,
    pub r: u64,
    pub gamma: u64,
    pub beta: u64,
    pub b: i32,
    pub n: i32,
    pub m: i32,
    pub hq: i32,
    pub hk: i32,
    pub h: i32,
    pub p: i32,
    pub d: i32,
    pub causal: i32,
    pub has_window: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub rope: i32,
    pub rope_token: i32,
    pub pos0: i32,
    pub collapse: i32,
    /// [`NORM_NONE`], [`NORM_RMS`] or [`NORM_GROUP`] (`HM_NORM_*` in `kernels-cuda/norm.cuh`).
    pub norm: i32,
    pub has_lse: i32,
    pub scale_log2: f32,
    pub rope_base: f32,
    pub eps: f32,
    pub pad: f32,
}

const _: () = assert!(std::mem::size_of::<HmArgs>() == 184);

/// `HmArgs::norm` codes, as `HM_NORM_*` in `kernels-cuda/norm.cuh`.
pub const NORM_NONE: i32 = 0;
pub const NORM_RMS: i32 = 1;
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
