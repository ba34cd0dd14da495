//! The named sweeps: which configurations, sizes and dtypes a benchmark run covers.
//!
//! Forward sweeps (`quick`, `full`) follow the FlashAttention benchmarks on GPUs: `H·d = 2048`
//! and `B·N = 16k` tokens, so every sequence length does the same number of tokens. Decode
//! sweeps (`decode-quick`, `decode`) follow issue 6: one new token per sequence against a cache
//! of `L` tokens, `H = 16`, `d = 128`, bf16, `B = 1, 8, 64`. The CPU backend (the reference) and
//! software wgpu adapters get tiny sizes ([`Scale::Host`]): enough to exercise the whole path.
//! Every configuration is causal; IHA local uses the paper's window `W = L / (2 P²)` tokens and,
//! in decode, a ring cache of `W + 1` tokens (all a new query can see).

use headmix::cache::{KvCache, window_tokens};
use headmix::{Backend, BackendKind, CacheBytes, Config, DType, Method, Problem, Weights, cache_bytes};

/// New query tokens per sequence of a decode case.
pub const NEW_TOKENS: usize = 1;

/// A named sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// A few forward cases per configuration; under a minute on the CPU backend of a 2-core machine.
    Quick,
    /// Every configuration, sequence length, `P`, `d` and dtype.
    Full,
    /// A few decode lengths; well under a minute on the CPU backend.
    DecodeQuick,
    /// Every batch and cache length of issue 6 (4k..128k tokens on GPUs).
    Decode,
}

impl Sweep {
    pub const ALL: [Sweep; 4] = [Sweep::Quick, Sweep::Full, Sweep::DecodeQuick, Sweep::Decode];

    pub fn name(self) -> &'static str {
        ["quick", "full", "decode-quick", "decode"][self as usize]
    }

    pub fn parse(s: &str) -> Option<Sweep> {
        Sweep::ALL.into_iter().find(|w| w.name() == s)
    }

    pub fn is_decode(self) -> bool {
        matches!(self, Sweep::DecodeQuick | Sweep::Decode)
    }

    /// Timed repetitions per case (after one warm-up call) at a scale.
    pub fn reps(self, scale: Scale) -> usize {
        match (self, scale) {
            (Sweep::Full | Sweep::Decode, Scale::Host) => 5,
            (Sweep::Full | Sweep::Decode, Scale::Gpu) => 20,
            _ => 10,
        }
    }

    /// The cases of this sweep at a scale.
    pub fn cases(self, scale: Scale) -> Vec<Case> {
        let gpu = scale == Scale::Gpu;
        let mut cases = Vec::new();
        if self.is_decode() {
            let (heads, head_dim, dtype) = if gpu { (16, 128, DType::BF16) } else { (4, 64, DType::F32) };
            let lens: &[usize] = match (self, gpu) {
                (Sweep::DecodeQuick, true) => &[4096, 32768],
                (_, true) => &[4096, 8192, 16384, 32768, 65536, 131072],
                (Sweep::DecodeQuick, false) => &[256, 1024],
                (_, false) => &[256, 1024, 4096],
            };
            for &tokens in lens {
                for batch in [1, 8, 64] {
                    let base = Case::mha(Mode::Decode, heads, head_dim, batch, tokens, dtype);
                    cases.extend(methods(base, heads / 4, heads / 4, &[2, 4]));
                }
            }
            return cases;
        }
        let (seqs, dims, dtypes, pseudos): (&[usize], &[usize], &[DType], &[usize]) = match (self, gpu) {
            (Sweep::Quick, true) => (&[1024, 4096, 16384], &[128], &[DType::BF16], &[2, 4]),
            (_, true) => (&[1024, 2048, 4096, 8192, 16384], &[64, 128], &[DType::BF16, DType::F16], &[1, 2, 4, 8]),
            (Sweep::Quick, false) => (&[64, 128, 256], &[64], &[DType::F32], &[2, 4]),
            (_, false) => (&[64, 128, 256], &[64, 128], &[DType::F32, DType::BF16], &[1, 2, 4, 8]),
        };
        for &dtype in dtypes {
            for &d in dims {
                let heads = if gpu { 2048 / d } else { 4 };
                for &n in seqs {
                    let batch = if gpu { (16384 / n).max(1) } else { 1 };
                    let base = Case::mha(Mode::Forward, heads, d, batch, n, dtype);
                    cases.extend(methods(base, heads / 4, heads / 2, pseudos));
                }
            }
        }
        cases
    }
}

