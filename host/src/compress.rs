//! MEA KV-cache compression of trained key/value projections (`headmix compress`).
//!
//! Each layer's `H` per-head projections `W[h]` (`D × d`) are stacked and truncated by SVD to
//! `Hk` component heads ([`headmix_reference::svd::compress`]): the model then caches only the
//! `Hk` components per token, and the attention kernel rebuilds the `H` heads through `ak`/`av`.
//!
//! Expected tensors, names and layouts: see [`HELP`] (what `headmix compress --help` prints); in
//! short, per layer `<prefix>.k_proj[.weight]` and `<prefix>.v_proj[.weight]`, either a linear
//! layer's weight `[H·d, D]` (e.g. `model.layers.3.self_attn.k_proj.weight`, give `H`) or per-head
//! `[H, D, d]`; written back: `<prefix>.{k,v}_components` (same layout, `Hk` heads) and
//! `<prefix>.{ak,av}` `[Hk, H, 1]`. Use the result with [`crate::Config::mea_compressed`]; a layer
//! with its own learned mixing gets it folded in by [`fold_mixing`]. The output holds no norm
//! weights: the layer keeps the model's own head norm (MEA's GroupNorm, weight and bias of `H·d`
//! channels = [`crate::HeadNorm::Group`] `{ gamma, beta }` reshaped to `[H, d]`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use half::{bf16, f16};
use headmix_reference::svd;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// The `safetensors` crate this module reads and writes with (for callers building input files).
pub use safetensors;

/// The command's help: usage and accepted layouts.
pub const HELP: &str = "\
headmix compress --input W.safetensors --output C.safetensors --rank Hk [--heads H]

Compress the key and value projections of every layer to Hk component heads (MEA KV-cache
compression: truncated SVD across the head axis), print the relative reconstruction error per
layer and the dropped singular values.

Input tensors (f32, f64, f16 or bf16), one pair per layer, found by name:
  <prefix>.k_proj and <prefix>.v_proj   (a trailing \".weight\" is accepted, e.g.
                                         model.layers.3.self_attn.k_proj.weight)
  layouts:
    [H*d, D]   a linear layer's weight (out features H*d, in features D): head h is rows
               h*d..(h+1)*d, and k_h = x W[h] with W[h][i, t] = weight[h*d + t, i]. Needs --heads H.
    [H, D, d]  per-head projections, k_h = x W[h]. --heads, if given, must equal H.
Output tensors (f32), per layer:
  <prefix>.k_components [Hk*d, D] (or [Hk, D, d], the input's layout)   component projections:
                        a k_proj with Hk heads; cache these Hk heads
  <prefix>.ak           [Hk, H, 1]   mixing weights: W[h] ~ sum_c ak[c, h, 0] * C[c] (C[c] the
                                     c-th component, D x d); Config::mea_compressed(H, Hk, d)
  <prefix>.v_components, <prefix>.av   the same for values
Rank: 1 <= Hk <= min(H, D*d); Hk = H is exact.
Head norm: not written (the compression does not change it). Run the compressed layer with the
model's own MEA GroupNorm (weight and bias [H*d], i.e. PyTorch GroupNorm(H, H*d), reshaped to
[H, d]) as headmix's HeadNorm::Group { gamma, beta }.
";

/// What can go wrong in a compression.
#[derive(Clone, Debug, PartialEq)]
pub enum CompressError {
    /// Bad command-line arguments.
    Usage(String),
    /// A file could not be read or written.
    Io {
        /// The file.
        path: String,
        /// The system's error.
        why: String,
    },
    /// The file is not a valid safetensors file.
    Format(String),
    /// A projection tensor has an unusable dtype, shape or head count.
    Tensor {
        /// The tensor in the file.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The rank is out of range or the SVD failed.
    Rank {
        /// The projection.
        name: String,
        /// What failed.
        why: String,
    },
}

impl fmt::Display for CompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompressError::Usage(why) => write!(f, "{why}\n\n{HELP}"),
            CompressError::Io { path, why } => write!(f, "{path}: {why}"),
            CompressError::Format(why) => write!(f, "not a safetensors file: {why}"),
            CompressError::Tensor { name, why } => write!(f, "tensor {name}: {why}"),
            CompressError::Rank { name, why } => write!(f, "{name}: {why}"),
        }
    }
}

