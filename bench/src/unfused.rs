//! The unfused pipeline, built from headmix's own pieces so that the gain from fusion shows:
//!
//! 1. **mix**: materialise `qt`, `kt`, `vt` (`[B, S, P, H, d]`, which *is* `[B, S·P, H, d]`);
//! 2. **attention**: plain attention with `P = 1` over the `N·P` virtual tokens, on the same
//!    backend (`Config::mha` with identity weights, the same causal mask and window);
//! 3. **collapse**: de-interleave, collapse by `r` and/or head norm by `gamma`.
//!
//! The mix and collapse stages run on the host (f32, rayon, wall clock): the [`headmix::Backend`]
//! trait has no device op for them. For the CPU backend that is where they would run anyway, and
//! the pipeline time is the sum of the three stages. For device backends only the attention stage
//! is timed on the device; its time alone is a lower bound of any unfused pipeline's time (the
//! PyTorch peers in `bench/peers/peers.py` time the whole pipeline on the GPU).

use std::time::Instant;

use headmix::reference::{HeadNorm, apply_head_norm};
use headmix::{Backend, Config, DType, Io, Problem, Rng, Tensor, TensorMut, Weights, replication};
use rayon::prelude::*;

/// One timed stage of the unfused pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTiming {
    /// `mix`, `attention` or `collapse`.
    pub name: &'static str,
    /// Where it ran: `host` or the backend's name.
    pub place: String,
    /// The clock that timed it (`wall clock`, or the backend's device clock).
    pub clock: String,
    /// Seconds per call, one per repetition.
    pub seconds: Vec<f64>,
    /// Extra device memory the stage reported (`Timing::extra_bytes`; 0 for host stages).
    pub extra_bytes: u64,
}

/// Which stages a problem's unfused pipeline has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stages {
    pub mix_q: bool,
    pub mix_k: bool,
    pub mix_v: bool,
    /// De-interleave / collapse / norm after the attention.
    pub collapse: bool,
}

impl Stages {
    /// The stages the pipeline needs: a tensor is materialised unless its mixing is the identity
    /// with `P = 1`; the collapse stage exists when there is `r`, `gamma` or `P > 1`.
    pub fn of(problem: &Problem, w: &Weights) -> Stages {
        let c = &problem.cfg;
        let identity = |src: usize, a: &[f32]| c.pseudo == 1 && src == c.heads && a == replication(src, c.heads, 1);
        Stages {
            mix_q: !identity(c.q_heads, &w.aq),
            mix_k: !identity(c.kv_heads, &w.ak),
            mix_v: !identity(c.kv_heads, &w.av),
            collapse: problem.collapse || problem.norm || c.pseudo > 1,
        }
    }

    /// Whether the unfused pipeline differs from one plain attention call (not for MHA).
    pub fn any(&self) -> bool {
        self.mix_q || self.mix_k || self.mix_v || self.collapse
    }
}

/// Bytes the unfused pipeline writes that the fused call does not: the materialised mixed
/// tensors and, when a collapse stage follows, the attention output before it (in the dtype).
pub fn extra_bytes(problem: &Problem, w: &Weights) -> u64 {
    let c = &problem.cfg;
    let s = Stages::of(problem, w);
    let per_token = (c.heads * c.pseudo * c.head_dim) as u64;
    let q_len = problem.batch as u64 * problem.n as u64 * per_token;
    let kv_len = problem.batch as u64 * problem.m as u64 * per_token;
    let mut elements = 0;
    elements += if s.mix_q { q_len } else { 0 };
    elements += if s.mix_k { kv_len } else { 0 };
    elements += if s.mix_v { kv_len } else { 0 };
    elements += if s.collapse { q_len } else { 0 };
    elements * problem.dtype.size() as u64
}

/// The attention stage: MHA with `P = 1` over `N·P` query and `M·P` key tokens, same mask,
/// window and scale, identity weights (its output is `[B, N·P, H, 1, d]`).
pub fn attention_problem(problem: &Problem) -> Result<(Problem, Weights), String> {
    let c = &problem.cfg;
    if c.rope.is_some() {
        return Err("the unfused pipeline of the benchmarks does not apply RoPE".into());
    }
    let mut cfg = Config::mha(c.heads, c.head_dim).with_causal(c.causal).with_scale(c.softmax_scale());
    if let Some(win) = c.window {
        cfg = cfg.with_window(win.left, win.right);
    }
    let w = Weights::identity(&cfg);
    let p = Problem::new(&cfg, problem.batch, problem.n * c.pseudo, problem.m * c.pseudo, problem.dtype, false, false)
        .map_err(|e| e.to_string())?;
    Ok((p, w))
}

