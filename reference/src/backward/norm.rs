//! The head norm of one output vector and its transpose (step 8 and 8' of `docs/backward.md`).

use super::NormWeights;
use crate::Real;

/// Normalised vector `xh` and the divisor (`rho` for Rms, `sigma` for Group) of one vector `x`.
fn normalise<T: Real>(centre: bool, x: &[T], eps: f64) -> (Vec<T>, T) {
    let dd = T::from_f64(x.len() as f64);
    let mut mu = T::ZERO;
    if centre {
        for &e in x {
            mu += e;
        }
        mu = mu / dd;
    }
    let mut ss = T::ZERO;
    for &e in x {
        ss += (e - mu) * (e - mu);
    }
    let div = (ss / dd + T::from_f64(eps)).sqrt();
    (x.iter().map(|&e| (e - mu) / div).collect(), div)
}

/// Apply the norm of head `h` to `x` in place: `gamma[h] ∘ xh (+ beta[h])`.
pub fn forward<T: Real>(norm: &NormWeights<T>, h: usize, x: &mut [T], eps: f64) {
    let d = x.len();
    let (xh, _) = normalise(norm.centred(), x, eps);
    let g = &norm.gamma()[h * d..(h + 1) * d];
    for t in 0..d {
        x[t] = g[t] * xh[t];
    }
    if let NormWeights::Group { beta, .. } = norm {
        for t in 0..d {
            x[t] += beta[h * d + t];
        }
    }
}

/// The transpose of [`forward`] at input `x` for head `h`: returns `dx` and adds this vector's
/// terms to `dgamma` (`dout ∘ xh`) and, for Group, `dbeta` (`dout`), both `[d]` rows of head `h`.
pub fn backward<T: Real>(
    norm: &NormWeights<T>,
    h: usize,
    x: &[T],
    dout: &[T],
    eps: f64,
    dgamma: &mut [T],
    dbeta: Option<&mut [T]>,
) -> Vec<T> {
    let d = x.len();
    let dd = T::from_f64(d as f64);
    let (xh, div) = normalise(norm.centred(), x, eps);
    let gamma = &norm.gamma()[h * d..(h + 1) * d];
    let g: Vec<T> = (0..d).map(|t| gamma[t] * dout[t]).collect();
    let (mut mean_g, mut mean_gx) = (T::ZERO, T::ZERO);
    for t in 0..d {
        dgamma[t] += dout[t] * xh[t];
        mean_g += g[t];
        mean_gx += g[t] * xh[t];
    }
    mean_g = mean_g / dd;
    mean_gx = mean_gx / dd;
    if let Some(dbeta) = dbeta {
        for t in 0..d {
            dbeta[t] += dout[t];
        }
    }
    let shift = if norm.centred() { mean_g } else { T::ZERO };
    (0..d).map(|t| (g[t] - shift - xh[t] * mean_gx) / div).collect()
}
