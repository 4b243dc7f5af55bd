//! `v2l-compile`: the compile layer between the exporter and the runtime.
//!
//! An export directory (graphs + manifest, from `v2l-export`) becomes an engine bundle that
//! `v2l_runtime` loads. Nothing here runs at serving time: the runtime does not link this
//! crate, nor `v2l-calibration`.
//!
//! | module | what it owns |
//! |---|---|
//! | [`bundle`] | [`compile`] / [`compile_with`]: the named compile steps, backend rewrites, precision lowering |
//! | [`calibrate`] | static int8: activation ranges from the fp32 DiT over calibration samples |
//! | [`accuracy`] | each changed stage's distance from fp32, recorded in `bundle.json` |
//! | [`error`] | [`CompileError`]: the runtime's errors and the compile passes' own |

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod accuracy;
pub mod bundle;
pub mod calibrate;
pub mod error;

pub use bundle::{
    compile, compile_with, default_attention, default_strategy, fuses_attention, quantised_as,
    Options,
};
pub use error::{CompileError, Result};