/// Mix `x: [B, S, Hs, d]` by `a: [Hs, H, P]` into `[B, S, P, H, d]` (f32, parallel over tokens).
/// Zero weights are skipped, so a replication (GQA's `repeat_kv`) costs a copy.
pub fn mix(x: &[f32], a: &[f32], b: usize, s: usize, hs: usize, h: usize, p: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; b * s * p * h * d];
    y.par_chunks_mut(p * h * d).enumerate().for_each(|(token, yt)| {
        let xt = &x[token * hs * d..][..hs * d];
        for q in 0..p {
            for hh in 0..h {
                let dst = &mut yt[(q * h + hh) * d..][..d];
                for m in 0..hs {
                    let w = a[(m * h + hh) * p + q];
                    if w != 0.0 {
                        for (o, &v) in dst.iter_mut().zip(&xt[m * d..][..d]) {
                            *o += w * v;
                        }
                    }
                }
            }
        }
    });
    y
}

/// After the attention: `o: [B, N, P, H, d]` to the output: collapsed by `r` into `[B, N, H, d]`
/// (else de-interleaved into `[B, N, H, P, d]`), then the head norm (`Group` or `Rms`).
pub fn collapse(
    o: &[f32],
    r: Option<&[f32]>,
    norm: Option<HeadNorm<&[f32]>>,
    eps: f32,
    b: usize,
    n: usize,
    h: usize,
    p: usize,
    d: usize,
) -> Vec<f32> {
    let out_per_token = if r.is_some() { h * d } else { h * p * d };
    let mut out = vec![0f32; b * n * out_per_token];
    out.par_chunks_mut(out_per_token).enumerate().for_each(|(token, ot)| {
        let x = &o[token * p * h * d..][..p * h * d];
        match r {
            // out[row] = sum over (h', p) of r[row, h'·P + p] · o[p, h'].
            Some(r) => {
                for row in 0..h {
                    let dst = &mut ot[row * d..][..d];
                    for hh in 0..h {
                        for q in 0..p {
                            let w = r[row * h * p + hh * p + q];
                            for (o, &v) in dst.iter_mut().zip(&x[(q * h + hh) * d..][..d]) {
                                *o += w * v;
                            }
                        }
                    }
                }
            }
            None => {
                for hh in 0..h {
                    for q in 0..p {
                        ot[(hh * p + q) * d..][..d].copy_from_slice(&x[(q * h + hh) * d..][..d]);
                    }
                }
            }
        }
        if let Some(norm) = &norm {
            let vecs_per_head = if r.is_some() { 1 } else { p };
            apply_head_norm(norm, ot, h, d, vecs_per_head, eps as f64);
        }
    });
    out
}

