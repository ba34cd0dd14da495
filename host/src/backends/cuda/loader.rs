//! Finding the CUDA libraries before cudarc does.
//!
//! cudarc's `dynamic-loading` panics on its first call when a library is absent, so every entry
//! point first asks this module, which `dlopen`s the driver (`libcuda.so.1`) and NVRTC
//! (`libnvrtc.so.13`) itself and returns a clear error naming what it searched. NVRTC is also
//! looked for in Python wheels (`pip install nvidia-cuda-nvrtc`: `site-packages/nvidia/cu13/lib`):
//! the library found there is opened by full path with `RTLD_GLOBAL`, after which cudarc's own
//! `dlopen("libnvrtc.so.13")` resolves to it by its soname. `HEADMIX_NVRTC_PATH` may name the
//! library file (or its directory) explicitly.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlerror() -> *const c_char;
}

/// `dlopen` a name or path, keeping it loaded for the life of the process.
fn open(name: &str) -> Result<(), String> {
    let c = CString::new(name).map_err(|_| format!("{name}: contains a NUL byte"))?;
    // SAFETY: dlopen with a valid C string; the handle is deliberately never closed.
    let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a valid C string owned by libc.
        let e = unsafe { dlerror() };
        let why = if e.is_null() {
            "unknown error".into()
        } else {
            unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
        return Err(why);
    }
    Ok(())
}

/// Directories where pip wheels put NVRTC (`nvidia/cu13/lib`, and the CUDA 12 layout
/// `nvidia/cuda_nvrtc/lib`), found by scanning the usual Python prefixes.
fn wheel_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut prefixes: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/local/lib".into(), "/opt/conda/lib".into()];
    if let Some(home) = &home {
        prefixes.push(home.join(".local/lib"));
        if let Ok(versions) = std::fs::read_dir(home.join(".pyenv/versions")) {
            prefixes.extend(versions.flatten().map(|v| v.path().join("lib")));
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv).join("lib"));
    }
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("python3") {
                roots.push(e.path().join("site-packages"));
                roots.push(e.path().join("dist-packages"));
            }
        }
    }
    roots.push("/usr/lib/python3/dist-packages".into());
    let mut dirs = Vec::new();
    for root in roots {
        for sub in ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"] {
            let d = root.join(sub);
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// Ask `python3` where the `nvidia` namespace package lives (last resort; run once).
fn python_dirs() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import nvidia, os; print('\\n'.join(list(nvidia.__path__)))"])
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|l| ["cu13/lib", "cuda_nvrtc/lib"].map(|s| Path::new(l.trim()).join(s)))
        .filter(|d| d.is_dir())
        .collect()
}

fn standard_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(d.into());
    }
    dirs
}

/// Load `libnvrtc-builtins.so.*` of a directory (not the `.alt` flavour), best effort.
fn preload_builtins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so") {
            let _ = open(&e.path().display().to_string());
        }
    }
}

fn find_nvrtc() -> Result<String, String> {
    const NAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so"];
    let mut searched: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    if let Some(p) = std::env::var_os("HEADMIX_NVRTC_PATH") {
        let p = PathBuf::from(p);
        let candidates: Vec<PathBuf> = if p.is_dir() { NAMES.iter().map(|n| p.join(n)).collect() } else { vec![p] };
        for c in candidates {
            if let Some(dir) = c.parent() {
                preload_builtins(dir);
            }
            let s = c.display().to_string();
            match open(&s) {
                Ok(()) => return Ok(s),
                Err(e) => errors.push(e),
            }
            searched.push(s);
        }
    }
    // The names cudarc itself tries, through the loader's own search path.
    for n in NAMES {
        if open(n).is_ok() {
            return Ok(n.to_string());
        }
        searched.push(n.to_string());
    }
    let mut tried_python = false;
    let mut dirs = standard_dirs();
    dirs.extend(wheel_dirs());
    loop {
        for d in &dirs {
            for n in NAMES {
                let path = d.join(n);
                if path.exists() {
                    let s = path.display().to_string();
                    // NVRTC dlopens its builtins library by name at compile time; one outside the
                    // loader's search path is found only if it is already loaded: load it first.
                    preload_builtins(d);
                    match open(&s) {
                        Ok(()) => return Ok(s),
                        Err(e) => errors.push(e),
                    }
                }
            }
            searched.push(d.display().to_string());
        }
        if tried_python {
            break;
        }
        tried_python = true;
        dirs = python_dirs();
    }
    let mut why = format!("NVRTC (libnvrtc.so.13) not found; searched {}", searched.join(", "));
    if !errors.is_empty() {
        why.push_str(&format!("; dlopen errors: {}", errors.join("; ")));
    }
    why.push_str(" (set HEADMIX_NVRTC_PATH or LD_LIBRARY_PATH, or `pip install nvidia-cuda-nvrtc`)");
    Err(why)
}

fn find_driver() -> Result<String, String> {
    const NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
    let mut first_error = String::new();
    for n in NAMES {
        match open(n) {
            Ok(()) => return Ok(n.to_string()),
            Err(e) if first_error.is_empty() => first_error = e,
            Err(_) => {}
        }
    }
    Err(format!(
        "the CUDA driver library was not found (searched {} on the loader path: {first_error}); is an NVIDIA driver installed?",
        NAMES.join(", ")
    ))
}

/// Make NVRTC loadable (once per process); returns the path or name it was found under.
pub fn nvrtc() -> Result<&'static str, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND.get_or_init(find_nvrtc).as_deref().map_err(Clone::clone)
}

/// Make the driver loadable (once per process).
pub fn driver() -> Result<&'static str, String> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND.get_or_init(find_driver).as_deref().map_err(Clone::clone)
}

/// Run a first cudarc call that could still panic inside the library, turning a panic into an
/// error message.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        format!("{what}: {msg}")
    })
}
