//! C ABI of the v2l runtime: `libv2l.so` / `libv2l.a` with the header `include/v2l.h`, which is
//! generated from this file by cbindgen (`V2L_UPDATE_HEADER=1 cargo test -p v2l-capi --test
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

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use v2l_contracts::io::files as files_io;

use v2l_runtime::engine::Engine;
use v2l_runtime::error::ErrorKind;
use v2l_runtime::limits::Limits;
use v2l_runtime::lora::format::Lora;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{Inputs, LoraInput, MediaInput, NoiseInput, Pipeline, PromptInput};
use v2l_runtime::request::{Checked, Field, RequestError, Settings};
use v2l_runtime::video::{self, Frames};
use v2l_runtime::{RuntimeError, SessionOptions, Tensor};

/// Version of the C ABI described by this header. It changes whenever a function, a struct
/// layout or a status value changes incompatibly; compare it with `v2l_abi_version()` at run
/// time. 2: `V2lGenerateParams` gained `prompt`, `negative_prompt`, `max_sequence_length`;
/// 5: `cache`.
pub const V2L_ABI_VERSION: u32 = 5;

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

/// An opened engine: immutable, shareable between threads.
pub struct V2lEngine {
    dir: Engine,
    opts: SessionOptions,
}

/// A loaded pipeline (its own ONNX Runtime sessions) and its applied LoRA. One call at a time;
/// `v2l_generator_cancel` from any thread.
pub struct V2lGenerator {
    pipeline: Mutex<Pipeline>,
    /// The tokenizer and text encoder, loaded on the first request with prompt text.
    prompts: Mutex<v2l_runtime::pipeline::PromptEncoders>,
    opts: SessionOptions,
    cancel: AtomicBool,
    /// Set by `v2l_generator_free`: a generation still running on another thread stops.
    freed: AtomicBool,
    text_embed_dim: usize,
    /// The engine (plain data): the noise layout and what a request must carry.
    engine: Engine,
    /// The VAE's loop contract (how many frames a decode returns).
    vae: v2l_contracts::manifest::VaeEntry,
}

/// A LoRA: immutable, shareable between threads and generators.
pub struct V2lLora {
    lora: Lora,
    source: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Errors

struct Error {
    status: V2lStatus,
    message: String,
}

impl Error {
    fn new(status: V2lStatus, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Error {
        // A request field by its `V2lGenerateParams` name, as the command line names its flag.
        let e = match e {
            RuntimeError::Request(r) => return request_error("params.", r),
            e => e,
        };
        let status = status_of(&e);
        let mut message = e.to_string();
        if let Some(h) = e.hint() {
            message.push_str(" (hint: ");
            message.push_str(&h);
            message.push(')');
        }
        Error { status, message }
    }
}

/// The C status of a runtime error: from its [`ErrorKind`], the classification the command-line
/// exit codes also come from.
fn status_of(e: &RuntimeError) -> V2lStatus {
    match e.kind() {
        ErrorKind::BadInput => V2lStatus::InvalidArgument,
        ErrorKind::BadFile => V2lStatus::Io,
        ErrorKind::Lora => V2lStatus::Lora,
        ErrorKind::OrtUnavailable => V2lStatus::OrtUnavailable,
        ErrorKind::Runtime => V2lStatus::Runtime,
        ErrorKind::Cancelled => V2lStatus::Cancelled,
    }
}

type Result<T> = std::result::Result<T, Error>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one entry point: clears the thread's error, catches panics, records the message.
fn guard(func: &str, f: impl FnOnce() -> Result<()>) -> V2lStatus {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            // Cleared again at the end: a call made from the progress callback during this one
            // (answered BUSY on this thread) must not leave its message behind a success.
            set_last_error(String::new());
            V2lStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(format!("{func}: {}", e.message));
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // Dropping the payload could itself panic: catch that too (and forget its payload).
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            set_last_error(format!("{func}: internal error (please report): {what}"));
            V2lStatus::Panic
        }
    }
}

/// Helpers for this crate's Rust tests (status classification); not part of the C API.
#[doc(hidden)]
pub mod testing {
    //! Hooks for the crate's tests (not part of the C ABI).

