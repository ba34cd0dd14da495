//! The configuration of one head-mixing attention layer, with named constructors for the methods.

pub use headmix_reference::PosMode;

use crate::{Error, Result};

/// Which named method a configuration was built as (used for default weights and reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Mha,
    Gqa,
    Mea,
    MeaCompressed,
    Iha,
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
    pub fn config(self, heads: usize, kv_heads: usize, pseudo: usize, head_dim: usize, seq_len: usize) -> Result<Config> {
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
    pub left: usize,
    pub right: usize,
}

/// Rotary embedding after mixing (rotate-half pairing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub base: f32,
    pub mode: PosMode,
}

impl Default for Rope {
    fn default() -> Self {
        Rope { base: 10000.0, mode: PosMode::Virtual }
    }
}

/// One head-mixing attention layer. Build it with a named constructor, then adjust with the
/// `with_*` methods; [`crate::forward`] validates it against the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
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
    pub causal: bool,
    pub window: Option<Window>,
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

    pub fn with_causal(mut self, causal: bool) -> Config {
        self.causal = causal;
        self
    }

    pub fn with_window(mut self, left: usize, right: usize) -> Config {
        self.window = Some(Window { left, right });
        self
    }

    pub fn with_rope(mut self, rope: Rope) -> Config {
        self.rope = Some(rope);
        self
    }

    pub fn with_pos_offset(mut self, pos: usize) -> Config {
        self.pos_offset = pos;
        self
    }

    pub fn with_scale(mut self, scale: f32) -> Config {
        self.scale = Some(scale);
        self
    }

    pub fn with_norm_eps(mut self, eps: f32) -> Config {
        self.norm_eps = eps;
        self
    }

    /// The softmax scale in force.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}
