//! `v2l-tools`: what the command-line tools do beside serving, kept out of the lean runtime.
//!
//! | module | what it owns |
//! |---|---|
//! | [`stage`] | one pipeline component on a safetensors file of inputs (`v2l-run stage`): how a user checks an export against PyTorch |
//! | [`measure`] | which effect a clip shows, from its pixels (`v2l-run measure`) |
//! | [`export_checks`] | the runtime's readers as the exporter's part checks (`v2l-export`, tests) |
//! | [`profile`] | where a stage's time goes: ONNX Runtime's per-node traces by operator and provider |
//! | [`lora_compare`] | how two LoRAs relate, layer by layer (`v2l-lora inspect --compare`) |

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod export_checks;
pub mod lora_compare;

pub use export_checks::ExportChecks;
pub mod measure;
pub mod profile;
pub mod stage;
