//! The HTTP API (see `openapi.rs` for the document clients read).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/videos` | multipart job → `202 {id}`; `429` + `Retry-After` when the queue is full |
//! | `GET /v1/videos` | the video jobs' states, newest first (`state`, `limit`, `after`) |
//! | `GET /v1/videos/{id}` | state, progress, timings, error |
//! | `GET /v1/videos/{id}/events` | server-sent progress events until the job ends |
//! | `GET /v1/videos/{id}/content` | the mp4 |
//! | `DELETE /v1/videos/{id}` | cancels (queued: at once; running: within the node in flight) |
//! | `POST /v1/loras` | reference clip → predicted LoRA, or an uploaded LoRA file → `lora_id` |
//! | `GET /v1/loras` | the stored LoRAs, most recently used first (`limit`, `after`) |
//! | `GET /v1/loras/{id}` | the LoRA as a diffusers/PEFT safetensors file |
//! | `DELETE /v1/loras/{id}` | deletes a stored LoRA (`409` while a job names it) |
//! | `/healthz`, `/readyz`, `/metrics`, `/openapi.json` | probes, Prometheus text, the API document |

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::json;
use tokio::sync::watch;

use crate::error::{ApiError, ErrorKindTag};
use crate::form::{self, LoraRequest};
use crate::jobs::{Cancelled, EnqueueError, Slot, Snapshot};
use crate::metrics::Gauges;
use crate::store::{JobParams, JobRecord, Kind, LoraDeleted, LoraPin, State as JobState};
use crate::worker::{Shared, IMAGE_FILE, PROMPT_FILE, REFERENCE_FILE, VIDEO_FILE};

/// The router's state: what the workers share, and the shutdown signal (open event streams and
/// waiting requests end when it flips).
#[derive(Clone)]
pub struct App {
    pub shared: Arc<Shared>,
    pub shutdown: watch::Receiver<bool>,
    /// Upload decodes running at once (`--max-decodes`): each is an ffmpeg process.
    pub decodes: Arc<tokio::sync::Semaphore>,
}

pub fn router(app: App) -> Router {
    let upload_limit = app.shared.config.limits.upload_bytes;
    let v1 = Router::new()
        .route(
            "/v1/videos",
            axum::routing::post(submit_video).get(list_videos),
        )
        .route("/v1/videos/{id}", get(video_status).delete(cancel_video))
        .route("/v1/videos/{id}/events", get(video_events))
        .route("/v1/videos/{id}/content", get(video_content))
        .route(
            "/v1/loras",
            axum::routing::post(submit_lora).get(list_loras),
        )
        .route("/v1/loras/{id}", get(download_lora).delete(delete_lora))
        .layer(DefaultBodyLimit::max(upload_limit))
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|State(app): State<App>| async move {
                let s = &app.shared;
                Json(crate::openapi::document(&crate::openapi::Described {
                    token: s.config.token.is_some(),
                    limits: &s.config.limits,
                    facts: &s.facts,
                }))
            }),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method; see /openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), check_host))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(middleware::from_fn(limit_uri))
        .with_state(app)
}

/// Counts every response by route and status, and errors by kind.
async fn observe(State(app): State<App>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let m = &app.shared.metrics;
    m.request(&route, resp.status().as_u16());
    if let Some(k) = resp.extensions().get::<ErrorKindTag>() {
        m.error(k.0);
    }
    resp
}

/// The longest request target (path and query) the server reads: v2l's routes are short, and
/// a longer one is a `414` with the JSON error body (`uri_too_long`).
pub const MAX_URI_BYTES: usize = 8 << 10;

fn uri_too_long() -> ApiError {
    ApiError::new(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        format!("the request's path and query are longer than {MAX_URI_BYTES} bytes"),
    )
}

/// The body of [`uri_too_long`], for the accept loop that answers before hyper parses.
pub fn uri_too_long_body() -> String {
    json!({ "error": uri_too_long() }).to_string()
}

/// Refuses a request target over [`MAX_URI_BYTES`] with the JSON error.
async fn limit_uri(req: Request, next: Next) -> Response {
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return uri_too_long().into_response();
    }
    next.run(req).await
}

