//! # headmix: fused head-mixing attention
//!
//! Attention in which heads mix before the softmax: standard MHA and GQA, Multi-head Explicit
//! Attention (MEA) and Interleaved Head Attention (IHA) are configurations of one operator, defined
//! in `docs/operator.md` of the headmix repository and implemented by every backend:
//!
//! * **CUDA**: flash-style kernels compiled at run time by NVRTC (no CUDA toolkit to build);
//! * **wgpu**: WGSL kernels on any Vulkan, Metal, DX12 or WebGPU device;
//! * **CPU**: the pure-Rust reference ([`headmix_reference`]).
//!
//! ```
//! use headmix::{Config, Weights, Io, Tensor, TensorMut, Backend};
//! let cfg = Config::iha(4, 2, 64);                 // H = 4 heads, P = 2 pseudo-heads, d = 64
//! let w = Weights::random(&cfg, 7);                // aq, ak, av, r
//! let (b, n) = (1, 8);
//! let q = vec![0.5f32; b * n * 4 * 64];
//! let (k, v) = (q.clone(), q.clone());
//! let mut out = vec![0f32; b * n * 4 * 64];        // [B, N, H, d] (collapsed by r)
//! let backend = headmix::best().backend;           // CUDA, else wgpu, else CPU
//! backend.forward(&cfg, &w, Io {
//!     q: Tensor::new(&q, &[b, n, 4, 64]),
//!     k: Tensor::new(&k, &[b, n, 4, 64]),
//!     v: Tensor::new(&v, &[b, n, 4, 64]),
//!     out: TensorMut::new(&mut out, &[b, n, 4, 64]),
//!     lse: None,
//! })?;
//! # Ok::<(), headmix::Error>(())
//! ```

#![warn(missing_docs)]

mod backend;
pub mod backends;
pub mod cache;
pub mod compress;
mod config;
pub mod decode;
mod error;
mod rng;
mod tensor;
pub mod timing;
pub mod validate;
mod weights;

pub use backend::{Backend, BackendKind, Io, Selection, Timing, best, open};
pub use cache::{CacheBytes, KvCache, KvCacheStack, cache_bytes};
pub use config::{Config, Method, PosMode, Rope, Window};
pub use decode::{DecodeIo, DecodeProblem, decode};
pub use error::{Cause, Error, Result};
pub use headmix_reference as reference;
pub use rng::Rng;
pub use tensor::{DType, Data, DataMut, Tensor, TensorMut};
pub use validate::{Problem, validate};
pub use weights::{Weights, replication};
