//! How a call is timed: one path per clock.
//!
//! * **Device clocks**: device backends time themselves ([`Backend::time`]: inputs already on the
//!   device, CUDA events or wgpu timestamps). The GPU sweeps run 64 MiB per bf16 input, more than
//!   an H100's 50 MB L2, so caches cannot flatter them.
//!   Decode: [`Backend::time_decode`] on a cache of the device (CUDA events, wgpu timestamps).
//! * **Wall clock**: everything on the host goes through [`headmix::timing::time_wall`]: the CPU
//!   backend's forward (rotating through several random input sets, about [`ROTATE_BYTES`] in
//!   all, so that tiny problems do not find their inputs in cache), its decode (the default
//!   [`Backend::time_decode`]) and the unfused pipeline's host stages.

use headmix::timing::time_host_rotated;
use headmix::{Backend, BackendKind, Problem, Result, Timing, Weights};

/// Bytes of input the rotated sets cover together.
pub const ROTATE_BYTES: usize = 64 << 20;
/// At most this many input sets.
pub const MAX_SETS: usize = 16;

/// How many sets of `bytes` each to rotate through: enough to cover [`ROTATE_BYTES`], at least
/// `min`, at most [`MAX_SETS`].
pub fn sets(bytes: usize, min: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(min, MAX_SETS)
}

/// The input sets of a forward problem: q, k and v together, at least 2.
pub fn input_sets(problem: &Problem) -> usize {
    let c = &problem.cfg;
    let elements = problem.batch * (problem.n * c.q_heads + 2 * problem.m * c.kv_heads) * c.head_dim;
    sets(elements * problem.dtype.size(), 2)
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