/// With `--token-file`, `/v1/*` needs `Authorization: Bearer <token>`.
async fn authorize(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.shared.config.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// DNS rebinding and cross-site requests: a request's `Host` must name this server (an IP
/// address, `localhost`, or a name given with `--allow-host`), and a browser request from
/// another origin (an `Origin` naming another host) needs the bearer token. Any web page could
/// otherwise queue jobs on a local server with a form post (no preflight), and a rebound
/// domain could read the answers.
async fn check_host(State(app): State<App>, req: Request, next: Next) -> Response {
    let allowed = &app.shared.config.allowed_hosts;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_of);
    if let Some(h) = &host {
        if !host_allowed(h, allowed) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                format!("Host `{h}` is not this server's; start it with --allow-host {h} if clients reach it by that name"),
            )
            .into_response();
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(|o| host_of(o.split_once("://").map_or(o, |(_, rest)| rest)));
    if let Some(o) = origin {
        let same_site = o != "null" && host_allowed(&o, allowed);
        let with_token = app.shared.config.token.as_ref().is_some_and(|token| {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token)
                .is_some_and(|given| same(given.as_bytes(), token.as_bytes()))
        });
        if !same_site && !with_token {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!("a request from the web origin `{o}` needs this server's bearer token (--token-file), or --allow-host {o}"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The host of a `Host` header value (or of an origin without its scheme): without the port
/// and a path, lowercase; an IPv6 literal keeps its brackets.
fn host_of(value: &str) -> String {
    let v = value.trim().split('/').next().unwrap_or("");
    let host = match v.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(v, |(h, _)| h),
        None => v.rsplit_once(':').map_or(v, |(h, _)| h),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// IP literals (a rebinding attack names a domain), `localhost`, and the listed names.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || host == "localhost"
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// The token of an `Authorization` value of the `Bearer` scheme. HTTP auth schemes are
/// case-insensitive (RFC 9110 §11.1), so `bearer` and `BEARER` are the same scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

/// Constant-time equality (the token's length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random hex digits from the OS.
fn new_id() -> Result<String, ApiError> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(ApiError::internal)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn queue_full(app: &App, waiting: usize) -> ApiError {
    let limits = &app.shared.config;
    ApiError {
        retry_after: Some(10),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!(
                "{waiting} jobs are waiting (--queue {}); retry later",
                limits.queue
            ),
        )
    }
}

fn draining() -> ApiError {
    ApiError {
        retry_after: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }
}

/// Holds a place in the queue before the body is read, or refuses at once: no upload is read
/// or decoded for a request the queue could not take.
fn admit(app: &App) -> Result<Slot<'_>, ApiError> {
    if app.shared.workers.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_worker",
            "no worker is running to take the job (see the server's log); restart the server",
        ));
    }
    app.shared.jobs.reserve().map_err(|e| match e {
        EnqueueError::Full(n) => queue_full(app, n),
        EnqueueError::Draining => draining(),
        EnqueueError::Store(e) => e.into(),
    })
}

/// Stores and queues a job whose files are in place, in the place `slot` held; on refusal its
/// directory goes.
fn enqueue(
    app: &App,
    job: &JobRecord,
    dir: &std::path::Path,
    slot: Slot<'_>,
) -> Result<(), ApiError> {
    match app.shared.jobs.enqueue(job, slot) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(match e {
                EnqueueError::Full(n) => queue_full(app, n),
                EnqueueError::Draining => draining(),
                EnqueueError::Store(e) => e.into(),
            })
        }
    }
}

/// Runs a blocking check (decoding uploads) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

fn scratch(app: &App) -> Result<std::path::PathBuf, ApiError> {
    let d = app.shared.config.state_dir.join("tmp");
    std::fs::create_dir_all(&d).map_err(ApiError::internal)?;
    Ok(d)
}