/// Wall-clock seconds of `reps` calls `f(i)` after one untimed warm-up call `f(0)`; `f(i)` works on
/// input set `i % sets`, so the host stages rotate their inputs like the attention stage does.
fn time_host_stage(reps: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    f(0);
    (1..=reps)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Time the unfused pipeline of `problem`: the attention stage with [`crate::timer::time`] (the
/// backend's clock), and, when `host_stages`, the mix and collapse stages on the host (wall clock).
pub fn time(
    backend: &dyn Backend,
    problem: &Problem,
    w: &Weights,
    reps: usize,
    host_stages: bool,
) -> Result<Vec<StageTiming>, String> {
    let c = &problem.cfg;
    let s = Stages::of(problem, w);
    let (ap, aw) = attention_problem(problem)?;
    backend.supports(&ap).map_err(|e| e.to_string())?;
    let (b, h, p, d) = (problem.batch, c.heads, c.pseudo, c.head_dim);
    let sets = crate::timer::input_sets(problem);
    let mut stages = Vec::new();
    let mut rng = Rng::new(11);
    let mut random_sets = |len: usize| (0..sets).map(|_| rng.normal_vec(len, 1.0)).collect::<Vec<_>>();
    if host_stages && (s.mix_q || s.mix_k || s.mix_v) {
        let q = random_sets(b * problem.n * c.q_heads * d);
        let k = random_sets(b * problem.m * c.kv_heads * d);
        let v = random_sets(b * problem.m * c.kv_heads * d);
        let seconds = time_host_stage(reps, |i| {
            let i = i % sets;
            if s.mix_q {
                std::hint::black_box(mix(&q[i], &w.aq, b, problem.n, c.q_heads, h, p, d));
            }
            if s.mix_k {
                std::hint::black_box(mix(&k[i], &w.ak, b, problem.m, c.kv_heads, h, p, d));
            }
            if s.mix_v {
                std::hint::black_box(mix(&v[i], &w.av, b, problem.m, c.kv_heads, h, p, d));
            }
        });
        stages.push(StageTiming {
            name: "mix",
            place: "host".into(),
            clock: "wall clock".into(),
            seconds,
            extra_bytes: 0,
        });
    }
    let t = crate::timer::time(backend, &ap, &aw, reps).map_err(|e| e.to_string())?;
    stages.push(StageTiming {
        name: "attention",
        place: backend.kind().name().into(),
        clock: t.clock.into(),
        seconds: t.seconds,
        extra_bytes: t.extra_bytes,
    });
    if host_stages && s.collapse {
        let o = random_sets(b * problem.n * p * h * d);
        let r = if problem.collapse { w.r.as_deref() } else { None };
        let g = if problem.norm { w.norm.as_ref().map(|n| n.as_slices()) } else { None };
        let seconds = time_host_stage(reps, |i| {
            std::hint::black_box(collapse(&o[i % sets], r, g, c.norm_eps, b, problem.n, h, p, d));
        });
        stages.push(StageTiming {
            name: "collapse",
            place: "host".into(),
            clock: "wall clock".into(),
            seconds,
            extra_bytes: 0,
        });
    }
    Ok(stages)
}

/// Run the unfused pipeline on f32 inputs (`q: [B, N, Hq, d]`, `k, v: [B, M, Hk, d]`), the
/// attention stage through `backend.forward`: the same result as the fused call.
pub fn forward(
    backend: &dyn Backend,
    problem: &Problem,
    w: &Weights,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<Vec<f32>, String> {
    let c = &problem.cfg;
    if problem.dtype != DType::F32 {
        return Err("unfused::forward runs in f32".into());
    }
    let s = Stages::of(problem, w);
    let (ap, aw) = attention_problem(problem)?;
    let (b, h, p, d) = (problem.batch, c.heads, c.pseudo, c.head_dim);
    let (n, m) = (problem.n, problem.m);
    let qt = if s.mix_q { mix(q, &w.aq, b, n, c.q_heads, h, p, d) } else { q.to_vec() };
    let kt = if s.mix_k { mix(k, &w.ak, b, m, c.kv_heads, h, p, d) } else { k.to_vec() };
    let vt = if s.mix_v { mix(v, &w.av, b, m, c.kv_heads, h, p, d) } else { v.to_vec() };
    let out_shape = ap.out_shape();
    let mut o = vec![f32::NAN; out_shape.iter().product()];
    let io = Io {
        q: Tensor::new(&qt, &[b, n * p, h, d]),
        k: Tensor::new(&kt, &[b, m * p, h, d]),
        v: Tensor::new(&vt, &[b, m * p, h, d]),
        out: TensorMut::new(&mut o, &out_shape),
        lse: None,
    };
    backend.forward(&ap.cfg, &aw, io).map_err(|e| e.to_string())?;
    if !s.collapse {
        return Ok(o);
    }
    let r = if problem.collapse { w.r.as_deref() } else { None };
    let g = if problem.norm { w.norm.as_ref().map(|n| n.as_slices()) } else { None };
    Ok(collapse(&o, r, g, c.norm_eps, b, n, h, p, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use headmix::reference::unfused::materialise;
    use headmix::{BackendKind, Method};

    fn problem(cfg: Config, w: &Weights, batch: usize, n: usize, m: usize) -> Problem {
        Problem::for_weights(&cfg, w, batch, n, m, DType::F32).unwrap()
    }

    #[test]
    fn mix_equals_the_reference_materialise() {
        let mut rng = Rng::new(3);
        let (b, s, hs, h, p, d) = (2, 5, 3, 4, 2, 8);
        let x = rng.normal_vec(b * s * hs * d, 1.0);
        let a = rng.normal_vec(hs * h * p, 1.0);
        let got = mix(&x, &a, b, s, hs, h, p, d);
        let want = materialise(&x, &a, b, s, hs, h, p, d);
        assert!(headmix::reference::rel_err(&got, &want) < 1e-6);
    }

    /// The unfused pipeline through the CPU backend equals the fused CPU call, for every
    /// configuration the sweeps run (IHA with collapse, MEA with norm, GQA replication, window).
    #[test]
    fn unfused_pipeline_equals_fused_call() {
        let cpu = headmix::open(BackendKind::Cpu).unwrap();
        let cfgs = [
            Config::iha(3, 2, 16),
            Config::iha_local(2, 3, 8, 24).unwrap(),
            Config::mea(4, 8).with_causal(true),
            Config::mea_compressed(4, 2, 8).unwrap(),
            Config::gqa(4, 2, 8).unwrap().with_causal(true),
        ];
        for (i, cfg) in cfgs.into_iter().enumerate() {
            let w = Weights::random(&cfg, 5 + i as u64);
            let (b, n, m) = (2, 12, 12);
            let pr = problem(cfg, &w, b, n, m);
            let mut rng = Rng::new(100 + i as u64);
            let q = rng.normal_vec(b * n * cfg.q_heads * cfg.head_dim, 1.0);
            let k = rng.normal_vec(b * m * cfg.kv_heads * cfg.head_dim, 1.0);
            let v = rng.normal_vec(b * m * cfg.kv_heads * cfg.head_dim, 1.0);
            let got = forward(cpu.as_ref(), &pr, &w, &q, &k, &v).unwrap();
            let shape = pr.out_shape();
            let mut want = vec![f32::NAN; shape.iter().product()];
            let kv_shape = [b, m, cfg.kv_heads, cfg.head_dim];
            let io = Io {
                q: Tensor::new(&q, &[b, n, cfg.q_heads, cfg.head_dim]),
                k: Tensor::new(&k, &kv_shape),
                v: Tensor::new(&v, &kv_shape),
                out: TensorMut::new(&mut want, &shape),
                lse: None,
            };
            cpu.forward(&cfg, &w, io).unwrap();
            let err = headmix::reference::rel_err(&got, &want);
            assert!(err < 1e-5, "{:?}: unfused differs from fused by {err:e}", cfg.method);
            let stages = Stages::of(&pr, &w);
            assert!(stages.any(), "{:?} has an unfused pipeline", cfg.method);
            if cfg.method == Method::Gqa {
                assert!(!stages.mix_q && stages.mix_k && !stages.collapse);
            }
        }
    }

    #[test]
    fn stages_and_extra_bytes() {
        // MHA: nothing to do besides attention.
        let cfg = Config::mha(4, 8);
        let w = Weights::identity(&cfg);
        let pr = problem(cfg, &w, 1, 4, 4);
        assert!(!Stages::of(&pr, &w).any());
        assert_eq!(extra_bytes(&pr, &w), 0);
        // IHA bf16, B=2, N=M=3, H=4, P=2, d=8: qt, kt, vt and the pre-collapse output, 2 bytes each.
        let cfg = Config::iha(4, 2, 8);
        let w = Weights::random(&cfg, 1);
        let mut pr = problem(cfg, &w, 2, 3, 3);
        pr.dtype = DType::BF16;
        assert_eq!(extra_bytes(&pr, &w), 4 * (2 * 3 * 4 * 2 * 8) * 2);
        // MEA: kt, vt and the pre-norm output.
        let cfg = Config::mea(4, 8);
        let w = Weights::random(&cfg, 1);
        let pr = problem(cfg, &w, 1, 5, 5);
        assert_eq!(extra_bytes(&pr, &w), 3 * (5 * 4 * 8) * 4);
    }

    #[test]
    fn timing_names_every_stage_and_where_it_ran() {
        let cpu = headmix::open(BackendKind::Cpu).unwrap();
        let cfg = Config::iha(2, 2, 8);
        let w = Weights::random(&cfg, 2);
        let pr = problem(cfg, &w, 1, 8, 8);
        let stages = time(cpu.as_ref(), &pr, &w, 2, true).unwrap();
        let names: Vec<_> = stages.iter().map(|s| (s.name, s.place.as_str())).collect();
        assert_eq!(names, [("mix", "host"), ("attention", "cpu"), ("collapse", "host")]);
        assert!(stages.iter().all(|s| s.seconds.len() == 2 && s.seconds.iter().all(|&t| t > 0.0)));
        let device_only = time(cpu.as_ref(), &pr, &w, 2, false).unwrap();
        assert_eq!(device_only.len(), 1);
    }
}
