//! `headmix run`: one forward pass of a named configuration on a backend, checked against the
//! f64 reference and timed. The configuration and the sizes are validated by the library's
//! validator, and the host memory the run needs is checked, before anything is allocated.

use std::io::Write;
use std::time::Instant;

use headmix::reference::{MixWeights, Rounding, rel_err};
use headmix::timing::{Owned, try_random_inputs};
use headmix::validate::{MAX_HEAD_DIM, validate_config, validate_sizes};
use headmix::{Backend, BackendKind, Config, DType, Error, Io, Method, PosMode, Problem, Rope, Weights};
use headmix_bench::report::fmt_sig;

use crate::flags::{self, MAX, Norm};

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// The configuration: mha, gqa, mea, mea-compressed, iha, iha-local
    #[arg(long, default_value = "iha", value_parser = flags::method)]
    config: Method,
    /// The backend: auto (the best present), cuda, wgpu, cpu
    #[arg(long, default_value = "auto", value_parser = flags::backend)]
    backend: ::std::option::Option<BackendKind>,
    /// Batch size B, in 1..=2^31-1
    #[arg(long, default_value_t = 1, value_parser = flags::count(1, MAX))]
    pub(crate) batch: usize,
    /// Query tokens N, in 1..=2^31-1
    #[arg(long, default_value_t = 256, value_parser = flags::count(1, MAX))]
    pub(crate) seq: usize,
    /// Key/value tokens M >= N (a KV-cache prefix) [default: N]
    #[arg(long, value_parser = flags::count(1, MAX))]
    pub(crate) kv_seq: Option<usize>,
    /// Attention heads H, in 1..=2^31-1
    #[arg(long, default_value_t = 8, value_parser = flags::count(1, MAX))]
    heads: usize,
    /// Stored key/value heads Hk, gqa and mea-compressed only [default: H/2]
    #[arg(long, value_parser = flags::count(1, MAX))]
    kv_heads: Option<usize>,
    /// Pseudo-heads per head P, iha and iha-local only [default: 2]
    #[arg(long, value_parser = flags::count(1, MAX))]
    pseudo: Option<usize>,
    /// Head dimension d: even, in 2..=256
    #[arg(long, default_value_t = 64, value_parser = flags::count(2, MAX_HEAD_DIM))]
    head_dim: usize,
    /// Element type: f32, f16, bf16
    #[arg(long, value_parser = flags::dtype)]
    pub(crate) dtype: Option<DType>,
    /// Sliding window L,R in virtual tokens (overrides iha-local's)
    #[arg(long, value_parser = flags::window)]
    window: Option<(usize, usize)>,
    /// Causal mask: true or false [default: true, every named configuration is causal]
    #[arg(long, value_parser = flags::boolean)]
    causal: Option<bool>,
    /// Head norm after attention: group (MEA's GroupNorm(H, H·d)), rms or none [default: group for mea and mea-compressed, none otherwise]
    #[arg(long, value_parser = flags::norm)]
    norm: Option<Norm>,
    /// Rotary embedding after mixing
    #[arg(long)]
    rope: bool,
    /// RoPE positions: virtual (one per virtual token) or token (pseudo-heads share their token's)
    #[arg(long, requires = "rope", default_value = "virtual", value_parser = flags::pos_mode)]
    rope_mode: PosMode,
    /// RoPE base, a finite number above 1
    #[arg(long, requires = "rope", default_value_t = 10000.0, value_parser = flags::base)]
    rope_base: f32,
    /// Seed of the random inputs and weights
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed repetitions after the checked call, in 0..=1000000
    #[arg(long, default_value_t = 5, value_parser = flags::count(0, 1_000_000))]
    reps: usize,
    /// Also run the backward pass (random dout): every gradient's error against the f64 reference, and its time
    #[arg(long)]
    backward: bool,
}

/// The flag a configuration or size error is about.
fn flag_of(e: &Error) -> &'static str {
    match e {
        Error::GqaHeads { .. } | Error::Heads { what: "kv_heads", .. } => "--kv-heads",
        Error::Heads { .. } | Error::ZeroHeads { .. } => "--heads",
        Error::ZeroPseudoHeads => "--pseudo",
        Error::HeadDim { .. } => "--head-dim",
        Error::Window { .. } => "--window",
        Error::QueryLongerThanKeys { .. } => "--kv-seq",
        Error::Config { what: "rope base", .. } => "--rope-base",
        _ => "--batch, --seq, --kv-seq, --heads, --pseudo, --head-dim",
    }
}