/// Keeps an uploaded LoRA: stored (diffusers format) and cached, and held from pruning and
/// DELETE until the pin drops (once its job is queued, or its id answered).
async fn keep_lora(
    app: &App,
    id: &str,
    lora: Arc<v2l_runtime::lora::format::Lora>,
) -> Result<LoraPin, ApiError> {
    let (shared, id) = (app.shared.clone(), id.to_string());
    blocking(move || {
        let store = &shared.jobs.store;
        let (pin, new) = match store.pin_lora(&id) {
            Some(pin) => (pin, false),
            None => {
                let pin = store.pin_new_lora(&id);
                v2l_runtime::lora::format::write(
                    &store.lora_path(&id),
                    &lora,
                    v2l_runtime::lora::format::LoraFormat::Diffusers,
                )
                .map_err(ApiError::internal)?;
                // Its store is its first use, stamped in order (`Store::use_lora`).
                store.use_lora(&id);
                (pin, true)
            }
        };
        shared.cache.insert(&id, lora);
        if new {
            shared.prune_loras();
        }
        Ok(pin)
    })
    .await
}

/// Reads a multipart form with `fields` within the body timeout and checks it off the async
/// threads with `check` (`form::video` or `form::lora`: both decode uploads, at most
/// `--max-decodes` at once), after holding a place in the queue.
/// The stored LoRAs the form names stay held until the pins drop: hold them until the job is
/// queued.
async fn checked<'a, T: Send + 'static>(
    app: &'a App,
    mp: Result<Multipart, MultipartRejection>,
    fields: &'static [&'static str],
    check: form::Check<T>,
) -> Result<(T, Slot<'a>, Vec<LoraPin>), ApiError> {
    let limit = app.shared.config.body_timeout;
    let slot = match admit(app) {
        Ok(slot) => slot,
        Err(e) => {
            let _ = tokio::time::timeout(limit, form::discard(mp)).await;
            return Err(e);
        }
    };
    let form = tokio::time::timeout(limit, form::read(mp, fields))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    limit.as_secs()
                ),
            )
        })??;
    let (shared, scratch) = (app.shared.clone(), scratch(app)?);
    let _decoding = app.decodes.acquire().await.map_err(ApiError::internal)?;
    let (checked, pins) = blocking(move || {
        let store = &shared.jobs.store;
        let pins = std::sync::Mutex::new(Vec::new());
        let checked = check(
            &form,
            &shared.facts,
            &shared.config.limits,
            &scratch,
            &|id| match store.pin_lora(id) {
                Some(pin) => {
                    pins.lock().unwrap_or_else(|p| p.into_inner()).push(pin);
                    true
                }
                None => false,
            },
        )?;
        Ok((
            checked,
            pins.into_inner().unwrap_or_else(|p| p.into_inner()),
        ))
    })
    .await?;
    Ok((checked, slot, pins))
}

async fn submit_video(
    State(app): State<App>,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    {
        let (req, slot, _named) = checked(&app, mp, form::VIDEO_FIELDS, form::video).await?;
        // Before the job's directory, the last await: a client gone meanwhile (the handler
        // dropped) leaves no directory without a row, which no prune would find.
        let _uploaded = match req.lora_upload {
            Some((lid, lora)) => Some(keep_lora(&app, &lid, lora).await?),
            None => None,
        };
        let id = new_id()?;
        let store = &app.shared.jobs.store;
        let dir = store.job_dir(&id)?;
        let saved = (|| {
            if let Some(image) = &req.image {
                crate::store::save_frames(&dir.join(IMAGE_FILE), image)?;
            }
            if let Some(r) = &req.reference {
                crate::store::save_frames(&dir.join(REFERENCE_FILE), r)?;
            }
            if let Some(p) = &req.prompt_embeds {
                v2l_runtime::write_safetensors(&dir.join(PROMPT_FILE), p)?;
            }
            Ok::<_, v2l_runtime::RuntimeError>(())
        })();
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::internal(e));
        }
        enqueue(
            &app,
            &JobRecord::queued(&id, JobParams::Video(req.params)),
            &dir,
            slot,
        )?;
        let mut r = (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": id, "state": "queued",
                "status_url": format!("/v1/videos/{id}"),
                "events_url": format!("/v1/videos/{id}/events"),
                "content_url": format!("/v1/videos/{id}/content"),
            })),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/videos/{id}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Ok(r)
    }
}

/// A video job by id (LoRA jobs are not videos).
fn video_job(app: &App, id: &str) -> Result<JobRecord, ApiError> {
    match app.shared.jobs.record(id)? {
        Some(j) if j.kind == Kind::Video => Ok(j),
        _ => Err(ApiError::not_found("video job")),
    }
}

