//! Benchmark tooling: the `skein-load` open-loop load generator and the latency statistics it
//! reports. `benches/run.sh` drives it against the mock provider directly, through nginx and
//! through Skein, and `benches/README.md` records the results.

pub mod stats;