impl Args {
    /// The configuration named on the command line; flags that do not apply to it are errors.
    pub(crate) fn config(&self) -> Result<Config, String> {
        let m = self.config;
        if self.pseudo.is_some() && !m.takes_pseudo() {
            return Err(format!("--pseudo: applies to iha and iha-local only, not --config {}", m.name()));
        }
        if self.kv_heads.is_some() && !m.takes_kv_heads() {
            return Err(format!("--kv-heads: applies to gqa and mea-compressed only, not --config {}", m.name()));
        }
        let (h, d) = (self.heads, self.head_dim);
        let (g, p) = (self.kv_heads.unwrap_or((h / 2).max(1)), self.pseudo.unwrap_or(2));
        let at = |e: Error| format!("{}: {e}", flag_of(&e));
        let mut cfg = m.config(h, g, p, d, self.seq).map_err(at)?;
        if let Some(causal) = self.causal {
            cfg.causal = causal;
        }
        if self.rope {
            cfg.rope = Some(Rope { base: self.rope_base, mode: self.rope_mode });
        }
        if let Some((l, r)) = self.window {
            cfg = cfg.with_window(l, r);
        }
        validate_config(&cfg).map_err(at)?;
        Ok(cfg)
    }
}

/// Bytes of host memory the run needs at most (inputs in f32, in the dtype and in f64 for the
/// reference; outputs; weights in f32 and f64), counted without overflow.
fn host_bytes(c: &Config, batch: usize, n: usize, m: usize, dtype: DType) -> u128 {
    let [b, n, m, h, hq, hk, p, d] =
        [batch, n, m, c.heads, c.q_heads, c.kv_heads, c.pseudo, c.head_dim].map(|x| x as u128);
    let inputs = b * n * hq * d + 2 * b * m * hk * d;
    let outputs = b * n * h * p * d + b * h * n * p;
    let weights = (hq + 2 * hk + h) * h * p + h * d;
    inputs * (4 + dtype.size() as u128 + 12) + outputs * (dtype.size() as u128 + 16) + weights * 12
}

/// Memory the system can give now (`MemAvailable`), where known.
fn available_bytes() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u128>().ok()? * 1024)
}

pub fn step(msg: &str) -> Instant {
    eprint!("{msg} ... ");
    let _ = std::io::stderr().flush();
    Instant::now()
}

pub fn done(t: Instant) {
    eprintln!("done ({:.2} s)", t.elapsed().as_secs_f64());
}

