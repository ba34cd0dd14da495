//! `headmix run --backward`: after the forward, the backward of the same problem on the same
//! backend with a random `dout`, each gradient checked against the f64 reference, and timed.

use headmix::backward::{GradBuffers, reference_grads};
use headmix::reference::rel_err;
use headmix::timing::Owned;
use headmix::{Backend, BackwardIo, Problem, Rng, Weights};

/// Run and report the backward of `problem` whose forward gave `out` and `lse`.
pub fn main(
    backend: &dyn Backend,
    problem: &Problem,
    w: &Weights,
    (q, k, v): (&Owned, &Owned, &Owned),
    out: &Owned,
    lse: &[f32],
    seed: u64,
) -> Result<(), String> {
    let c = &problem.cfg;
    let qs = [problem.batch, problem.n, c.q_heads, c.head_dim];
    let ks = [problem.batch, problem.m, c.kv_heads, c.head_dim];
    let out_shape = problem.out_shape();
    let mut rng = Rng::new(seed ^ 0xbac4);
    let dout = Owned::from_f32(problem.dtype, &rng.normal_vec(out_shape.iter().product(), 1.0));
    let mut g = GradBuffers::new(problem, w, f32::NAN);

    let t = crate::run::step("running backward");
    let (dq, dk, dv, dw) = g.outputs(&qs, &ks);
    let io = BackwardIo {
        q: q.tensor(&qs),
        k: k.tensor(&ks),
        v: v.tensor(&ks),
        out: out.tensor(&out_shape),
        lse,
        dout: dout.tensor(&out_shape),
        dq,
        dk,
        dv,
        dw,
    };
    backend.backward(c, w, io).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    crate::run::done(t);

    let t = crate::run::step("f64 reference backward");
    let want = reference_grads(problem, w, &q.to_f32(), &k.to_f32(), &v.to_f32(), &dout.to_f32());
    crate::run::done(t);
    let got = g.to_grads();
    let errs: Vec<String> = got
        .named()
        .iter()
        .zip(want.named())
        .map(|((name, x), (_, y))| format!("{name} {:.2e}", rel_err(x, y)))
        .collect();
    println!("grad rel. err  {}", errs.join("  "));
    println!("backward time  {:.3} ms (one call, wall clock, validation included)", secs * 1e3);
    Ok(())
}
