//! Engine calls: open and free an engine, read a LoRA file for it.

use std::ffi::c_char;

use crate::args::{out_handle, path_arg};
use crate::error::{guard, request_error, Error};
use crate::handles::{lookup, register, unregister, V2lEngine, V2lLora};
use crate::types::{V2lEngineOptions, V2lStatus};
use v2l_runtime::engine::Engine;
use v2l_runtime::limits::Limits;
use v2l_runtime::RuntimeError;

/// Opens an engine bundle written by `v2l-compile` (every file's hash is checked), or a plain
/// export directory of a whole pipeline (`v2l-export pipeline`), and loads ONNX Runtime if it
/// is not loaded yet. `options` may be NULL. On success `*out_engine` is a new handle to free
/// with `v2l_engine_free`; on failure it is NULL.
///
/// # Safety
/// `path` is a NUL-terminated string; `options` is NULL or points to a `V2lEngineOptions`;
/// `out_engine` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn v2l_engine_open(
    path: *const c_char,
    options: *const V2lEngineOptions,
    out_engine: *mut *mut V2lEngine,
) -> V2lStatus {
    guard("v2l_engine_open", || {
        let out = out_handle(out_engine, "out_engine")?;
        let path = path_arg(path, "path")?;
        let options = if options.is_null() {
            V2lEngineOptions::default()
        } else {
            *options
        };
        let dir = Engine::open(&path)?;
        let m = &dir.manifest;
        if m.dit.is_none() || m.vae.is_none() || m.scheduler.is_none() {
            return Err(Error::new(
                V2lStatus::InvalidArgument,
                format!(
                    "{}: not a pipeline engine (it needs a DiT, a VAE and a scheduler config: `v2l-export pipeline`, then `v2l-compile`)",
                    path.display()
                ),
            ));
        }
        Limits::from_env()?
            .check_threads(options.threads as usize)
            .map_err(|e| request_error("options.", e))?;
        v2l_runtime::ort_env::init()?;
        // The bundle's backend: a CUDA or TensorRT engine is never run on the CPU provider.
        let opts = (dir.session_options_on(options.threads as usize, options.device))
            .map_err(|e| Error::new(V2lStatus::InvalidArgument, format!("options.{e}")))?;
        *out = register(V2lEngine { dir, opts });
        Ok(())
    })
}

/// Frees an engine (NULL: no-op). Generators and LoRAs made from it stay valid.
///
/// # Safety
/// `engine` is NULL or a pointer returned by `v2l_engine_open`; a freed or foreign pointer is
/// refused with `V2L_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn v2l_engine_free(engine: *mut V2lEngine) -> V2lStatus {
    guard("v2l_engine_free", || {
        drop(unregister(engine, "engine")?);
        Ok(())
    })
}

/// Reads a standard LoRA file (diffusers/PEFT, kohya/musubi or ComfyUI safetensors) for the
/// engine's DiT. On success `*out_lora` is a new handle to free with `v2l_lora_free`.
///
/// # Safety
/// `engine` is a live engine handle; `path` a NUL-terminated string; `out_lora` points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn v2l_engine_load_lora(
    engine: *const V2lEngine,
    path: *const c_char,
    out_lora: *mut *mut V2lLora,
) -> V2lStatus {
    guard("v2l_engine_load_lora", || {
        let e = lookup(engine, "engine")?;
        let out = out_handle(out_lora, "out_lora")?;
        let path = path_arg(path, "path")?;
        let modules: Vec<String> = e
            .dir
            .dit_targets()?
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let lora =
            v2l_runtime::lora::format::read(&path, Some(&modules)).map_err(RuntimeError::from)?;
        // Shapes too, now: a LoRA for another model must fail here, not at `set_lora`.
        v2l_runtime::lora::apply::match_targets(&lora, e.dir.dit_targets()?, &path)
            .map_err(RuntimeError::from)?;
        *out = register(V2lLora {
            lora: lora.into(),
            source: path,
        });
        Ok(())
    })
}
