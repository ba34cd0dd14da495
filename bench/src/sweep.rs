//! The named sweeps: which configurations, sizes and dtypes a benchmark run covers.
//!
//! Sizes follow the FlashAttention benchmarks on GPUs: `H·d = 2048` and `B·N = 16k` tokens, so
//! every sequence length does the same number of tokens. The CPU backend is the f64/f32
//! reference, so it gets tiny sizes (`N = 64..256`, `H = 4`): enough to exercise the whole path.
//! Every configuration is causal (LLM prefill), `M = N`.

use headmix::{BackendKind, Config, DType, Method, Weights};

/// A named sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// A few cases per configuration; under a minute on the CPU backend of a 2-core machine.
    Quick,
    /// Every configuration, sequence length, `P`, `d` and dtype.
    Full,
}

impl Sweep {
    pub const ALL: [Sweep; 2] = [Sweep::Quick, Sweep::Full];

    pub fn name(self) -> &'static str {
        match self {
            Sweep::Quick => "quick",
            Sweep::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Option<Sweep> {
        Sweep::ALL.into_iter().find(|w| w.name() == s)
    }

    /// Timed repetitions per case (after one warm-up call) at a scale.
    pub fn reps(self, scale: Scale) -> usize {
        match (self, scale) {
            (Sweep::Quick, Scale::Host) => 10,
            (Sweep::Full, Scale::Host) => 5,
            (Sweep::Quick, _) => 10,
            _ => 20,
        }
    }

    /// The cases of this sweep at a scale.
    pub fn cases(self, scale: Scale) -> Vec<Case> {
        let gpu = scale == Scale::Gpu;
        let (seqs, dims, dtypes, pseudos): (&[usize], &[usize], &[DType], &[usize]) = match (self, gpu) {
            (Sweep::Quick, true) => (&[1024, 4096, 16384], &[128], &[DType::BF16], &[2, 4]),
            (Sweep::Full, true) => {
                (&[1024, 2048, 4096, 8192, 16384], &[64, 128], &[DType::BF16, DType::F16], &[1, 2, 4, 8])
            }
            (Sweep::Quick, false) => (&[64, 128, 256], &[64], &[DType::F32], &[2, 4]),
            (Sweep::Full, false) => (&[64, 128, 256], &[64, 128], &[DType::F32, DType::BF16], &[1, 2, 4, 8]),
        };
        let mut cases = Vec::new();
        for &dtype in dtypes {
            for &d in dims {
                let heads = if gpu { 2048 / d } else { 4 };
                for &n in seqs {
                    let batch = if gpu { (16384 / n).max(1) } else { 1 };
                    let case = |method, kv_heads, pseudo| Case {
                        method,
                        heads,
                        kv_heads,
                        pseudo,
                        head_dim: d,
                        batch,
                        n,
                        m: n,
                        dtype,
                    };
                    cases.push(case(Method::Mha, heads, 1));
                    cases.push(case(Method::Gqa, heads / 4, 1));
                    cases.push(case(Method::Mea, heads, 1));
                    cases.push(case(Method::MeaCompressed, heads / 2, 1));
                    for &p in pseudos {
                        cases.push(case(Method::Iha, heads, p));
                        cases.push(case(Method::IhaLocal, heads, p));
                    }
                }
            }
        }
        cases
    }
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
}

/// One benchmark case: a named configuration at one size and dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Case {
    pub method: Method,
    /// Attention heads `H`.
    pub heads: usize,
    /// Stored key/value heads `Hk` (GQA groups, compressed MEA components).
    pub kv_heads: usize,
    /// Pseudo-heads `P` (IHA only; 1 otherwise).
    pub pseudo: usize,
    pub head_dim: usize,
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub dtype: DType,
}

