//! `v2l-serve`: an HTTP server for "first frame + prompt + reference clip → video" on an
//! exported engine, with a LoRA cache, SQLite job state and Prometheus metrics.
//!
//! Data flows one way: a request is checked and its uploads decoded (`form`), stored as a job
//! (`store`) and queued (`jobs`); a worker (`worker`) takes it, resolves its LoRA through the
//! cache (`cache`), generates, and writes the mp4 next to the job. The HTTP surface is `api`
//! (documented by `openapi`); `client` is a small blocking client for tests and benchmarks.
//!
//! | file | what |
//! |---|---|
//! | [`config`] | flags, per-request limits, what the engine says about requests |
//! | [`form`] | multipart forms → checked job parameters; upload decoding |
//! | [`store`] | SQLite job records and the state directory; recovery after a restart |
//! | [`jobs`] | the bounded queue, live progress, cancellation, draining |
//! | [`cache`] | the LoRA cache: content-hash keys, LRU bounded in bytes |
//! | [`worker`] | one pipeline per thread: LoRA resolution, resident-LoRA switching, generation |
//! | [`api`] | routes, auth, metrics middleware, server-sent events |
//! | [`metrics`] | Prometheus text |
//! | [`server`] | start (pipelines loaded before listening), graceful stop |

// Library code returns typed errors; tests may unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod api;
pub mod cache;
pub mod client;
pub mod config;
pub mod error;
mod fault;
pub mod form;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod params;
pub mod server;
pub mod store;
pub mod worker;
