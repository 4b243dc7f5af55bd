//! Requests in: multipart forms read into named parts, then checked field by field into job
//! parameters. Every failure names its field; uploads are decoded here, before a job exists,
//! with ffmpeg bounded in formats, frames and time (`video::read_untrusted`).

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::http::StatusCode;
use v2l_runtime::limits::Limits;
use v2l_runtime::lora::format::Lora;
use v2l_runtime::request::{check_fps, Field, RequestError, Settings};
use v2l_runtime::tensor::{Data, Tensor};
use v2l_runtime::video::{Frames, UntrustedMedia};

pub use crate::params::{LoraChoice, LoraParams, VideoParams};

use crate::cache::lora_key;
use crate::config::{EngineFacts, RequestLimits};
use crate::error::{upload_error, ApiError};

/// A multipart form: field name → bytes.
pub struct Form(BTreeMap<String, Bytes>);

/// Reads every part of a multipart body, refusing fields not in `allowed` and repeated ones.
pub async fn read(
    multipart: Result<Multipart, MultipartRejection>,
    allowed: &[&str],
) -> Result<Form, ApiError> {
    let mut mp = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected a multipart/form-data body ({})", e.body_text()),
        )
    })?;
    let mut parts = BTreeMap::new();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(body_error(e.status(), e.body_text())),
        };
        let name = field.name().unwrap_or("").to_string();
        if !allowed.contains(&name.as_str()) {
            drop(field);
            discard_fields(&mut mp).await;
            return Err(ApiError::field(
                &name,
                format!("unknown field; this endpoint takes {}", allowed.join(", ")),
            ));
        }
        let bytes = field
            .bytes()
            .await
            .map_err(|e| body_error(e.status(), e.body_text()))?;
        if parts.insert(name.clone(), bytes).is_some() {
            discard_fields(&mut mp).await;
            return Err(ApiError::field(&name, "given more than once"));
        }
    }
    Ok(Form(parts))
}

/// Reads the rest of a body and drops it, so a request refused before its body was read still
/// gets its answer: closing a socket with unread data resets the connection, and the client
/// would see the reset instead of the `4xx`. Bounded by the upload limit (the stream ends in an
/// error past it) and, in the caller, by `--body-timeout`; nothing is kept or decoded.
pub async fn discard(multipart: Result<Multipart, MultipartRejection>) {
    let Ok(mut mp) = multipart else { return };
    discard_fields(&mut mp).await;
}

async fn discard_fields(mp: &mut Multipart) {
    while let Ok(Some(mut field)) = mp.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "too_large",
            "the request body is larger than the server takes (--max-upload-mb)",
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("malformed multipart body ({text})"),
        )
    }
}

impl Form {
    #[cfg(test)]
    pub fn of(parts: &[(&str, &[u8])]) -> Form {
        Form(
            parts
                .iter()
                .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
                .collect(),
        )
    }

    pub fn bytes(&self, field: &str) -> Option<&Bytes> {
        self.0.get(field).filter(|b| !b.is_empty())
    }

    pub fn text(&self, field: &str) -> Result<Option<String>, ApiError> {
        self.0
            .get(field)
            .map(|b| {
                String::from_utf8(b.to_vec())
                    .map_err(|_| ApiError::field(field, "is not valid UTF-8"))
            })
            .transpose()
    }

    fn number<T: FromStr>(&self, field: &str, what: &str) -> Result<Option<T>, ApiError> {
        self.text(field)?
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| ApiError::field(field, format!("`{s}` is not {what}")))
            })
            .transpose()
    }

    fn count(&self, field: &str) -> Result<Option<usize>, ApiError> {
        self.number(field, "a non-negative integer")
    }

    /// A number (finiteness is checked by the request builder, `v2l_runtime::request`).
    fn real(&self, field: &str, default: f32) -> Result<f32, ApiError> {
        Ok(self.number(field, "a number")?.unwrap_or(default))
    }
}

/// A checked video request with its decoded uploads.
pub struct VideoRequest {
    pub params: VideoParams,
    /// The first frame; `None` for a text-to-video engine (Wan T2V), which takes none.
    pub image: Option<Frames>,
    /// Decoded reference clip, when its LoRA is not stored yet.
    pub reference: Option<Frames>,
    /// An uploaded LoRA file, parsed and checked against the DiT: `(id, lora)`.
    pub lora_upload: Option<(String, Arc<Lora>)>,
    /// `prompt_embeds` and `negative_prompt_embeds`, when given instead of text.
    pub prompt_embeds: Option<BTreeMap<String, Tensor>>,
}