/// The causal configuration of a named method, as every sweep builds it (IHA local with the
/// paper's window `seq_len / (2 P²)` tokens).
pub fn method_config(
    method: Method,
    heads: usize,
    kv_heads: usize,
    pseudo: usize,
    head_dim: usize,
    seq_len: usize,
) -> Result<Config, String> {
    let (h, d) = (heads, head_dim);
    let cfg = match method {
        Method::Mha => Config::mha(h, d),
        Method::Gqa => Config::gqa(h, kv_heads, d).map_err(|e| e.to_string())?,
        Method::Mea => Config::mea(h, d),
        Method::MeaCompressed => Config::mea_compressed(h, kv_heads, d).map_err(|e| e.to_string())?,
        Method::Iha => Config::iha(h, pseudo, d),
        Method::IhaLocal => Config::iha_local(h, pseudo, d, seq_len).map_err(|e| e.to_string())?,
        Method::Custom => return Err("custom configurations are not benchmarked".into()),
    };
    Ok(cfg.with_causal(true))
}

impl Case {
    /// The configuration (causal; IHA local with the paper's window `N / (2 P²)` tokens).
    pub fn config(&self) -> Result<Config, String> {
        method_config(self.method, self.heads, self.kv_heads, self.pseudo, self.head_dim, self.n)
    }

    /// The weights a trained layer of the method would have (fixed seed).
    pub fn weights(&self) -> Result<Weights, String> {
        Ok(Weights::random(&self.config()?, 42))
    }

    /// A short label for progress lines and tables, e.g. `iha P=2 N=256 d=64 bf16`.
    pub fn label(&self) -> String {
        let mut s = self.method.name().to_string();
        if self.pseudo > 1 || matches!(self.method, Method::Iha | Method::IhaLocal) {
            s += &format!(" P={}", self.pseudo);
        }
        if matches!(self.method, Method::Gqa | Method::MeaCompressed) {
            s += &format!(" Hk={}", self.kv_heads);
        }
        format!("{s} B={} N={} d={} {}", self.batch, self.n, self.head_dim, self.dtype.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_of_every_sweep_builds_a_valid_configuration() {
        for sweep in Sweep::ALL {
            for scale in [Scale::Gpu, Scale::Host] {
                for case in sweep.cases(scale) {
                    let cfg = case.config().unwrap();
                    headmix::validate::validate_config(&cfg).unwrap();
                    headmix::validate::validate_weights(&cfg, &case.weights().unwrap()).unwrap();
                    assert!(cfg.causal);
                }
            }
        }
        assert_eq!(Sweep::parse("full"), Some(Sweep::Full));
        assert_eq!(Sweep::parse("nope"), None);
    }

    #[test]
    fn software_devices_get_host_sizes() {
        assert_eq!(Scale::of(BackendKind::Cpu, "host CPU (2 threads)", &[]), Scale::Host);
        assert_eq!(Scale::of(BackendKind::Cuda, "NVIDIA H100 80GB HBM3", &[]), Scale::Gpu);
        assert_eq!(Scale::of(BackendKind::Wgpu, "NVIDIA GeForce RTX 4090", &[]), Scale::Gpu);
        assert_eq!(Scale::of(BackendKind::Wgpu, "llvmpipe (LLVM 19.1.7, 256 bits)", &[]), Scale::Host);
        let describe = [("device type".to_string(), "Cpu".to_string())];
        assert_eq!(Scale::of(BackendKind::Wgpu, "some adapter", &describe), Scale::Host);
    }

    #[test]
    fn sweeps_cover_the_issue_grid() {
        let full = Sweep::Full.cases(Scale::Gpu);
        let ns: std::collections::BTreeSet<_> = full.iter().map(|c| c.n).collect();
        assert_eq!(ns.into_iter().collect::<Vec<_>>(), [1024, 2048, 4096, 8192, 16384]);
        for p in [1, 2, 4, 8] {
            assert!(full.iter().any(|c| c.method == Method::IhaLocal && c.pseudo == p));
        }
        assert!(full.iter().all(|c| c.batch * c.n == 16384 && c.heads * c.head_dim == 2048));
        let cpu = Sweep::Full.cases(Scale::Host);
        assert!(cpu.iter().all(|c| c.n <= 256));
        // IHA local uses the paper's window: W = N / (2 P²) tokens, W·P virtual keys seen (the
        // query's own included: left = W·P − 1).
        let c = full.iter().find(|c| c.method == Method::IhaLocal && c.pseudo == 4 && c.n == 4096).unwrap();
        assert_eq!(c.config().unwrap().window.unwrap().left, 4096 / 32 * 4 - 1);
    }
}
