//! Head mixing as the NaN policy defines it: a *selection* matrix (every `(h, p)` column one-hot
//! with weight exactly 1: MHA, GQA, identity) is a gather, so each pseudo-head reads only its
//! selected stored head and a NaN in an unread head never reaches it (no `0 · NaN`); any other
//! matrix is dense and reads every stored head of the token.

use crate::Real;

/// For a mixing matrix `a [S, H, P]`: `Some(sel)` with `sel[h·P + p]` the one stored head column
/// `(h, p)` reads when `a` is a selection (each column has exactly one nonzero entry, equal to
/// 1); `None` for a dense matrix.
pub fn selection<T: Real>(a: &[T], src: usize, heads: usize, pseudo: usize) -> Option<Vec<usize>> {
    let mut sel = Vec::with_capacity(heads * pseudo);
    for h in 0..heads {
        for p in 0..pseudo {
            let mut pick = None;
            for m in 0..src {
                let w = a[(m * heads + h) * pseudo + p];
                if w == T::ONE && pick.is_none() {
                    pick = Some(m);
                } else if w != T::ZERO {
                    return None; // a second nonzero, a weight other than 1, or NaN
                }
            }
            sel.push(pick?);
        }
    }
    Some(sel)
}

/// `row += Σ_m a[m, h, p] · src_m` for the stored heads `x_heads` (`S` rows of `d`) of one token,
/// or `row = x_heads[sel]` when `sel` (from [`selection`]) is given.
pub fn mix_into<T: Real>(
    row: &mut [T],
    x_heads: &[T],
    a: &[T],
    sel: Option<&[usize]>,
    heads: usize,
    pseudo: usize,
    h: usize,
    p: usize,
) {
    let d = row.len();
    match sel {
        Some(sel) => {
            let m = sel[h * pseudo + p];
            row.copy_from_slice(&x_heads[m * d..(m + 1) * d]);
        }
        None => {
            for m in 0..x_heads.len() / d {
                let w = a[(m * heads + h) * pseudo + p];
                let src = &x_heads[m * d..(m + 1) * d];
                for t in 0..d {
                    row[t] += w * src[t];
                }
            }
        }
    }
}

/// The running maximum of the visible scores of a row, NaN-aware: `None` when no score was
/// given (the row sees no key), `Some(NaN)` when any score is NaN (the row then comes out NaN
/// through `exp(s − max)`), else the largest.
pub fn row_max<T: Real>(scores: impl IntoIterator<Item = T>) -> Option<T> {
    let mut max: Option<T> = None;
    for s in scores {
        max = Some(match max {
            None => s,
            Some(m) if m.to_f64().is_nan() => m, // NaN sticks
            Some(_) if s.to_f64().is_nan() => s,
            Some(m) => {
                if s > m {
                    s
                } else {
                    m
                }
            }
        });
    }
    max
}
