//! The sampling math of the pipelines, apart from any engine: CogVideoX's DDIM/DPM scheduler
//! ([`scheduler`]), Wan's flow-matching UniPC scheduler ([`flow`]) and the rotary position
//! tables the DiTs take ([`rope`]). Each matches diffusers' numbers (tests/scheduler_rope.rs,
//! tests/flow_schedulers.rs); the runtime drives them and re-exports them under the same names.

pub mod flow;
pub mod rope;
pub mod scheduler;

mod error;
pub use error::{Result, SamplingError};
