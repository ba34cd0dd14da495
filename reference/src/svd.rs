//! MEA KV-cache compression: a truncated SVD over the head axis of stacked projections.
//!
//! The `H` per-head projections `W[h]` (`D × d` each) are the rows of an `H × (D·d)` matrix
//! `A = U S Vᵀ`. Keeping rank `Hk`, the component projections are the first `Hk` rows of `Vᵀ`
//! and the mixing weights are `ak[c, h, 0] = (U S)[h, c]`, so that `W[h] ≈ Σ_c ak[c,h,0] · comp[c]`.
//! The Frobenius error of the truncation is `sqrt(Σ_{c ≥ Hk} σ_c²)`.

use faer::Mat;

/// Result of [`compress`].
#[derive(Clone, Debug)]
pub struct Compressed {
    /// `[Hk, D, d]`: the component projections.
    pub components: Vec<f64>,
    /// `[Hk, H, 1]`: mixing weights that rebuild the `H` heads (`ak` or `av`).
    pub mix: Vec<f64>,
    /// All `min(H, D·d)` singular values, largest first.
    pub singular_values: Vec<f64>,
    /// `‖A − A_Hk‖_F`, from the dropped singular values.
    pub error: f64,
    /// `error / ‖A‖_F`.
    pub rel_error: f64,
}

/// Compress `w: [H, D, d]` (row-major, `len = h · dd` with `dd = D·d`) to rank `hk`.
/// Errors (as text) when `hk` is 0 or exceeds `min(H, D·d)`, or the SVD fails.
pub fn compress(w: &[f64], h: usize, dd: usize, hk: usize) -> Result<Compressed, String> {
    if w.len() != h * dd {
        return Err(format!("projection length {} is not H·D·d = {}·{}", w.len(), h, dd));
    }
    let full = h.min(dd);
    if hk == 0 || hk > full {
        return Err(format!("rank {hk} must be in 1..={full}"));
    }
    let a = Mat::<f64>::from_fn(h, dd, |i, j| w[i * dd + j]);
    let svd = a.thin_svd().map_err(|e| format!("SVD failed: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let singular_values: Vec<f64> = (0..full).map(|i| s[i]).collect();
    let mut components = vec![0.0; hk * dd];
    for c in 0..hk {
        for j in 0..dd {
            components[c * dd + j] = v[(j, c)];
        }
    }
    let mut mix = vec![0.0; hk * h];
    for c in 0..hk {
        for hh in 0..h {
            mix[c * h + hh] = u[(hh, c)] * singular_values[c];
        }
    }
    let error = singular_values[hk..].iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm = singular_values.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(Compressed { components, mix, singular_values, error, rel_error: if norm > 0.0 { error / norm } else { 0.0 } })
}

/// Rebuild `[H, D·d]` from components and mixing weights (`W[h] = Σ_c mix[c,h] · comp[c]`).
pub fn reconstruct(c: &Compressed, h: usize, dd: usize) -> Vec<f64> {
    let hk = c.mix.len() / h;
    let mut w = vec![0.0; h * dd];
    for hh in 0..h {
        for cc in 0..hk {
            let m = c.mix[cc * h + hh];
            for j in 0..dd {
                w[hh * dd + j] += m * c.components[cc * dd + j];
            }
        }
    }
    w
}
