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
    check_within(got, want, f32_ref, dtype, label, 2.0)
}

/// [`check`] with `factor` times the f32 reference's error allowed on gradients where that error
/// exceeds half the tolerance (instead of FlashAttention's 2).
pub fn check_within(got: &Grads<f32>, want: &Grads<f64>, f32_ref: &Grads<f32>, dtype: DType, label: &str, factor: f64) {
    let (g, w, r) = (got.named(), want.named(), f32_ref.named());
    assert_eq!(g.len(), w.len(), "{label}: gradient sets differ");
    for (((name, x), (_, y)), (_, z)) in g.iter().zip(&w).zip(&r) {
        assert!(x.iter().all(|v| !v.is_nan()), "{label}: {name} has NaN (unwritten or wrong)");
        let err = rel_err(x, y);
        let tol = tolerance(dtype);
        let ref_err = rel_err(z, y);
        let bound = if ref_err > tol / 2.0 { tol.max(factor * ref_err) } else { tol };
        assert!(
            err <= bound,
            "{label}: {name} relative error {err:.3e} above {bound:.1e} (f32 reference {ref_err:.1e})"
        );
    }
}
