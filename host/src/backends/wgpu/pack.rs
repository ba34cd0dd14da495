//! The packed f32 weights buffer (binding 1 of every kernel) and the uniform fields that follow
//! from the configuration and the weights alone: written once here, used by the forward
//! (`launch.rs`), decode (`decode.rs`) and the backward (`backward.rs`).

use super::launch::{DENSE, Uniforms, to_u32};
use crate::{Config, NormKind, PosMode, Result, Weights};

/// The weights buffer `aq | ak | av | r | gamma | beta | [selection tables] | RoPE table` and the
/// offset (in f32) of each part.
pub(crate) struct Packed {
    pub weights: Vec<f32>,
    pub aq_off: u32,
    pub ak_off: u32,
    pub av_off: u32,
    pub r_off: u32,
    pub gamma_off: u32,
    pub beta_off: u32,
    pub rope_off: u32,
    /// Offsets of the `[H, P]` stored-head tables of aq, ak, av (u32 bits), or [`DENSE`] for a
    /// dense matrix or when no tables were asked for.
    pub sel_q: u32,
    pub sel_k: u32,
    pub sel_v: u32,
}

/// Pack the weights of `cfg`; `selection_tables`: add the gather tables of selection matrices
/// (MHA, GQA, identity: the NaN policy's gather); `rope`: the RoPE table the kernels will read.
pub(crate) fn pack(cfg: &Config, w: &Weights, selection_tables: bool, rope: &[f32]) -> Result<Packed> {
    let mut weights = Vec::new();
    let mut push = |xs: &[f32]| -> Result<u32> {
        let off = to_u32("weights buffer", weights.len())?;
        weights.extend_from_slice(xs);
        Ok(off)
    };
    let aq_off = push(&w.aq)?;
    let ak_off = push(&w.ak)?;
    let av_off = push(&w.av)?;
    let r_off = push(w.r.as_deref().unwrap_or(&[]))?;
    let gamma_off = push(w.norm.as_ref().map_or(&[][..], |n| n.gamma()))?;
    let beta_off = push(w.norm.as_ref().and_then(|n| n.beta()).map_or(&[][..], |b| b))?;
    let mut push_sel = |a: &[f32], src: usize| -> Result<u32> {
        match selection_tables.then(|| headmix_reference::mixing::selection(a, src, cfg.heads, cfg.pseudo)).flatten() {
            Some(sel) => push(&sel.iter().map(|&m| f32::from_bits(m as u32)).collect::<Vec<_>>()),
            None => Ok(DENSE),
        }
    };
    let sel_q = push_sel(&w.aq, cfg.q_heads)?;
    let sel_k = push_sel(&w.ak, cfg.kv_heads)?;
    let sel_v = push_sel(&w.av, cfg.kv_heads)?;
    let rope_off = push(rope)?;
    if weights.is_empty() {
        weights.push(0.0); // bindings may not be empty
    }
    Ok(Packed { weights, aq_off, ak_off, av_off, r_off, gamma_off, beta_off, rope_off, sel_q, sel_k, sel_v })
}

impl Packed {
    /// Uniforms with the fields fixed by the configuration and these weights (head counts,
    /// mask kind, RoPE mode, scale, norm, weight offsets); the call's sizes, tiles and scratch
    /// offsets are zero, for the caller to set.
    pub(crate) fn uniforms(&self, cfg: &Config, w: &Weights) -> Result<Uniforms> {
        Ok(Uniforms {
            heads: to_u32("heads", cfg.heads)?,
            hq: to_u32("q_heads", cfg.q_heads)?,
            hk: to_u32("kv_heads", cfg.kv_heads)?,
            p: to_u32("pseudo", cfg.pseudo)?,
            causal: cfg.causal as u32,
            windowed: cfg.window.is_some() as u32,
            rope: match cfg.rope.map(|r| r.mode) {
                None => 0,
                Some(PosMode::Virtual) => 1,
                Some(PosMode::Token) => 2,
            },
            pos0: to_u32("pos_offset", cfg.pos_offset)?,
            scale_log2: cfg.softmax_scale() * std::f32::consts::LOG2_E,
            aq_off: self.aq_off,
            ak_off: self.ak_off,
            av_off: self.av_off,
            r_off: self.r_off,
            gamma_off: self.gamma_off,
            rope_off: self.rope_off,
            splits: 1,
            eps: cfg.norm_eps,
            norm: match w.norm.as_ref().map(|n| n.kind()) {
                None => 0,
                Some(NormKind::Rms) => 1,
                Some(NormKind::Group) => 2,
            },
            neg_inf_bits: f32::NEG_INFINITY.to_bits(),
            beta_off: self.beta_off,
            sel_q: self.sel_q,
            sel_k: self.sel_k,
            sel_v: self.sel_v,
            ..Uniforms::default()
        })
    }
}