fn status_body(job: &JobRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(job).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("kind");
        o.insert(
            "progress".into(),
            json!(if job.steps > 0 {
                job.step as f64 / job.steps as f64
            } else {
                0.0
            }),
        );
        if job.state == JobState::Succeeded {
            o.insert(
                "content_url".into(),
                json!(format!("/v1/videos/{}/content", job.id)),
            );
        }
    }
    v
}

/// The most a listing gives at once (`limit`), and what it gives unasked.
const LIST_MAX: usize = 1000;
const LIST_DEFAULT: usize = 100;

/// A listing's query: only `allowed` parameters; `limit` (1–[`LIST_MAX`]) and `after` (a
/// page's `next`) read here. Anything else is a `400` naming the parameter.
fn listing(
    query: Result<Query<std::collections::BTreeMap<String, String>>, QueryRejection>,
    allowed: &[&str],
) -> Result<
    (
        std::collections::BTreeMap<String, String>,
        usize,
        Option<Cursor>,
    ),
    ApiError,
> {
    let q = query
        .map_err(|e| ApiError::field("query", e.body_text()))?
        .0;
    if let Some(k) = q
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && !["limit", "after"].contains(&k.as_str()))
    {
        return Err(ApiError::field(k, "not a parameter of this listing"));
    }
    let limit = match q.get("limit") {
        None => LIST_DEFAULT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::field("limit", format!("`{v}`: an integer from 1 to {LIST_MAX}"))
            })?,
    };
    let after = match q.get("after") {
        None => None,
        Some(v) => Some(Cursor::parse(v).ok_or_else(|| {
            ApiError::field("after", format!("`{v}`: not a `next` this listing gave"))
        })?),
    };
    Ok((q, limit, after))
}

/// A place in a listing, between pages: the last item's sort key and id, so a page is the
/// same whatever was added before it or deleted since (an offset would skip or repeat
/// items). Written as 16 hex digits of the key, then the id.
struct Cursor {
    key: u64,
    id: String,
}

impl Cursor {
    fn parse(s: &str) -> Option<Cursor> {
        let (key, id) = (s.get(..16)?, s.get(16..)?);
        let hex = |t: &str| {
            t.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        (hex(key) && crate::store::is_id(id)).then(|| Cursor {
            key: u64::from_str_radix(key, 16).unwrap_or_default(),
            id: id.to_string(),
        })
    }

    fn token(key: u64, id: &str) -> String {
        format!("{key:016x}{id}")
    }
}

/// `GET /v1/videos`: each video job's status as `GET /v1/videos/{id}` gives it, newest first.
async fn list_videos(
    State(app): State<App>,
    query: Result<Query<std::collections::BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (q, limit, after) = listing(query, &["state"])?;
    let state = match q.get("state") {
        None => None,
        Some(s) => Some(JobState::named(s).ok_or_else(|| {
            ApiError::field(
                "state",
                format!("`{s}`: one of queued, running, succeeded, failed, cancelled"),
            )
        })?),
    };
    let shared = app.shared.clone();
    let body = blocking(move || {
        let jobs = &shared.jobs;
        // Creation times are positive, so their bits sort as they do.
        let after = after
            .as_ref()
            .map(|c| (f64::from_bits(c.key), c.id.as_str()));
        let (mut rows, total) = jobs.store.list(Kind::Video, state, limit + 1, after)?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let mut videos = Vec::with_capacity(rows.len());
        for (id, _) in &rows {
            // Deleted since the listing, or no longer in the state asked for: left out.
            if let Some(j) = jobs
                .record(id)?
                .filter(|j| state.is_none_or(|s| j.state == s))
            {
                videos.push(status_body(&j));
            }
        }
        let next = (rows.last())
            .filter(|_| more)
            .map(|(id, at)| Cursor::token(at.to_bits(), id));
        Ok(json!({"videos": videos, "total": total, "limit": limit, "next": next}))
    })
    .await?;
    Ok(Json(body).into_response())
}

/// `GET /v1/loras`: the stored LoRAs, most recently used first (the last to be deleted by
/// `--keep-loras` and `--keep-lora-mb`). A LoRA used while a client pages moves to the front,
/// before its cursor: that pass does not see it again; no other is skipped or repeated.
async fn list_loras(
    State(app): State<App>,
    query: Result<Query<std::collections::BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (_, limit, after) = listing(query, &[])?;
    let shared = app.shared.clone();
    let body = blocking(move || {
        let all = shared.jobs.store.loras()?;
        let since_epoch = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
        };
        // The listing's order: last use, newest first, then id.
        let key = |t: std::time::SystemTime| since_epoch(t).as_nanos().min(u64::MAX as u128) as u64;
        let after_cursor = |(id, _, used): &&(String, u64, std::time::SystemTime)| match &after {
            None => true,
            Some(c) => key(*used) < c.key || (key(*used) == c.key && *id > c.id),
        };
        let mut page: Vec<_> = all.iter().filter(after_cursor).take(limit + 1).collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = (page.last())
            .filter(|_| more)
            .map(|(id, _, used)| Cursor::token(key(*used), id));
        let loras: Vec<_> = page
            .iter()
            .map(|(id, bytes, used)| {
                json!({"lora_id": id, "bytes": bytes, "last_used": since_epoch(*used).as_secs_f64(), "url": format!("/v1/loras/{id}")})
            })
            .collect();
        Ok(json!({"loras": loras, "total": all.len(), "limit": limit, "next": next}))
    })
    .await?;
    Ok(Json(body).into_response())
}

