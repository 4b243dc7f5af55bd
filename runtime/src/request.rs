//! The request contract, the one way every front end (the CLI, the C ABI, the server, Python
//! through the C ABI) turns what it received into a run:
//!
//! 1. [`Settings`] → [`Settings::check`] → [`Checked`]: steps (the limit, then the scheduler's),
//!    guidance, LoRA scale, the size (given or the engine's default, the one frame-size rule),
//!    the prompt length. Possible before anything loads.
//! 2. [`Inputs`] + [`Checked`] → [`Inputs::build`]: files read, prompt text encoded, and
//! 3. [`RequestParts`] → [`RequestParts::check`] → [`Request`]: the whole request against the
//!    engine (shapes, values, the first-frame and sampler rules). The pipeline trusts a
//!    [`Request`] checked against an engine with its own [`RequestFacts`] (any bundle of the
//!    same export); neither a `Request` nor a [`Checked`] can be made any other way.
//!
//! A bad value is a [`RequestError`] carrying a typed [`Field`]; each front end names that
//! field its own way (`--frames`, `params.frames`, the form field `frames`), so the same bad
//! value gives the same message everywhere.

mod checked;
mod inputs;
mod settings;

pub use crate::predict::check_reference_weight;
pub(crate) use checked::LatentShape;
pub use checked::{
    check_first_frame, check_sampler, Request, RequestFacts, RequestLora, RequestParts,
};
pub use inputs::{Built, Inputs, LoraInput, MediaInput, NoiseInput, PromptEncoders, PromptInput};
pub use settings::{
    bounded, check_fps, check_sequence_length, finite, frame_multiple, Checked, EngineDefaults,
    Settings, DEFAULT_GUIDANCE, DEFAULT_LORA_SCALE, DEFAULT_STEPS, MAX_SCALE, MAX_SEQUENCE_LENGTH,
};
pub use v2l_contracts::request::{Field, RequestError};
