//! # headmix-bench: how fast headmix runs, and against what
//!
//! Modules in dependency order (each uses only those above it):
//! * [`count`]: FLOPs and bytes of a call, and the measured device ceilings used as denominators;
//! * [`sweep`]: the named sweeps (`quick`, `full`, `decode-quick`, `decode`) as lists of
//!   [`sweep::Case`]s per device scale;
//! * [`report`]: the JSON report (schema in `bench/README.md`), tables, peers side by side;
//! * [`timer`]: how a call is timed, one path per clock (device clock, host wall clock);
//! * [`unfused`]: the unfused pipeline from the reference's pieces, timed stage by stage;
//! * [`measure`]: one case on one device into rows (fused, unfused, baselines, device decode);
//! * [`plot`]: the SVG chart of TFLOP/s against sequence length;
//! * [`run`]: a sweep's plan (and its JSON for the PyTorch peers) and the measuring loop.
//!
//! The command line is `headmix bench` (the `headmix-cli` crate).

pub mod count;
pub mod measure;
pub mod plot;
pub mod report;
pub mod run;
pub mod sweep;
pub mod timer;
pub mod unfused;