/// Every method of [`Method::ALL`] at the sizes of `base`: GQA with `Hk = gqa_kv`, compressed MEA
/// with `Hk = mea_kv`, IHA and IHA local once per `P` of `pseudos`.
fn methods(base: Case, gqa_kv: usize, mea_kv: usize, pseudos: &[usize]) -> Vec<Case> {
    let mut out = Vec::new();
    for method in Method::ALL {
        let kv_heads = match method {
            Method::Gqa => gqa_kv,
            Method::MeaCompressed => mea_kv,
            _ => base.heads,
        };
        for &pseudo in if method.takes_pseudo() { pseudos } else { &[1] } {
            out.push(Case { method, kv_heads, pseudo, ..base });
        }
    }
    out
}

/// The configurations of issue 6's cache-size comparison: `H = 16`, `d = 128`, bf16, `B = 8`,
/// 32k tokens per sequence: MHA, GQA `Hk = 4`, MEA, MEA compressed `Hk = 8, 4`, IHA and IHA local
/// `P = 2, 4, 8` (`headmix bench --sizes-only`; exact counts, nothing is timed).
pub fn issue_size_cases() -> Vec<Case> {
    let base = Case::mha(Mode::Decode, 16, 128, 8, 32768, DType::BF16);
    let case = |method, kv_heads, pseudo| Case { method, kv_heads, pseudo, ..base };
    let mut cases = vec![case(Method::Mha, 16, 1), case(Method::Gqa, 4, 1), case(Method::Mea, 16, 1)];
    cases.extend([case(Method::MeaCompressed, 8, 1), case(Method::MeaCompressed, 4, 1)]);
    cases.extend([2, 4, 8].map(|p| case(Method::Iha, 16, p)));
    cases.extend([2, 4, 8].map(|p| case(Method::IhaLocal, 16, p)));
    cases
}

/// The sizes a device gets: GPU sizes, or the small ones of the CPU backend, which software
/// rasterizers behind wgpu (llvmpipe, lavapipe, SwiftShader) get too: they run on the same cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Gpu,
    Host,
}

impl Scale {
    /// The scale of a device from its backend kind, name and `describe()` pairs (a `... type`
    /// entry saying `Cpu`, as wgpu's device type prints, marks a software device).
    pub fn of(kind: BackendKind, device: &str, describe: &[(String, String)]) -> Scale {
        const SOFTWARE: [&str; 5] = ["llvmpipe", "lavapipe", "swiftshader", "softpipe", "basic render driver"];
        let name = device.to_ascii_lowercase();
        let cpu_type =
            describe.iter().any(|(k, v)| k.to_ascii_lowercase().contains("type") && v.eq_ignore_ascii_case("cpu"));
        if kind == BackendKind::Cpu || cpu_type || SOFTWARE.iter().any(|s| name.contains(s)) {
            Scale::Host
        } else {
            Scale::Gpu
        }
    }

    /// The scale assumed without opening a device (`--list`): GPU sizes but on the CPU backend.
    pub fn assumed(kind: BackendKind) -> Scale {
        if kind == BackendKind::Cpu { Scale::Host } else { Scale::Gpu }
    }
}

/// What a case times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A forward pass of `N` query tokens against `M = N` keys.
    Forward,
    /// [`headmix::decode()`] of one new token per sequence against a filled cache of `L = m`
    /// tokens on the device ([`headmix::Backend::time_decode`]).
    Decode,
}

/// One benchmark case: a named configuration at one size and dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Case {
    pub mode: Mode,
    pub method: Method,
    /// Attention heads `H`.
    pub heads: usize,
    /// Stored key/value heads `Hk` (GQA groups, compressed MEA components).
    pub kv_heads: usize,
    /// Pseudo-heads `P` (IHA only; 1 otherwise).
    pub pseudo: usize,
    pub head_dim: usize,
    pub batch: usize,
    /// Query tokens per sequence (decode: [`NEW_TOKENS`]).
    pub n: usize,
    /// Key tokens per sequence (decode: `L`, the sequence length, the new token included).
    pub m: usize,
    pub dtype: DType,
}

