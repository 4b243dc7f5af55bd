//! `v2l-bench`'s benchmarks, one module each. Every figure is printed beside its baseline from
//! the same run, as medians with their spread, and beside the machine it ran on
//! ([`common::cpu_line`]): timings from different machines are never compared.
//!
//! The benches drive the released binaries (`v2l-export`, `v2l-compile`, `v2l-run`, `v2l-serve`,
//! found beside this one) or the runtime's library API; none of the product depends on this
//! crate.

pub use v2l_cli::{bytes, own_peak_rss_mb, Failure};

pub mod attention;
pub mod cache;
pub mod common;
pub mod conv;
pub mod e2e;
pub mod fuse;
pub mod gpu;
pub mod gpu_scale;
pub mod hypernet;
pub mod int8_gemm;
pub mod lilora;
pub mod lora_batch;
pub mod peaks;
pub mod pipeline;
pub mod scale;
pub mod serve;
