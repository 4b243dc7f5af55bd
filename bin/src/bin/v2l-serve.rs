//! `v2l-serve`: see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use v2l_serve::config::{Config, RequestLimits};

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
    /// Default: 1, or one per --devices GPU.
    #[arg(long, value_parser = bounded::<1, 64>)]
    workers: Option<usize>,
    /// GPUs for a cuda or tensorrt engine's workers, as CUDA numbers them (after
    /// CUDA_VISIBLE_DEVICES; `nvidia-smi`'s order where the GPUs are alike, or with
    /// CUDA_DEVICE_ORDER=PCI_BUS_ID), comma-separated: worker i runs on the i-th, in turn (`--devices 0,1,2,3`: four workers,
    /// one per GPU). Default: GPU 0. A CPU engine refuses any but 0.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    devices: Vec<u32>,
    /// ONNX Runtime threads per pipeline (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Jobs that may wait; beyond that, requests get 429 with Retry-After.
    #[arg(long, default_value_t = 16, value_parser = bounded::<1, 1000000>)]
    queue: usize,
    /// How LoRAs reach the DiT: fused (weights rewritten), bound (fused and rebound) or
    /// unfused (factors as inputs). Default: the engine's.
    #[arg(long)]
    lora_strategy: Option<String>,
    /// Memory for cached LoRAs, in MiB (least recently used evicted first).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=1048576))]
    lora_cache_mb: u64,
    /// Per worker, with the unfused strategy: memory for LoRA factors laid out as the DiT
    /// takes them (on a GPU, the GPU's memory), kept for LoRAs switched away from, so a switch
    /// back to one moves nothing; in MiB, least recently used dropped first. 0 lays factors
    /// out on every switch. Up to about 0.5 GiB per LoRA at CogVideoX-5B width (rank 64 on
    /// every linear, bf16; a request's CFG samples share it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=1048576))]
    factor_cache_mb: u64,
    /// File holding a bearer token that /v1/* requests must carry.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 64, value_parser = bounded::<1, 16384>)]
    max_upload_mb: usize,
    /// Most frames a job may ask for (1 + 4k).
    #[arg(long, default_value_t = 49, value_parser = bounded::<1, 1001>)]
    max_frames: usize,
    /// Most pixels (height × width) a job may ask for.
    #[arg(long, default_value_t = 720 * 480, value_parser = bounded::<1, 268435456>)]
    max_pixels: usize,
    /// Most denoising steps a job may ask for.
    #[arg(long, default_value_t = 100, value_parser = bounded::<1, 10000>)]
    max_steps: usize,
    /// Seconds one upload may take to decode.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    decode_timeout: u64,
    /// Pixels an uploaded image or clip may declare (width × height of its stored frames);
    /// the decoder refuses larger ones before allocating.
    #[arg(long, default_value_t = 4096 * 4096, value_parser = bounded::<1, 4294967296>)]
    max_source_pixels: usize,
    /// Uploads decoded at once at most (each is one ffmpeg process); more wait their turn.
    #[arg(long, default_value_t = 2, value_parser = bounded::<1, 1024>)]
    max_decodes: usize,
    /// Connections served at once; more wait in the accept backlog. Keep it well under the
    /// process's open-file limit (`ulimit -n`): jobs and decodes need descriptors too.
    #[arg(long, default_value_t = 256, value_parser = bounded::<1, 65536>)]
    max_connections: usize,
    /// Seconds a client may take to send a request's header; then the connection is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
    /// Seconds a client may take to send an upload's body; then the request ends 408.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86400))]
    body_timeout: u64,
    /// Video jobs that may share one DiT call per step (each with its own LoRA): a job waits
    /// up to --batch-wait-ms for queued jobs of its size, steps and prompt length. Above 1
    /// the DiT uses the `unfused` LoRA strategy (factors as inputs per sample)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    batch: u32,
    /// How long a job waits for others to batch with (milliseconds)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=60000))]
    batch_wait_ms: u64,
    /// A host name clients may reach this server by (repeatable). Requests whose `Host` (or a
    /// browser's `Origin`) names another host are refused (403): IP addresses and `localhost`
    /// are always allowed; a DNS name (a service name, a public domain) must be listed. A
    /// cross-origin browser request is allowed only with the bearer token of --token-file.
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// Ended jobs kept with their results; beyond that the oldest are deleted with their files
    /// (DELETE removes one at any time).
    #[arg(long, default_value_t = 1000, value_parser = bounded::<1, 10000000>)]
    keep_jobs: usize,
    /// Hours an ended job and its result are kept (0: no time limit).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(0..=87600))]
    keep_hours: u64,
    /// Stored LoRAs kept (what `lora_id`s name, under `<state-dir>/loras`); beyond that the
    /// least recently used are deleted, never one a queued or running job names (DELETE
    /// /v1/loras/{id} removes one at any time).
    #[arg(long, default_value_t = 1000, value_parser = bounded::<1, 10000000>)]
    keep_loras: usize,
    /// Megabytes of stored LoRAs kept, the least recently used deleted first (0: no limit).
    #[arg(long, default_value_t = 51200, value_parser = clap::value_parser!(u64).range(0..=1u64 << 30))]
    keep_lora_mb: u64,
    /// Seconds one job may run from its start: predicting its LoRA, encoding its prompt,
    /// denoising and decoding (it stops the ONNX Runtime call in flight; 0: no limit).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=31536000))]
    job_timeout: u64,
    /// After SIGTERM or Ctrl-C, seconds the running jobs may go on; then they are stopped
    /// within the ONNX Runtime node in flight and queued again, to run from the start at the
    /// next start (not failed, as a kill would leave them). Without it they run to their end.
    /// Set it below your orchestrator's kill timeout (Kubernetes: 30 s, Docker: 10 s). A
    /// second signal stops them at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=31536000))]
    shutdown_grace: Option<u64>,
}

