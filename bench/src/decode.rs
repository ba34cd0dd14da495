//! The decode sweeps: one new token per sequence against a filled KV cache, per configuration,
//! batch and cache length.
//!
//! Sizes follow issue 6 on GPUs: `H = 16`, `d = 128`, bf16, `B ∈ {1, 8, 64}`, caches of 4k to 128k
//! tokens per sequence. The CPU backend (the reference) and software wgpu adapters get `H = 4`,
//! `d = 64`, f32 and caches of a few hundred to a few thousand tokens (the same [`Scale`] rule as
//! the forward sweeps). Every configuration is causal; IHA local uses the paper's window
//! `W = L / (2 P²)` tokens for a sequence of `L` tokens and a ring cache of `W + 1` tokens (the
//! window and the new token), which is all a new query can see however long the sequence.

use headmix::cache::{CacheLayout, KvCache, window_tokens};
use headmix::{CacheBytes, Config, DType, Method, Weights, cache_bytes};

use crate::sweep::Scale;

/// A named decode sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeSweep {
    /// A few lengths; well under a minute on the CPU backend of a 2-core machine.
    Quick,
    /// Every batch and cache length of the issue (4k..128k tokens on GPUs).
    Full,
}

impl DecodeSweep {
    pub const ALL: [DecodeSweep; 2] = [DecodeSweep::Quick, DecodeSweep::Full];

    pub fn name(self) -> &'static str {
        match self {
            DecodeSweep::Quick => "decode-quick",
            DecodeSweep::Full => "decode",
        }
    }

    pub fn parse(s: &str) -> Option<DecodeSweep> {
        DecodeSweep::ALL.into_iter().find(|w| w.name() == s)
    }

    /// Timed repetitions per case (after one warm-up call).
    pub fn reps(self, scale: Scale) -> usize {
        match (self, scale) {
            (DecodeSweep::Quick, Scale::Host) => 10,
            (DecodeSweep::Full, Scale::Host) => 5,
            (DecodeSweep::Quick, Scale::Gpu) => 10,
            (DecodeSweep::Full, Scale::Gpu) => 20,
        }
    }

    /// `(batch, cache tokens)` pairs of this sweep at a scale.
    fn sizes(self, scale: Scale) -> Vec<(usize, usize)> {
        let grid = |batches: &[usize], lens: &[usize]| -> Vec<(usize, usize)> {
            lens.iter().flat_map(|&l| batches.iter().map(move |&b| (b, l))).collect()
        };
        match (self, scale) {
            (DecodeSweep::Quick, Scale::Gpu) => grid(&[1, 8, 64], &[4096, 32768]),
            (DecodeSweep::Full, Scale::Gpu) => grid(&[1, 8, 64], &[4096, 8192, 16384, 32768, 65536, 131072]),
            (DecodeSweep::Quick, Scale::Host) => grid(&[1, 8, 64], &[256, 1024]),
            (DecodeSweep::Full, Scale::Host) => grid(&[1, 8, 64], &[256, 1024, 4096]),
        }
    }

    /// The cases of this sweep at a scale: per size, MHA, GQA (`Hk = H/4`), MEA, compressed MEA
    /// (`Hk = H/4`), IHA and IHA local (`P = 2, 4`).
    pub fn cases(self, scale: Scale) -> Vec<DecodeCase> {
        let (heads, head_dim, dtype) = match scale {
            Scale::Gpu => (16, 128, DType::BF16),
            Scale::Host => (4, 64, DType::F32),
        };
        let mut cases = Vec::new();
        for (batch, tokens) in self.sizes(scale) {
            let case = |method, kv_heads, pseudo| DecodeCase {
                method,
                heads,
                kv_heads,
                pseudo,
                head_dim,
                batch,
                tokens,
                dtype,
            };
            cases.push(case(Method::Mha, heads, 1));
            cases.push(case(Method::Gqa, heads / 4, 1));
            cases.push(case(Method::Mea, heads, 1));
            cases.push(case(Method::MeaCompressed, heads / 4, 1));
            for p in [2, 4] {
                cases.push(case(Method::Iha, heads, p));
                cases.push(case(Method::IhaLocal, heads, p));
            }
        }
        cases
    }
}