/// A form check: [`video`] or [`lora`]. `stored(id)` tells whether a LoRA is stored already.
pub type Check<T> =
    fn(&Form, &EngineFacts, &RequestLimits, &Path, &dyn Fn(&str) -> bool) -> Result<T, ApiError>;

pub const VIDEO_FIELDS: &[&str] = &[
    "image",
    "reference",
    "lora_id",
    "lora",
    "lora_scale",
    "prompt",
    "prompt_embeds",
    "negative_prompt",
    "max_sequence_length",
    "frames",
    "height",
    "width",
    "steps",
    "guidance",
    "seed",
    "fps",
    "scheduler",
    "cache",
];

pub const LORA_FIELDS: &[&str] = &["reference", "lora", "lora_scale", "height", "width"];

/// Checks a `POST /v1/videos` form. `stored(id)` tells whether a LoRA is already stored (its
/// reference clip then need not be kept); `scratch` is where uploads are decoded from.
pub fn video(
    form: &Form,
    facts: &EngineFacts,
    limits: &RequestLimits,
    scratch: &Path,
    stored: &dyn Fn(&str) -> bool,
) -> Result<VideoRequest, ApiError> {
    // The runtime's one request builder: the same checks, in the same order, as the CLI and
    // the C ABI.
    let settings = Settings {
        frames: form.count("frames")?,
        height: form.count("height")?,
        width: form.count("width")?,
        steps: form
            .count("steps")?
            .unwrap_or(v2l_runtime::request::DEFAULT_STEPS),
        guidance: form.real("guidance", v2l_runtime::request::DEFAULT_GUIDANCE)?,
        lora_scale: form.real("lora_scale", v2l_runtime::request::DEFAULT_LORA_SCALE)?,
        max_sequence_length: form.count("max_sequence_length")?,
    };
    let c = settings
        .check_with(&facts.request_defaults(), &runtime_limits(limits))
        .map_err(request_error)?;
    let (frames, height, width, steps, guidance) =
        (c.frames(), c.height(), c.width(), c.steps(), c.guidance());
    let seed = form
        .number("seed", "an integer 0 to 2^64 - 1")?
        .unwrap_or(0);
    let fps = form.number("fps", "an integer 1 to 240")?.unwrap_or(8u32);
    let fps = check_fps(fps).map_err(request_error)?;
    let max_sequence_length = c
        .max_sequence_length()
        .unwrap_or(facts.text_sequence_length);
    let negative_prompt = form.text("negative_prompt")?.unwrap_or_default();
    // Prompt text is bounded before it is kept or tokenised (the tokenizer's memory grows with
    // the text).
    for (field, text) in [
        ("prompt", form.text("prompt")?.unwrap_or_default()),
        ("negative_prompt", negative_prompt.clone()),
    ] {
        v2l_runtime::text::prompt::check_prompt_len(field, &text).map_err(|e| match e {
            v2l_runtime::RuntimeError::Invalid { message, .. } => ApiError::field(field, message),
            e => ApiError::field(field, e.to_string()),
        })?;
    }
    let (prompt, prompt_embeds) = match (form.text("prompt")?, form.bytes("prompt_embeds")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "prompt_embeds",
                "give `prompt` or `prompt_embeds`, not both",
            ))
        }
        (Some(_), None) if !facts.has_text_encoder => {
            return Err(ApiError::field(
                "prompt",
                "this engine has no text encoder; send `prompt_embeds`",
            ))
        }
        (Some(p), None) => (Some(p), None),
        (None, Some(b)) => (None, Some(embeddings(b, facts)?)),
        (None, None) => {
            return Err(ApiError::field("prompt", "required (or `prompt_embeds`)"));
        }
    };
    // The cheap checks first: which LoRA, and whether it exists; decoding comes last.
    let scale = c.lora_scale();
    let chosen: Vec<&str> = ["reference", "lora_id", "lora"]
        .into_iter()
        .filter(|f| form.bytes(f).is_some())
        .collect();
    if chosen == ["reference"] {
        v2l_runtime::request::check_reference_weight(scale).map_err(request_error)?;
    }
    let mut lora_upload = None;
    let mut lora = match chosen[..] {
        [] => LoraChoice::None,
        ["reference"] if !facts.has_hypernet => {
            return Err(ApiError::field(
                "reference",
                "this engine has no hypernetwork to predict a LoRA; send `lora_id` or `lora`",
            ))
        }
        ["reference"] => LoraChoice::None, // decided after the image
        ["lora_id"] => {
            let id = form.text("lora_id")?.unwrap_or_default().trim().to_string();
            if !is_id(&id) || !stored(&id) {
                return Err(
                    ApiError::field("lora_id", format!("no LoRA `{id}` on this server"))
                        .with_status(StatusCode::NOT_FOUND, "not_found"),
                );
            }
            LoraChoice::Stored { id, scale }
        }
        ["lora"] => {
            let (id, l) = uploaded_lora(form, facts)?;
            lora_upload = Some((id.clone(), l));
            LoraChoice::Stored { id, scale }
        }
        _ => {
            return Err(ApiError::field(
                chosen.last().copied().unwrap_or("lora"),
                format!(
                    "give one of `reference`, `lora_id`, `lora`; got {}",
                    chosen.join(", ")
                ),
            ))
        }
    };
    // The runtime's rule: text-to-video engines (Wan T2V) take no first frame, every other
    // kind needs one.
    let image_bytes = form.bytes("image");
    v2l_runtime::request::check_first_frame(facts.pipeline, image_bytes.is_some())
        .map_err(request_error)?;
    let image = match image_bytes {
        Some(bytes) => Some(decode(
            "image",
            bytes,
            Some((height, width)),
            1,
            limits,
            scratch,
        )?),
        None => None,
    };
    let mut reference = None;
    if chosen[..] == ["reference"] {
        let (id, clip) =
            reference_lora(form, facts, limits, scratch, height, width, scale, stored)?;
        reference = clip;
        lora = LoraChoice::Reference { id, weight: scale };
    }
    let scheduler = match form.text("scheduler")? {
        None => None,
        Some(name) => Some(
            name.parse::<v2l_runtime::pipeline::Sampler>()
                .map_err(|m| ApiError::field("scheduler", m))?,
        ),
    };
    v2l_runtime::request::check_sampler(facts.pipeline, scheduler).map_err(request_error)?;
    let cache = match form.text("cache")? {
        None => None,
        Some(text) => Some(
            text.parse::<v2l_runtime::step_cache::StepCache>()
                .map_err(request_error)?,
        ),
    };
    Ok(VideoRequest {
        params: VideoParams {
            scheduler,
            cache: cache.map(|c| c.describe()),
            frames,
            height,
            width,
            steps,
            guidance,
            seed,
            fps,
            prompt,
            negative_prompt,
            max_sequence_length,
            lora,
        },
        image,
        reference,
        lora_upload,
        prompt_embeds,
    })
}

