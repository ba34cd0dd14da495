//! The crate's typed errors. Every invalid input is reported before anything is written.

use std::fmt;

use crate::DType;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each variant naming the offending value.
#[derive(Clone, Debug)]
pub enum Error {
    /// A tensor's shape is not the one the configuration implies.
    Shape { what: &'static str, expected: Vec<usize>, got: Vec<usize> },
    /// A tensor's data length does not match its declared shape.
    Length { what: &'static str, expected: usize, got: usize },
    /// The tensors do not share one dtype.
    DType { what: &'static str, expected: DType, got: DType },
    /// Head dimension zero, odd, or above what any backend supports.
    HeadDim { d: usize, why: &'static str },
    /// `P = 0`.
    ZeroPseudoHeads,
    /// A head count is zero.
    ZeroHeads { what: &'static str },
    /// GQA needs `H` divisible by the number of key/value heads.
    GqaHeads { heads: usize, kv_heads: usize },
    /// A head count that the configuration cannot use (e.g. identity query mixing with `Hq != H`).
    Heads { what: &'static str, value: usize, why: String },
    /// A window edge larger than kernels can index.
    Window { left: usize, right: usize, max: usize },
    /// More queries than keys (`N > M`).
    QueryLongerThanKeys { n: usize, m: usize },
    /// Batch or sequence of size zero.
    Empty { what: &'static str },
    /// NaN or infinity in a weight or a configuration number.
    NonFinite { what: &'static str, index: usize, value: f64 },
    /// A configuration number out of range (scale, eps, RoPE base, position offset).
    Config { what: &'static str, value: f64, why: &'static str },
    /// Sizes whose element count or index overflows what kernels address.
    TooLarge { what: &'static str, elements: u128, max: u128 },
    /// The backend cannot run this (valid) problem.
    Unsupported { backend: &'static str, why: String },
    /// The device or its driver failed (not found, compile error, launch failure, lost device).
    Device { backend: &'static str, why: String },
    /// A KV cache was used wrongly (overflow, wrong layer shape).
    Cache { why: String },
    /// A host allocation of `bytes` bytes failed (more than the memory available).
    OutOfMemory { what: &'static str, bytes: u128 },
    /// Two bindings of one call overlap in memory and at least one is written.
    Alias { what: &'static str, other: &'static str },
    /// A device buffer that belongs to another device than the backend's.
    ForeignBuffer { what: &'static str },
    /// A [`crate::Problem`] / [`crate::DecodeProblem`] that does not describe the tensors or
    /// weights it is run with.
    ProblemMismatch { why: String },
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
            Error::Device { backend, why } => write!(f, "{backend} backend: {why}"),
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

impl std::error::Error for Error {}