    /// Runs a panicking closure through the entry-point guard: the status it returns.
    pub fn guard_panic() -> super::V2lStatus {
        super::guard("testing::guard_panic", || panic!("deliberate test panic"))
    }

    /// The C status a runtime error maps to.
    pub fn status_of(e: &v2l_runtime::RuntimeError) -> super::V2lStatus {
        super::status_of(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Handle registry

enum Entry {
    Engine(Arc<V2lEngine>),
    Generator(Arc<V2lGenerator>),
    Lora(Arc<V2lLora>),
}

impl Entry {
    fn kind(&self) -> &'static str {
        match self {
            Entry::Engine(_) => "an engine",
            Entry::Generator(_) => "a generator",
            Entry::Lora(_) => "a LoRA",
        }
    }
}

/// Live handles by address. The registry owns one reference of each; calls clone it for their
/// duration, so freeing a handle another thread is using releases it when that call returns.
static HANDLES: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());

fn handles() -> MutexGuard<'static, BTreeMap<usize, Entry>> {
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

trait Handle: Sized {
    /// "an engine", "a generator", "a LoRA".
    const KIND: &'static str;
    fn wrap(a: Arc<Self>) -> Entry;
    fn get(e: &Entry) -> Option<&Arc<Self>>;
}

impl Handle for V2lEngine {
    const KIND: &'static str = "an engine";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Engine(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Engine(a) => Some(a),
            _ => None,
        }
    }
}

impl Handle for V2lGenerator {
    const KIND: &'static str = "a generator";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Generator(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Generator(a) => Some(a),
            _ => None,
        }
    }
}

impl Handle for V2lLora {
    const KIND: &'static str = "a LoRA";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Lora(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Lora(a) => Some(a),
            _ => None,
        }
    }
}

fn register<T: Handle>(v: T) -> *mut T {
    let a = Arc::new(v);
    let p = Arc::as_ptr(&a) as *mut T;
    handles().insert(p as usize, T::wrap(a));
    p
}

fn not_live<T: Handle>(arg: &str) -> Error {
    Error::new(
        V2lStatus::InvalidHandle,
        format!(
            "`{arg}` is not a live handle of {} (already freed, or not made by v2l)",
            T::KIND
        ),
    )
}

fn wrong_kind<T: Handle>(arg: &str, e: &Entry) -> Error {
    Error::new(
        V2lStatus::InvalidHandle,
        format!("`{arg}` is the handle of {}, not of {}", e.kind(), T::KIND),
    )
}

fn lookup<T: Handle>(p: *const T, arg: &str) -> Result<Arc<T>> {
    if p.is_null() {
        return Err(Error::new(
            V2lStatus::InvalidHandle,
            format!("`{arg}` is NULL"),
        ));
    }
    let h = handles();
    let e = h.get(&(p as usize)).ok_or_else(|| not_live::<T>(arg))?;
    T::get(e).cloned().ok_or_else(|| wrong_kind::<T>(arg, e))
}

/// Removes a handle from the registry (NULL: nothing to do) and returns the registry's
/// reference, to be dropped outside the registry lock.
fn unregister<T: Handle>(p: *mut T, arg: &str) -> Result<Option<Arc<T>>> {
    if p.is_null() {
        return Ok(None);
    }
    let mut h = handles();
    let key = p as usize;
    let e = h.get(&key).ok_or_else(|| not_live::<T>(arg))?;
    if T::get(e).is_none() {
        return Err(wrong_kind::<T>(arg, e));
    }
    let removed = h.remove(&key).and_then(|e| T::get(&e).cloned());
    if h.is_empty() {
        // Free the map's last node too: no v2l memory outlives the last handle.
        drop(std::mem::take(&mut *h));
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------------
// Argument helpers

fn null(arg: &str) -> Error {
    Error::new(V2lStatus::NullPointer, format!("`{arg}` is NULL"))
}

/// Checks an output-handle pointer and sets `*out = NULL` so it is NULL on failure.
unsafe fn out_handle<T>(out: *mut *mut T, arg: &str) -> Result<*mut *mut T> {
    if out.is_null() {
        return Err(null(arg));
    }
    *out = std::ptr::null_mut();
    Ok(out)
}

/// A NUL-terminated UTF-8 argument (NULL: empty).
unsafe fn text_arg(ptr: *const c_char, arg: &str) -> Result<String> {
    if ptr.is_null() {
        return Ok(String::new());
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map(str::to_string)
        .map_err(|e| {
            Error::new(
                V2lStatus::InvalidArgument,
                format!("{arg} is not valid UTF-8 ({e})"),
            )
        })
}

unsafe fn path_arg(p: *const c_char, arg: &str) -> Result<PathBuf> {
    if p.is_null() {
        return Err(null(arg));
    }
    let bytes = CStr::from_ptr(p).to_bytes();
    if bytes.is_empty() {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is empty"),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes)
            .map(PathBuf::from)
            .map_err(|_| Error::new(V2lStatus::InvalidArgument, format!("`{arg}` is not UTF-8")))
    }
}

/// A borrowed input buffer of exactly `len` elements.
unsafe fn input<'a, T>(p: *const T, len: usize, arg: &str) -> Result<&'a [T]> {
    if p.is_null() {
        return Err(null(arg));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!(
                "`{arg}` is not aligned to {} bytes",
                std::mem::align_of::<T>()
            ),
        ));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::new(
            V2lStatus::BufferSize,
            format!("`{arg}`: {len} elements is too large"),
        ));
    }
    Ok(std::slice::from_raw_parts(p, len))
}

