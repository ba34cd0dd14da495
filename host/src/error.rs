//! The crate's typed errors. Every invalid input is reported before anything is written.

use std::fmt;
use std::sync::Arc;

use crate::DType;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each variant naming the offending value.
#[derive(Clone, Debug)]
pub enum Error {
    /// A tensor's shape is not the one the configuration implies.
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A tensor's data length does not match its declared shape.
    Length {
        /// Which tensor.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements the buffer holds.
        got: usize,
    },
    /// The tensors do not share one dtype.
    DType {
        /// Which tensor.
        what: &'static str,
        /// The dtype of `q`.
        expected: DType,
        /// This tensor's dtype.
        got: DType,
    },
    /// Head dimension zero, odd, or above what any backend supports.
    HeadDim {
        /// The head dimension.
        d: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `P = 0`.
    ZeroPseudoHeads,
    /// A head count is zero.
    ZeroHeads {
        /// Which head count.
        what: &'static str,
    },
    /// GQA needs `H` divisible by the number of key/value heads.
    GqaHeads {
        /// Query heads `H`.
        heads: usize,
        /// Key/value heads `G`.
        kv_heads: usize,
    },
    /// A head count that the configuration cannot use (e.g. identity query mixing with `Hq != H`).
    Heads {
        /// Which head count.
        what: &'static str,
        /// Its value.
        value: usize,
        /// Why it cannot be used.
        why: String,
    },
    /// A window edge larger than kernels can index.
    Window {
        /// Left edge, virtual tokens.
        left: usize,
        /// Right edge, virtual tokens.
        right: usize,
        /// The largest edge supported.
        max: usize,
    },
    /// More queries than keys (`N > M`).
    QueryLongerThanKeys {
        /// Query tokens `N`.
        n: usize,
        /// Key tokens `M`.
        m: usize,
    },
    /// Batch or sequence of size zero.
    Empty {
        /// Which size.
        what: &'static str,
    },
    /// NaN or infinity in a weight or a configuration number.
    NonFinite {
        /// Which weight or number.
        what: &'static str,
        /// Index of the first non-finite element.
        index: usize,
        /// The value found.
        value: f64,
    },
    /// A configuration number out of range (scale, eps, RoPE base, position offset).
    Config {
        /// Which number.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        why: &'static str,
    },
    /// Sizes whose element count or index overflows what kernels address.
    TooLarge {
        /// Which tensor or index.
        what: &'static str,
        /// Its element count (or largest index).
        elements: u128,
        /// The most kernels address.
        max: u128,
    },
    /// The backend cannot run this (valid) problem.
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// What it cannot run.
        why: String,
    },
    /// The device or its driver failed (not found, compile error, launch failure, lost device).
    /// `why` says what failed, with the cause's message; `source` keeps the cause itself (a
    /// cudarc `DriverError`, an NVRTC error, a wgpu error) for [`std::error::Error::source`].
    Device {
        /// `"cuda"` or `"wgpu"`.
        backend: &'static str,
        /// What failed, and the cause's message.
        why: String,
        /// The driver's or library's own error, when there is one.
        source: Option<Cause>,
    },
    /// A KV cache was used wrongly (overflow, wrong layer shape).
    Cache {
        /// What went wrong.
        why: String,
    },
    /// A host allocation of `bytes` bytes failed (more than the memory available).
    OutOfMemory {
        /// The buffer.
        what: &'static str,
        /// Its size in bytes.
        bytes: u128,
    },
    /// Two bindings of one call overlap in memory and at least one is written.
    Alias {
        /// The written binding.
        what: &'static str,
        /// The binding it overlaps.
        other: &'static str,
    },
    /// A device buffer that belongs to another device than the backend's (a handle of another
    /// backend or wgpu instance, a slice of another CUDA context).
    ForeignBuffer {
        /// The binding.
        what: &'static str,
    },
    /// A [`crate::Problem`] / [`crate::DecodeProblem`] that does not describe the tensors or
    /// weights it is run with.
    ProblemMismatch {
        /// What differs.
        why: String,
    },
}

/// Equality by the `Debug` text: every field compared, and a NaN `value` (`NonFinite`,
/// `Config`) equal to itself, so an error equals its clone.
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

impl Eq for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { what, expected, got } => write!(f, "{what}: expected shape {expected:?}, got {got:?}"),
            Error::Length { what, expected, got } => {
                write!(f, "{what}: shape implies {expected} elements but the buffer holds {got}")
            }
            Error::DType { what, expected, got } => write!(f, "{what}: dtype {got:?}, expected {expected:?}"),
            Error::HeadDim { d, why } => write!(f, "head dim {d}: {why}"),
            Error::ZeroPseudoHeads => write!(f, "P (pseudo-heads per head) must be at least 1, got 0"),
            Error::ZeroHeads { what } => write!(f, "{what} must be at least 1, got 0"),
            Error::GqaHeads { heads, kv_heads } => {
                write!(f, "GQA needs heads ({heads}) divisible by kv heads ({kv_heads})")
            }
            Error::Heads { what, value, why } => write!(f, "{what} = {value}: {why}"),
            Error::Window { left, right, max } => {
                write!(f, "window ({left}, {right}) has an edge above the largest supported {max}")
            }
            Error::QueryLongerThanKeys { n, m } => write!(f, "{n} query tokens but only {m} key tokens (need N <= M)"),
            Error::Empty { what } => write!(f, "{what} is empty"),
            Error::NonFinite { what, index, value } => write!(f, "{what}[{index}] = {value} is not finite"),
            Error::Config { what, value, why } => write!(f, "{what} = {value}: {why}"),
            Error::TooLarge { what, elements, max } => write!(f, "{what}: {elements} elements exceeds {max}"),
            Error::Unsupported { backend, why } => write!(f, "{backend} backend: unsupported: {why}"),
            Error::Device { backend, why, .. } => write!(f, "{backend} backend: {why}"),
            Error::Cache { why } => write!(f, "KV cache: {why}"),
            Error::OutOfMemory { what, bytes } => {
                write!(f, "{what}: allocating {bytes} bytes failed (more than the memory available)")
            }
            Error::Alias { what, other } => write!(f, "{what} overlaps {other} in memory (outputs may not alias)"),
            Error::ForeignBuffer { what } => write!(f, "{what} belongs to another device than the backend's"),
            Error::ProblemMismatch { why } => write!(f, "problem does not match the call: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Device { source: Some(cause), .. } => Some(cause.get()),
            _ => None,
        }
    }
}

impl Error {
    /// A device error without a typed cause.
    pub fn device(backend: &'static str, why: impl Into<String>) -> Error {
        Error::Device { backend, why: why.into(), source: None }
    }

    /// A device error caused by a library error: `why` is `"{what}: {cause}"` and the cause is kept
    /// as the error's [`source`](std::error::Error::source).
    pub fn device_caused(
        backend: &'static str,
        what: impl fmt::Display,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Device { backend, why: format!("{what}: {cause}"), source: Some(Cause::new(cause)) }
    }
}

/// The cause of an [`Error::Device`]: the library's own error, shared so that [`Error`] stays
/// `Clone`. Downcast it through [`std::error::Error::source`] (e.g. to cudarc's `DriverError`).
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    /// Wrap a library error.
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(cause))
    }

    /// The wrapped error.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Two causes are equal when they are the same error or print the same.
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}
