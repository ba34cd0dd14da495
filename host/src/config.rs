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

/// Sliding window `(left, right)` in virtual tokens: query `i` (at key index `i'`) sees key `j`
/// iff `i' - left <= j <= i' + right`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Keys visible before the query's own position, virtual tokens.
    pub left: usize,
    /// Keys visible after the query's own position, virtual tokens.
    pub right: usize,
}

/// Rotary embedding after mixing (rotate-half pairing).
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
/// `with_*` methods; [`Backend::forward`](crate::Backend::forward) validates it against the tensors.
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
    /// Head-norm epsilon (used when the weights carry `gamma`).
    pub norm_eps: f32,
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
            causal: false,
            window: None,
            rope: None,
            pos_offset: 0,
            scale: None,
            norm_eps: 1e-5,
        }
    }

    /// Standard multi-head attention: `H` heads, identity mixing, `P = 1`.
    pub fn mha(heads: usize, head_dim: usize) -> Config {
        Config::base(Method::Mha, heads, heads, heads, 1, head_dim)
    }

    /// Grouped-query attention: `H` query heads share `G` key/value heads (`H % G == 0`).
    pub fn gqa(heads: usize, kv_heads: usize, head_dim: usize) -> Result<Config> {
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::GqaHeads { heads, kv_heads });
        }
        Ok(Config::base(Method::Gqa, heads, heads, kv_heads, 1, head_dim))
    }

    /// MEA: keys and values mixed across the `H` heads, per-head RMS norm after attention.
    pub fn mea(heads: usize, head_dim: usize) -> Config {
        Config::base(Method::Mea, heads, heads, heads, 1, head_dim)
    }

    /// MEA with a compressed KV cache: `Hk < H` component heads rebuilt into `H` heads on chip.
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
        Config { causal: true, ..Config::base(Method::Iha, heads, heads, heads, pseudo, head_dim) }
    }

    /// IHA, local: causal with a sliding window of `W·P` virtual tokens, where `W` is the paper's
    /// `N / (2 P²)` tokens for a sequence of `seq_len` tokens (at least 1).
    pub fn iha_local(heads: usize, pseudo: usize, head_dim: usize, seq_len: usize) -> Result<Config> {
        if pseudo == 0 {
            return Err(Error::ZeroPseudoHeads);
        }
        let w = (seq_len / (2 * pseudo * pseudo)).max(1);
        Ok(Config::iha_window(heads, pseudo, head_dim, w))
    }

    /// IHA, local, with an explicit window of `w_tokens` tokens (`w_tokens·P` virtual tokens back).
    pub fn iha_window(heads: usize, pseudo: usize, head_dim: usize, w_tokens: usize) -> Config {
        Config {
            method: Method::IhaLocal,
            window: Some(Window { left: w_tokens.saturating_mul(pseudo), right: 0 }),
            ..Config::iha(heads, pseudo, head_dim)
        }
    }

    /// Turn the causal mask on or off.
    pub fn with_causal(mut self, causal: bool) -> Config {
        self.causal = causal;
        self
    }

    /// Set a sliding window `(left, right)` in virtual tokens.
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

    /// The softmax scale in force.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}
