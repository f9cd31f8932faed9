//! Load generator and benchmarks against the mock provider (landing with the benchmark step).