impl std::error::Error for CompressError {}

/// One projection as per-head matrices: `w[h, i, t]`, `[H, D, d]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    /// Heads `H`.
    pub heads: usize,
    /// Model dimension `D`.
    pub model_dim: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
    /// `[H, D, d]` row-major.
    pub w: Vec<f64>,
    /// Whether the file held it as a linear layer's weight `[H*d, D]` (else `[H, D, d]`).
    pub linear: bool,
}

impl Projection {
    /// `[S, D, d]` per-head values (`w.len() = S·D·d`) in the projection's file layout:
    /// `[S*d, D]` when linear.
    fn to_layout(&self, heads: usize, w: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let (dm, d) = (self.model_dim, self.head_dim);
        if !self.linear {
            return (vec![heads, dm, d], w.to_vec());
        }
        let mut out = vec![0.0f32; heads * d * dm];
        for h in 0..heads {
            for i in 0..dm {
                for t in 0..d {
                    out[(h * d + t) * dm + i] = w[(h * dm + i) * d + t];
                }
            }
        }
        (vec![heads * d, dm], out)
    }

    /// Read a tensor of shape `[H*d, D]` (needs `heads`) or `[H, D, d]` (see [`HELP`]).
    pub fn from_layout(
        name: &str,
        shape: &[usize],
        data: &[f64],
        heads: Option<usize>,
    ) -> Result<Projection, CompressError> {
        let bad = |why: String| CompressError::Tensor { name: name.to_string(), why };
        // The product in checked arithmetic: a shape whose product overflows matches no data.
        let elements = shape.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x));
        if elements != Some(data.len()) || data.is_empty() {
            return Err(bad(format!("shape {shape:?} does not match {} values", data.len())));
        }
        match *shape {
            [rows, dm] => {
                let h = heads.ok_or_else(|| bad(format!("shape {shape:?} is [H*d, D]: give --heads H")))?;
                if h == 0 || rows % h != 0 {
                    return Err(bad(format!("{rows} rows are not H*d with H = {h}")));
                }
                let d = rows / h;
                let mut w = vec![0.0; h * dm * d];
                for hh in 0..h {
                    for i in 0..dm {
                        for t in 0..d {
                            w[(hh * dm + i) * d + t] = data[(hh * d + t) * dm + i];
                        }
                    }
                }
                Ok(Projection { heads: h, model_dim: dm, head_dim: d, w, linear: true })
            }
            [h, dm, d] => {
                if let Some(given) = heads
                    && given != h
                {
                    return Err(bad(format!("shape {shape:?} has H = {h} but --heads {given}")));
                }
                Ok(Projection { heads: h, model_dim: dm, head_dim: d, w: data.to_vec(), linear: false })
            }
            _ => Err(bad(format!("shape {shape:?}: expected [H*d, D] or [H, D, d]"))),
        }
    }
}

/// One compressed projection.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedProjection {
    /// `Hk`.
    pub rank: usize,
    /// `[Hk, D, d]`.
    pub components: Vec<f32>,
    /// `[Hk, H, 1]`.
    pub mix: Vec<f32>,
    /// All singular values, largest first.
    pub singular_values: Vec<f64>,
    /// `‖W − W_Hk‖_F / ‖W‖_F` from the dropped singular values.
    pub rel_error: f64,
}

impl CompressedProjection {
    /// The singular values the truncation dropped.
    pub fn dropped(&self) -> &[f64] {
        &self.singular_values[self.rank..]
    }
}

/// Compress one projection to `rank` component heads.
pub fn compress_projection(name: &str, p: &Projection, rank: usize) -> Result<CompressedProjection, CompressError> {
    let c = svd::compress(&p.w, p.heads, p.model_dim * p.head_dim, rank)
        .map_err(|why| CompressError::Rank { name: name.to_string(), why })?;
    Ok(CompressedProjection {
        rank,
        components: c.components.iter().map(|&x| x as f32).collect(),
        mix: c.mix.iter().map(|&x| x as f32).collect(),
        singular_values: c.singular_values,
        rel_error: c.rel_error,
    })
}