/// What `POST /v1/loras` asks for.
pub enum LoraRequest {
    /// A clip whose LoRA is stored already (`id`).
    Stored(String),
    /// A clip to predict from.
    Predict(LoraParams, Frames),
    /// An uploaded LoRA file, checked.
    Upload(String, Arc<Lora>),
}

/// Checks a `POST /v1/loras` form.
pub fn lora(
    form: &Form,
    facts: &EngineFacts,
    limits: &RequestLimits,
    scratch: &Path,
    stored: &dyn Fn(&str) -> bool,
) -> Result<LoraRequest, ApiError> {
    match (
        form.bytes("reference").is_some(),
        form.bytes("lora").is_some(),
    ) {
        (true, true) => Err(ApiError::field(
            "lora",
            "give `reference` or `lora`, not both",
        )),
        (false, false) => Err(ApiError::field(
            "reference",
            "required (a clip), or `lora` (a LoRA file)",
        )),
        (false, true) => {
            let (id, l) = uploaded_lora(form, facts)?;
            Ok(LoraRequest::Upload(id, l))
        }
        (true, false) => {
            let (_, height, width) = size(form, facts, limits)?;
            let weight =
                v2l_runtime::request::check_reference_weight(form.real("lora_scale", 1.0)?)
                    .map_err(request_error)?;
            let (id, clip) =
                reference_lora(form, facts, limits, scratch, height, width, weight, stored)?;
            Ok(match clip {
                None => LoraRequest::Stored(id),
                Some(clip) => LoraRequest::Predict(LoraParams { id, weight }, clip),
            })
        }
    }
}

pub use crate::store::is_id;

