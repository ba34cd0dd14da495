//! CUDA backend (issue 3): not built yet.

use crate::{Backend, Error, Result};

/// Open the CUDA backend on device 0.
pub fn open() -> Result<Box<dyn Backend>> {
    Err(Error::Device { backend: "cuda", why: "the CUDA backend is not built yet".into() })
}
