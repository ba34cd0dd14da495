//! # headmix-bench: how fast headmix runs, and against what
//!
//! * [`sweep`]: the named sweeps (`quick`, `full`) as lists of cases per
//!   backend kind (large sequences on GPUs, tiny ones on the CPU);
//! * [`decode`]: the decode sweeps (`decode`, `decode-quick`): one new token per sequence against
//!   a filled KV cache, `B = 1, 8, 64`, 4k..128k tokens on GPUs;
//! * [`decode_measure`]: fill the caches, time `headmix::decode`, count the cache read and the
//!   cache size against the unfused design;
//! * [`count`]: FLOPs (`4·B·H·d·` visible pairs) and bytes (q, k, v read + out written) of a case,
//!   and the measured H100 ceilings used as denominators;
//! * [`unfused`]: the unfused pipeline built from headmix's own pieces (mix, plain attention with
//!   `P = 1` over `N·P` tokens, collapse), timed stage by stage;
//! * [`timer`]: how a call is timed (the backend's clock; rotated input sets on the CPU);
//! * [`measure`]: time one case on one backend (fused, unfused, baselines) into [`report::Row`]s;
//! * [`report`]: the JSON report (schema in `bench/README.md`), tables, peers side by side;
//! * [`plot`]: the SVG chart of TFLOP/s against sequence length;
//! * [`cli`]: `headmix bench ...`.

pub mod cli;
pub mod count;
pub mod decode;
pub mod decode_measure;
pub mod measure;
pub mod meta;
pub mod plot;
pub mod report;
pub mod stats;
pub mod sweep;
pub mod timer;
pub mod unfused;
