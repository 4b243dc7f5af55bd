//! `v2l-serve`: see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use v2l_runtime::engine::Engine;
use v2l_serve::api::{self, App};
use v2l_serve::cache::LoraCache;
use v2l_serve::config::{Config, EngineFacts, RequestLimits};
use v2l_serve::jobs::Jobs;
use v2l_serve::metrics::Metrics;
use v2l_serve::store::Store;
use v2l_serve::worker::{Shared, Worker};

/// Serve an engine over HTTP: video jobs from a first frame, a prompt and a reference clip (or
/// a LoRA), with the predicted LoRAs cached.
///
/// Jobs are asynchronous: `POST /v1/videos` (multipart) answers `202 {id}`; follow
/// `GET /v1/videos/{id}/events` (server-sent events) or poll `GET /v1/videos/{id}`; download
/// `GET /v1/videos/{id}/content`. The API document is at `/openapi.json`.
///
/// Job state lives in SQLite under --state-dir: accepted jobs survive a restart, finished
/// videos stay downloadable. SIGTERM (or Ctrl-C) stops taking jobs, finishes the running ones
/// and leaves the queued ones for the next start.
///
/// Example:
///
///   v2l-serve --engine engine/ --state-dir /var/lib/v2l &
///   curl -F image=@first.png -F prompt="a red car" -F reference=@ref.mp4 -F seed=42 \
///        http://127.0.0.1:8080/v1/videos
#[derive(Parser)]
#[command(name = "v2l-serve", version, verbatim_doc_comment)]
struct Args {
    /// Engine bundle (v2l-compile) or export directory (v2l-export pipeline).
    #[arg(long)]
    engine: PathBuf,
    /// Address to listen on. Loopback by default; give 0.0.0.0:PORT to serve other machines
    /// (then also give --token-file).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Directory for the job database, uploads, videos and stored LoRAs.
    #[arg(long, default_value = "v2l-state")]
    state_dir: PathBuf,
    /// Pipelines (each a full copy of the engine's sessions), each running one job at a time.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// ONNX Runtime threads per pipeline (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Jobs that may wait; beyond that, requests get 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Memory for cached LoRAs, in MiB (least recently used evicted first).
    #[arg(long, default_value_t = 1024)]
    lora_cache_mb: u64,
    /// File holding a bearer token that /v1/* requests must carry.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 64)]
    max_upload_mb: usize,
    /// Most frames a job may ask for (1 + 4k).
    #[arg(long, default_value_t = 49)]
    max_frames: usize,
    /// Most pixels (height × width) a job may ask for.
    #[arg(long, default_value_t = 720 * 480)]
    max_pixels: usize,
    /// Most denoising steps a job may ask for.
    #[arg(long, default_value_t = 100)]
    max_steps: usize,
    /// Seconds one upload may take to decode.
    #[arg(long, default_value_t = 30)]
    decode_timeout: u64,
    /// Seconds one job may run (checked between denoising steps; 0: no limit).
    #[arg(long, default_value_t = 3600)]
    job_timeout: u64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> Result<(), String> {
    if a.workers == 0 || a.workers > 64 {
        return Err(format!("--workers {}: must be 1 to 64", a.workers));
    }
    if a.queue == 0 {
        return Err("--queue 0: must be at least 1".into());
    }
    let token = match &a.token_file {
        None => None,
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|e| format!("--token-file {}: {e}", p.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 || t.contains(char::is_whitespace) {
                return Err(format!("--token-file {}: the token must be at least 16 characters, no spaces", p.display()));
            }
            Some(t)
        }
    };
    if !a.addr.ip().is_loopback() && token.is_none() {
        eprintln!("warning: serving {} beyond this machine without --token-file", a.addr);
    }
    let engine = Engine::open(&a.engine).map_err(|e| e.to_string())?;
    let facts = EngineFacts::of(&engine)?;
    let (store, recovered) = Store::open(&a.state_dir).map_err(|e| e.to_string())?;
    if !recovered.interrupted.is_empty() {
        eprintln!("v2l-serve: {} job(s) were running when the last process stopped; marked failed", recovered.interrupted.len());
    }
    if !recovered.queued.is_empty() {
        eprintln!("v2l-serve: {} queued job(s) from the last process will run", recovered.queued.len());
    }
    let config = Config {
        engine: a.engine.clone(),
        addr: a.addr,
        state_dir: a.state_dir.clone(),
        workers: a.workers,
        threads: a.threads,
        queue: a.queue,
        lora_cache_bytes: a.lora_cache_mb << 20,
        token,
        limits: RequestLimits {
            frames: a.max_frames,
            pixels: a.max_pixels,
            steps: a.max_steps,
            upload_bytes: a.max_upload_mb << 20,
            reference_frames: a.max_frames,
            decode_timeout: Duration::from_secs(a.decode_timeout.max(1)),
            job_timeout: (a.job_timeout > 0).then(|| Duration::from_secs(a.job_timeout)),
        },
    };
    let shared = Arc::new(Shared {
        jobs: Jobs::new(store, a.queue, recovered.queued),
        cache: LoraCache::new(config.lora_cache_bytes),
        metrics: Metrics::default(),
        facts,
        config,
    });
    // Load every pipeline before listening: a broken engine is an error now, not a 5xx later.
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let w = Worker::load(shared.clone(), engine.clone()).map_err(|e| format!("loading pipeline {i}: {e}"))?;
        workers.push(std::thread::Builder::new().name(format!("v2l-worker-{i}")).spawn(move || w.run()).map_err(|e| e.to_string())?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (down_tx, down_rx) = tokio::sync::watch::channel(false);
    let app = App { shared: shared.clone(), shutdown: down_rx };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .map_err(|e| format!("--addr {}: cannot listen ({e})", a.addr))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!("v2l-serve: listening on http://{local} ({} worker(s), engine {})", a.workers, a.engine.display());
        let shared = shared.clone();
        let stop = async move {
            shutdown_signal().await;
            eprintln!("v2l-serve: shutting down: no new jobs; finishing the running ones");
            shared.jobs.drain();
            let _ = down_tx.send(true);
        };
        axum::serve(listener, api::router(app))
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| e.to_string())
    })?;
    for w in workers {
        let _ = w.join();
    }
    let left = shared.jobs.depth();
    eprintln!("v2l-serve: stopped; {left} queued job(s) kept for the next start");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
