//! `v2l-bench` run as a user runs it: its `--help` pages (snapshots) and the GPU check's CPU
//! side. The benchmarks themselves print timings and are run by hand, never timed in a test.

#![allow(clippy::unwrap_used)]

mod cli;
