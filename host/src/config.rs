//! The configuration of one head-mixing attention layer, with named constructors for the methods.

pub use headmix_reference::PosMode;

use crate::{Error, Result};

/// Which named method a configuration was built as (used for default weights and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Standard multi-head attention.
    Mha,
    /// Grouped-query attention.
    Gqa,
    /// Multi-head Explicit Attention.
    Mea,
    /// MEA with a compressed KV cache (`Hk < H`).
    MeaCompressed,
    /// Interleaved Head Attention, global.
    Iha,
    /// Interleaved Head Attention with a sliding window.
    IhaLocal,
    /// Built field by field.
    Custom,
}

impl Method {
    /// The named methods, in the order tests, the CLI, the benchmarks and their reports list them
    /// (every method but [`Method::Custom`]).
    pub const ALL: [Method; 6] =
        [Method::Mha, Method::Gqa, Method::Mea, Method::MeaCompressed, Method::Iha, Method::IhaLocal];

    /// The named method called `name` (as [`Method::name`] spells it).
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the method stores fewer key/value heads than heads (`Hk` is a free parameter).
    pub fn takes_kv_heads(self) -> bool {
        matches!(self, Method::Gqa | Method::MeaCompressed)
    }

    /// Whether the method has pseudo-heads (`P` is a free parameter).
    pub fn takes_pseudo(self) -> bool {
        matches!(self, Method::Iha | Method::IhaLocal)
    }

    /// The configuration of a named method by its named constructor: `kv_heads` is read by
    /// GQA and compressed MEA only, `pseudo` by IHA only, `seq_len` by IHA local only (its
    /// window, the paper's `seq_len / (2 P²)` tokens). Not causal unless the method is.
    /// [`Method::Custom`] gets the MHA shape, to be edited field by field.
    pub fn config(
        self,
        heads: usize,
        kv_heads: usize,
        pseudo: usize,
        head_dim: usize,
        seq_len: usize,
    ) -> Result<Config> {
        Ok(match self {
            Method::Mha => Config::mha(heads, head_dim),
            Method::Gqa => Config::gqa(heads, kv_heads, head_dim)?,
            Method::Mea => Config::mea(heads, head_dim),
            Method::MeaCompressed => Config::mea_compressed(heads, kv_heads, head_dim)?,
            Method::Iha => Config::iha(heads, pseudo, head_dim),
            Method::IhaLocal => Config::iha_local(heads, pseudo, head_dim, seq_len)?,
            // No constructor: the MHA shape, to be edited field by field.
            Method::Custom => Config::base(Method::Custom, heads, heads, heads, 1, head_dim),
        })
    }

    /// Lower-case name (`mha`, `iha-local`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::Mha => "mha",
            Method::Gqa => "gqa",
            Method::Mea => "mea",
            Method::MeaCompressed => "mea-compressed",
            Method::Iha => "iha",
            Method::IhaLocal => "iha-local",
            Method::Custom => "custom",
        }
    }
}

/// Sliding window `(left, right)` in virtual tokens, FlashAttention's convention: query `i` (at
/// key index `i' = i + (M − N)·P`, bottom-right aligned) sees key `j` iff
/// `i' − left <= j <= i' + right`, i.e. `left` keys before its own, its own, and `right` after:
/// at most `left + 1 + right` keys (`left + 1` when causal). IHA-local's window of `W` tokens is
/// `(W·P − 1, 0)`: exactly `W·P` virtual keys, the query's own included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Keys visible before the query's own position, virtual tokens.
    pub left: usize,
    /// Keys visible after the query's own position, virtual tokens.
    pub right: usize,
}

/// Rotary embedding after mixing (rotate-half pairing, frequencies `base^(−2t/d)`), at positions
/// aligned bottom-right like the mask: with `M` keys and `N <= M` queries the queries are the
/// last `N` tokens, so (`Virtual` mode) key `j` sits at `pos0 + j` and query `i` at
/// `pos0 + i + (M − N)·P`; in `Token` mode key token `s` at `pos0 + s` and query token `n` at
/// `pos0 + n + (M − N)`. A prefill followed by decode steps therefore rotates exactly as one
/// forward over the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Frequency base (default 10000).
    pub base: f32,
    /// Virtual or token positions.
    pub mode: PosMode,
}