/// Fold a layer's own mixing behind the compression: `mix [Hk, S]` rebuilds the `S` source heads
/// that `a [S, H, P]` mixed (an MEA layer's learned `ak`, `S = H`; or a GQA replication,
/// `S = G`), so the compressed layer's mixing `[Hk, H, P]` is `Σ_s mix[c, s] · a[s, h, p]`.
pub fn fold_mixing(
    mix: &[f32],
    a: &[f32],
    kv_heads: usize,
    heads: usize,
    pseudo: usize,
) -> Result<Vec<f32>, CompressError> {
    let src = mix.len() / kv_heads.max(1);
    if kv_heads == 0 || mix.len() != kv_heads * src || a.len() != src * heads * pseudo {
        return Err(CompressError::Tensor {
            name: "mixing".into(),
            why: format!(
                "fold_mixing: mix has {} values for Hk = {kv_heads}, a has {} (need [S, H = {heads}, P = {pseudo}])",
                mix.len(),
                a.len()
            ),
        });
    }
    let mut out = vec![0.0f32; kv_heads * heads * pseudo];
    for c in 0..kv_heads {
        for s in 0..src {
            let m = mix[c * src + s];
            for hp in 0..heads * pseudo {
                out[c * heads * pseudo + hp] += m * a[s * heads * pseudo + hp];
            }
        }
    }
    Ok(out)
}

/// The outcome for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// The name prefix (`layers.3`).
    pub prefix: String,
    /// Heads `H` before compression.
    pub heads: usize,
    /// Component heads kept `Hk`.
    pub rank: usize,
    /// Relative Frobenius error of the truncated key projections.
    pub k_rel_error: f64,
    /// Relative Frobenius error of the truncated value projections.
    pub v_rel_error: f64,
    /// Singular values dropped from the keys.
    pub k_dropped: Vec<f64>,
    /// Singular values dropped from the values.
    pub v_dropped: Vec<f64>,
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fmt_sv = |xs: &[f64]| xs.iter().map(|x| format!("{x:.4e}")).collect::<Vec<_>>().join(", ");
        write!(
            f,
            "{}: H = {} -> Hk = {}: k rel err {:.3e} (dropped sigma [{}]), v rel err {:.3e} (dropped sigma [{}])",
            self.prefix,
            self.heads,
            self.rank,
            self.k_rel_error,
            fmt_sv(&self.k_dropped),
            self.v_rel_error,
            fmt_sv(&self.v_dropped)
        )
    }
}

fn values(name: &str, t: &TensorView) -> Result<Vec<f64>, CompressError> {
    let b = t.data();
    let v: Vec<f64> = match t.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        other => {
            return Err(CompressError::Tensor {
                name: name.into(),
                why: format!("dtype {other:?}; expected f32, f64, f16 or bf16"),
            });
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(CompressError::Tensor { name: name.into(), why: format!("element {i} is {}", v[i]) });
    }
    Ok(v)
}

/// The `(prefix, k name, v name)` of every layer, ordered by layer number.
fn layer_names(st: &SafeTensors) -> Result<Vec<(String, String, String)>, CompressError> {
    let names = st.names();
    let mut layers = Vec::new();
    for name in &names {
        for suffix in [".k_proj", ".k_proj.weight"] {
            if let Some(prefix) = name.strip_suffix(suffix) {
                let v = format!("{prefix}{}", suffix.replace("k_proj", "v_proj"));
                if !names.contains(&v.as_str()) {
                    return Err(CompressError::Tensor { name: name.to_string(), why: format!("no matching {v}") });
                }
                layers.push((prefix.to_string(), name.to_string(), v));
            }
        }
    }
    if layers.is_empty() {
        return Err(CompressError::Format("no <prefix>.k_proj tensors found (see --help)".into()));
    }
    // `l.0.k_proj` and `l.0.k_proj.weight` name one layer twice: its outputs would collide.
    let mut prefixes: Vec<&(String, String, String)> = layers.iter().collect();
    prefixes.sort_by(|a, b| a.0.cmp(&b.0));
    for pair in prefixes.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(CompressError::Tensor {
                name: pair[1].1.clone(),
                why: format!("layer {} also has {}: one projection per layer, remove one", pair[1].0, pair[0].1),
            });
        }
    }
    let number = |p: &str| p.split('.').filter_map(|s| s.parse::<usize>().ok()).next_back().unwrap_or(usize::MAX);
    layers.sort_by(|a, b| (number(&a.0), &a.0).cmp(&(number(&b.0), &b.0)));
    Ok(layers)
}