async fn video_status(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    video_job(&app, &id).map(|j| Json(status_body(&j)).into_response())
}

async fn video_events(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_job(&app, &id)?;
    let first = Snapshot {
        state: job.state,
        step: job.step,
        steps: job.steps,
    };
    let rx = app.shared.jobs.live(&id).map(|l| l.status.subscribe());
    Ok(Sse::new(events(first, rx, app.shutdown.clone()))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn event(s: &Snapshot) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(if s.state.is_final() {
            "end"
        } else {
            "progress"
        })
        .data(serde_json::to_string(s).unwrap_or_default()))
}

/// The job's snapshots as they change, ending with its final state (or at shutdown).
fn events(
    first: Snapshot,
    rx: Option<watch::Receiver<Snapshot>>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = match &rx {
        Some(rx) => *rx.borrow(),
        None => first,
    };
    futures_util::stream::unfold(
        (Some(start), rx, shutdown, false),
        |(pending, mut rx, mut shutdown, ended)| async move {
            if ended {
                return None;
            }
            if let Some(s) = pending {
                let end = s.state.is_final() || rx.is_none();
                return Some((event(&s), (None, rx, shutdown, end)));
            }
            let r = rx.as_mut()?;
            let next = tokio::select! {
                changed = r.changed() => changed.ok().map(|_| *r.borrow_and_update()),
                _ = shutdown.wait_for(|down| *down) => None,
            };
            let s = next?;
            Some((event(&s), (None, rx, shutdown, s.state.is_final())))
        },
    )
}

async fn video_content(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    {
        let job = video_job(&app, &id)?;
        if job.state != JobState::Succeeded {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_ready",
                format!(
                    "the job is {}; the video exists once it has succeeded",
                    job.state.name()
                ),
            ));
        }
        let path = app.shared.jobs.store.job_dir(&id)?.join(VIDEO_FILE);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(ApiError::internal)?;
        let len = file.metadata().await.map_err(ApiError::internal)?.len();
        Ok((
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("video/mp4")),
                (header::CONTENT_LENGTH, HeaderValue::from(len)),
            ],
            axum::body::Body::from_stream(file_chunks(file)),
        )
            .into_response())
    }
}

/// A file read in 64 KiB chunks as the client takes them: a download holds one chunk, not the
/// whole mp4 (60 slow downloads of a 17 MB video used to hold 60 copies). The open file stays
/// readable if the job's files are removed meanwhile.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<axum::body::Bytes>> {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut f = file?;
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), Some(f)))
            }
            // The error ends the body; nothing is read after it.
            Err(e) => Some((Err(e), None)),
        }
    })
}

