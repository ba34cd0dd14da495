//! Wall-clock timing through the host API (the CPU backend's clock).

use std::time::Instant;

use crate::validate::Problem;
use crate::{Backend, DType, Io, Result, Rng, Tensor, TensorMut, Timing, Weights};
use half::{bf16, f16};

/// Random inputs of a problem in its dtype (never zeros): q, k, v as f32 values.
pub fn random_inputs(problem: &Problem, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = &problem.cfg;
    let mut rng = Rng::new(seed);
    let q = rng.normal_vec(problem.batch * problem.n * c.q_heads * c.head_dim, 1.0);
    let k = rng.normal_vec(problem.batch * problem.m * c.kv_heads * c.head_dim, 1.0);
    let v = rng.normal_vec(problem.batch * problem.m * c.kv_heads * c.head_dim, 1.0);
    (q, k, v)
}

/// [`random_inputs`], with an allocation the host cannot make an [`crate::Error::OutOfMemory`]
/// instead of an abort (sizes are validated, but a validated problem may still exceed memory).
pub fn try_random_inputs(problem: &Problem, seed: u64) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let c = &problem.cfg;
    let mut rng = Rng::new(seed);
    let mut draw = |what: &'static str, len: usize| -> Result<Vec<f32>> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| crate::Error::OutOfMemory { what, bytes: 4 * len as u128 })?;
        v.extend((0..len).map(|_| rng.normal() as f32));
        Ok(v)
    };
    let q = draw("random q", problem.batch * problem.n * c.q_heads * c.head_dim)?;
    let k = draw("random k", problem.batch * problem.m * c.kv_heads * c.head_dim)?;
    let v = draw("random v", problem.batch * problem.m * c.kv_heads * c.head_dim)?;
    Ok((q, k, v))
}

/// Owned host buffers of one dtype.
pub enum Owned {
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values.
    F16(Vec<f16>),
    /// bf16 values.
    BF16(Vec<bf16>),
}

impl Owned {
    /// `x` rounded to `dtype`.
    pub fn from_f32(dtype: DType, x: &[f32]) -> Owned {
        match dtype {
            DType::F32 => Owned::F32(x.to_vec()),
            DType::F16 => Owned::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Owned::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// `len` copies of `value` rounded to `dtype`.
    pub fn filled(dtype: DType, len: usize, value: f32) -> Owned {
        match dtype {
            DType::F32 => Owned::F32(vec![value; len]),
            DType::F16 => Owned::F16(vec![f16::from_f32(value); len]),
            DType::BF16 => Owned::BF16(vec![bf16::from_f32(value); len]),
        }
    }

    /// [`Owned::filled`], but an allocation the host cannot make is [`crate::Error::OutOfMemory`]
    /// naming `what`, not an abort.
    pub fn try_filled(what: &'static str, dtype: DType, len: usize, value: f32) -> Result<Owned> {
        fn fill<T: Copy>(what: &'static str, len: usize, value: T) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| crate::Error::OutOfMemory {
                what,
                bytes: len as u128 * std::mem::size_of::<T>() as u128,
            })?;
            v.resize(len, value);
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => Owned::F32(fill(what, len, value)?),
            DType::F16 => Owned::F16(fill(what, len, f16::from_f32(value))?),
            DType::BF16 => Owned::BF16(fill(what, len, bf16::from_f32(value))?),
        })
    }

    /// A view with a shape.
    pub fn tensor(&self, shape: &[usize]) -> Tensor<'_> {
        match self {
            Owned::F32(v) => Tensor::new(v.as_slice(), shape),
            Owned::F16(v) => Tensor::new(v.as_slice(), shape),
            Owned::BF16(v) => Tensor::new(v.as_slice(), shape),
        }
    }

    /// A mutable view with a shape.
    pub fn tensor_mut(&mut self, shape: &[usize]) -> TensorMut<'_> {
        match self {
            Owned::F32(v) => TensorMut::new(v.as_mut_slice(), shape),
            Owned::F16(v) => TensorMut::new(v.as_mut_slice(), shape),
            Owned::BF16(v) => TensorMut::new(v.as_mut_slice(), shape),
        }
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Owned::F32(v) => v.clone(),
            Owned::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Owned::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Time `reps` host calls after one warm-up call.
pub fn time_host<B: Backend + ?Sized>(backend: &B, problem: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
    time_host_rotated(backend, problem, w, reps, 1..2)
}

/// Wall-clock time of `reps` host calls of `backend.run` after one untimed warm-up call, rotating
/// through one random input set (never zeros) per seed in `seeds`: call `i` uses set
/// `i % seeds.len()`, so small problems do not find their inputs in cache.
pub fn time_host_rotated<B: Backend + ?Sized>(
    backend: &B,
    problem: &Problem,
    w: &Weights,
    reps: usize,
    seeds: std::ops::Range<u64>,
) -> Result<Timing> {
    problem.check(w)?;
    backend.supports(problem)?;
    let c = &problem.cfg;
    let inputs: Vec<[Owned; 3]> = seeds
        .map(|s| {
            let (q, k, v) = try_random_inputs(problem, s)?;
            Ok([q, k, v].map(|x| Owned::from_f32(problem.dtype, &x)))
        })
        .collect::<Result<_>>()?;
    let out_shape = problem.out_shape();
    let mut out = Owned::try_filled("timed output", problem.dtype, out_shape.iter().product(), f32::NAN)?;
    let mut lse = vec![f32::NAN; problem.lse_len()];
    let qs = [problem.batch, problem.n, c.q_heads, c.head_dim];
    let ks = [problem.batch, problem.m, c.kv_heads, c.head_dim];
    let seconds = time_wall(reps, |call| {
        let [q, k, v] = &inputs[call % inputs.len()];
        let io = Io {
            q: q.tensor(&qs),
            k: k.tensor(&ks),
            v: v.tensor(&ks),
            out: out.tensor_mut(&out_shape),
            lse: Some(&mut lse),
        };
        backend.run(problem, w, io)
    })?;
    Ok(Timing { seconds, extra_bytes: 0, clock: "wall clock" })
}

/// Wall-clock seconds of `reps` calls `f(1)..=f(reps)` after one untimed warm-up call `f(0)`: the
/// one host wall-clock loop (the CPU backend's `time`, the benchmarks' host stages and decode).
pub fn time_wall(reps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    f(0)?;
    (1..=reps)
        .map(|call| {
            let t = Instant::now();
            f(call)?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}
