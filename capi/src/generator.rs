//! Generator calls: make and free a generator, predict a LoRA with it, apply or remove one.

use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::args::{clip, finite, lock, out_handle, path_arg};
use crate::error::{guard, Error};
use crate::handles::{lookup, register, unregister, V2lEngine, V2lGenerator, V2lLora};
use crate::types::V2lStatus;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::Pipeline;
use v2l_runtime::video;

/// Loads the engine's pipeline (its own ONNX Runtime sessions: VAE, DiT and, when the engine
/// has one, the Video2LoRA hypernetwork). On success `*out_generator` is a new handle to free
/// with `v2l_generator_free`.
///
/// # Safety
/// `engine` is a live engine handle; `out_generator` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_new(
    engine: *const V2lEngine,
    out_generator: *mut *mut V2lGenerator,
) -> V2lStatus {
    guard("v2l_generator_new", || {
        let e = lookup(engine, "engine")?;
        let out = out_handle(out_generator, "out_generator")?;
        // The engine was checked on open: reuse it rather than hash every file again.
        let dir = e.dir.clone();
        let dit = dir
            .manifest
            .dit
            .as_ref()
            .ok_or_else(|| Error::new(V2lStatus::InvalidArgument, "the engine holds no DiT"))?;
        let text_embed_dim = dit.text_embed_dim;
        let vae = dir
            .manifest
            .vae
            .as_ref()
            .ok_or_else(|| Error::new(V2lStatus::InvalidArgument, "the engine holds no VAE"))?;
        let vae = vae.clone();
        let engine = dir.clone();
        let mut pipeline = Pipeline::load(dir, &e.opts)?;
        // Loaded now, so no `v2l_generate` with a reference waits for it.
        pipeline.load_predictor()?;
        *out = register(V2lGenerator {
            pipeline: Mutex::new(pipeline),
            prompts: Mutex::new(Default::default()),
            opts: e.opts.clone(),
            cancel: AtomicBool::new(false),
            freed: AtomicBool::new(false),
            interrupt: Default::default(),
            text_embed_dim,
            engine,
            vae,
        });
        Ok(())
    })
}

/// Frees a generator (NULL: no-op). If another thread is generating with it, that generation
/// is cancelled and the memory is released when it returns.
///
/// # Safety
/// `generator` is NULL or a pointer returned by `v2l_generator_new`.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_free(generator: *mut V2lGenerator) -> V2lStatus {
    guard("v2l_generator_free", || {
        if let Some(g) = unregister(generator, "generator")? {
            g.freed.store(true, Ordering::SeqCst);
            g.interrupt.interrupt();
        }
        Ok(())
    })
}

/// Predicts a Video2LoRA LoRA from a reference clip: RGB8 `frames × height × width × 3` bytes
/// (`rgb_len` must equal that product). `lora_weight` is upstream's LoRA weight w (used as
/// multiplier and alpha, so the effect scales as w²; 1 is the default). Needs an engine with the
/// hypernetwork. The generator's applied LoRA is unchanged. On success `*out_lora` is a new
/// handle to free with `v2l_lora_free`.
///
/// # Safety
/// `generator` is a live generator handle; `rgb` points to `rgb_len` readable bytes;
/// `out_lora` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_predict_lora(
    generator: *mut V2lGenerator,
    rgb: *const u8,
    rgb_len: usize,
    frames: u32,
    height: u32,
    width: u32,
    lora_weight: f32,
    out_lora: *mut *mut V2lLora,
) -> V2lStatus {
    guard("v2l_generator_predict_lora", || {
        let g = lookup(generator, "generator")?;
        let out = out_handle(out_lora, "out_lora")?;
        let reference = clip(rgb, rgb_len, frames, height, width, "rgb")?;
        let w = finite(lora_weight, "lora_weight")?;
        let p = lock(&g)?.predict(&reference, w)?;
        *out = register(V2lLora {
            lora: p.lora.into(),
            source: "reference frames".into(),
        });
        Ok(())
    })
}

/// Like `v2l_generator_predict_lora`, from a video file (anything ffmpeg decodes, a directory
/// of PNGs, or a safetensors file with `reference_u8 [F, H, W, 3]`), resized to
/// `height × width` (ffmpeg bicubic). Decoding needs `ffmpeg` on the PATH.
///
/// # Safety
/// `generator` is a live generator handle; `path` a NUL-terminated string; `out_lora` points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_predict_lora_from_video(
    generator: *mut V2lGenerator,
    path: *const c_char,
    height: u32,
    width: u32,
    lora_weight: f32,
    out_lora: *mut *mut V2lLora,
) -> V2lStatus {
    guard("v2l_generator_predict_lora_from_video", || {
        let g = lookup(generator, "generator")?;
        let out = out_handle(out_lora, "out_lora")?;
        let path = path_arg(path, "path")?;
        if height == 0 || width == 0 {
            return Err(Error::new(
                V2lStatus::InvalidArgument,
                format!("{width}x{height}: both must be at least 1"),
            ));
        }
        let w = finite(lora_weight, "lora_weight")?;
        let kind = g.engine.pipeline_kind()?;
        let reference = video::read_reference(&path, kind, height as usize, width as usize)?;
        let p = lock(&g)?.predict(&reference, w)?;
        *out = register(V2lLora {
            lora: p.lora.into(),
            source: path,
        });
        Ok(())
    })
}

/// Applies `lora` with multiplier `scale` (fuse scale `scale · alpha / rank`; 1 for a predicted
/// LoRA at its weight), replacing whatever LoRA was applied: this is also how to switch. The
/// DiT is rebuilt from the base weights, so switching never accumulates. On failure the
/// previously applied LoRA stays.
///
/// # Safety
/// `generator` is a live generator handle; `lora` a live LoRA handle.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_set_lora(
    generator: *mut V2lGenerator,
    lora: *const V2lLora,
    scale: f32,
) -> V2lStatus {
    guard("v2l_generator_set_lora", || {
        let g = lookup(generator, "generator")?;
        let l = lookup(lora, "lora")?;
        let multiplier = finite(scale, "scale")?;
        let applied = AppliedLora {
            lora: l.lora.clone(),
            source: l.source.clone(),
            multiplier,
        };
        lock(&g)?.set_lora(Some(&applied))?;
        Ok(())
    })
}

/// Keeps up to `bytes` of LoRA factors laid out as the DiT takes them (on a GPU, in its memory)
/// for LoRAs switched away from, least recently used dropped first: `v2l_generator_set_lora`
/// back to one of them (the same LoRA handle at the same scale) then moves no factor. Only the
/// `unfused` LoRA strategy has factor inputs (the default of GPU and int8 engines); elsewhere
/// this keeps nothing. 0 (the default) keeps none. Up to about 0.5 GiB per LoRA at
/// CogVideoX-5B width (rank 64 on every linear, bf16; a request's guidance samples share it).
///
/// # Safety
/// `generator` is a live generator handle.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_set_factor_cache(
    generator: *mut V2lGenerator,
    bytes: u64,
) -> V2lStatus {
    guard("v2l_generator_set_factor_cache", || {
        let g = lookup(generator, "generator")?;
        lock(&g)?.set_factor_cache(bytes);
        Ok(())
    })
}

/// Removes the applied LoRA: the DiT runs on its base weights again.
///
/// # Safety
/// `generator` is a live generator handle.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_clear_lora(generator: *mut V2lGenerator) -> V2lStatus {
    guard("v2l_generator_clear_lora", || {
        let g = lookup(generator, "generator")?;
        lock(&g)?.set_lora(None)?;
        Ok(())
    })
}
