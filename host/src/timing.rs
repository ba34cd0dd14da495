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
        Owned::from_f32(dtype, &vec![value; len])
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
    let c = &problem.cfg;
    let inputs: Vec<[Owned; 3]> = seeds
        .map(|s| {
            let (q, k, v) = random_inputs(problem, s);
            [q, k, v].map(|x| Owned::from_f32(problem.dtype, &x))
        })
        .collect();
    let out_shape = problem.out_shape();
    let mut out = Owned::filled(problem.dtype, out_shape.iter().product(), f32::NAN);
    let mut lse = vec![f32::NAN; problem.lse_len()];
    let qs = [problem.batch, problem.n, c.q_heads, c.head_dim];
    let ks = [problem.batch, problem.m, c.kv_heads, c.head_dim];
    let mut seconds = Vec::with_capacity(reps);
    for call in 0..=reps {
        let [q, k, v] = &inputs[call % inputs.len()];
        let io = Io {
            q: q.tensor(&qs),
            k: k.tensor(&ks),
            v: v.tensor(&ks),
            out: out.tensor_mut(&out_shape),
            lse: Some(&mut lse),
        };
        let t = Instant::now();
        backend.run(problem, w, io)?;
        if call > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(Timing { seconds, extra_bytes: 0, clock: "wall clock" })
}
