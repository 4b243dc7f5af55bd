//! C ABI of the v2l runtime: `libv2l.so` / `libv2l.a` with the header `include/v2l.h`, which is
//! generated from this crate's sources by cbindgen (`V2L_UPDATE_HEADER=1 cargo test -p v2l-capi --test
//! header` rewrites it; the test fails when the checked-in copy is stale).
//!
//! Three opaque handle kinds, all created and freed by v2l:
//! - [`V2lEngine`]: an opened engine bundle (or export directory) and the session options.
//!   Immutable: share it between threads freely.
//! - [`V2lGenerator`]: a loaded pipeline with its own ONNX Runtime sessions and its applied LoRA.
//!   One call at a time (a concurrent call gets `V2L_STATUS_BUSY`, never a data race); it may
//!   move between threads; [`v2l_generator_cancel`] may be called from any thread at any time.
//! - [`V2lLora`]: a LoRA (predicted from a reference clip or read from a file). Immutable: apply
//!   it to any number of generators on any threads.
//!
//! Every live handle is in a registry (address → kind and owner), so a NULL, freed, foreign or
//! wrong-kind handle is refused with `V2L_STATUS_INVALID_HANDLE` without ever being
//! dereferenced. Every entry point runs under `catch_unwind`: a panic becomes
//! `V2L_STATUS_PANIC`, never an unwind into C. See docs/c-api.md.

// Input reaches this crate: no unwrap, expect or unchecked indexing outside tests (modules
// that index provably in-bounds buffers in hot loops say so and allow it locally).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

// cbindgen writes the header's functions in the order it reads them: this file's, then each
// module's in the order declared here (a blank line after each keeps rustfmt from sorting them).

// The public value types: V2lStatus, the option and request structs, the progress callback.
mod types;

// The status and message of a failed call, the entry-point guard; v2l_last_error, v2l_status_str.
mod error;

// The opaque handles and the registry of live ones.
mod handles;

// Pointers, strings, paths and buffers from C, checked.
mod args;

// v2l_engine_*.
mod engine;

// v2l_generator_new/free and the generator's LoRA calls.
mod generator;

// A request from V2lGenerateParams; v2l_generator_output_size/generate/cancel.
mod generate;

// v2l_lora_*.
mod lora;

pub use engine::{v2l_engine_free, v2l_engine_load_lora, v2l_engine_open};
pub use error::{v2l_last_error, v2l_status_str};
pub use generate::{v2l_generator_cancel, v2l_generator_generate, v2l_generator_output_size};
pub use generator::{
    v2l_generator_clear_lora, v2l_generator_free, v2l_generator_new, v2l_generator_predict_lora,
    v2l_generator_predict_lora_from_video, v2l_generator_set_factor_cache, v2l_generator_set_lora,
};
pub use handles::{V2lEngine, V2lGenerator, V2lLora};
pub use lora::{v2l_lora_free, v2l_lora_layer_count};
pub use types::{V2lEngineOptions, V2lGenerateParams, V2lProgressFn, V2lStatus};

use std::ffi::c_char;

/// Version of the C ABI described by this header. It changes whenever a function, a struct
/// layout or a status value changes incompatibly; compare it with `v2l_abi_version()` at run
/// time. 2: `V2lGenerateParams` gained `prompt`, `negative_prompt`, `max_sequence_length`;
/// 5: `cache`; 6: `V2lEngineOptions` gained `device`.
pub const V2L_ABI_VERSION: u32 = 6;

/// Helpers for this crate's Rust tests (status classification); not part of the C API.
#[doc(hidden)]
pub mod testing {
    //! Hooks for the crate's tests (not part of the C ABI).

    /// Runs a panicking closure through the entry-point guard: the status it returns.
    pub fn guard_panic() -> crate::types::V2lStatus {
        crate::error::guard("testing::guard_panic", || panic!("deliberate test panic"))
    }

    /// How a generator's kept factor inputs have served (`v2l_generator_set_factor_cache`).
    ///
    /// # Safety
    /// `generator` is a live generator handle.
    pub unsafe fn factor_cache_stats(
        generator: *mut crate::V2lGenerator,
    ) -> Option<v2l_runtime::lora::factors::FactorCacheStats> {
        let g = crate::handles::lookup(generator, "generator").ok()?;
        let stats = crate::args::lock(&g).ok()?.factor_cache_stats();
        Some(stats)
    }

    /// The C status a runtime error maps to.
    pub fn status_of(e: &v2l_runtime::RuntimeError) -> crate::types::V2lStatus {
        crate::error::status_of(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Library

/// The library's version ("0.1.0"): a static string.
#[no_mangle]
pub extern "C" fn v2l_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version the library was built with; compare with `V2L_ABI_VERSION`.
#[no_mangle]
pub extern "C" fn v2l_abi_version() -> u32 {
    V2L_ABI_VERSION
}