/// The configurations of issue 6's cache-size comparison: `H = 16`, `d = 128`, bf16, `B = 8`,
/// 32k tokens per sequence: MHA, GQA `Hk = 4`, MEA dense, MEA compressed `Hk = 8, 4`, IHA and
/// IHA local `P = 2, 4, 8` (`headmix bench --sizes-only`; exact counts, nothing is timed).
pub fn issue_size_cases() -> Vec<DecodeCase> {
    let case = |method, kv_heads, pseudo| DecodeCase {
        method,
        heads: 16,
        kv_heads,
        pseudo,
        head_dim: 128,
        batch: 8,
        tokens: 32768,
        dtype: DType::BF16,
    };
    let mut cases = vec![
        case(Method::Mha, 16, 1),
        case(Method::Gqa, 4, 1),
        case(Method::Mea, 16, 1),
        case(Method::MeaCompressed, 8, 1),
        case(Method::MeaCompressed, 4, 1),
    ];
    for p in [2, 4, 8] {
        cases.push(case(Method::Iha, 16, p));
    }
    for p in [2, 4, 8] {
        cases.push(case(Method::IhaLocal, 16, p));
    }
    cases
}

/// One decode case: a configuration, a batch, a sequence length, a dtype; one new token each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeCase {
    pub method: Method,
    /// Attention heads `H`.
    pub heads: usize,
    /// Stored key/value heads `Hk` (GQA groups, compressed MEA components).
    pub kv_heads: usize,
    /// Pseudo-heads `P` (IHA only; 1 otherwise).
    pub pseudo: usize,
    pub head_dim: usize,
    pub batch: usize,
    /// Tokens per sequence `L`, the new one included.
    pub tokens: usize,
    pub dtype: DType,
}

impl DecodeCase {
    /// The configuration (causal; IHA local with the paper's window `L / (2 P²)` tokens).
    pub fn config(&self) -> Result<Config, String> {
        crate::sweep::method_config(self.method, self.heads, self.kv_heads, self.pseudo, self.head_dim, self.tokens)
    }

    /// The weights a trained layer of the method would have (fixed seed, as the forward sweeps).
    pub fn weights(&self) -> Result<Weights, String> {
        Ok(Weights::random(&self.config()?, 42))
    }

    /// Whether the cache is a ring (IHA local: only the window and the new token are kept).
    pub fn ring(&self) -> bool {
        self.method == Method::IhaLocal
    }

    /// Tokens the cache holds per sequence, all of which one decode reads: `L` for a linear cache,
    /// `min(L, W + 1)` for the ring of IHA local.
    pub fn held(&self) -> Result<usize, String> {
        let cfg = self.config()?;
        Ok(match window_tokens(&cfg).filter(|_| self.ring()) {
            Some(w) => (w + 1).min(self.tokens),
            None => self.tokens,
        })
    }

    /// The empty cache of this case: linear of `L` tokens, or a ring of `W + 1` (room for the one
    /// new token) for IHA local. A typed error when it is too large to address.
    pub fn empty_cache(&self) -> Result<KvCache, String> {
        let cfg = self.config()?;
        let cache = if self.ring() {
            KvCache::ring(&cfg, self.batch, 1, self.dtype)
        } else {
            KvCache::for_config(&cfg, self.batch, self.tokens, self.dtype)
        };
        cache.map_err(|e| e.to_string())
    }

