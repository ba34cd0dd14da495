//! Shared helpers of the backward suites: the inputs of one backward call (the CPU forward gives
//! `out` and `lse`, `dout` is random), the call with NaN-poisoned outputs, and the check of every
//! gradient against the f64 reference (tolerance per dtype, or twice the f32 reference's error).

use headmix::backends::cpu::CpuBackend;
use headmix::backward::{GradBuffers, reference_grads_in};
use headmix::reference::backward::Grads;
use headmix::reference::rel_err;
use headmix::timing::Owned;
use headmix::{Backend, BackwardIo, DType, Rng};

use crate::{Case, normals, tolerance};

/// Everything a backward call reads, in the case's dtype (f32 values exactly representable).
pub struct Inputs {
    pub case: Case,
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub dout: Vec<f32>,
}

impl Inputs {
    /// The forward on the CPU backend gives `out`, `lse`; `dout` is random.
    pub fn new(case: Case, seed: u64) -> Inputs {
        let (out, lse) = case.run(&CpuBackend::new()).expect("forward");
        let mut rng = Rng::new(seed ^ 0xd0);
        let dout = normals(&mut rng, out.len(), 1.0).into_iter().map(|x| x as f32).collect::<Vec<_>>();
        let dout = Owned::from_f32(case.problem.dtype, &dout).to_f32();
        Inputs { case, out, lse, dout }
    }

    /// The reference gradients at the same inputs, in f64 and in f32 (each with its own forward
    /// for `out` and `lse`).
    pub fn reference(&self) -> (Grads<f64>, Grads<f32>) {
        (self.reference_in::<f64>(), self.reference_in::<f32>())
    }

    pub fn reference_in<T: headmix::reference::Real>(&self) -> Grads<T> {
        let c = &self.case;
        reference_grads_in(&c.problem, &c.weights, &c.q, &c.k, &c.v, &self.dout)
    }

    /// The f32 reference at `runs` copies of the inputs (q, k, v, dout) perturbed by a few ulp
    /// (factors `1 ± 2^-21`): other draws of the f32 rounding noise of gradients that cancel,
    /// while a well-conditioned gradient moves by ~1e-6 relative, below half the f32 tolerance.
    pub fn f32_noise(&self, runs: u64) -> Vec<Grads<f32>> {
        let c = &self.case;
        (0..runs)
            .map(|r| {
                let mut rng = Rng::new(0x5eed ^ r);
                let mut jitter = |x: &[f32]| -> Vec<f32> {
                    x.iter()
                        .map(|&v| v * (1.0 + if rng.normal() > 0.0 { 1.0 } else { -1.0 } * 2f32.powi(-21)))
                        .collect()
                };
                let (q, k, v, dout) = (jitter(&c.q), jitter(&c.k), jitter(&c.v), jitter(&self.dout));
                reference_grads_in(&c.problem, &c.weights, &q, &k, &v, &dout)
            })
            .collect()
    }

    /// Run `backend.backward` with every output poisoned with NaN; the gradients as f32.
    pub fn run(&self, backend: &dyn Backend) -> headmix::Result<Grads<f32>> {
        let c = &self.case;
        let (p, w) = (&c.problem, &c.weights);
        let dt = p.dtype;
        let (q, k, v) = (Owned::from_f32(dt, &c.q), Owned::from_f32(dt, &c.k), Owned::from_f32(dt, &c.v));
        let (out, dout) = (Owned::from_f32(dt, &self.out), Owned::from_f32(dt, &self.dout));
        let mut g = GradBuffers::new(p, w, f32::NAN);
        let (dq, dk, dv, dw) = g.outputs(&c.q_shape(), &c.kv_shape());
        let out_shape = p.out_shape();
        backend.backward(
            &p.cfg,
            w,
            BackwardIo {
                q: q.tensor(&c.q_shape()),
                k: k.tensor(&c.kv_shape()),
                v: v.tensor(&c.kv_shape()),
                out: out.tensor(&out_shape),
                lse: &self.lse,
                dout: dout.tensor(&out_shape),
                dq,
                dk,
                dv,
                dw,
            },
        )?;
        Ok(g.to_grads())
    }
}

/// Every gradient within the dtype's tolerance of the f64 reference, and none left NaN. Where
/// the reference itself run in f32 misses by more than half the tolerance (a gradient that
/// cancels to ~eps, e.g. `dav` of a single head under a head norm, which makes the loss
/// invariant to the scale of `av`), FlashAttention's rule instead: at most twice the f32
/// reference's error.
pub fn check(got: &Grads<f32>, want: &Grads<f64>, f32_ref: &Grads<f32>, dtype: DType, label: &str) {
    check_against(got, want, &[f32_ref], (2.0, None), dtype, label)
}

/// [`check`] with the f32 reference's error taken as the largest of several f32 runs (e.g. the
/// reference and [`Inputs::f32_noise`]) and `factor` times it allowed where that is above the
/// tolerance: on a gradient that cancels to rounding noise (the loss invariant to a weight's
/// scale), one f32 run is a single draw of that noise, and an implementation summing in another
/// order may land a few times off it by chance. `noise: Some((level, bound))`: a gradient the
/// f32 reference misses by more than `level` (fewer than ~3 digits survive f32: the gradient is
/// mostly rounding noise, often a single scalar) need only be within `bound` (relative).
pub fn check_against(
    got: &Grads<f32>,
    want: &Grads<f64>,
    f32_refs: &[&Grads<f32>],
    (factor, noise): (f64, Option<(f64, f64)>),
    dtype: DType,
    label: &str,
) {
    let (g, w) = (got.named(), want.named());
    assert_eq!(g.len(), w.len(), "{label}: gradient sets differ");
    for (i, ((name, x), (_, y))) in g.iter().zip(&w).enumerate() {
        assert!(x.iter().all(|v| !v.is_nan()), "{label}: {name} has NaN (unwritten or wrong)");
        let err = rel_err(x, y);
        let tol = tolerance(dtype);
        let ref_err = f32_refs.iter().map(|r| rel_err(r.named()[i].1, y)).fold(0.0, f64::max);
        let mut bound = tol.max(factor * ref_err); // with factor 2: the tolerance unless ref_err > tol / 2
        if let Some((level, noisy)) = noise.filter(|(level, _)| ref_err > *level) {
            let _ = level;
            bound = bound.max(noisy);
        }
        assert!(
            err <= bound,
            "{label}: {name} relative error {err:.3e} above {bound:.1e} (f32 reference {ref_err:.1e})"
        );
    }
}