/// The shared limits (`v2l_runtime::limits`) at this server's `--max-*` values.
pub(crate) fn runtime_limits(limits: &RequestLimits) -> Limits {
    Limits {
        max_frames: limits.frames,
        max_pixels: limits.pixels,
        max_steps: limits.steps,
        ..Limits::default()
    }
}

/// A request error as the server says it: the form field, the message every front end gives,
/// and for a limit the server flag that raises it (not the CLI's environment variables).
pub fn request_error(e: RequestError) -> ApiError {
    let flag = match e.field {
        Field::Frames => Some("--max-frames"),
        Field::Size => Some("--max-pixels"),
        Field::Steps => Some("--max-steps"),
        _ => None,
    };
    let message = match (e.over_limit, flag) {
        (true, Some(flag)) => format!("{} (the server's {flag})", e.message),
        _ => e.message,
    };
    ApiError::field(e.field.name(), message)
}

/// `frames`, `height`, `width`: given or the engine's defaults, within the limits.
fn size(
    form: &Form,
    facts: &EngineFacts,
    limits: &RequestLimits,
) -> Result<(usize, usize, usize), ApiError> {
    let settings = Settings {
        frames: form.count("frames")?,
        height: form.count("height")?,
        width: form.count("width")?,
        ..Settings::default()
    };
    let c = settings
        .check_with(&facts.request_defaults(), &runtime_limits(limits))
        .map_err(request_error)?;
    Ok((c.frames(), c.height(), c.width()))
}

/// Writes `bytes` to a scratch file and decodes at most `max_frames` frames of it, at `size`
/// (`height, width`) or, for `None`, at the size it is stored at.
fn decode(
    field: &str,
    bytes: &[u8],
    size: Option<(usize, usize)>,
    max_frames: usize,
    limits: &RequestLimits,
    scratch: &Path,
) -> Result<Frames, ApiError> {
    let file = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(scratch)
        .map_err(ApiError::internal)?;
    std::fs::write(file.path(), bytes).map_err(ApiError::internal)?;
    let media = UntrustedMedia {
        max_frames,
        timeout: limits.decode_timeout,
        max_pixels: limits.source_pixels,
    };
    let frames = match size {
        Some((height, width)) => {
            v2l_runtime::video::read_untrusted(file.path(), height, width, media)
        }
        None => v2l_runtime::video::read_untrusted_at_source_size(file.path(), media),
    };
    frames.map_err(|e| match e {
        v2l_runtime::RuntimeError::MediaTooLarge {
            size, max_pixels, ..
        } => ApiError::field(
            field,
            format!("declares a {size} picture, more than the {max_pixels} pixels allowed; not decoded (the server's --max-source-pixels)"),
        ),
        e => {
            // ffmpeg names its input; the client knows it by its field.
            let mut err = upload_error(field, e);
            err.message = err.message.replace(&*file.path().to_string_lossy(), field);
            err
        }
    })
}

/// Whether `bytes` start as a safetensors file does: an 8-byte little-endian header length
/// that fits, then a JSON object.
fn is_safetensors(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..8) else {
        return false;
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(head);
    let n = u64::from_le_bytes(n);
    n >= 2 && n <= (bytes.len() - 8) as u64 && bytes.get(8) == Some(&b'{')
}

/// A reference clip given as a safetensors `reference_u8` tensor (`[frames, height, width, 3]`,
/// the size the request asks for, or any size for `size = None`), read as `v2l-run --reference
/// clip.safetensors` reads it.
fn reference_tensor(
    bytes: &[u8],
    size: Option<(usize, usize)>,
    limits: &RequestLimits,
    scratch: &Path,
) -> Result<Frames, ApiError> {
    let file = tempfile::Builder::new()
        .prefix("upload-")
        .suffix(".safetensors")
        .tempfile_in(scratch)
        .map_err(ApiError::internal)?;
    std::fs::write(file.path(), bytes).map_err(ApiError::internal)?;
    let frames = match size {
        Some((height, width)) => v2l_runtime::video::read_frames_at_most(
            file.path(),
            height,
            width,
            limits.reference_frames,
        ),
        // At its own size (a Fun-InP engine resizes it), within the frame cap.
        None => v2l_runtime::video::read_frames_at_source_size(file.path()).map(|mut f| {
            f.truncate(limits.reference_frames);
            f
        }),
    };
    frames.map_err(|e| {
        let mut err = upload_error("reference", e);
        err.message = err
            .message
            .replace(&*file.path().to_string_lossy(), "reference");
        err
    })
}

