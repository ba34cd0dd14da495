//! The `headmix` command line (to be written).
fn main() {}
