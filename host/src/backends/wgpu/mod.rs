//! wgpu backend (issue 4): not built yet.

use crate::{Backend, Error, Result};

/// Open the wgpu backend on the best adapter.
pub fn open() -> Result<Box<dyn Backend>> {
    Err(Error::Device { backend: "wgpu", why: "the wgpu backend is not built yet".into() })
}