impl Default for Rope {
    fn default() -> Self {
        Rope { base: 10000.0, mode: PosMode::Virtual }
    }
}

/// One head-mixing attention layer. Build it with a named constructor, then adjust with the
/// `with_*` methods; [`crate::validate()`] checks it against the tensors on every call.
///
/// # Defaults (the same for every named constructor)
///
/// * **causal = true**: the methods are decoder-LM layers (the IHA and MEA papers are causal
///   language models). Causality is always an explicit field: `with_causal(false)` gives
///   bidirectional attention (FlashAttention's `causal=False`). The mask is bottom-right aligned
///   (with `M > N` keys the queries are the last `N` tokens).
/// * no window except IHA-local's `(W·P − 1, 0)` (see [`Window`]), no RoPE, `pos_offset = 0`,
///   softmax scale `1/sqrt(d)`, `norm_eps = 1e-5`.
/// * The head norm and the collapse live in [`crate::Weights`]: MEA's default weights carry
///   the paper's `Group` norm (PyTorch `GroupNorm(H, H·d)`); IHA's carry a collapse `r`.
///
/// # Output shape
///
/// `[B, N, H, d]` when the weights carry a collapse `r` or when `P = 1` (MHA, GQA, MEA: the
/// common case); `[B, N, H, P, d]` for `P > 1` without a collapse (`[B, N, H, 1, d]` is accepted
/// too for `P = 1`: the same memory).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// The named method it was built as.
    pub method: Method,
    /// Attention heads `H`.
    pub heads: usize,
    /// Stored query heads `Hq`.
    pub q_heads: usize,
    /// Stored key/value heads `Hk`.
    pub kv_heads: usize,
    /// Pseudo-heads per head `P`.
    pub pseudo: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
    /// Causal mask on virtual tokens.
    pub causal: bool,
    /// Sliding window, if any.
    pub window: Option<Window>,
    /// Rotary embedding after mixing, if any.
    pub rope: Option<Rope>,
    /// RoPE position offset `pos0`.
    pub pos_offset: usize,
    /// Softmax scale; `None` is `1/sqrt(d)`.
    pub scale: Option<f32>,
    /// Head-norm epsilon (used when the weights carry a head norm).
    pub norm_eps: f32,
    /// Validate `q`, `k`, `v` (and a decode's cached keys/values) on the host: the first NaN or
    /// infinity is an [`Error::NonFinite`] naming the tensor and flat index. Off by default
    /// (it reads every input once); see the crate docs' NaN policy.
    pub check_finite: bool,
}

impl Config {
    fn base(method: Method, heads: usize, q_heads: usize, kv_heads: usize, pseudo: usize, head_dim: usize) -> Config {
        Config {
            method,
            heads,
            q_heads,
            kv_heads,
            pseudo,
            head_dim,
            causal: true,
            window: None,
            rope: None,
            pos_offset: 0,
            scale: None,
            norm_eps: 1e-5,
            check_finite: false,
        }
    }

    /// Standard multi-head attention: `H` heads, identity mixing, `P = 1`; causal.
    pub fn mha(heads: usize, head_dim: usize) -> Config {
        Config::base(Method::Mha, heads, heads, heads, 1, head_dim)
    }