    /// Elements of the cache's key tensor (and of its value tensor): `B · held · Hk · d`, which
    /// `KvCache` addresses with 32-bit indices; an error naming the limit when it is above it.
    pub fn cache_elements(&self) -> Result<usize, String> {
        let elements = self.batch * self.held()? * self.kv_heads * self.head_dim;
        if elements > headmix::validate::MAX_INDEX {
            return Err(format!(
                "the cache's B·held·Hk·d = {elements} elements per tensor exceed 2^31 - 1 (KvCache indexes with 32 bits)"
            ));
        }
        Ok(elements)
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

    /// A short label for progress lines, e.g. `iha-local P=2 B=8 L=32768 d=128 bf16`.
    pub fn label(&self) -> String {
        let mut s = self.method.name().to_string();
        if self.pseudo > 1 || matches!(self.method, Method::Iha | Method::IhaLocal) {
            s += &format!(" P={}", self.pseudo);
        }
        if matches!(self.method, Method::Gqa | Method::MeaCompressed) {
            s += &format!(" Hk={}", self.kv_heads);
        }
        format!("{s} B={} L={} d={} {}", self.batch, self.tokens, self.head_dim, self.dtype.name())
    }
}

/// The cache size table of decode cases: bytes held by headmix (the `Hk` stored heads) and by the
/// unfused design (the mixed heads it attends over), exact, and their ratio.
pub fn sizes_table(cases: &[DecodeCase]) -> Result<String, String> {
    let header = [
        "config",
        "dtype",
        "B",
        "L",
        "held",
        "H",
        "Hk",
        "P",
        "d",
        "headmix bytes",
        "unfused bytes",
        "headmix",
        "unfused",
        "smaller",
    ];
    let mut cells = Vec::new();
    for c in cases {
        let b = c.cache_bytes()?;
        let mut config = c.method.name().to_string();
        if c.kv_heads != c.heads {
            config += &format!(" Hk={}", c.kv_heads);
        }
        if matches!(c.method, Method::Iha | Method::IhaLocal) {
            config += &format!(" P={}", c.pseudo);
        }
        cells.push(vec![
            config,
            c.dtype.name().into(),
            c.batch.to_string(),
            c.tokens.to_string(),
            format!("{} {}", c.held()?, c.layout_name()),
            c.heads.to_string(),
            c.kv_heads.to_string(),
            c.pseudo.to_string(),
            c.head_dim.to_string(),
            b.headmix.to_string(),
            b.unfused.to_string(),
            crate::report::fmt_bytes(b.headmix as u64),
            crate::report::fmt_bytes(b.unfused as u64),
            format!("{:.2}x", b.ratio()),
        ]);
    }
    Ok(crate::report::layout(&header, &cells))
}

/// Whether a cache is a ring.
pub fn is_ring(cache: &KvCache) -> bool {
    matches!(cache.layout(), CacheLayout::Ring { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decode_case_builds_a_valid_configuration_and_names_its_sweep() {
        for sweep in DecodeSweep::ALL {
            for scale in [Scale::Gpu, Scale::Host] {
                for case in sweep.cases(scale) {
                    let cfg = case.config().unwrap();
                    headmix::validate::validate_config(&cfg).unwrap();
                    headmix::validate::validate_weights(&cfg, &case.weights().unwrap()).unwrap();
                    assert!(cfg.causal && case.held().unwrap() <= case.tokens, "{}", case.label());
                }
            }
            assert_eq!(DecodeSweep::parse(sweep.name()), Some(sweep));
        }
        assert_eq!(DecodeSweep::parse("quick"), None);
    }

    #[test]
    fn gpu_sweep_covers_the_issue_grid_and_host_sizes_stay_small() {
        let full = DecodeSweep::Full.cases(Scale::Gpu);
        let lens: std::collections::BTreeSet<_> = full.iter().map(|c| c.tokens).collect();
        assert_eq!(lens.into_iter().collect::<Vec<_>>(), [4096, 8192, 16384, 32768, 65536, 131072]);
        let batches: std::collections::BTreeSet<_> = full.iter().map(|c| c.batch).collect();
        assert_eq!(batches.into_iter().collect::<Vec<_>>(), [1, 8, 64]);
        // The first bar of the issue: B = 8 at 32k tokens, in both GPU sweeps.
        for sweep in DecodeSweep::ALL {
            for m in [Method::Mha, Method::Gqa, Method::Mea, Method::MeaCompressed, Method::Iha, Method::IhaLocal] {
                let cases = sweep.cases(Scale::Gpu);
                assert!(cases.iter().any(|c| c.method == m && c.batch == 8 && c.tokens == 32768), "{m:?}");
            }
        }
        assert!(full.iter().all(|c| c.heads == 16 && c.head_dim == 128 && c.dtype == DType::BF16));
        for sweep in DecodeSweep::ALL {
            assert!(sweep.cases(Scale::Host).iter().all(|c| c.tokens <= 4096 && c.heads == 4));
        }
    }

    /// The GPU cases whose cache exceeds `KvCache`'s 32-bit addressing (`B·held·Hk·d < 2³¹` per
    /// tensor) are exactly the ones `bench/README.md` lists; issue 6's first bar (B = 8, 32k) fits.
    #[test]
    fn gpu_cases_beyond_the_cache_index_limit_are_the_documented_ones() {
        let too_large =
            |c: &DecodeCase| c.batch * c.held().unwrap() * c.kv_heads * c.head_dim > headmix::validate::MAX_INDEX;
        for c in DecodeSweep::Full.cases(Scale::Gpu) {
            let documented = match c.method {
                Method::Mha | Method::Mea | Method::Iha => c.batch * c.tokens >= 1 << 20,
                Method::Gqa | Method::MeaCompressed => c.batch * c.tokens >= 1 << 22,
                Method::IhaLocal => c.pseudo == 2 && c.batch == 64 && c.tokens == 131072,
                Method::Custom => unreachable!(),
            };
            assert_eq!(too_large(&c), documented, "{}", c.label());
            if c.batch == 8 && c.tokens == 32768 {
                assert!(!too_large(&c), "{}", c.label());
            }
        }
    }

    #[test]
    fn ring_cases_hold_the_window_and_the_new_token() {
        // IHA local, L = 32768, P = 2: W = 32768 / 8 = 4096 tokens, ring of 4097.
        let c = issue_size_cases().into_iter().find(|c| c.method == Method::IhaLocal && c.pseudo == 2).unwrap();
        assert_eq!(c.config().unwrap().window.unwrap().left, 4096 * 2 - 1); // W·P keys seen, own included
        assert_eq!(c.held().unwrap(), 4097);
        let small = DecodeCase { batch: 2, tokens: 256, heads: 4, kv_heads: 4, head_dim: 8, dtype: DType::F32, ..c };
        let cache = small.empty_cache().unwrap();
        assert!(is_ring(&cache));
        assert_eq!(cache.shape().capacity, small.held().unwrap());
        assert_eq!(cache.bytes(), small.cache_bytes().unwrap().headmix);
        // A global IHA case keeps every token in a linear cache.
        let global = DecodeCase { method: Method::Iha, ..small };
        let cache = global.empty_cache().unwrap();
        assert!(!is_ring(&cache) && cache.shape().capacity == 256);
        assert_eq!(cache.bytes(), global.cache_bytes().unwrap().headmix);
    }

    #[test]
    fn issue_sizes_are_p_and_h_over_hk_times_smaller() {
        for c in issue_size_cases() {
            let b = c.cache_bytes().unwrap();
            let want = match c.method {
                Method::Iha | Method::IhaLocal => c.pseudo as f64,
                Method::Mea | Method::MeaCompressed => (c.heads / c.kv_heads) as f64,
                _ => 1.0,
            };
            assert_eq!(b.ratio(), want, "{}", c.label());
            // B · held · Hk · d · 2 (k and v) · 2 bytes.
            assert_eq!(b.headmix, 8 * c.held().unwrap() * c.kv_heads * 128 * 2 * 2, "{}", c.label());
        }
        // MHA at B = 8, 32k tokens, H = 16, d = 128, bf16: 8·32768·16·128·2·2 bytes = 2 GiB.
        let t = sizes_table(&issue_size_cases()).unwrap();
        assert_eq!(t.lines().count(), 2 + issue_size_cases().len());
        assert!(t.lines().nth(2).unwrap().contains(&(1u64 << 31).to_string()), "{t}");
        assert!(t.contains("8.00x") && t.contains("4.00x") && t.contains("2.00x"), "{t}");
    }
}