async fn cancel_video(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    {
        video_job(&app, &id)?;
        let (status, state) = match app.shared.jobs.cancel(&id)? {
            Cancelled::Queued => (StatusCode::OK, "cancelled"),
            Cancelled::Running => (StatusCode::ACCEPTED, "cancelling"),
            // An ended job is forgotten with its files (retention is the client's choice).
            Cancelled::Final(_) => {
                if !app.shared.jobs.store.delete_ended(&id)? {
                    return Err(ApiError::not_found("video job"));
                }
                (StatusCode::OK, "deleted")
            }
            Cancelled::Unknown => return Err(ApiError::not_found("video job")),
        };
        Ok((status, Json(json!({"id": id, "state": state}))).into_response())
    }
}

async fn submit_lora(
    State(app): State<App>,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    {
        let (req, slot, _named) = checked(&app, mp, form::LORA_FIELDS, form::lora).await?;
        let created = |id: &str, status: StatusCode, cached: bool| {
            let url = format!("/v1/loras/{id}");
            (
                status,
                Json(json!({"lora_id": id, "cached": cached, "url": url})),
            )
                .into_response()
        };
        match req {
            LoraRequest::Stored(id) => Ok(created(&id, StatusCode::OK, true)),
            LoraRequest::Upload(id, lora) => {
                let _pin = keep_lora(&app, &id, lora).await?;
                Ok(created(&id, StatusCode::CREATED, false))
            }
            LoraRequest::Predict(params, clip) => {
                let id = new_id()?;
                let dir = app.shared.jobs.store.job_dir(&id)?;
                crate::store::save_frames(&dir.join(REFERENCE_FILE), &clip).map_err(|e| {
                    let _ = std::fs::remove_dir_all(&dir);
                    ApiError::internal(e)
                })?;
                let lid = params.id.clone();
                enqueue(
                    &app,
                    &JobRecord::queued(&id, JobParams::Lora(params)),
                    &dir,
                    slot,
                )?;
                let end = wait_for_end(&app, &id).await?;
                let job = app
                    .shared
                    .jobs
                    .store
                    .get(&id)?
                    .ok_or_else(|| ApiError::not_found("job"))?;
                match end {
                    JobState::Succeeded => Ok(created(&lid, StatusCode::CREATED, false)),
                    _ => Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "prediction_failed",
                        job.error
                            .map(|e| e.message)
                            .unwrap_or_else(|| "the prediction did not finish".into()),
                    )),
                }
            }
        }
    }
}

/// Waits for a job to end; at shutdown a job still queued is left for the next process.
async fn wait_for_end(app: &App, id: &str) -> Result<JobState, ApiError> {
    let Some(live) = app.shared.jobs.live(id) else {
        return Ok(app
            .shared
            .jobs
            .store
            .get(id)?
            .map(|j| j.state)
            .unwrap_or(JobState::Failed));
    };
    let mut rx = live.status.subscribe();
    drop(live);
    let mut shutdown = app.shutdown.clone();
    tokio::select! {
        r = rx.wait_for(|s| s.state.is_final()) => Ok(r.map(|s| s.state).unwrap_or(JobState::Failed)),
        _ = shutdown.wait_for(|down| *down) => Err(draining()),
    }
}

async fn download_lora(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    {
        if !form::is_id(&id) {
            return Err(ApiError::not_found("LoRA"));
        }
        // A use (off the async threads: it stamps the file); not a stored LoRA, a 404.
        let (shared, lid) = (app.shared.clone(), id.clone());
        if !blocking(move || Ok(shared.jobs.store.use_lora(&lid))).await? {
            return Err(ApiError::not_found("LoRA"));
        }
        let file = match tokio::fs::File::open(app.shared.jobs.store.lora_path(&id)).await {
            Ok(f) => f,
            // Deleted since (a prune, a DELETE).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ApiError::not_found("LoRA"))
            }
            Err(e) => return Err(ApiError::internal(e)),
        };
        let len = file.metadata().await.map_err(ApiError::internal)?.len();
        let disposition = format!("attachment; filename=\"{id}.safetensors\"");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Ok(v) = HeaderValue::from_str(&disposition) {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
        // Streamed as videos are: a 5B LoRA at rank 64 is about a gigabyte.
        Ok((headers, axum::body::Body::from_stream(file_chunks(file))).into_response())
    }
}