/// A `usize` flag within `LO..=HI`: refused at parse time with clap's `error:` line and exit
/// code 2, so a huge value never reaches a timer, a semaphore or an allocation.
fn bounded<const LO: u64, const HI: u64>(s: &str) -> Result<usize, String> {
    let v: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(LO..=HI).contains(&v) {
        return Err(format!("{v} is not in {LO}..={HI}"));
    }
    usize::try_from(v).map_err(|_| format!("{v} does not fit this machine"))
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
    // Every numeric flag was range-checked when parsed (`bounded`, clap's ranges).
    let token = match &a.token_file {
        None => None,
        Some(p) => {
            let t = v2l_contracts::input::read_text(p, v2l_contracts::input::InputKind::Record)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?;
            let t = t.trim().to_string();
            if t.len() < 16 || t.contains(char::is_whitespace) {
                return Err(format!(
                    "--token-file {}: the token must be at least 16 characters, no spaces",
                    p.display()
                ));
            }
            Some(t)
        }
    };
    // The same thread limit as `v2l-run` and the C ABI (`V2L_MAX_THREADS`, default 256).
    v2l_runtime::limits::Limits::from_env()
        .map_err(|e| e.to_string())?
        .check_threads(a.threads)
        .map_err(|e| v2l_cli::request_message(&e))?;
    use v2l_runtime::lora::strategy::Strategy;
    let lora_strategy = match &a.lora_strategy {
        None if a.batch > 1 => Some(Strategy::Unfused),
        None => None,
        Some(s) => Some(
            Strategy::parse(s)
                .ok_or_else(|| format!("--lora-strategy {s}: expected fused, bound or unfused"))?,
        ),
    };
    if a.devices.len() > 64 {
        return Err(format!(
            "--devices: {} GPUs; a server runs at most 64 workers",
            a.devices.len()
        ));
    }
    if a.batch > 1 && lora_strategy != Some(Strategy::Unfused) {
        return Err(format!(
            "--batch {}: jobs with different LoRAs share DiT calls only with --lora-strategy unfused",
            a.batch
        ));
    }
    v2l_serve::server::serve(Config {
        lora_strategy,
        shutdown_grace: a.shutdown_grace.map(Duration::from_secs),
        engine: a.engine,
        addr: a.addr,
        state_dir: a.state_dir,
        workers: a.workers.unwrap_or(a.devices.len().max(1)),
        devices: a.devices,
        threads: a.threads,
        queue: a.queue,
        lora_cache_bytes: a.lora_cache_mb << 20,
        factor_cache_bytes: a.factor_cache_mb << 20,
        connections: a.max_connections,
        batch: a.batch as usize,
        batch_wait: Duration::from_millis(a.batch_wait_ms),
        header_timeout: Duration::from_secs(a.header_timeout.max(1)),
        body_timeout: Duration::from_secs(a.body_timeout.max(1)),
        token,
        allowed_hosts: a.allow_hosts,
        retention: v2l_serve::store::Retention {
            jobs: Some(a.keep_jobs),
            age: (a.keep_hours > 0).then(|| Duration::from_secs(a.keep_hours * 3600)),
            loras: Some(a.keep_loras),
            lora_bytes: (a.keep_lora_mb > 0).then(|| a.keep_lora_mb << 20),
        },
        limits: RequestLimits {
            frames: a.max_frames,
            pixels: a.max_pixels,
            steps: a.max_steps,
            upload_bytes: a.max_upload_mb << 20,
            reference_frames: a.max_frames,
            decode_timeout: Duration::from_secs(a.decode_timeout.max(1)),
            source_pixels: a.max_source_pixels,
            decodes: a.max_decodes,
            job_timeout: (a.job_timeout > 0).then(|| Duration::from_secs(a.job_timeout)),
        },
    })
}