fn product(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::new(
                V2lStatus::InvalidArgument,
                format!("{what} {dims:?} is too large"),
            )
        })
}

/// A scale or weight argument: finite and within ±1e4 (`v2l_runtime::request::MAX_SCALE`).
fn finite(v: f32, arg: &str) -> Result<f32> {
    v2l_runtime::request::bounded(v).map_err(|_| {
        let why = match v.is_finite() {
            true => "within ±1e4 (a larger scale overflows the weights)",
            false => "finite",
        };
        Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is {v}; it must be {why}"),
        )
    })
}

fn lock(g: &V2lGenerator) -> Result<MutexGuard<'_, Pipeline>> {
    try_lock(
        &g.pipeline,
        "the generator is in use by another call (one call at a time per generator; only v2l_generator_cancel may run alongside)",
        "the generator is unusable after an internal error in an earlier call; free it and make a new one",
    )
}

/// `m` for this call, or `V2L_STATUS_BUSY` with `busy` while another call holds it, or
/// `V2L_STATUS_RUNTIME` with `poisoned` after a panic inside it.
fn try_lock<'a, T>(m: &'a Mutex<T>, busy: &str, poisoned: &str) -> Result<MutexGuard<'a, T>> {
    match m.try_lock() {
        Ok(p) => Ok(p),
        Err(TryLockError::WouldBlock) => Err(Error::new(V2lStatus::Busy, busy)),
        Err(TryLockError::Poisoned(_)) => Err(Error::new(V2lStatus::Runtime, poisoned)),
    }
}

/// An RGB8 clip `frames × height × width × 3` from a buffer of `len` bytes.
unsafe fn clip(
    rgb: *const u8,
    len: usize,
    frames: u32,
    height: u32,
    width: u32,
    arg: &str,
) -> Result<Frames> {
    let (f, h, w) = (frames as usize, height as usize, width as usize);
    if f == 0 || h == 0 || w == 0 {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!("`{arg}` is {f} frames of {w}x{h}; every dimension must be at least 1"),
        ));
    }
    let need = product(&[f, h, w, 3], arg)?;
    if rgb.is_null() {
        return Err(null(arg));
    }
    if len != need {
        return Err(Error::new(
            V2lStatus::BufferSize,
            format!("`{arg}` has {len} bytes; {f} frames of {w}x{h} RGB8 are {need}"),
        ));
    }
    Ok(Frames {
        frames: f,
        height: h,
        width: w,
        rgb: input(rgb, len, arg)?.to_vec(),
    })
}

/// Validated sizes of a request.
struct Sizes {
    /// Frames the VAE decodes (see `v2l_contracts::frame_batch::decoded_frames`).
    frames: usize,
    height: usize,
    width: usize,
    /// Latent noise shape `[1, lf, C, h/8, w/8]`.
    noise: Vec<usize>,
    out_bytes: usize,
    /// The request's settings, checked.
    checked: Checked,
}