    /// Grouped-query attention: `H` query heads share `G` key/value heads (`H % G == 0`); causal.
    pub fn gqa(heads: usize, kv_heads: usize, head_dim: usize) -> Result<Config> {
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::GqaHeads { heads, kv_heads });
        }
        Ok(Config::base(Method::Gqa, heads, heads, kv_heads, 1, head_dim))
    }

    /// MEA: keys and values mixed across the `H` heads, then the head-level `Group` norm (in the
    /// weights: [`crate::Weights::identity`]/[`crate::Weights::random`]; `Rms` selectable); causal.
    pub fn mea(heads: usize, head_dim: usize) -> Config {
        Config::base(Method::Mea, heads, heads, heads, 1, head_dim)
    }

    /// MEA with a compressed KV cache: `Hk < H` component heads rebuilt into `H` heads on chip;
    /// `Group` norm as [`Config::mea`]; causal.
    pub fn mea_compressed(heads: usize, kv_heads: usize, head_dim: usize) -> Result<Config> {
        if kv_heads == 0 || kv_heads > heads {
            return Err(Error::Heads {
                what: "kv_heads",
                value: kv_heads,
                why: format!("compressed MEA needs 1 <= Hk <= H = {heads}"),
            });
        }
        Ok(Config::base(Method::MeaCompressed, heads, heads, kv_heads, 1, head_dim))
    }

    /// IHA, global: `P` pseudo-heads per head, causal over the `N·P` virtual tokens.
    pub fn iha(heads: usize, pseudo: usize, head_dim: usize) -> Config {
        Config::base(Method::Iha, heads, heads, heads, pseudo, head_dim)
    }

    /// The paper's IHA-local window in tokens for a sequence of `seq_len` tokens:
    /// `W = max(1, floor(N / (2 P²)))` (checked: a `2 P²` beyond `usize` gives `W = 1`).
    pub fn iha_local_tokens(pseudo: usize, seq_len: usize) -> Result<usize> {
        if pseudo == 0 {
            return Err(Error::ZeroPseudoHeads);
        }
        let denom = pseudo.checked_mul(pseudo).and_then(|p2| p2.checked_mul(2));
        Ok(denom.map_or(0, |den| seq_len / den).max(1))
    }

    /// IHA, local: causal, each virtual query sees exactly `W·P` virtual keys (itself included),
    /// window `(left, right) = (W·P − 1, 0)`, with the paper's `W = max(1, floor(N / (2 P²)))`
    /// tokens for a sequence of `seq_len` tokens ([`Config::iha_local_tokens`]).
    pub fn iha_local(heads: usize, pseudo: usize, head_dim: usize, seq_len: usize) -> Result<Config> {
        let w = Config::iha_local_tokens(pseudo, seq_len)?;
        Ok(Config::iha_window(heads, pseudo, head_dim, w))
    }

    /// IHA, local, with an explicit window of `w_tokens` tokens (at least 1): causal, window
    /// `(W·P − 1, 0)`, so each virtual query sees `W·P` virtual keys, itself included (a `W·P`
    /// beyond `usize` saturates and is then refused by validation as too wide).
    pub fn iha_window(heads: usize, pseudo: usize, head_dim: usize, w_tokens: usize) -> Config {
        let left = w_tokens.max(1).saturating_mul(pseudo).saturating_sub(1);
        Config {
            method: Method::IhaLocal,
            window: Some(Window { left, right: 0 }),
            ..Config::iha(heads, pseudo, head_dim)
        }
    }

    /// Causal (`true`, the default of every named constructor) or bidirectional (`false`).
    pub fn with_causal(mut self, causal: bool) -> Config {
        self.causal = causal;
        self
    }

    /// Sliding window `(left, right)` in virtual tokens (see [`Window`] for the keys it shows).
    pub fn with_window(mut self, left: usize, right: usize) -> Config {
        self.window = Some(Window { left, right });
        self
    }

    /// Apply RoPE after mixing.
    pub fn with_rope(mut self, rope: Rope) -> Config {
        self.rope = Some(rope);
        self
    }

    /// Set the RoPE position offset `pos0`.
    pub fn with_pos_offset(mut self, pos: usize) -> Config {
        self.pos_offset = pos;
        self
    }

    /// Set the softmax scale (default `1/sqrt(d)`).
    pub fn with_scale(mut self, scale: f32) -> Config {
        self.scale = Some(scale);
        self
    }

    /// Set the head-norm epsilon (default `1e-5`).
    pub fn with_norm_eps(mut self, eps: f32) -> Config {
        self.norm_eps = eps;
        self
    }

    /// Opt in (or out) of host-side validation of `q`, `k`, `v` for NaN and infinities.
    pub fn with_check_finite(mut self, check: bool) -> Config {
        self.check_finite = check;
        self
    }

    /// The softmax scale in force.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}
