//! Starting and stopping: load every pipeline, listen, serve until SIGTERM/SIGINT, then stop
//! taking jobs, finish the running ones and leave the queued ones for the next start.

use std::path::Path;
use std::sync::Arc;

use v2l_runtime::engine::Engine;

use crate::api::{self, App};
use crate::cache::LoraCache;
use crate::config::{Config, EngineFacts};
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::worker::{Shared, Worker};

/// Refuses CUDA graphs with more than one worker: ONNX Runtime captures a graph in CUDA's
/// global capture mode, where another thread's allocation or copy on any GPU during the
/// capture fails, and fails the capture with it.
fn check_cuda_graphs_alone(engine: &Engine, workers: usize) -> Result<(), String> {
    let backend = engine.session_options(0).backend.for_this_process();
    let graphs = backend.map_err(|e| e.to_string())?.cuda_graph();
    match graphs && workers > 1 {
        true => Err(format!(
            "--workers {workers} with CUDA graphs (enable_cuda_graph=1, from the engine's \
             bundle.json or V2L_CUDA_OPTIONS): ONNX Runtime captures a graph in CUDA's global \
             mode, which another worker's GPU work breaks; run one worker a process (a v2l-serve \
             per GPU), or V2L_CUDA_OPTIONS=enable_cuda_graph=0"
        )),
        false => Ok(()),
    }
}

/// Runs the server until a shutdown signal; errors are one line for the user.
pub fn serve(config: Config) -> Result<(), String> {
    if !config.addr.ip().is_loopback() && config.token.is_none() {
        eprintln!(
            "warning: serving {} beyond this machine without --token-file",
            config.addr
        );
    }
    check_state_outside_engine(&config.state_dir, &config.engine)?;
    let engine = Engine::open(&config.engine).map_err(|e| e.to_string())?;
    check_cuda_graphs_alone(&engine, config.workers)?;
    let facts = EngineFacts::of(&engine)?;
    let (store, recovered) = Store::open(&config.state_dir).map_err(|e| e.to_string())?;
    store.prune(&config.retention).map_err(|e| e.to_string())?;
    let gone = store
        .prune_loras(&config.retention)
        .map_err(|e| e.to_string())?;
    if !gone.is_empty() {
        eprintln!(
            "v2l-serve: deleted {} least recently used stored LoRA(s) (--keep-loras, --keep-lora-mb)",
            gone.len()
        );
    }
    if !recovered.interrupted.is_empty() {
        eprintln!(
            "v2l-serve: {} job(s) were running when the last process stopped; marked failed",
            recovered.interrupted.len()
        );
    }
    if !recovered.queued.is_empty() {
        eprintln!(
            "v2l-serve: {} queued job(s) from the last process will run",
            recovered.queued.len()
        );
    }
    let (addr, workers) = (config.addr, config.workers);
    let shared = Arc::new(Shared {
        jobs: Jobs::new(store, config.queue, recovered.queued),
        cache: LoraCache::new(config.lora_cache_bytes),
        metrics: Metrics::default(),
        workers: Default::default(),
        factor_caches: Default::default(),
        facts,
        config,
    });
    // Load every pipeline before listening: a broken engine is an error now, not a 5xx later.
    let mut threads = Vec::new();
    for i in 0..workers {
        let device = shared.config.device_of(i);
        let w = Worker::load(shared.clone(), engine.clone(), device).map_err(|e| {
            match shared.config.devices.is_empty() {
                true => format!("loading pipeline {i}: {e}"),
                false => format!("loading pipeline {i} (--devices: GPU {device}): {e}"),
            }
        })?;
        shared
            .workers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let t = std::thread::Builder::new()
            .name(format!("v2l-worker-{i}"))
            .spawn(move || w.run())
            .map_err(|e| e.to_string())?;
        threads.push(t);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (down_tx, down_rx) = tokio::sync::watch::channel(false);
    // When the shutdown signal came: `--shutdown-grace` counts from it.
    let signalled = Arc::new(std::sync::OnceLock::new());
    let app = App {
        shared: shared.clone(),
        shutdown: down_rx,
        decodes: Arc::new(tokio::sync::Semaphore::new(shared.config.limits.decodes)),
    };
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--addr {addr}: cannot listen ({e})"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let on = match shared.config.devices.as_slice() {
            [] => String::new(),
            d => {
                let d: Vec<String> = d.iter().map(u32::to_string).collect();
                format!(" on GPU {}", d.join(", "))
            }
        };
        eprintln!(
            "v2l-serve: listening on http://{local} ({workers} worker(s){on}, engine {})",
            engine.dir.display()
        );
        let limits = Listening {
            connections: shared.config.connections,
            header_timeout: shared.config.header_timeout,
        };
        let (shared, signalled) = (shared.clone(), signalled.clone());
        let stop = async move {
            shutdown_signal().await;
            let _ = signalled.set(std::time::Instant::now());
            match shared.config.shutdown_grace {
                None => eprintln!(
                    "v2l-serve: shutting down: no new jobs; finishing the running ones (a second signal stops them)"
                ),
                Some(g) => eprintln!(
                    "v2l-serve: shutting down: no new jobs; the running ones have {} s (--shutdown-grace), then are queued again",
                    g.as_secs()
                ),
            }
            shared.jobs.drain();
            let _ = down_tx.send(true);
        };
        accept_loop(listener, api::router(app), limits, stop).await;
        Ok::<(), String>(())
    });
    // Workers stop taking jobs once draining; on a listen error, drain them here.
    shared.jobs.drain();
    let workers = std::thread::spawn(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let since = signalled
        .get()
        .copied()
        .unwrap_or_else(std::time::Instant::now);
    rt.block_on(stop_running_jobs(&shared, workers, since));
    served?;
    // From the store: jobs the shutdown stopped are queued there again, not in the queue.
    let queued = (shared.jobs.store.counts().ok())
        .and_then(|c| c.get("queued").copied())
        .unwrap_or(shared.jobs.depth() as u64);
    eprintln!("v2l-serve: stopped; {queued} queued job(s) kept for the next start");
    Ok(())
}

