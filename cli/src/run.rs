//! `headmix run`: one forward pass of a named configuration on a backend, checked against the
//! f64 reference and timed.

use std::io::Write;
use std::time::Instant;

use headmix::reference::{MixWeights, Rounding, rel_err};
use headmix::timing::{Owned, random_inputs};
use headmix::{Backend, BackendKind, Config, DType, Io, NormKind, Problem, Rope, Weights};

use crate::args::Args;

pub const HELP: &str = "\
headmix run [options]     one forward pass, checked against the f64 reference, timed
  --config NAME     mha | gqa | mea | mea-compressed | iha | iha-local   (default iha)
  --backend NAME    auto | cuda | wgpu | cpu                            (default auto)
  --batch B         batch size                                          (default 1)
  --seq N           query tokens                                        (default 256)
  --kv-seq M        key/value tokens, M >= N (a KV-cache prefix)        (default N)
  --heads H         attention heads                                     (default 8)
  --kv-heads G      stored key/value heads for gqa / mea-compressed     (default H/2)
  --pseudo P        pseudo-heads per head for iha                       (default 2)
  --head-dim d      head dimension                                      (default 64)
  --dtype T         f32 | f16 | bf16                                    (default f32)
  --causal B        true | false: causal mask (default true for every configuration)
  --norm K          head norm: group | rms | none   (default group for mea / mea-compressed,
                    MEA's GroupNorm(H, H*d); none for the others)
  --window L,R      sliding window in virtual tokens: each query sees L keys before its own and R
                    after (overrides iha-local's (W*P-1, 0))
  --rope, --seed S, --reps R (timed repetitions, default 5)
  --backward        also run the backward (random dout): every gradient's error, its time";

const KNOWN: &[&str] = &[
    "config",
    "backend",
    "batch",
    "seq",
    "kv-seq",
    "heads",
    "kv-heads",
    "pseudo",
    "head-dim",
    "dtype",
    "window",
    "causal",
    "norm",
    "rope",
    "seed",
    "reps",
    "backward",
];

/// Build the configuration named on the command line.
pub fn config_from(a: &Args, n: usize) -> Result<Config, String> {
    let h: usize = a.get("heads", 8)?;
    let d: usize = a.get("head-dim", 64)?;
    let p: usize = a.get("pseudo", 2)?;
    let g: usize = a.get("kv-heads", (h / 2).max(1))?;
    let e = |e: headmix::Error| e.to_string();
    let mut cfg = match a.str("config").unwrap_or("iha") {
        "mha" => Config::mha(h, d),
        "gqa" => Config::gqa(h, g, d).map_err(e)?,
        "mea" => Config::mea(h, d),
        "mea-compressed" => Config::mea_compressed(h, g, d).map_err(e)?,
        "iha" => Config::iha(h, p, d),
        "iha-local" => Config::iha_local(h, p, d, n).map_err(e)?,
        other => return Err(format!("--config: unknown configuration {other:?}")),
    };
    if let Some(c) = a.str("causal") {
        cfg.causal = c.parse().map_err(|_| format!("--causal takes true or false, not {c:?}"))?;
    }
    if a.flag("rope") {
        cfg.rope = Some(Rope::default());
    }
    if let Some(w) = a.str("window") {
        let (l, r) = w.split_once(',').ok_or("--window takes L,R")?;
        let l = l.trim().parse().map_err(|_| format!("--window: bad left edge {l:?}"))?;
        let r = r.trim().parse().map_err(|_| format!("--window: bad right edge {r:?}"))?;
        cfg = cfg.with_window(l, r);
    }
    Ok(cfg)
}

/// The backend asked for, or the best one present (saying why better ones were skipped).
pub fn backend_from(a: &Args) -> Result<Box<dyn Backend>, String> {
    match a.str("backend").unwrap_or("auto") {
        "auto" => {
            let sel = headmix::best();
            for (kind, why) in &sel.skipped {
                eprintln!("note: {kind} not used: {why}");
            }
            Ok(sel.backend)
        }
        name => {
            let kind = BackendKind::parse(name).ok_or_else(|| format!("--backend: unknown backend {name:?}"))?;
            headmix::open(kind).map_err(|e| e.to_string())
        }
    }
}

pub fn step(msg: &str) -> Instant {
    eprint!("{msg} ... ");
    let _ = std::io::stderr().flush();
    Instant::now()
}

pub fn done(t: Instant) {
    eprintln!("done ({:.2} s)", t.elapsed().as_secs_f64());
}

pub fn main(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return Ok(());
    }
    let a = Args::parse(args, &["rope", "backward"])?;
    if let Some(u) = a.unknown(KNOWN).first() {
        return Err(format!("unknown option --{u}\n{HELP}"));
    }
    let n: usize = a.get("seq", 256)?;
    let m: usize = a.get("kv-seq", n)?;
    let batch: usize = a.get("batch", 1)?;
    let reps: usize = a.get("reps", 5)?;
    let seed: u64 = a.get("seed", 1)?;
    let dtype = DType::parse(a.str("dtype").unwrap_or("f32")).ok_or("--dtype: f32, f16 or bf16")?;
    let cfg = config_from(&a, n)?;
    let mut w = Weights::random(&cfg, seed);
    if let Some(kind) = a.str("norm") {
        let kind = match kind {
            "none" => None,
            k => Some(NormKind::parse(k).ok_or_else(|| format!("--norm takes group, rms or none, not {k:?}"))?),
        };
        w = w.with_norm_kind(kind, &cfg);
    }
    let backend = backend_from(&a)?;

    let c = &cfg;
    let mut problem = Problem::for_weights(&cfg, &w, batch, n, m, dtype).map_err(|e| e.to_string())?;
    let (q, k, v) = random_inputs(&problem, seed);
    let (qo, ko, vo) = (Owned::from_f32(dtype, &q), Owned::from_f32(dtype, &k), Owned::from_f32(dtype, &v));
    let out_shape = problem.out_shape();
    let mut out = Owned::filled(dtype, out_shape.iter().product(), f32::NAN);
    let mut lse = vec![f32::NAN; problem.lse_len()];
    let (qs, ks) = ([batch, n, c.q_heads, c.head_dim], [batch, m, c.kv_heads, c.head_dim]);

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
        c.rope.is_some(),
        w.norm.as_ref().map_or("none", |n| n.kind().name())
    );
    println!("sizes          B={batch} N={n} M={m} dtype={}", dtype.name());
    println!("backend        {} ({})", backend.kind(), backend.device_name());

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
    problem = headmix::validate(
        c,
        &w,
        &qo.tensor(&qs),
        &ko.tensor(&ks),
        &vo.tensor(&ks),
        &out.tensor_mut(&out_shape),
        Some(&lse),
    )
    .map_err(|e| e.to_string())?;
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
    let lse_err = rel_err(
        &lse.iter().zip(&reference.lse).filter(|(_, r)| r.is_finite()).map(|(l, _)| *l).collect::<Vec<_>>(),
        &reference.lse.iter().filter(|r| r.is_finite()).cloned().collect::<Vec<_>>(),
    );
    println!("rel. error     out {err:.3e}   lse {lse_err:.3e}   (‖out − ref‖ / ‖ref‖ against the f64 reference)");

    let timing = if reps > 0 {
        let t = step(&format!("timing {reps} repetitions"));
        let timing = backend.time(&problem, &w, reps).map_err(|e| e.to_string())?;
        done(t);
        Some(timing)
    } else {
        None
    };
    let flops = problem.flops();
    match timing {
        Some(tm) if !tm.seconds.is_empty() => {
            let mut s = tm.seconds.clone();
            s.sort_by(f64::total_cmp);
            let med = s[s.len() / 2];
            println!(
                "time           {:.3} ms median of {} ({}), first call {:.3} ms; {:.3} TFLOP/s",
                med * 1e3,
                s.len(),
                tm.clock,
                first * 1e3,
                flops / med / 1e12
            );
        }
        _ => println!("time           {:.3} ms (one call, wall clock)", first * 1e3),
    }
    if a.flag("backward") {
        crate::run_backward::main(backend.as_ref(), &problem, &w, (&qo, &ko, &vo), &out, &lse, seed)?;
    }
    Ok(())
}
