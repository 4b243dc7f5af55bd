//! Generation: a request's sizes and inputs from `V2lGenerateParams`, the output size, the
//! generation itself and its cancellation.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;
use v2l_contracts::io::files as files_io;

use crate::args::{clip, input, lock, null, product, text_arg, try_lock};
use crate::error::{guard, request_error, Error, Result};
use crate::handles::{lookup, V2lGenerator};
use crate::types::{V2lGenerateParams, V2lProgressFn, V2lStatus};
use v2l_runtime::limits::Limits;
use v2l_runtime::pipeline::{Inputs, LoraInput, MediaInput, NoiseInput, Progress, PromptInput};
use v2l_runtime::request::{Checked, Field, RequestError, Settings};
use v2l_runtime::video;
use v2l_runtime::{RuntimeError, Tensor};

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
/// (the callback is called after each denoising step; a cancel is also checked after each
/// frame batch of the VAE decode); `out` is then left untouched.
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
        // The pipeline first (one call at a time), then this call's stop: a cancel or free
        // from here on stops it, the prompt's encoding included; one before is ignored, unless
        // the generator is being freed.
        let mut pipeline = lock(&g)?;
        g.cancel.store(false, Ordering::SeqCst);
        g.interrupt.reset();
        if g.cancel.load(Ordering::SeqCst) || g.freed.load(Ordering::SeqCst) {
            g.interrupt.interrupt();
        }
        let stopped_by = || match g.freed.load(Ordering::SeqCst) {
            true => "v2l_generator_free",
            false => "v2l_generator_cancel",
        };
        let mut prompts = prompt_encoders(&g)?;
        let built = g
            .interrupt
            .watch(|| inputs.build(&g.engine, &g.opts, &s.checked, &mut prompts));
        let req = match built {
            Ok(built) => built.request,
            Err(RuntimeError::Cancelled) => {
                return Err(Error::new(
                    V2lStatus::Cancelled,
                    format!("cancelled by {} before the first step", stopped_by()),
                ))
            }
            // A first frame the engine needs, passed as NULL: the C ABI's NULL-pointer status.
            Err(RuntimeError::Request(e)) if e.field == Field::Image && no_frame => {
                let mut e = request_error("params.", e);
                e.status = V2lStatus::NullPointer;
                return Err(e);
            }
            Err(e) => return Err(e.into()),
        };
        drop(prompts);

        let mut watch = Watch {
            callback: progress,
            user_data,
            cancel: &g.cancel,
            freed: &g.freed,
            stopped: None,
            at: String::from("before the first step"),
        };
        // A cancel or a free reaches the ONNX Runtime call in flight too (a DiT step is
        // minutes at a real size on a CPU), not only the checks between steps.
        let result = g.interrupt.watch(|| pipeline.generate(&req, &mut watch));
        drop(pipeline);
        let generation = match result {
            Ok(gen) => gen,
            Err(RuntimeError::Cancelled) => {
                let (by, when) = watch.stopped.unwrap_or_else(|| (stopped_by(), watch.at));
                return Err(Error::new(
                    V2lStatus::Cancelled,
                    format!("cancelled by {by} {when}"),
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

/// Asks the generation running on `generator` to stop: within about 10 ms plus the ONNX
/// Runtime node in flight (a denoising step or a frame batch of the decode is cut short, not
/// finished), its call then returning `V2L_STATUS_CANCELLED`. Callable from any thread at any
/// time, including from the progress callback; a request made while no generation runs is
/// ignored (each generation starts uncancelled).
///
/// # Safety
/// `generator` is a live generator handle.
#[no_mangle]
pub unsafe extern "C" fn v2l_generator_cancel(generator: *const V2lGenerator) -> V2lStatus {
    guard("v2l_generator_cancel", || {
        let g = lookup(generator, "generator")?;
        g.cancel.store(true, Ordering::SeqCst);
        g.interrupt.interrupt();
        Ok(())
    })
}

/// A C generation's progress: the caller's callback after each denoising step, and
/// `v2l_generator_cancel` or `v2l_generator_free` after each step and each frame batch of the
/// decode. Remembers what stopped the run, for its error message.
struct Watch<'a> {
    callback: V2lProgressFn,
    user_data: *mut c_void,
    cancel: &'a AtomicBool,
    freed: &'a AtomicBool,
    stopped: Option<(&'static str, String)>,
    /// Where the run is, for a stop inside a call: `during step 3 of 50`.
    at: String,
}

impl Watch<'_> {
    /// Whether a cancel or a free asks the run to stop; `when` names the point, if so.
    fn go_on(&mut self, when: impl FnOnce() -> String) -> bool {
        let by = match (
            self.cancel.load(Ordering::SeqCst),
            self.freed.load(Ordering::SeqCst),
        ) {
            (true, _) => "v2l_generator_cancel",
            (_, true) => "v2l_generator_free",
            _ => return true,
        };
        self.stopped = Some((by, when()));
        false
    }
}

impl Progress for Watch<'_> {
    fn step(&mut self, done: usize, of: usize) -> bool {
        self.at = match done < of {
            true => format!("during step {} of {of}", done + 1),
            false => String::from("in the decode, during its first frame batch"),
        };
        let when = || format!("after step {done} of {of}");
        if let Some(f) = self.callback {
            // SAFETY: the caller's callback, with the user data it gave for it.
            if unsafe { f(self.user_data, done as u32, of as u32) } != 0 {
                self.stopped = Some(("the progress callback", when()));
                return false;
            }
        }
        self.go_on(when)
    }

    fn decode(&mut self, done: usize, of: usize) -> bool {
        self.at = format!("in the decode, during frame batch {} of {of}", done + 1);
        self.go_on(|| format!("in the decode, after frame batch {done} of {of}"))
    }
}
