//! The C ABI's public value types: the status every call returns, the option and request
//! structs, and the progress callback.

use std::ffi::{c_char, c_void};

/// What every call returns. `v2l_last_error()` has the message of a failed call.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V2lStatus {
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A bad value: size, shape, frame count, non-finite scale, non-pipeline engine, ...
    InvalidArgument = 2,
    /// A NULL, freed, unknown or wrong-kind handle.
    InvalidHandle = 3,
    /// A buffer length does not match what its dimensions require (or an output buffer is too
    /// small: see `v2l_generator_output_size`).
    BufferSize = 4,
    /// A file is missing, unreadable or malformed, or an engine bundle fails its checks.
    Io = 5,
    /// The ONNX Runtime library was not found or could not be loaded.
    OrtUnavailable = 6,
    /// ONNX Runtime failed while building a session or running a model.
    Runtime = 7,
    /// A LoRA does not fit the model or its file is invalid.
    Lora = 8,
    /// The generation was cancelled (progress callback or `v2l_generator_cancel`).
    Cancelled = 9,
    /// The generator is in use by another call (on another thread, or from the progress
    /// callback).
    Busy = 10,
    /// An internal error (a Rust panic, caught at the boundary). The handles stay valid; a
    /// generator that panicked mid-call answers `V2L_STATUS_RUNTIME` afterwards and should be
    /// freed.
    Panic = 11,
}

/// Options for `v2l_engine_open` (pass NULL for the defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct V2lEngineOptions {
    /// Intra-op threads of each ONNX Runtime session (0: one per core).
    pub threads: u32,
    /// The GPU a cuda or tensorrt engine's sessions run on, as CUDA numbers them (0: the first
    /// after `CUDA_VISIBLE_DEVICES`; `nvidia-smi`'s order where the GPUs are alike, or with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`). A CPU engine takes 0 only. Every generator of the engine runs there: to
    /// serve from several GPUs, open the engine once per GPU.
    pub device: u32,
}

/// One generation request (image-to-video, classifier-free guidance, DDIM). Input buffers are
/// read during the call only; v2l keeps no pointer to them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct V2lGenerateParams {
    /// Frames to generate: 1 + 4k (the VAE may decode a few more: `v2l_generator_output_size`).
    pub frames: u32,
    /// Output size in pixels: multiples of 8 × the DiT's patch size (16 for CogVideoX).
    pub height: u32,
    pub width: u32,
    /// Denoising steps (>= 1).
    pub steps: u32,
    /// Classifier-free guidance scale (CogVideoX default 6).
    pub guidance: f32,
    /// Seed of v2l's Gaussian noise (ignored when `noise` is given): the same seed gives the
    /// same video on every machine.
    pub seed: u64,
    /// The first frame: RGB8, `height × width × 3` bytes, row-major, interleaved. NULL for a
    /// text-to-video engine (Wan T2V), which takes none.
    pub first_frame: *const u8,
    /// Its length in bytes (must be `height * width * 3`).
    pub first_frame_len: usize,
    /// Text-encoder output for the prompt: `embed_len × embed_dim` floats (row-major `[L, D]`);
    /// NULL when `prompt` gives the text instead.
    pub prompt_embeds: *const f32,
    /// The same for the negative prompt (same `[L, D]`).
    pub negative_prompt_embeds: *const f32,
    /// L: tokens.
    pub embed_len: u32,
    /// D: the DiT's text embedding width.
    pub embed_dim: u32,
    /// Optional initial noise (e.g. PyTorch's, for exact comparisons); NULL to use `seed`.
    /// CogVideoX `[1, (frames - 1) / 4 + 1, 16, height / 8, width / 8]` floats; Wan channels
    /// first, `[1, 16, (frames - 1) / 4 + 1, height / 8, width / 8]`.
    pub noise: *const f32,
    /// Its length in floats (ignored when `noise` is NULL).
    pub noise_len: usize,
    /// The prompt as text (UTF-8, NUL-terminated), encoded by the engine's tokenizer and T5
    /// text encoder as diffusers does (a prompt longer than the sequence length is truncated);
    /// NULL to pass `prompt_embeds` instead. Both set is an error. The same text is encoded once
    /// per generator.
    pub prompt: *const c_char,
    /// The negative prompt as text (NULL: empty, as diffusers); only with `prompt`.
    pub negative_prompt: *const c_char,
    /// Tokens of the encoded prompts (0: the DiT's `max_text_seq_length`); only with `prompt`.
    pub max_sequence_length: u32,
    /// Wan I2V: the first frame's CLIP image tokens, `image_embed_len × image_embed_dim`
    /// floats (row-major `[tokens, image_dim]`, the vision encoder's penultimate hidden
    /// states); NULL for every other engine. Added in ABI version 3.
    pub image_embeds: *const f32,
    pub image_embed_len: u32,
    pub image_embed_dim: u32,
    /// The sampler of a CogVideoX engine, as UTF-8 NUL-terminated text: `ddim` (diffusers'
    /// `DDIMScheduler`, VideoX-Fun's `DDIM_Origin`), `cogvideox-ddim` or `dpm`
    /// (`CogVideoXDPMScheduler`, its step noise drawn from `seed`); NULL for the engine's
    /// default (`ddim` for CogVideoX-Fun-InP, `cogvideox-ddim` for diffusers' I2V). Wan
    /// engines take NULL. Added in ABI version 4.
    pub scheduler: *const c_char,
    /// CogVideoX-Fun-InP: the conditioning clip's augmentation noise as upstream adds it,
    /// `[1, 3, frames, height, width]` floats (scaled, zero where the pixel is -1); NULL to
    /// draw it from `seed`. Only with `noise` (set without it: `V2L_INVALID_ARGUMENT`).
    /// Ignored by other engines. Added in ABI version 4.
    pub inpaint_noise: *const f32,
    /// Its length in floats (ignored when `inpaint_noise` is NULL).
    pub inpaint_noise_len: usize,
    /// Step caching as UTF-8 NUL-terminated text: `first-block:THRESHOLD` (diffusers' First
    /// Block Cache: the DiT's blocks after the first run only when the first block's output
    /// moved by more than THRESHOLD since they last ran); NULL for none. The first request
    /// with a cache cuts the generator's DiT into three sessions for good. CogVideoX and Wan engines.
    /// Added in ABI version 5.
    pub cache: *const c_char,
}

/// Progress callback: called on the generating thread after each denoising step with
/// `step` in 1..=`steps`. Return 0 to go on, anything else to cancel (the call then returns
/// `V2L_STATUS_CANCELLED`). It may call `v2l_generator_cancel`; any other call on the same
/// generator from inside it returns `V2L_STATUS_BUSY`. It must not unwind (longjmp, C++ throw).
pub type V2lProgressFn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, step: u32, steps: u32) -> i32>;
