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
//!
//! # Conventions
//!
//! * Every named [`Config`] constructor is **causal** (`with_causal(false)` for bidirectional).
//! * Masks and RoPE positions are **bottom-right aligned**: with `M > N` keys the queries are the
//!   last `N` tokens (virtual query `i` at key index and position `i + (M − N)·P`, plus `pos0`
//!   for RoPE).
//! * A [`Window`] `(left, right)` shows `left` keys before the query's own, its own, and `right`
//!   after (FlashAttention's convention); IHA-local's is `(W·P − 1, 0)`: `W·P` keys.
//! * Output `[B, N, H, d]` with a collapse or when `P = 1`; `[B, N, H, P, d]` for `P > 1`
//!   without one (`[B, N, H, 1, d]` accepted for `P = 1`).
//! * Head norm ([`Weights::norm`]): [`HeadNorm::Group`] `{ gamma, beta }` is MEA's GroupNorm
//!   (PyTorch `GroupNorm(H, H·d)`), MEA's default; [`HeadNorm::Rms`] `{ gamma }` the RMS norm.

//!
//! # Non-finite inputs (NaN policy)
//!
//! Every backend (CPU, wgpu, CUDA) and decode treat NaN and infinities the same way,
//! FlashAttention's way:
//!
//! 1. **Selection mixing is a gather.** When a mixing matrix (`aq`, `ak` or `av`) is a selection
//!    (every `(h, p)` column has exactly one nonzero entry and it is exactly 1: MHA, GQA, identity),
//!    each pseudo-head reads only its selected stored head; a NaN in a stored head reaches only the
//!    heads that read it (never `0 · NaN`). Any other matrix is dense and reads every stored head of
//!    a token, so a non-finite value there reaches every pseudo-head mixed from that token (the
//!    collapse `r` likewise mixes every pseudo-head of a token).
//! 2. **Masked keys never reach a row.** A key outside a row's mask (causal future, outside the
//!    window, beyond `M`) is skipped by selection, never multiplied by 0: neither its score nor its
//!    value row can make the row non-finite.
//! 3. **Non-finite values reach exactly the rows that read them.** A row that reads a NaN (its
//!    query, any visible key or value) has a non-finite output (and, for a non-finite score, a NaN
//!    `lse`); every other row is finite and equal to the reference. An infinity propagates the same
//!    way, except where the arithmetic absorbs it exactly (a score of `−inf` is a weight of 0).
//! 4. **Opt-in validation.** [`Config::with_check_finite`]`(true)` checks `q`, `k`, `v` (and a
//!    decode's held cache entries) on the host before anything runs and returns
//!    [`Error::NonFinite`] naming the tensor (`"q"`, `"k"`, `"v"`, `"cache k"`, `"cache v"`) and the
//!    flat index of the first non-finite value. Off by default (it reads every input once); the
//!    device-buffer entry points, which have no host copy, refuse it with [`Error::Unsupported`].
//!
//! Weights and configuration numbers are always validated: a non-finite weight is an
//! [`Error::NonFinite`], a scale whose `scale · log2(e)` overflows f32 or a subnormal `norm_eps`
//! an [`Error::Config`]. The operator's definition is in `docs/operator.md`.
//!
//! # Device tensors
//!
//! Tensors that stay on the GPU between calls go through each backend's device entries:
//! `backends::wgpu::WgpuTensor` handles (made by `WgpuBackend::alloc_tensor` /
//! `upload_tensor`, read by `download_tensor`) for `WgpuBackend::forward_buffers` and
//! `append_buffers`, cudarc slices for `CudaBackend::forward_device` and `append_device`. A handle
//! or slice of another backend, device, wgpu instance or CUDA context is
//! [`Error::ForeignBuffer`] naming the binding, an output aliasing another binding
//! [`Error::Alias`]; raw buffers and pointers, which cannot be checked, enter only through
//! `unsafe` functions (`WgpuBackend::adopt_buffer`, `CudaBackend::forward_raw`).

#![warn(missing_docs)]

mod backend;
pub mod backends;
pub mod backward;
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
pub use backward::{BackwardIo, WeightGrads, validate_backward};
pub use cache::{CacheBytes, KvCache, KvCacheStack, cache_bytes};
pub use config::{Config, Method, PosMode, Rope, Window};
pub use decode::{DecodeIo, DecodeProblem, decode};
pub use error::{Cause, Error, Result};
pub use headmix_reference as reference;
pub use headmix_reference::NormKind;
pub use rng::Rng;
pub use tensor::{DType, Data, DataMut, Tensor, TensorMut};
pub use validate::{Problem, validate};
pub use weights::{HeadNorm, Weights, identity_norm, replication, try_replication};
