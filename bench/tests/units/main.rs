//! Unit tests of the bench library, one module per source file (kept out of `src/` so the code reads
//! on its own; one test binary links faster than seven).

mod count;
mod measure;
mod plot;
mod report;
mod sweep;
mod timer;
mod unfused;