/// Refuses a state directory inside the engine directory (or the same): the server writes
/// jobs, LoRAs and scratch files there, and would mix them with the engine's parts.
fn check_state_outside_engine(state: &Path, engine: &Path) -> Result<(), String> {
    use v2l_contracts::input::resolved;
    let engine_dir = if engine.is_file() {
        engine.parent().unwrap_or(Path::new("."))
    } else {
        engine
    };
    if let (Some(s), Some(e)) = (resolved(state), resolved(engine_dir)) {
        if s.starts_with(&e) {
            return Err(format!(
                "--state-dir {}: is inside the engine directory {}; the server writes jobs and LoRAs there: give a directory outside the engine",
                state.display(),
                e.display()
            ));
        }
    }
    Ok(())
}

/// Per-connection bounds of the accept loop.
struct Listening {
    /// Connections served at once; the next is accepted when one ends.
    connections: usize,
    /// hyper closes a connection whose request header is not whole within this.
    header_timeout: std::time::Duration,
}

/// Serves HTTP/1 connections until `stop` resolves, then lets open ones finish their
/// requests. At most `connections` are served at once: the rest wait in the kernel's backlog,
/// holding no descriptor of ours, so slow clients cannot exhaust the process's files.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Listening,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a reset before accept: wait a little, go on.
                    eprintln!("v2l-serve: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let header_timeout = limits.header_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            if request_line_too_long(&stream, api::MAX_URI_BYTES, header_timeout).await {
                refuse_long_uri(stream).await;
                drop(permit);
                return;
            }
            // The header's time bound counts from the accept, peeking included.
            let left = header_timeout.saturating_sub(start.elapsed());
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(left.max(std::time::Duration::from_millis(1)))
                .serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Whether the first request line on `stream` runs past `limit` bytes, peeked (nothing is
/// consumed) for at most `wait`. hyper answers a URI over its own 64 KiB limit with a bare
/// `414` and no body; v2l's clients get the JSON error every other status has, so the server
/// looks first. Later requests on a kept-alive connection are checked by the router
/// (`api::limit_uri`) up to hyper's limit.
async fn request_line_too_long(
    stream: &tokio::net::TcpStream,
    limit: usize,
    wait: std::time::Duration,
) -> bool {
    let mut buf = vec![0u8; limit + 1];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false, // closed, failed or timed out: hyper handles it
        };
        let seen = buf.get(..n).unwrap_or_default();
        if seen.contains(&b'\n') {
            return false;
        }
        if n > limit {
            return true;
        }
        // Part of a line has come: wait for more without spinning.
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Answers a request whose line is over [`api::MAX_URI_BYTES`] with a JSON `414` and closes.
async fn refuse_long_uri(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = api::uri_too_long_body();
    let head = format!(
        "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Waits for the workers (`workers`, the thread joining them) to finish their running jobs,
/// until `--shutdown-grace` from `since` (the signal) is over or a second signal comes; then
/// stops those jobs, which are queued again for the next start, and waits for the workers to
/// wind down.
async fn stop_running_jobs(
    shared: &Shared,
    workers: std::thread::JoinHandle<()>,
    since: std::time::Instant,
) {
    let done = tokio::task::spawn_blocking(move || {
        let _ = workers.join();
    });
    tokio::pin!(done);
    let grace = async {
        match shared.config.shutdown_grace {
            Some(g) => tokio::time::sleep(g.saturating_sub(since.elapsed())).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = &mut done => return,
        _ = grace => eprintln!("v2l-serve: --shutdown-grace is over: stopping the running jobs"),
        _ = shutdown_signal() => eprintln!("v2l-serve: a second signal: stopping the running jobs"),
    }
    shared.jobs.stop_running();
    let _ = done.await;
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