/// Compress the bytes of a safetensors file; returns the output file's bytes and the reports.
pub fn compress_safetensors(
    input: &[u8],
    rank: usize,
    heads: Option<usize>,
) -> Result<(Vec<u8>, Vec<LayerReport>), CompressError> {
    let st = SafeTensors::deserialize(input).map_err(|e| CompressError::Format(e.to_string()))?;
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut reports = Vec::new();
    for (prefix, kn, vn) in layer_names(&st)? {
        let read = |name: &str| -> Result<Projection, CompressError> {
            let t = st.tensor(name).map_err(|e| CompressError::Format(e.to_string()))?;
            Projection::from_layout(name, t.shape(), &values(name, &t)?, heads)
        };
        let (kp, vp) = (read(&kn)?, read(&vn)?);
        if kp.heads != vp.heads {
            return Err(CompressError::Tensor {
                name: vn,
                why: format!("H = {} but {kn} has H = {}", vp.heads, kp.heads),
            });
        }
        let (kc, vc) = (compress_projection(&kn, &kp, rank)?, compress_projection(&vn, &vp, rank)?);
        for (which, p, c) in [("k", &kp, &kc), ("v", &vp, &vc)] {
            let (shape, components) = p.to_layout(rank, &c.components);
            out.push((format!("{prefix}.{which}_components"), shape, components));
            out.push((format!("{prefix}.a{which}"), vec![rank, p.heads, 1], c.mix.clone()));
        }
        reports.push(LayerReport {
            prefix,
            heads: kp.heads,
            rank,
            k_rel_error: kc.rel_error,
            v_rel_error: vc.rel_error,
            k_dropped: kc.dropped().to_vec(),
            v_dropped: vc.dropped().to_vec(),
        });
    }
    let bytes: Vec<Vec<u8>> = out.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = out
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CompressError::Format(e.to_string()))?;
    let mut info = HashMap::new();
    info.insert("headmix".to_string(), format!("mea-compressed rank {rank}"));
    let file = safetensors::serialize(views, Some(info)).map_err(|e| CompressError::Format(e.to_string()))?;
    Ok((file, reports))
}

/// Read `input`, compress, write `output` (f32 safetensors).
pub fn compress_file(
    input: &Path,
    output: &Path,
    rank: usize,
    heads: Option<usize>,
) -> Result<Vec<LayerReport>, CompressError> {
    let io = |p: &Path, e: std::io::Error| CompressError::Io { path: p.display().to_string(), why: e.to_string() };
    let bytes = std::fs::read(input).map_err(|e| io(input, e))?;
    let (file, reports) = compress_safetensors(&bytes, rank, heads)?;
    std::fs::write(output, file).map_err(|e| io(output, e))?;
    Ok(reports)
}

/// `headmix compress ARGS`: parse, run, and return the report to print (the help for `--help`).
pub fn run_cli(args: &[String]) -> Result<String, CompressError> {
    let (mut input, mut output, mut rank, mut heads) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Ok(HELP.to_string());
        }
        let mut value = || it.next().cloned().ok_or_else(|| CompressError::Usage(format!("{a} needs a value")));
        let number =
            |s: String| s.parse::<usize>().map_err(|_| CompressError::Usage(format!("{a}: `{s}` is not a number")));
        match a.as_str() {
            "--input" => input = Some(value()?),
            "--output" => output = Some(value()?),
            "--rank" => rank = Some(number(value()?)?),
            "--heads" => heads = Some(number(value()?)?),
            _ => return Err(CompressError::Usage(format!("unknown argument `{a}`"))),
        }
    }
    let missing = |what: &str| CompressError::Usage(format!("missing {what}"));
    let (input, output) = (input.ok_or_else(|| missing("--input"))?, output.ok_or_else(|| missing("--output"))?);
    let rank = rank.ok_or_else(|| missing("--rank"))?;
    let reports = compress_file(Path::new(&input), Path::new(&output), rank, heads)?;
    let mut text = String::new();
    for r in &reports {
        text.push_str(&format!("{r}\n"));
    }
    text.push_str(&format!("wrote {} layers to {output}\n", reports.len()));
    Ok(text)
}