/// A request error in the C ABI's words: the field as `<prefix><name>` (`params.frames`,
/// `options.threads`), the message every front end gives, and the environment variable that
/// raises a limit.
fn request_error(prefix: &str, e: RequestError) -> Error {
    let field = match e.field {
        Field::Size => format!("{prefix}height/{prefix}width"),
        // The C ABI's name for the first frame.
        Field::Image => format!("{prefix}first_frame"),
        f => format!("{prefix}{}", f.name()),
    };
    Error::new(
        V2lStatus::InvalidArgument,
        format!("{field}: {}", e.message_with_env_hint()),
    )
}

/// `params`' settings checked by the runtime's one request builder (`v2l_runtime::request`).
fn settings(g: &V2lGenerator, p: &V2lGenerateParams) -> Result<Checked> {
    let settings = Settings {
        frames: Some(p.frames as usize),
        height: Some(p.height as usize),
        width: Some(p.width as usize),
        steps: p.steps as usize,
        guidance: p.guidance,
        lora_scale: 1.0,
        // 0: the DiT's `max_text_seq_length`.
        max_sequence_length: (p.max_sequence_length != 0).then_some(p.max_sequence_length as usize),
    };
    let limits = Limits::from_env()?;
    settings
        .check(&g.engine, &limits)
        .map_err(|e| request_error("params.", e))
}

fn sizes(g: &V2lGenerator, p: &V2lGenerateParams) -> Result<Sizes> {
    let c = settings(g, p)?;
    let (f, h, w) = (c.frames(), c.height(), c.width());
    let latent_frames = v2l_contracts::LatentGrid::of_video(f, h, w).frames;
    let frames = g.vae.decoded_frames(latent_frames);
    let out_bytes = product(&[frames, h, w, 3], "output")?;
    Ok(Sizes {
        frames,
        height: h,
        width: w,
        noise: g.engine.noise_shape(f, h, w)?,
        out_bytes,
        checked: c,
    })
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

/// The message of the calling thread's last v2l call: "" when it succeeded. The string belongs
/// to v2l and stays valid until the thread's next v2l call.
#[no_mangle]
pub extern "C" fn v2l_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"".as_ptr())
}

/// A static name for a status ("V2L_STATUS_OK", ...; "unknown status" for other values).
#[no_mangle]
pub extern "C" fn v2l_status_str(status: i32) -> *const c_char {
    let s: &CStr = match status {
        0 => c"V2L_STATUS_OK",
        1 => c"V2L_STATUS_NULL_POINTER",
        2 => c"V2L_STATUS_INVALID_ARGUMENT",
        3 => c"V2L_STATUS_INVALID_HANDLE",
        4 => c"V2L_STATUS_BUFFER_SIZE",
        5 => c"V2L_STATUS_IO",
        6 => c"V2L_STATUS_ORT_UNAVAILABLE",
        7 => c"V2L_STATUS_RUNTIME",
        8 => c"V2L_STATUS_LORA",
        9 => c"V2L_STATUS_CANCELLED",
        10 => c"V2L_STATUS_BUSY",
        11 => c"V2L_STATUS_PANIC",
        _ => c"unknown status",
    };
    s.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// Engine

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
        let opts = dir.session_options(options.threads as usize);
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
        *out = register(V2lLora { lora, source: path });
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Generator

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
            lora: p.lora,
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
            lora: p.lora,
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
            lora: l.lora.clone().into(),
            source: l.source.clone(),
            multiplier,
        };
        lock(&g)?.set_lora(Some(&applied))?;
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

/// The request's embeddings from `prompt_embeds`/`negative_prompt_embeds`.
unsafe fn prompt_embeddings(g: &V2lGenerator, p: &V2lGenerateParams) -> Result<(Tensor, Tensor)> {
    let (l, d) = (p.embed_len as usize, p.embed_dim as usize);
    if l == 0 || d != g.text_embed_dim {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!(
                "prompt embeddings are [{l}, {d}]; the model needs [L >= 1, {}] (or give params.prompt as text)",
                g.text_embed_dim
            ),
        ));
    }
    let n = product(&[l, d], "prompt embeddings")?;
    let embeds = |ptr: *const f32, arg: &str| -> Result<Tensor> {
        Ok(Tensor::f32(vec![1, l, d], input(ptr, n, arg)?.to_vec()))
    };
    Ok((
        embeds(p.prompt_embeds, "params.prompt_embeds")?,
        embeds(p.negative_prompt_embeds, "params.negative_prompt_embeds")?,
    ))
}

