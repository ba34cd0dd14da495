//! The backends: CPU (the reference), CUDA (NVRTC kernels), wgpu (WGSL kernels).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod wgpu;
