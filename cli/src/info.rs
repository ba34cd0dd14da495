//! `headmix info`: the backends and devices found, and their limits.

use headmix::BackendKind;

pub fn main() -> crate::Result {
    println!("headmix {}", env!("CARGO_PKG_VERSION"));
    for kind in BackendKind::ALL {
        match headmix::open(kind) {
            Ok(b) => {
                println!("\n[{kind}] available: {}", b.device_name());
                for (k, v) in b.describe() {
                    println!("  {k:<28} {v}");
                }
            }
            Err(e) => println!("\n[{kind}] not available: {e}"),
        }
    }
    let sel = headmix::best();
    println!("\nbest backend: {} ({})", sel.backend.kind(), sel.backend.device_name());
    Ok(())
}