/// `params.image_embeds` as `[1, tokens, dim]`, or `None` when NULL (the pipeline says when an
/// engine needs them).
unsafe fn image_tokens(p: &V2lGenerateParams) -> Result<Option<Tensor>> {
    if p.image_embeds.is_null() {
        return Ok(None);
    }
    let (l, d) = (p.image_embed_len as usize, p.image_embed_dim as usize);
    if l == 0 || d == 0 {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            format!("`params.image_embeds` is [{l}, {d}]; both sizes must be at least 1"),
        ));
    }
    let n = product(&[l, d], "params.image_embeds")?;
    Ok(Some(Tensor::f32(
        vec![1, l, d],
        input(p.image_embeds, n, "params.image_embeds")?.to_vec(),
    )))
}

/// The generator's prompt encoders, for a request with prompt text.
fn prompt_encoders(
    g: &V2lGenerator,
) -> Result<MutexGuard<'_, v2l_runtime::pipeline::PromptEncoders>> {
    try_lock(
        &g.prompts,
        "the generator is in use by another call",
        "the prompt encoder was poisoned by a panic",
    )
}

/// `params`' prompt: text for the engine's encoder, or the embedding buffers.
unsafe fn prompt_input(g: &V2lGenerator, p: &V2lGenerateParams) -> Result<PromptInput> {
    if p.prompt.is_null() {
        let (prompt, negative) = prompt_embeddings(g, p)?;
        return Ok(PromptInput::Embeds { prompt, negative });
    }
    if !p.prompt_embeds.is_null() || !p.negative_prompt_embeds.is_null() {
        return Err(Error::new(
            V2lStatus::InvalidArgument,
            "params.prompt and params.prompt_embeds are both set; give the text or the embeddings",
        ));
    }
    Ok(PromptInput::Text {
        prompt: text_arg(p.prompt, "params.prompt")?,
        negative: text_arg(p.negative_prompt, "params.negative_prompt")?,
    })
}

/// `params`' noise buffers (`noise`, and a Fun-InP model's `inpaint_noise`), or the seed.
unsafe fn noise_input(s: &Sizes, p: &V2lGenerateParams) -> Result<NoiseInput> {
    if p.noise.is_null() {
        // Every buffer given is used or refused: inpaint noise goes with the initial noise.
        if !p.inpaint_noise.is_null() {
            return Err(Error::new(
                V2lStatus::InvalidArgument,
                "`params.inpaint_noise` is set but `params.noise` is NULL: give both buffers, or neither and a seed",
            ));
        }
        return Ok(NoiseInput::Seed(p.seed));
    }
    let need = product(&s.noise, "noise")?;
    if p.noise_len != need {
        return Err(Error::new(
            V2lStatus::BufferSize,
            format!(
                "`params.noise_len` is {}; noise {:?} has {need} floats",
                p.noise_len, s.noise
            ),
        ));
    }
    let noise = Tensor::f32(
        s.noise.clone(),
        input(p.noise, need, "params.noise")?.to_vec(),
    );
    let inpaint_noise = if p.inpaint_noise.is_null() {
        None
    } else {
        let shape = vec![1, 3, s.checked.frames(), s.height, s.width];
        let need = product(&shape, files_io::INPAINT_NOISE)?;
        if p.inpaint_noise_len != need {
            return Err(Error::new(
                V2lStatus::BufferSize,
                format!(
                    "`params.inpaint_noise_len` is {}; inpaint noise {shape:?} has {need} floats",
                    p.inpaint_noise_len
                ),
            ));
        }
        let v = input(p.inpaint_noise, need, "params.inpaint_noise")?.to_vec();
        Some(Tensor::f32(shape, v))
    };
    Ok(NoiseInput::Given {
        noise,
        inpaint_noise,
        seed: Some(p.seed),
    })
}

