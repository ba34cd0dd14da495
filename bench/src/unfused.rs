//! The unfused pipeline, built from the reference's pieces so that the gain from fusion shows:
//!
//! 1. **mix**: materialise `qt`, `kt`, `vt` (`[B, S, P, H, d]`, which *is* `[B, S·P, H, d]`) with
//!    [`headmix::reference::unfused::materialise`];
//! 2. **attention**: plain attention with `P = 1` over the `N·P` virtual tokens, on the same
//!    backend (`Config::mha` with identity weights, the same causal mask, window and scale);
//! 3. **collapse**: de-interleave, collapse by `r` and/or the head norm (group or RMS) with
//!    [`headmix::reference::unfused::collapse`].
//!
//! The mix and collapse stages run on the host (f32, rayon, wall clock): the [`Backend`] trait has
//! no device op for them. On the CPU backend the pipeline time is the sum of the three stages; on
//! device backends only the attention stage is timed, a lower bound of any unfused pipeline's
//! time (the PyTorch peers in `bench/peers/peers.py` time the whole pipeline on the GPU).

use headmix::reference::unfused::{collapse, materialise};
use headmix::timing::time_wall;
use headmix::{Backend, Config, Problem, Rng, Weights, replication};

use crate::report::{StageResult, UnfusedResult, median};
use crate::timer;

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
    /// A tensor is materialised unless its mixing is the identity with `P = 1`; the collapse
    /// stage exists when there is `r`, a head norm or `P > 1`.
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
    let per_token = (problem.batch * c.heads * c.pseudo * c.head_dim) as u64;
    let (q, kv) = (problem.n as u64 * per_token, problem.m as u64 * per_token);
    let elements: u64 =
        [(s.mix_q, q), (s.mix_k, kv), (s.mix_v, kv), (s.collapse, q)].iter().filter(|x| x.0).map(|x| x.1).sum();
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
    let (n, m) = (problem.n * c.pseudo, problem.m * c.pseudo);
    let p = Problem::new(&cfg, problem.batch, n, m, problem.dtype, false, false).map_err(|e| e.to_string())?;
    Ok((p, Weights::identity(&cfg)))
}

/// Time the unfused pipeline of `problem`: the attention stage by [`timer::forward`] (the
/// backend's clock), and, when `host_stages`, the mix and collapse stages on the host.
pub fn measure(
    backend: &dyn Backend,
    problem: &Problem,
    w: &Weights,
    reps: usize,
    host_stages: bool,
) -> Result<UnfusedResult, String> {
    let c = &problem.cfg;
    let s = Stages::of(problem, w);
    let (ap, aw) = attention_problem(problem)?;
    backend.supports(&ap).map_err(|e| e.to_string())?;
    let (b, h, p, d, n, m) = (problem.batch, c.heads, c.pseudo, c.head_dim, problem.n, problem.m);
    let sets = timer::input_sets(problem);
    let mut rng = Rng::new(11);
    let mut random_sets = |len: usize| (0..sets).map(|_| rng.normal_vec(len, 1.0)).collect::<Vec<_>>();
    let stage = |name: &str, place: &str, clock: &str, seconds: Vec<f64>| {
        let (name, place, clock) = (name.into(), place.into(), clock.into());
        StageResult { name, place, clock, median_s: median(&seconds), seconds }
    };
    let host = |name, seconds| stage(name, "host", "wall clock", seconds);
    let mut stages = Vec::new();
    let e = |e: headmix::Error| e.to_string();
    if host_stages && (s.mix_q || s.mix_k || s.mix_v) {
        let (q, k, v) = (
            random_sets(b * n * c.q_heads * d),
            random_sets(b * m * c.kv_heads * d),
            random_sets(b * m * c.kv_heads * d),
        );
        let seconds = time_wall(reps, |i| {
            let i = i % sets;
            for (on, x, a, len, src) in [
                (s.mix_q, &q, &w.aq, n, c.q_heads),
                (s.mix_k, &k, &w.ak, m, c.kv_heads),
                (s.mix_v, &v, &w.av, m, c.kv_heads),
            ] {
                if on {
                    std::hint::black_box(materialise(&x[i], a, b, len, src, h, p, d));
                }
            }
            Ok(())
        });
        stages.push(host("mix", seconds.map_err(e)?));
    }
    let t = timer::forward(backend, &ap, &aw, reps).map_err(e)?;
    stages.push(stage("attention", backend.kind().name(), t.clock, t.seconds));
    if host_stages && s.collapse {
        let o = random_sets(b * n * p * h * d);
        let r = w.r.as_deref().filter(|_| problem.collapse);
        let g = w.norm.as_ref().map(|n| n.as_slices()).filter(|_| problem.norm);
        let seconds = time_wall(reps, |i| {
            std::hint::black_box(collapse(&o[i % sets], r, g.as_ref(), c.norm_eps as f64, b, n, h, p, d));
            Ok(())
        });
        stages.push(host("collapse", seconds.map_err(e)?));
    }
    Ok(UnfusedResult {
        complete: host_stages,
        median_s: stages.iter().map(|s| s.median_s).sum(),
        extra_bytes: extra_bytes(problem, w) + t.extra_bytes,
        stages,
    })
}