/// A reference clip's LoRA id, and the decoded clip unless that LoRA is stored already.
#[allow(clippy::too_many_arguments)]
fn reference_lora(
    form: &Form,
    facts: &EngineFacts,
    limits: &RequestLimits,
    scratch: &Path,
    height: usize,
    width: usize,
    weight: f32,
    stored: &dyn Fn(&str) -> bool,
) -> Result<(String, Option<Frames>), ApiError> {
    if !facts.has_hypernet {
        return Err(ApiError::field(
            "reference",
            "this engine has no hypernetwork to predict a LoRA; send `lora_id` or `lora`",
        ));
    }
    let bytes = form
        .bytes("reference")
        .ok_or_else(|| ApiError::field("reference", "required"))?;
    // Everything the prediction depends on: the clip, its decoded size and frame cap, the
    // LoRA weight (the hypernetwork's alpha) and the VAE posterior mode.
    let settings = format!(
        "weight={:08x};size={height}x{width};frames={};posterior=mode",
        weight.to_bits(),
        limits.reference_frames
    );
    let id = lora_key(&facts.key, "reference", &settings, bytes);
    if stored(&id) {
        return Ok((id, None));
    }
    // VideoX-Fun's pipeline reads the clip at its stored size and resizes it like PIL.
    let fun = facts.pipeline == v2l_contracts::PipelineKind::CogvideoxFunInpaint;
    let clip = match (is_safetensors(bytes), fun) {
        (true, false) => reference_tensor(bytes, Some((height, width)), limits, scratch)?,
        (true, true) => reference_tensor(bytes, None, limits, scratch)?,
        (false, false) => decode(
            "reference",
            bytes,
            Some((height, width)),
            limits.reference_frames,
            limits,
            scratch,
        )?,
        (false, true) => decode(
            "reference",
            bytes,
            None,
            limits.reference_frames,
            limits,
            scratch,
        )?,
    };
    let clip = match fun {
        true => clip
            .resized_like_pil(height, width)
            .map_err(|e| upload_error("reference", e))?,
        false => clip,
    };
    v2l_runtime::predict::check_reference(&clip, "reference")
        .map_err(|e| upload_error("reference", e))?;
    Ok((id, Some(clip)))
}

/// An uploaded LoRA file (diffusers/PEFT, kohya or ComfyUI), checked against the DiT's layers.
fn uploaded_lora(form: &Form, facts: &EngineFacts) -> Result<(String, Arc<Lora>), ApiError> {
    let bytes = form
        .bytes("lora")
        .ok_or_else(|| ApiError::field("lora", "required"))?;
    let lora = v2l_runtime::lora::format::parse(bytes, Path::new("lora"), Some(&facts.modules))
        .map_err(|e| upload_error("lora", e.into()))?;
    if lora.layers.is_empty() {
        return Err(ApiError::field("lora", "holds no LoRA layers"));
    }
    let unknown: Vec<&str> = lora
        .layers
        .iter()
        .map(|l| l.module.as_str())
        .filter(|m| !facts.modules.iter().any(|t| t == m))
        .take(3)
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::field(
            "lora",
            format!(
                "targets layers this DiT does not have: {}",
                unknown.join(", ")
            ),
        ));
    }
    // Shapes too: a LoRA stored now must be one every later job can apply.
    v2l_runtime::lora::apply::match_targets(&lora, &facts.targets, Path::new("lora"))
        .map_err(|e| upload_error("lora", e.into()))?;
    Ok((lora_key(&facts.key, "file", "", bytes), Arc::new(lora)))
}

