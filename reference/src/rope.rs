//! Rotary embedding, "rotate-half" pairing: element `t` with `t + d/2`, frequency `base^(-2t/d)`.

use crate::Real;

/// Rotate one vector of even length `d` to position `pos` (angles computed in f64).
pub fn rotate<T: Real>(x: &mut [T], pos: f64, base: f64) {
    let d = x.len();
    let half = d / 2;
    for t in 0..half {
        let freq = base.powf(-2.0 * t as f64 / d as f64);
        let (sin, cos) = (pos * freq).sin_cos();
        let (a, b) = (x[t].to_f64(), x[t + half].to_f64());
        x[t] = T::from_f64(a * cos - b * sin);
        x[t + half] = T::from_f64(b * cos + a * sin);
    }
}
