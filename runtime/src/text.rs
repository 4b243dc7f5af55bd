//! Prompt text in: the tokenizer ([`tokenizer`], from a model's `spiece.model` or
//! `tokenizer.json`) and the exported text encoder, run as diffusers' CogVideoX pipelines run
//! them ([`prompt`]).

pub mod prompt;
pub mod spiece;
pub mod tokenizer;