/// Deletes a stored LoRA (its file and its cache entry): `200`, then `404`; `409` while a
/// queued or running job names it.
async fn delete_lora(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !form::is_id(&id) {
        return Err(ApiError::not_found("LoRA"));
    }
    let (shared, lid) = (app.shared.clone(), id.clone());
    let deleted = blocking(move || Ok(shared.jobs.store.delete_lora(&lid)?)).await?;
    match deleted {
        LoraDeleted::Deleted => {
            app.shared.cache.remove(&id);
            Ok(Json(json!({"lora_id": id, "state": "deleted"})).into_response())
        }
        LoraDeleted::InUse => Err(ApiError::new(
            StatusCode::CONFLICT,
            "lora_in_use",
            "a queued or running job uses this LoRA; delete it once that job has ended",
        )),
        LoraDeleted::Unknown => Err(ApiError::not_found("LoRA")),
    }
}

/// Whether the state directory takes a write now: a 64 KiB probe file, synced, then removed.
fn state_dir_writable(app: &App) -> bool {
    use std::io::Write;
    let probe = app.shared.config.state_dir.join(".ready-probe");
    let wrote = std::fs::File::create(&probe)
        .and_then(|mut f| {
            f.write_all(&[0u8; 64 << 10])?;
            f.sync_all()
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    wrote
}

async fn ready(State(app): State<App>) -> Response {
    let jobs = &app.shared.jobs;
    let probe = app.clone();
    let writable = tokio::task::spawn_blocking(move || state_dir_writable(&probe))
        .await
        .unwrap_or(false);
    if writable {
        let pending = app.shared.clone();
        let _ = tokio::task::spawn_blocking(move || pending.jobs.record_pending()).await;
    }
    let (status, why) = if jobs.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if app.shared.workers.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker is running (see the server's log)",
        )
    } else if !writable {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the state directory cannot take writes (disk full?)",
        )
    } else if jobs.depth() >= jobs.capacity() {
        (StatusCode::SERVICE_UNAVAILABLE, "queue full")
    } else {
        (StatusCode::OK, "ready")
    };
    (
        status,
        Json(json!({"status": why, "queue_depth": jobs.depth(), "running": jobs.running()})),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Result<Response, ApiError> {
    // Off the async threads: the state directory is walked.
    let shared = app.shared.clone();
    let text = blocking(move || Ok(render_metrics(&shared))).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

fn render_metrics(s: &Shared) -> String {
    let (cache_entries, cache_bytes) = s.cache.usage();
    let gauges = Gauges {
        queue_depth: s.jobs.depth(),
        running: s.jobs.running(),
        cache_entries,
        cache_bytes,
        cache_capacity: s.cache.capacity(),
        cache_hits: s.cache.hits.load(std::sync::atomic::Ordering::Relaxed),
        cache_misses: s.cache.misses.load(std::sync::atomic::Ordering::Relaxed),
        factor_cache: s.factor_cache(),
        jobs: s.jobs.store.counts().unwrap_or_default(),
        state_bytes: s.jobs.store.size_bytes(),
        stored_loras: s.jobs.store.lora_usage(),
        workers: s.workers.load(std::sync::atomic::Ordering::SeqCst),
    };
    s.metrics.render(&gauges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t0k", "bearer t0k", "BEARER  t0k", " bEaReR t0k "] {
            assert_eq!(bearer_token(v), Some("t0k"), "{v}");
        }
        for (value, host) in [
            ("127.0.0.1:8080", "127.0.0.1"),
            ("[::1]:8080", "::1"),
            ("LocalHost.", "localhost"),
            ("attacker.example:80", "attacker.example"),
            ("attacker.example/path", "attacker.example"),
        ] {
            assert_eq!(host_of(value), host, "{value}");
        }
        let listed = vec!["v2l.internal".to_string()];
        for h in ["127.0.0.1", "::1", "10.1.2.3", "localhost", "v2l.internal"] {
            assert!(host_allowed(h, &listed), "{h}");
        }
        for h in [
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!host_allowed(h, &listed), "{h}");
        }
        for v in ["Basic t0k", "Bearert0k", "t0k", ""] {
            assert_ne!(bearer_token(v), Some("t0k"), "{v}");
        }
    }
}