impl Case {
    /// An MHA case of `tokens` tokens per sequence (other methods: `Case { method, .. }`).
    pub fn mha(mode: Mode, heads: usize, head_dim: usize, batch: usize, tokens: usize, dtype: DType) -> Case {
        let n = if mode == Mode::Forward { tokens } else { NEW_TOKENS };
        Case { mode, method: Method::Mha, heads, kv_heads: heads, pseudo: 1, head_dim, batch, n, m: tokens, dtype }
    }

    /// The configuration: causal, IHA local with the paper's window `M / (2 P²)` tokens.
    pub fn config(&self) -> Result<Config, String> {
        let cfg = self.method.config(self.heads, self.kv_heads, self.pseudo, self.head_dim, self.m);
        Ok(cfg.map_err(|e| e.to_string())?.with_causal(true))
    }

    /// The weights a trained layer of the method would have (fixed seed).
    pub fn weights(&self) -> Result<Weights, String> {
        Ok(Weights::random(&self.config()?, 42))
    }

    /// The validated forward problem the case times: `N` against `M`; for decode cases, what
    /// one sequence's decode counts: one query token against the held tokens (bottom-right
    /// aligned, so it sees exactly what a decode sees), `B = 1` (every sequence holds as many).
    pub fn problem(&self) -> Result<(Problem, Weights), String> {
        let (cfg, w) = (self.config()?, self.weights()?);
        let (b, m) = if self.mode == Mode::Forward { (self.batch, self.m) } else { (1, self.held()?) };
        let p = Problem::for_weights(&cfg, &w, b, self.n, m, self.dtype).map_err(|e| e.to_string())?;
        Ok((p, w))
    }

    /// FLOPs and bytes of the whole case from its [`Case::problem`] (times `B` for decode).
    pub fn counts(&self, p: &Problem) -> (f64, f64) {
        let b = (self.batch / p.batch) as f64;
        (b * p.flops(), b * crate::count::bytes(p))
    }

    /// Whether the cache is a ring (decode of IHA local: only the window and the new token).
    pub fn ring(&self) -> bool {
        self.method == Method::IhaLocal && self.mode != Mode::Forward
    }

    /// Tokens the cache holds per sequence, all of which one decode reads: `L` for a linear cache,
    /// `min(L, W + 1)` for a ring.
    pub fn held(&self) -> Result<usize, String> {
        Ok(match window_tokens(&self.config()?).filter(|_| self.ring()) {
            Some(w) => (w + 1).min(self.m),
            None => self.m,
        })
    }

    /// The empty cache on `backend`'s device (host memory for the CPU): linear of `L` tokens, or
    /// a ring of `W + 1` (room for the new token). A typed error, before anything is allocated,
    /// when a sequence exceeds the kernels' 32-bit indices or the device refuses the size.
    pub fn empty_cache(&self, backend: &dyn Backend) -> Result<KvCache, String> {
        let cfg = self.config()?;
        let cache = if self.ring() {
            KvCache::ring_on(backend, &cfg, self.batch, NEW_TOKENS, self.dtype)
        } else {
            KvCache::for_config_on(backend, &cfg, self.batch, self.m, self.dtype)
        };
        cache.map_err(|e| e.to_string())
    }

    /// `linear` or `ring`.
    pub fn layout_name(&self) -> &'static str {
        if self.ring() { "ring" } else { "linear" }
    }

    /// Cache memory of the held tokens: headmix (the `Hk` stored heads) against the unfused design
    /// (the mixed heads its attention reads), from [`headmix::cache_bytes`].
    pub fn cache_bytes(&self) -> Result<CacheBytes, String> {
        Ok(cache_bytes(&self.config()?, self.batch, self.held()?, self.dtype))
    }

    /// A short label, e.g. `iha P=2 B=1 N=256 d=64 f32`, `gqa Hk=4 B=8 L=32768 d=128 bf16`.
    pub fn label(&self) -> String {
        let mut s = self.method.name().to_string();
        if self.pseudo > 1 || self.method.takes_pseudo() {
            s += &format!(" P={}", self.pseudo);
        }
        if self.method.takes_kv_heads() {
            s += &format!(" Hk={}", self.kv_heads);
        }
        let (b, d, dt) = (self.batch, self.head_dim, self.dtype.name());
        match self.mode {
            Mode::Forward => format!("{s} B={b} N={} d={d} {dt}", self.n),
            Mode::Decode => format!("{s} B={b} L={} d={d} {dt}", self.m),
        }
    }
}