/// `params.scheduler` by name, or `None` (NULL) for the engine's default.
unsafe fn sampler(p: &V2lGenerateParams) -> Result<Option<v2l_runtime::pipeline::Sampler>> {
    if p.scheduler.is_null() {
        return Ok(None);
    }
    let name = text_arg(p.scheduler, "params.scheduler")?;
    name.parse::<v2l_runtime::pipeline::Sampler>()
        .map(Some)
        .map_err(|m| {
            Error::new(
                V2lStatus::InvalidArgument,
                format!("`params.scheduler`: {m}"),
            )
        })
}

/// `params.cache` parsed, or `None` (NULL): no step caching.
unsafe fn step_cache(p: &V2lGenerateParams) -> Result<Option<v2l_runtime::step_cache::StepCache>> {
    if p.cache.is_null() {
        return Ok(None);
    }
    let text = text_arg(p.cache, "params.cache")?;
    text.parse().map(Some).map_err(|e: RequestError| {
        Error::new(
            V2lStatus::InvalidArgument,
            format!("`params.cache`: {}", e.message),
        )
    })
}

/// Checks `params`' sizes (frames 1 + 4k, height and width multiples of 8 × patch size,
/// steps >= 1) and writes the output size in bytes, `frames × height × width × 3`, to
/// `*out_bytes`, and the number of frames to `*out_frames` unless it is NULL. The frames are
/// those the VAE decodes, as in diffusers: `params.frames` when every decoder batch of latent
/// frames is odd (17 or 49 frames, any 1 + 8k), otherwise more (5 → 8, 13 → 16). May be called
/// while the generator is generating.
///
/// # Safety
/// `generator` is a live generator handle; `params` points to a `V2lGenerateParams`;
/// `out_bytes` to writable storage for a `size_t`; `out_frames` is NULL or points to writable
/// storage for a `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_output_size(
    generator: *const V2lGenerator,
    params: *const V2lGenerateParams,
    out_bytes: *mut usize,
    out_frames: *mut u32,
) -> V2lStatus {
    guard("v2l_generator_output_size", || {
        let g = lookup(generator, "generator")?;
        if out_bytes.is_null() {
            return Err(null("out_bytes"));
        }
        *out_bytes = 0;
        let p = params.as_ref().ok_or_else(|| null("params"))?;
        let s = sizes(&g, p)?;
        *out_bytes = s.out_bytes;
        if !out_frames.is_null() {
            *out_frames = u32::try_from(s.frames).unwrap_or(u32::MAX);
        }
        Ok(())
    })
}

