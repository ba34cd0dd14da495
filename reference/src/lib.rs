//! Pure-Rust reference of head-mixing attention.
//!
//! This crate is the contract of `docs/operator.md` (in the headmix repository) written as plainly as possible, so that
//! every headmix kernel can be checked against it. Two independent implementations check each other:
//!
//! * [`attention`] follows the definition step by step (mix, interleave, RoPE, mask, softmax,
//!   de-interleave, collapse, norm), one `(batch, head)` pair per rayon task;
//! * [`unfused::attention`] is the pipeline people run today: materialise the mixed tensors,
//!   reshape to `N*P` virtual tokens, run textbook attention ([`unfused::mha`]), reshape back,
//!   collapse.
//!
//! Both are generic over [`Real`] (`f32`, `f64`). [`Rounding`] makes the reference round its
//! intermediates the way a low-precision kernel must (mixed q/k/v, probabilities, outputs), which
//! gives the "reference run in the same low precision" that kernel tolerances are measured against.
//!
//! [`backward`] holds the gradients (`docs/backward.md`), again in two forms that check each other.

pub mod backward;
mod direct;
pub mod mixing;
mod params;
mod real;
pub mod rope;
pub mod svd;
pub mod unfused;

pub use direct::attention;
pub use params::{HeadNorm, MixWeights, NormKind, Output, Params, PosMode, Rope, Rounding, apply_head_norm};
pub use real::Real;

/// Relative Frobenius error `‖a − b‖ / ‖b‖` (the tolerance measure of the project), in f64.
pub fn rel_err<A: Real, B: Real>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.to_f64(), y.to_f64());
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Largest absolute difference `max |a − b|`, in f64. NaN anywhere gives NaN... reported as infinity.
pub fn max_abs_err<A: Real, B: Real>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_err: lengths differ");
    let mut m = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.to_f64(), y.to_f64());
        let e = (x - y).abs();
        if e.is_nan() {
            return f64::INFINITY;
        }
        m = m.max(e);
    }
    m
}
