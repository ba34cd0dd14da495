//! How a call is timed: one path per clock.
//!
//! * **Device clocks** (CUDA events, wgpu timestamps): device backends time themselves on inputs
//!   already on the device, [`Backend::time`] (the GPU sweeps' 64 MiB per bf16 input exceed the
//!   50 MB L2) and [`Backend::time_decode`] (a cache on the device).
//! * **Wall clock** ([`headmix::timing::time_wall`]): the CPU backend's forward, rotating through
//!   random input sets of about [`ROTATE_BYTES`] in all so that tiny problems do not find their
//!   inputs in cache, its decode, and the unfused pipeline's host stages.

use headmix::timing::time_host_rotated;
use headmix::{Backend, BackendKind, Problem, Result, Timing, Weights};

/// Bytes of input the rotated sets cover together.
pub const ROTATE_BYTES: usize = 64 << 20;
/// At most this many input sets.
pub const MAX_SETS: usize = 16;

/// How many input sets (q, k and v) of a forward problem to rotate through: enough to cover
/// [`ROTATE_BYTES`], 2 to [`MAX_SETS`].
pub fn input_sets(problem: &Problem) -> usize {
    let c = &problem.cfg;
    let elements = problem.batch * (problem.n * c.q_heads + 2 * problem.m * c.kv_heads) * c.head_dim;
    ROTATE_BYTES.div_ceil((elements * problem.dtype.size()).max(1)).clamp(2, MAX_SETS)
}

/// Time `reps` forward calls after warm-up: the CPU backend on the wall clock with rotated
/// inputs, any other backend by its own clock.
pub fn forward(backend: &dyn Backend, problem: &Problem, w: &Weights, reps: usize) -> Result<Timing> {
    if backend.kind() == BackendKind::Cpu {
        time_host_rotated(backend, problem, w, reps, 1000..1000 + input_sets(problem) as u64)
    } else {
        backend.time(problem, w, reps)
    }
}