/// Prompt embeddings from an uploaded safetensors file: `prompt_embeds` and
/// `negative_prompt_embeds`, `[1, L, D]` each with the DiT's `D`.
fn embeddings(bytes: &[u8], facts: &EngineFacts) -> Result<BTreeMap<String, Tensor>, ApiError> {
    let field = "prompt_embeds";
    let all = v2l_runtime::tensor::parse_safetensors(bytes, Path::new(field))
        .map_err(|e| upload_error(field, e))?;
    let mut out = BTreeMap::new();
    for name in ["prompt_embeds", "negative_prompt_embeds"] {
        let t = all
            .get(name)
            .ok_or_else(|| ApiError::field(field, format!("missing tensor `{name}`")))?;
        let ok = matches!(t.shape[..], [1, l, d] if l >= 1 && d == facts.text_embed_dim)
            && matches!(t.data, Data::F32(_));
        if !ok {
            return Err(ApiError::field(
                field,
                format!(
                    "`{name}` is {:?}; expected float32 [1, L, {}]",
                    t.shape, facts.text_embed_dim
                ),
            ));
        }
        if t.as_f32(name)
            .map_err(|e| upload_error(field, e))?
            .iter()
            .any(|v| !v.is_finite())
        {
            return Err(ApiError::field(
                field,
                format!("`{name}` holds NaN or infinite values"),
            ));
        }
        out.insert(name.to_string(), t.clone());
    }
    let shapes: Vec<&Vec<usize>> = out.values().map(|t| &t.shape).collect();
    if shapes.windows(2).any(|w| w.first() != w.last()) {
        return Err(ApiError::field(
            field,
            "`negative_prompt_embeds` must have the shape of `prompt_embeds`",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn facts() -> EngineFacts {
        EngineFacts {
            fixed_size: None,
            key: "k".into(),
            default_frames: Some(9),
            default_height: Some(32),
            default_width: Some(32),
            multiple: 16,
            text_embed_dim: 8,
            text_sequence_length: 16,
            has_text_encoder: true,
            has_hypernet: false,
            scheduler_steps: 1000,
            modules: vec!["transformer_blocks.0.attn1.to_q".into()],
            targets: vec![v2l_contracts::LinearInfo {
                name: "transformer_blocks.0.attn1.to_q".into(),
                out_features: 32,
                in_features: 32,
            }],
            pipeline: v2l_contracts::PipelineKind::CogvideoxI2v,
        }
    }

    fn field_of(r: Result<VideoRequest, ApiError>) -> (StatusCode, String, String) {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => (e.status, e.field.unwrap_or_default(), e.message),
        }
    }

    #[test]
    fn every_bad_field_is_a_4xx_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let none = |_: &str| false;
        let run = |parts: &[(&str, &[u8])]| {
            field_of(video(
                &Form::of(parts),
                &facts(),
                &RequestLimits::default(),
                dir.path(),
                &none,
            ))
        };
        let cases: &[(&[(&str, &[u8])], &str)] = &[
            (&[("prompt", b"x")], "image"),
            (&[("image", b"x")], "prompt"),
            (
                &[("image", b"x"), ("prompt", b"x"), ("frames", b"4")],
                "frames",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("frames", b"-1")],
                "frames",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("height", b"33")],
                "height",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("steps", b"0")],
                "steps",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("steps", b"100000")],
                "steps",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("guidance", b"nan")],
                "guidance",
            ),
            (
                &[("image", b"x"), ("prompt", b"x"), ("seed", b"1.5")],
                "seed",
            ),
            (&[("image", b"x"), ("prompt", b"x"), ("fps", b"0")], "fps"),
            (&[("image", b"x"), ("prompt", b"\xff")], "prompt"),
            (
                &[("image", b"x"), ("prompt", b"x"), ("prompt_embeds", b"y")],
                "prompt_embeds",
            ),
            (
                &[("image", b"x"), ("prompt_embeds", b"not safetensors")],
                "prompt_embeds",
            ),
            (&[("image", b"not an image"), ("prompt", b"x")], "image"),
        ];
        for (parts, field) in cases {
            let (status, got, message) = run(parts);
            assert!(status.is_client_error(), "{field}: {status}");
            assert_eq!(&got, field, "{message}");
            assert!(
                !message.contains(&*dir.path().to_string_lossy()),
                "a server path leaked: {message}"
            );
        }
    }

    #[test]
    fn lora_choices_are_exclusive_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let limits = RequestLimits::default();
        let base: Vec<(&str, &[u8])> = vec![("image", b"x"), ("prompt", b"x")];
        let with = |extra: &[(&str, &[u8])]| {
            let mut p = base.clone();
            p.extend_from_slice(extra);
            field_of(video(&Form::of(&p), &facts(), &limits, dir.path(), &|_| {
                false
            }))
        };
        assert_eq!(
            with(&[("reference", b"r")]).1,
            "reference",
            "no hypernetwork"
        );
        assert_eq!(with(&[("reference", b"r"), ("lora_id", b"x")]).1, "lora_id");
        let (status, field, _) = with(&[("lora_id", b"../../etc/passwd")]);
        assert_eq!((status, field.as_str()), (StatusCode::NOT_FOUND, "lora_id"));
        assert!(is_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_id("../x"));
    }
}
