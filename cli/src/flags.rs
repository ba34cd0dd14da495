//! Value parsers shared by the subcommands: every refusal says what the flag takes (clap puts
//! the flag's name in front), so a bad value is one line naming the flag and the allowed range.

use headmix::validate::MAX_INDEX;
use headmix::{BackendKind, DType, Method, NormKind, PosMode};

/// `2^31 - 1`, the largest count a kernel indexes.
pub const MAX: usize = MAX_INDEX;

/// A whole number in `lo..=hi`.
pub fn count(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match s.trim().parse::<usize>() {
        Ok(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(format!("takes a whole number in {lo}..={hi}")),
    }
}

/// A named method (`mha`, `gqa`, ...).
pub fn method(s: &str) -> Result<Method, String> {
    Method::parse(s).ok_or_else(|| format!("takes one of {}", names(Method::ALL.map(Method::name))))
}

/// A comma-separated list of named methods.
pub fn methods(s: &str) -> Result<Vec<Method>, String> {
    s.split(',').map(|m| method(m.trim())).collect()
}

/// `auto` (the best present) or a backend kind.
pub fn backend(s: &str) -> Result<Option<BackendKind>, String> {
    match s {
        "auto" => Ok(None),
        _ => BackendKind::parse(s)
            .map(Some)
            .ok_or_else(|| format!("takes auto or one of {}", names(BackendKind::ALL.map(|k| k.name())))),
    }
}

/// `all` or a comma-separated list of backend kinds.
pub fn backends(s: &str) -> Result<Vec<BackendKind>, String> {
    if s == "all" {
        return Ok(BackendKind::ALL.to_vec());
    }
    let kinds = names(BackendKind::ALL.map(|k| k.name()));
    s.split(',')
        .map(|k| BackendKind::parse(k.trim()).ok_or_else(|| format!("takes all or a list of {kinds}")))
        .collect()
}

pub fn dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| "takes one of f32, f16, bf16".into())
}

/// `L,R`: a sliding window in virtual tokens, each edge in `0..=2^31 - 1`.
pub fn window(s: &str) -> Result<(usize, usize), String> {
    let edge = |x: &str| x.trim().parse::<usize>().ok().filter(|&x| x <= MAX);
    match s.split_once(',').map(|(l, r)| (edge(l), edge(r))) {
        Some((Some(l), Some(r))) => Ok((l, r)),
        _ => Err(format!("takes L,R with each edge in 0..={MAX}")),
    }
}

/// RoPE positions: `virtual` (one per virtual token) or `token` (pseudo-heads share their token's).
pub fn pos_mode(s: &str) -> Result<PosMode, String> {
    match s {
        "virtual" => Ok(PosMode::Virtual),
        "token" => Ok(PosMode::Token),
        _ => Err("takes virtual or token".into()),
    }
}

/// A finite number above 1 (a RoPE base).
pub fn base(s: &str) -> Result<f32, String> {
    s.trim()
        .parse::<f32>()
        .ok()
        .filter(|b| b.is_finite() && *b > 1.0)
        .ok_or_else(|| format!("takes a finite number in (1, {:e}]", f32::MAX))
}

/// `true` or `false`.
pub fn boolean(s: &str) -> Result<bool, String> {
    s.parse().map_err(|_| "takes true or false".into())
}

/// A head norm choice: `group`, `rms`, or `none` (`Norm(None)`).
#[derive(Clone, Copy, Debug)]
pub struct Norm(pub Option<NormKind>);

pub fn norm(s: &str) -> Result<Norm, String> {
    match s {
        "none" => Ok(Norm(None)),
        _ => NormKind::parse(s).map(|k| Norm(Some(k))).ok_or_else(|| "takes group, rms or none".into()),
    }
}

fn names<const N: usize>(xs: [&str; N]) -> String {
    xs.join(", ")
}