/// Generates a clip into `out`: RGB8 `frames × height × width × 3` bytes, row-major,
/// interleaved, each value `round(clamp(x, 0, 1) · 255)` of the decoded video, where `frames`
/// is what `v2l_generator_output_size` reports,
/// with the applied LoRA if any. `out_len` must be at least `v2l_generator_output_size`; only
/// that many bytes are written. `progress` may be NULL; `user_data` is passed to it as is.
/// Returns `V2L_STATUS_CANCELLED` when the callback or `v2l_generator_cancel` stops the run
/// (checked after each denoising step); `out` is then left untouched.
///
/// # Safety
/// `generator` is a live generator handle; `params` points to a `V2lGenerateParams` whose
/// buffers have the lengths it states; `out` points to `out_len` writable bytes that do not
/// overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_generate(
    generator: *mut V2lGenerator,
    params: *const V2lGenerateParams,
    progress: V2lProgressFn,
    user_data: *mut c_void,
    out: *mut u8,
    out_len: usize,
) -> V2lStatus {
    guard("v2l_generator_generate", || {
        let g = lookup(generator, "generator")?;
        let p = params.as_ref().ok_or_else(|| null("params"))?;
        let s = sizes(&g, p)?;
        if out.is_null() {
            return Err(null("out"));
        }
        if out_len < s.out_bytes {
            return Err(Error::new(
                V2lStatus::BufferSize,
                format!(
                    "`out_len` is {out_len} bytes; the {} frames of {}x{} RGB8 this request makes need {}",
                    s.frames, s.width, s.height, s.out_bytes
                ),
            ));
        }
        // The first frame is given at the request's size; the builder says whether the engine
        // takes one.
        let image = match p.first_frame.is_null() {
            true => None,
            false => Some(MediaInput::Frames(clip(
                p.first_frame,
                p.first_frame_len,
                1,
                p.height,
                p.width,
                "params.first_frame",
            )?)),
        };
        let inputs = Inputs {
            prompt: prompt_input(&g, p)?,
            image,
            image_embeds: image_tokens(p)?,
            lora: LoraInput::Resident,
            noise: noise_input(&s, p)?,
            sampler: sampler(p)?,
            cache: step_cache(p)?,
        };
        let no_frame = p.first_frame.is_null();
        let mut prompts = prompt_encoders(&g)?;
        let req = match inputs.build(&g.engine, &g.opts, &s.checked, &mut prompts) {
            Ok(built) => built.request,
            // A first frame the engine needs, passed as NULL: the C ABI's NULL-pointer status.
            Err(RuntimeError::Request(e)) if e.field == Field::Image && no_frame => {
                let mut e = request_error("params.", e);
                e.status = V2lStatus::NullPointer;
                return Err(e);
            }
            Err(e) => return Err(e.into()),
        };
        drop(prompts);

        let mut pipeline = lock(&g)?;
        g.cancel.store(false, Ordering::SeqCst);
        let mut stopped: Option<(&str, usize, usize)> = None;
        let result = pipeline.generate(&req, &mut |step, steps| {
            if let Some(f) = progress {
                if f(user_data, step as u32, steps as u32) != 0 {
                    stopped = Some(("the progress callback", step, steps));
                    return false;
                }
            }
            if g.cancel.load(Ordering::SeqCst) {
                stopped = Some(("v2l_generator_cancel", step, steps));
                return false;
            }
            if g.freed.load(Ordering::SeqCst) {
                stopped = Some(("v2l_generator_free", step, steps));
                return false;
            }
            true
        });
        drop(pipeline);
        let generation = match result {
            Ok(gen) => gen,
            Err(RuntimeError::Cancelled) => {
                let (by, step, steps) = stopped.unwrap_or(("a cancel request", 0, 0));
                return Err(Error::new(
                    V2lStatus::Cancelled,
                    format!("cancelled by {by} after step {step} of {steps}"),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let rgb = video::to_rgb8(&generation.frames)?;
        if (rgb.frames, rgb.height, rgb.width) != (s.frames, s.height, s.width)
            || rgb.rgb.len() != s.out_bytes
        {
            return Err(Error::new(
                V2lStatus::Runtime,
                format!(
                    "the pipeline produced {} frames of {}x{}, not the {} frames of {}x{} expected",
                    rgb.frames, rgb.width, rgb.height, s.frames, s.width, s.height
                ),
            ));
        }
        std::ptr::copy_nonoverlapping(rgb.rgb.as_ptr(), out, s.out_bytes);
        Ok(())
    })
}

/// Asks the generation running on `generator` to stop after its current denoising step (its
/// call then returns `V2L_STATUS_CANCELLED`). Callable from any thread at any time, including
/// from the progress callback; a request made while no generation runs is ignored (each
/// generation starts uncancelled).
///
/// # Safety
/// `generator` is a live generator handle.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_cancel(generator: *const V2lGenerator) -> V2lStatus {
    guard("v2l_generator_cancel", || {
        lookup(generator, "generator")?
            .cancel
            .store(true, Ordering::SeqCst);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// LoRA

/// Writes the number of layers `lora` changes to `*out_layers`.
///
/// # Safety
/// `lora` is a live LoRA handle; `out_layers` points to writable storage for a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn v2l_lora_layer_count(
    lora: *const V2lLora,
    out_layers: *mut usize,
) -> V2lStatus {
    guard("v2l_lora_layer_count", || {
        let l = lookup(lora, "lora")?;
        if out_layers.is_null() {
            return Err(null("out_layers"));
        }
        *out_layers = l.lora.layers.len();
        Ok(())
    })
}

/// Frees a LoRA (NULL: no-op). Generators it is applied to keep their fused weights.
///
/// # Safety
/// `lora` is NULL or a pointer returned by a v2l function that makes LoRAs.
#[no_mangle]
pub unsafe extern "C" fn v2l_lora_free(lora: *mut V2lLora) -> V2lStatus {
    guard("v2l_lora_free", || {
        drop(unregister(lora, "lora")?);
        Ok(())
    })
}