pub fn main(a: Args) -> crate::Result {
    let (n, batch, dtype) = (a.seq, a.batch, a.dtype.unwrap_or(DType::F32));
    let m = a.kv_seq.unwrap_or(n);
    let cfg = a.config()?;
    validate_sizes(&cfg, batch, n, m).map_err(|e| format!("{}: {e}", flag_of(&e)))?;
    let need = host_bytes(&cfg, batch, n, m, dtype);
    if let Some(avail) = available_bytes().filter(|&avail| need > avail) {
        let gib = |x: u128| x as f64 / (1u64 << 30) as f64;
        return Err(format!(
            "--batch, --seq, --kv-seq, --heads, --pseudo, --head-dim: this run needs about {:.1} GiB of host memory, {:.1} GiB are available",
            gib(need),
            gib(avail)
        ));
    }
    let backend: Box<dyn Backend> = match a.backend {
        None => {
            let sel = headmix::best();
            for (kind, why) in &sel.skipped {
                eprintln!("note: {kind} not used: {why}");
            }
            sel.backend
        }
        Some(kind) => headmix::open(kind).map_err(|e| format!("--backend: {e}"))?,
    };
    let mut w = Weights::try_random(&cfg, a.seed).map_err(|e| format!("{}: {e}", flag_of(&e)))?;
    if let Some(Norm(kind)) = a.norm {
        w = w.with_norm_kind(kind, &cfg);
    }
    let c = &cfg;
    let problem = Problem::for_weights(&cfg, &w, batch, n, m, dtype).map_err(|e| format!("{}: {e}", flag_of(&e)))?;
    backend.supports(&problem).map_err(|e| e.to_string())?;
    println!(
        "configuration  {} H={} Hq={} Hk={} P={} d={} causal={} window={:?} rope={} norm={}",
        c.method.name(),
        c.heads,
        c.q_heads,
        c.kv_heads,
        c.pseudo,
        c.head_dim,
        c.causal,
        c.window.map(|w| (w.left, w.right)),
        c.rope.map_or("no".into(), |r| format!("{:?} base {}", r.mode, r.base).to_lowercase()),
        w.norm.as_ref().map_or("none", |n| n.kind().name())
    );
    println!("sizes          B={batch} N={n} M={m} dtype={}", dtype.name());
    println!("backend        {} ({})", backend.kind(), backend.device_name());

    // The memory check above is an estimate: an allocation that still fails is a typed error.
    let oom = |e: Error| format!("{}: {e}", flag_of(&e));
    let (q, k, v) = try_random_inputs(&problem, a.seed).map_err(oom)?;
    let (qo, ko, vo) = (Owned::from_f32(dtype, &q), Owned::from_f32(dtype, &k), Owned::from_f32(dtype, &v));
    drop((q, k, v));
    let out_shape = problem.out_shape();
    let mut out = Owned::try_filled("output", dtype, out_shape.iter().product(), f32::NAN).map_err(oom)?;
    let mut lse = vec![f32::NAN; problem.lse_len()];
    let (qs, ks) = ([batch, n, c.q_heads, c.head_dim], [batch, m, c.kv_heads, c.head_dim]);
    let t = step("running forward");
    let io = Io {
        q: qo.tensor(&qs),
        k: ko.tensor(&ks),
        v: vo.tensor(&ks),
        out: out.tensor_mut(&out_shape),
        lse: Some(&mut lse),
    };
    backend.forward(c, &w, io).map_err(|e| e.to_string())?;
    let first = t.elapsed().as_secs_f64();
    done(t);

    let t = step("f64 reference");
    let mut params = problem.params();
    params.rounding = Rounding::Exact;
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (aq, ak, av) = (f(&w.aq), f(&w.ak), f(&w.av));
    let r = w.r.as_deref().map(f);
    let norm = w.norm.as_ref().map(|n| n.map(|v| f(v)));
    let mix = MixWeights { aq: &aq, ak: &ak, av: &av, r: r.as_deref(), norm: norm.as_ref().map(|n| n.as_slices()) };
    let reference = headmix::reference::attention(&params, &f(&qo.to_f32()), &f(&ko.to_f32()), &f(&vo.to_f32()), &mix);
    done(t);
    let err = rel_err(&out.to_f32(), &reference.out);
    let finite: Vec<(f32, f64)> =
        lse.iter().zip(&reference.lse).filter(|(_, r)| r.is_finite()).map(|(l, r)| (*l, *r)).collect();
    let lse_err =
        rel_err(&finite.iter().map(|x| x.0).collect::<Vec<_>>(), &finite.iter().map(|x| x.1).collect::<Vec<_>>());
    println!("rel. error     out {err:.3e}   lse {lse_err:.3e}   (‖out − ref‖ / ‖ref‖ against the f64 reference)");

    let timing = match a.reps {
        0 => None,
        reps => {
            let t = step(&format!("timing {reps} repetitions"));
            let timing = backend.time(&problem, &w, reps).map_err(|e| e.to_string())?;
            done(t);
            Some(timing)
        }
    };
    match timing.filter(|t| !t.seconds.is_empty()) {
        Some(tm) => {
            let med = headmix_bench::report::median(&tm.seconds);
            let tflops = fmt_sig(problem.flops() / med / 1e12);
            let (k, first_ms) = (tm.seconds.len(), first * 1e3);
            println!(
                "time           {:.3} ms median of {k} ({}), first call {first_ms:.3} ms; {tflops} TFLOP/s",
                med * 1e3,
                tm.clock
            );
        }
        None => println!("time           {:.3} ms (one call, wall clock)", first * 1e3),
    }
    if a.backward {
        crate::run_backward::main(backend.as_ref(), &problem, &w, (&qo, &ko, &vo), &out, &lse, a.seed)?;
    }
    Ok(())
}
