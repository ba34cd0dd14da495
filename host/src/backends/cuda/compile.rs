//! NVRTC: compile a variant to PTX for one architecture, with a process-wide cache and an
//! optional on-disk cache under `HEADMIX_CACHE_DIR` (PTX text keyed by a hash of the source,
//! the options and the architecture).

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::result as nvrtc;

use super::loader;
use super::variants::Variant;
use crate::{Error, Result};

fn dev_err(why: impl Into<String>) -> Error {
    Error::device("cuda", why)
}

/// NVRTC options of every variant (no include paths: the sources are self-contained).
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--fmad=true".into(), "-lineinfo".into()]
}

/// NVRTC's version, when the library can be loaded.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    loader::nvrtc().ok()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (above); the call writes two ints.
    let rc = loader::guarded("NVRTC", || unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }).ok()?;
    (rc == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// PTX of one variant, and NVRTC's log (warnings; empty when clean).
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's log (empty when clean).
    pub log: String,
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The exact source NVRTC compiles for a variant (what `headmix kernels --source` writes).
pub fn source(variant: &Variant) -> String {
    variant.source()
}

/// Compile one variant with NVRTC (uncached).
pub fn compile_uncached(variant: &Variant, arch: &str) -> Result<Compiled> {
    compile_source(&variant.name(), &source(variant), arch)
}

/// Compile a CUDA source with the options of every variant; a compile error is an
/// `Error::Device` carrying NVRTC's log.
pub fn compile_source(name: &str, source: &str, arch: &str) -> Result<Compiled> {
    loader::nvrtc().map_err(dev_err)?;
    let src = CString::new(source).map_err(|_| dev_err(format!("{name}: source holds a NUL byte")))?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| dev_err(format!("{name}: name holds a NUL byte")))?;
    let opts = options(arch);
    loader::guarded("NVRTC", || -> Result<Compiled> {
        let prog = nvrtc::create_program(&src, Some(&file))
            .map_err(|e| Error::device_caused("cuda", "nvrtcCreateProgram", e))?;
        // SAFETY: prog was just created and is destroyed once, below.
        let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
        let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
        let ptx = match compiled {
            Ok(()) => unsafe { nvrtc::get_ptx(prog) }
                .map(|p| c_chars_to_string(&p))
                .map_err(|e| Error::device_caused("cuda", "nvrtcGetPTX", e)),
            Err(e) => Err(Error::Device {
                backend: "cuda",
                why: format!("NVRTC failed to compile {name} for {arch}: {e:?}\n{log}"),
                source: Some(crate::Cause::new(e)),
            }),
        };
        let _ = unsafe { nvrtc::destroy_program(prog) };
        Ok(Compiled { ptx: ptx?, log: log.trim().to_string() })
    })
    .map_err(dev_err)?
}

/// A compiled kernel is clean when NVRTC said nothing (any warning is treated as an error: the
/// sources compile without one) and the PTX holds the entry point for the architecture.
pub fn check_clean(name: &str, arch: &str, c: &Compiled, entry: &str) -> Result<()> {
    if !c.log.is_empty() {
        return Err(dev_err(format!("NVRTC log for {name} ({arch}) is not clean:\n{}", c.log)));
    }
    if !c.ptx.contains(&format!(".entry {entry}(")) {
        return Err(dev_err(format!("{name} ({arch}): the PTX lacks the entry point {entry}")));
    }
    if !c.ptx.contains(&format!(".target {arch}")) {
        return Err(dev_err(format!("{name}: the PTX does not target {arch}")));
    }
    Ok(())
}

/// FNV-1a, 64 bit: a hash that is stable across Rust versions (names cache files).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// The cache file of a variant's PTX for an architecture: keyed by a hash of the full source,
/// the NVRTC options and the architecture, so an edited kernel never reads a stale file.
pub fn cache_file(dir: &Path, variant: &Variant, arch: &str) -> PathBuf {
    let opts = options(arch).join(" ");
    let key = fnv1a(&[&source(variant), &opts, arch]);
    dir.join(format!("headmix-{}-{arch}-{key:016x}.ptx", variant.name()))
}

/// PTX from the disk cache under `dir` when present, else compiled with NVRTC (and written there,
/// best effort: a cache that cannot be written is not an error).
pub fn load_or_compile(variant: &Variant, arch: &str, dir: Option<&Path>) -> Result<String> {
    let path = dir.map(|d| cache_file(d, variant, arch));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok())
        && text.contains(&format!(".entry {}(", variant.kernel.entry()))
    {
        return Ok(text);
    }
    let c = compile_uncached(variant, arch)?;
    if let Some(p) = &path {
        // Write to a temporary name, then rename (atomic for concurrent readers).
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &c.ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(c.ptx)
}

/// PTX of a variant for an architecture: the process-wide memory cache, then the disk cache under
/// `HEADMIX_CACHE_DIR` (when set), then NVRTC.
pub fn ptx(variant: &Variant, arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<Mutex<HashMap<(Variant, String), Arc<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (*variant, arch.to_string());
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    let dir = std::env::var_os("HEADMIX_CACHE_DIR").map(PathBuf::from);
    let text = Arc::new(load_or_compile(variant, arch, dir.as_deref())?);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, text.clone());
    Ok(text)
}
