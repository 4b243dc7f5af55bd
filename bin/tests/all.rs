//! The command-line tools and the server, run as a user runs them, in one harness: one
//! binary to link. `common` holds the fixture helpers every module shares.

mod common;

mod attention;
mod batched_loras;
mod cli;
mod e2e;
mod effects_model;
mod fun_inpaint;
mod gpu_lease;
mod gpu_placement;
mod hardening;
mod profile;
mod request_errors;
mod schemathesis;
mod serve;
mod server_bounds;
mod server_faults;
mod server_soak;
mod step_cache;
mod vae_conv;
mod valid_graphs;
