//! Prompt text in: the tokenizer ([`tokenizer`], from a model's `spiece.model` or
//! `tokenizer.json`) and the exported text encoder, run as diffusers' CogVideoX pipelines run
//! them ([`prompt`]).

//!
//! Tokenizing is the cargo feature `text` (on by default; it brings the `tokenizers` crate):
//! without it the runtime still runs text-encoder graphs on given `input_ids` ([`encoder_feed`])
//! and pipelines on given prompt embeddings.

mod feed;
pub use feed::encoder_feed;

#[cfg(feature = "text")]
pub mod prompt;
#[cfg(feature = "text")]
pub mod spiece;
#[cfg(feature = "text")]
pub mod tokenizer;
