//! A worker: one loaded pipeline on its own thread, running one job at a time from the queue.
//!
//! A job's LoRA is resolved through the cache (a hit skips the VAE encode of the clip and the
//! hypernetwork), then made the pipeline's resident LoRA: consecutive jobs with the same LoRA
//! switch nothing, and a different one is one exact rewrite of the union of touched layers from
//! the base weights (the engine's switch), never a fuse on top of another LoRA.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use v2l_contracts::io::files as files_io;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::factors::FactorCacheStats;
use v2l_runtime::lora::format::{Lora, LoraFormat};
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{
    Inputs, LoraInput, MediaInput, NoiseInput, Pipeline, PromptEncoders, PromptInput, Request,
};
use v2l_runtime::request::Settings;
use v2l_runtime::session::SessionOptions;
use v2l_runtime::stages::ms_since as ms;
use v2l_runtime::RuntimeError;

use crate::cache::LoraCache;
use crate::config::{Config, EngineFacts};
use crate::form::{LoraChoice, VideoParams};
use crate::jobs::{Jobs, Live, Snapshot};
use crate::metrics::Metrics;
use crate::store::{JobError, JobErrorKind, JobParams, JobRecord, Kind, State};

/// Everything the HTTP handlers and the workers share.
pub struct Shared {
    pub config: Config,
    pub facts: EngineFacts,
    pub jobs: Jobs,
    pub cache: LoraCache,
    pub metrics: Metrics,
    /// Worker threads still taking jobs: counted up before each starts and down when its
    /// thread ends, however it ends. `/readyz` and new submissions see none left.
    pub workers: std::sync::atomic::AtomicUsize,
    /// Each worker's kept factor inputs (`--factor-cache-mb`), as of its last switch.
    pub factor_caches: std::sync::Mutex<Vec<FactorCacheStats>>,
}

impl Shared {
    /// Applies the stored LoRAs' retention (`--keep-loras`, `--keep-lora-mb`) after one was
    /// stored or a job ended; a deleted id leaves the cache too.
    pub fn prune_loras(&self) {
        match self.jobs.store.prune_loras(&self.config.retention) {
            Ok(gone) => {
                for id in &gone {
                    self.cache.remove(id);
                }
                if !gone.is_empty() {
                    eprintln!(
                        "v2l-serve: deleted {} least recently used stored LoRA(s) (--keep-loras, --keep-lora-mb)",
                        gone.len()
                    );
                }
            }
            Err(e) => eprintln!("v2l-serve: pruning stored LoRAs: {e}"),
        }
    }

    /// Every worker's kept factor inputs, summed.
    pub fn factor_cache(&self) -> FactorCacheStats {
        let all = self.factor_caches.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .fold(FactorCacheStats::default(), |a, s| FactorCacheStats {
                entries: a.entries + s.entries,
                bytes: a.bytes + s.bytes,
                hits: a.hits + s.hits,
                misses: a.misses + s.misses,
            })
    }
}

/// Files in a job's directory.
pub use crate::store::{IMAGE_FILE, PROMPT_FILE, REFERENCE_FILE};
pub const VIDEO_FILE: &str = "video.mp4";

/// Why a job did not succeed.
struct Stop {
    state: State,
    error: JobError,
}

impl Stop {
    fn failed(kind: JobErrorKind, message: impl Into<String>) -> Stop {
        Stop {
            state: State::Failed,
            error: JobError {
                kind,
                message: message.into(),
            },
        }
    }
}

impl From<RuntimeError> for Stop {
    fn from(e: RuntimeError) -> Stop {
        use v2l_runtime::error::ErrorKind as K;
        let kind = match e.kind() {
            K::BadInput => JobErrorKind::BadInput,
            K::BadFile => JobErrorKind::BadFile,
            K::Lora => JobErrorKind::Lora,
            K::OrtUnavailable => JobErrorKind::RuntimeUnavailable,
            K::Runtime => JobErrorKind::Runtime,
            // A DELETE or the time limit: `Bounds::run` says which.
            K::Cancelled => return cancelled(),
        };
        Stop::failed(kind, e.to_string())
    }
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Stop {
        Stop::failed(JobErrorKind::Internal, e.to_string())
    }
}

/// The thread that runs queued jobs on one pipeline.
pub struct Worker {
    shared: Arc<Shared>,
    engine: Engine,
    opts: SessionOptions,
    pipeline: Pipeline,
    prompts: PromptEncoders,
    /// `(lora id, multiplier bits)` the pipeline holds; `None` for the base weights.
    resident: Option<(String, u32)>,
    /// This worker's entry in [`Shared::factor_caches`].
    factor_slot: usize,
}

impl Worker {
    /// Loads a pipeline (VAE, DiT, hypernetwork sessions) for `engine` on GPU `device` (a
    /// CPU engine: 0).
    pub fn load(shared: Arc<Shared>, engine: Engine, device: u32) -> Result<Worker, RuntimeError> {
        let opts = engine.session_options_on(shared.config.threads, device)?;
        let mut pipeline = match shared.config.lora_strategy {
            Some(s) => Pipeline::load_with_strategy(engine.clone(), &opts, s)?,
            None => Pipeline::load(engine.clone(), &opts)?,
        };
        // Loaded now, so no request with a reference waits for it.
        pipeline.load_predictor()?;
        pipeline.set_factor_cache(shared.config.factor_cache_bytes);
        let factor_slot = {
            let mut all = shared
                .factor_caches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.push(pipeline.factor_cache_stats());
            all.len() - 1
        };
        Ok(Worker {
            shared,
            engine,
            opts,
            pipeline,
            prompts: PromptEncoders::default(),
            resident: None,
            factor_slot,
        })
    }

    /// Runs jobs until the queue drains. With `--batch N` (and the `unfused` strategy) a job
    /// waits up to `--batch-wait-ms` for queued jobs that can share its DiT calls (same size,
    /// steps and prompt length), and up to N run as one batch.
    pub fn run(mut self) {
        /// Counts the worker out when its thread ends, a panic's unwinding included.
        struct Gone(Arc<Shared>);
        impl Drop for Gone {
            fn drop(&mut self) {
                let left = self.0.workers.fetch_sub(1, Ordering::SeqCst) - 1;
                eprintln!("v2l-serve: a worker stopped; {left} left");
            }
        }
        let _gone = Gone(self.shared.clone());
        while let Some(first) = self.shared.jobs.next() {
            let key = self.batchable(&first.0);
            let mut batch = vec![first];
            if let Some(key) = key {
                let deadline = Instant::now() + self.shared.config.batch_wait;
                while batch.len() < self.shared.config.batch && Instant::now() < deadline {
                    let store = &self.shared.jobs.store;
                    let fits = |id: &str| batch_key(store, id).as_ref() == Some(&key);
                    match self.shared.jobs.take_fitting(fits) {
                        Some(j) => batch.push(j),
                        None => std::thread::sleep(std::time::Duration::from_millis(2)),
                    }
                }
            }
            // A panic fails the jobs it caught alone; the worker goes on with the queue
            // (before, the job stayed `running` and every later one `queued`).
            let jobs: Vec<(String, Arc<Live>)> = batch.clone();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if batch.len() == 1 {
                    let (id, live) = batch.remove(0);
                    let last = self.run_job(&id, &live);
                    self.shared.jobs.finished(&id, last);
                } else {
                    self.run_batch(batch);
                }
            }));
            if let Err(panic) = ran {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                for (id, live) in jobs {
                    if self.shared.jobs.live(&id).is_none() {
                        continue;
                    }
                    let stop = Stop::failed(JobErrorKind::Internal,
                        format!("the worker panicked ({what}); this job failed alone and the queue goes on"),
                    );
                    let last = self.end(&id, &live, Err(stop), BTreeMap::new());
                    self.shared.jobs.finished(&id, last);
                }
            }
            if crate::fault::once("worker-exit") {
                panic!("fault point worker-exit: the worker thread ends");
            }
        }
    }

    /// The key of jobs that can share DiT calls with job `id`, when this worker batches.
    fn batchable(&self, id: &str) -> Option<BatchKey> {
        let c = &self.shared.config;
        if c.batch < 2 || self.pipeline.strategy() != Strategy::Unfused {
            return None;
        }
        batch_key(&self.shared.jobs.store, id)
    }

    /// Marks job `id` running; its end when it cannot start (cancelled meanwhile, or the store
    /// refused the write).
    fn start(&self, id: &str, live: &Live) -> Result<(), Snapshot> {
        let mut last = Snapshot {
            state: State::Failed,
            step: 0,
            steps: 0,
        };
        match self.shared.jobs.store.start(id) {
            Ok(true) => {
                live.status.send_modify(|s| s.state = State::Running);
                Ok(())
            }
            Ok(false) => {
                last.state = State::Cancelled;
                Err(last)
            }
            Err(e) => {
                eprintln!("v2l-serve: job {id}: {e}");
                self.shared.jobs.unrecorded(
                    id,
                    State::Failed,
                    JobError {
                        kind: JobErrorKind::Storage,
                        message: format!("the job could not be started ({e}); is the disk full?"),
                    },
                );
                Err(last)
            }
        }
    }

    fn run_job(&mut self, id: &str, live: &Live) -> Snapshot {
        if let Err(last) = self.start(id, live) {
            return last;
        }
        if crate::fault::once("worker-panic") {
            panic!("fault point worker-panic");
        }
        let shared = self.shared.clone();
        let store = &shared.jobs.store;
        let started = Instant::now();
        let mut timings = BTreeMap::new();
        let jobs = [(id, live)];
        let bounds = Bounds::new(&jobs, self.deadline(started), &shared.jobs);
        let outcome = match store.get(id) {
            Ok(Some(job)) => self.run_record(&job, &bounds, &mut timings),
            Ok(None) => Err(Stop::failed(
                JobErrorKind::Internal,
                "the job vanished from the database",
            )),
            Err(e) => Err(e.into()),
        };
        timings.insert("job".into(), started.elapsed().as_secs_f64() * 1e3);
        self.end(id, live, outcome, timings)
    }

    /// Records a job's end (`outcome`): its state, timings and error. A job whose end cannot
    /// be written ends `failed` (storage): its video is not served, and the end is written
    /// once the store takes writes again.
    fn end(
        &self,
        id: &str,
        live: &Live,
        outcome: Result<(), Stop>,
        timings: BTreeMap<String, f64>,
    ) -> Snapshot {
        let store = &self.shared.jobs.store;
        if let Err(stop) = &outcome {
            if stop.state == State::Queued {
                return self.requeue(id, &stop.error.message);
            }
        }
        let snap = *live.status.borrow();
        let mut last = Snapshot {
            state: State::Failed,
            step: snap.step,
            steps: snap.steps,
        };
        let (state, error) = match outcome {
            Ok(()) => (State::Succeeded, None),
            Err(stop) => {
                // A cancellation is the client's wish, not an error.
                if stop.state == State::Failed {
                    let kind = format!("job_{}", stop.error.kind.name());
                    self.shared.metrics.error(&kind);
                }
                (stop.state, Some(stop.error))
            }
        };
        last.state = state;
        self.shared.metrics.stages(&timings);
        if let Err(e) = store.finish(id, state, &timings, error.as_ref()) {
            eprintln!("v2l-serve: job {id}: cannot record its end: {e}");
            if let Ok(dir) = store.job_dir(id) {
                let _ = std::fs::remove_file(dir.join(VIDEO_FILE));
            }
            self.shared.metrics.error("job_storage");
            last.state = State::Failed;
            self.shared.jobs.unrecorded(
                id,
                State::Failed,
                JobError {
                    kind: JobErrorKind::Storage,
                    message: format!(
                        "the job's end could not be recorded ({e}); is the disk full?"
                    ),
                },
            );
        } else {
            self.shared.jobs.record_pending();
            if let Err(e) = store.prune(&self.shared.config.retention) {
                eprintln!("v2l-serve: pruning ended jobs: {e}");
            }
            // The LoRAs this job named are no longer in use: the bounds apply to them now.
            self.shared.prune_loras();
        }
        last
    }

    /// A job the shutdown stopped: queued again (its inputs kept) for the next start; failed
    /// should the store refuse, as a kill would have left it.
    fn requeue(&self, id: &str, why: &str) -> Snapshot {
        let queued = Snapshot {
            state: State::Queued,
            step: 0,
            steps: 0,
        };
        match self.shared.jobs.store.requeue(id) {
            Ok(true) => {
                eprintln!("v2l-serve: job {id}: {why}");
                queued
            }
            Ok(false) => queued,
            Err(e) => {
                eprintln!("v2l-serve: job {id}: {why}, but it could not be queued again: {e}");
                Snapshot {
                    state: State::Failed,
                    ..queued
                }
            }
        }
    }

    fn run_record(
        &mut self,
        job: &JobRecord,
        bounds: &Bounds,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(), Stop> {
        let dir = self.shared.jobs.store.job_dir(&job.id)?;
        // A DELETE or the time limit reaches the ONNX Runtime call in flight (predicting the
        // LoRA, encoding the prompt), not only the checks between steps.
        bounds.run(|| self.run_params(job, &dir, bounds, timings))
    }

    fn run_params(
        &mut self,
        job: &JobRecord,
        dir: &Path,
        bounds: &Bounds,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(), Stop> {
        match &job.params {
            JobParams::Lora(p) => {
                let t = Instant::now();
                let (_, cached) = self.reference_lora(&p.id, p.weight, dir)?;
                timings.insert("lora".into(), ms(t));
                self.shared.jobs.store.set_lora(&job.id, &p.id, cached)?;
                Ok(())
            }
            JobParams::Video(p) => {
                let req = self.video_request(&job.id, p, dir, timings, true)?;
                let gen = self.generate(bounds, &[req])?;
                let gen = gen.into_iter().next().ok_or_else(|| {
                    Stop::failed(JobErrorKind::Internal, "the pipeline returned no video")
                })?;
                self.write_video(gen, p, dir, bounds, timings)
            }
        }
    }

    /// Runs video jobs together (one DiT call per step), each with its own LoRA; each ends as
    /// it would alone, its timings noting the batch size.
    fn run_batch(&mut self, batch: Vec<(String, Arc<Live>)>) {
        let started = Instant::now();
        let deadline = self.deadline(started);
        let shared = self.shared.clone();
        let mut ready = Vec::new();
        for (id, live) in batch {
            if let Err(last) = self.start(&id, &live) {
                self.shared.jobs.finished(&id, last);
                continue;
            }
            let mut timings = BTreeMap::new();
            let prepared = (|| {
                let job = self.shared.jobs.store.get(&id)?.ok_or_else(|| {
                    Stop::failed(JobErrorKind::Internal, "the job vanished from the database")
                })?;
                let JobParams::Video(p) = job.params else {
                    return Err(Stop::failed(
                        JobErrorKind::Internal,
                        "a LoRA job in a video batch",
                    ));
                };
                let dir = self.shared.jobs.store.job_dir(&id)?;
                let one = [(id.as_str(), &*live)];
                let req = Bounds::new(&one, deadline, &shared.jobs)
                    .run(|| self.video_request(&id, &p, &dir, &mut timings, false))?;
                Ok::<_, Stop>((p, dir, req))
            })();
            match prepared {
                Ok((p, dir, req)) => ready.push((id, live, p, dir, req, timings)),
                Err(stop) => {
                    let last = self.end(&id, &live, Err(stop), timings);
                    self.shared.jobs.finished(&id, last);
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let n = ready.len() as f64;
        let lives: Vec<(&str, &Live)> = ready.iter().map(|r| (r.0.as_str(), &*r.1)).collect();
        let reqs: Vec<Request> = ready.iter().map(|r| r.4.clone()).collect();
        let bounds = Bounds::new(&lives, deadline, &shared.jobs);
        let generated = bounds.run(|| self.generate(&bounds, &reqs));
        drop(lives);
        let mut gens = match generated {
            Ok(g) => g.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(stop) => ready
                .iter()
                .map(|_| {
                    Err(Stop {
                        state: stop.state,
                        error: stop.error.clone(),
                    })
                })
                .collect(),
        };
        for ((id, live, p, dir, _, mut timings), gen) in ready.into_iter().zip(gens.drain(..)) {
            timings.insert("batch_size".into(), n);
            let one = [(id.as_str(), &*live)];
            let bounds = Bounds::new(&one, deadline, &self.shared.jobs);
            let outcome = gen.and_then(|g| self.write_video(g, &p, &dir, &bounds, &mut timings));
            // A job cancelled while its batch ran is cancelled, whatever the batch did.
            let outcome = match live.cancel.load(Ordering::SeqCst) {
                true => Err(cancelled()),
                false => outcome,
            };
            timings.insert("job".into(), started.elapsed().as_secs_f64() * 1e3);
            let last = self.end(&id, &live, outcome, timings);
            self.shared.jobs.finished(&id, last);
        }
    }

    /// Steps 1 to 4 of a video job: its LoRA (from the cache, the store, or predicted from
    /// the reference clip), prompt embeddings, first frame and noise, as a request. `resident`:
    /// the LoRA becomes the pipeline's own (a job alone: consecutive jobs with one LoRA switch
    /// nothing); otherwise it is the request's (a batch).
    fn video_request(
        &mut self,
        id: &str,
        p: &VideoParams,
        dir: &Path,
        timings: &mut BTreeMap<String, f64>,
        resident: bool,
    ) -> Result<Request, Stop> {
        let shared = self.shared.clone();
        let store = &shared.jobs.store;
        // 1. The LoRA: from the cache, the store, or predicted from the reference clip.
        let t = Instant::now();
        let wanted = match &p.lora {
            LoraChoice::None => None,
            LoraChoice::Stored { id: lid, scale } => {
                let (l, cached) = self.stored_lora(lid)?;
                Some((lid.clone(), l, *scale, cached))
            }
            LoraChoice::Reference { id: lid, weight } => {
                let (l, cached) = self.reference_lora(lid, *weight, dir)?;
                // The prediction carries the weight (upstream's alpha); fused at multiplier 1.
                Some((lid.clone(), l, 1.0, cached))
            }
        };
        timings.insert("lora".into(), ms(t));
        if let Some((lid, _, _, cached)) = &wanted {
            store.set_lora(id, lid, *cached)?;
        }
        // 2. Make it the resident LoRA (no work when it already is), or the request's own.
        let lora = match resident {
            true => {
                let t = Instant::now();
                self.make_resident(wanted.map(|(lid, l, m, _)| (lid, l, m)))?;
                timings.insert("lora_switch".into(), ms(t));
                LoraInput::Resident
            }
            false => match wanted {
                None => LoraInput::Base,
                Some((lid, lora, multiplier, _)) => LoraInput::Applied(vec![AppliedLora {
                    lora,
                    source: format!("lora:{lid}").into(),
                    multiplier,
                }]),
            },
        };
        // 3. Prompt embeddings: text through the engine's T5 (cached by text), or as uploaded.
        let prompt = match &p.prompt {
            Some(text) => PromptInput::Text {
                prompt: text.clone(),
                negative: p.negative_prompt.clone(),
            },
            None => {
                let mut t = v2l_runtime::tensor::read_safetensors(&dir.join(PROMPT_FILE))?;
                let mut take = |name: &str| {
                    t.remove(name).ok_or_else(|| {
                        Stop::failed(
                            JobErrorKind::Internal,
                            format!("stored `{name}` is missing"),
                        )
                    })
                };
                PromptInput::Embeds {
                    prompt: take(files_io::PROMPT_EMBEDS)?,
                    negative: take(files_io::NEGATIVE_PROMPT_EMBEDS)?,
                }
            }
        };
        // 4. The first frame, stored with the job unless the engine is text-to-video, and the
        // seeded noise: the runtime's one request builder, as the CLI and the C ABI use it.
        let image_file = dir.join(IMAGE_FILE);
        let image = match image_file.exists() {
            true => Some(MediaInput::Frames(crate::store::load_frames(&image_file)?)),
            false => None,
        };
        // The stored settings, through the contract again (the form checked them when the job
        // was queued; a store edited since is refused here, not run).
        let settings = Settings {
            frames: Some(p.frames),
            height: Some(p.height),
            width: Some(p.width),
            steps: p.steps,
            guidance: p.guidance,
            lora_scale: v2l_runtime::request::DEFAULT_LORA_SCALE,
            max_sequence_length: Some(p.max_sequence_length),
        };
        let limits = crate::form::runtime_limits(&self.shared.config.limits);
        let checked = (settings.check_with(&self.shared.facts.request_defaults(), &limits))
            .map_err(RuntimeError::from)?;
        let inputs = Inputs {
            prompt,
            image,
            image_embeds: None,
            lora,
            noise: NoiseInput::Seed(p.seed),
            sampler: p.scheduler,
            // Checked by the form when the job was queued.
            cache: (p.cache.as_deref().map(str::parse)).transpose().map_err(
                |e: v2l_runtime::request::RequestError| {
                    Stop::failed(
                        JobErrorKind::Internal,
                        format!("stored `cache`: {}", e.message),
                    )
                },
            )?,
        };
        let t = Instant::now();
        let built = inputs.build(&self.engine, &self.opts, &checked, &mut self.prompts)?;
        timings.insert("prompt".into(), ms(t));
        Ok(built.request)
    }

    /// Generates `reqs` (one request alone, or a batch) within `bounds`, which the pipeline
    /// checks after each step and each frame batch of the VAE ([`Watch`]); run it under
    /// [`Bounds::run`] so they reach the ONNX Runtime call in flight too. A batch stops when
    /// all its jobs are cancelled, or when the time limit passes (all bounded alike).
    fn generate(
        &mut self,
        bounds: &Bounds,
        reqs: &[Request],
    ) -> Result<Vec<v2l_runtime::pipeline::Generation>, Stop> {
        let mut watch = Watch {
            bounds,
            store: &self.shared.jobs.store,
        };
        let result = match reqs {
            [one] => self.pipeline.generate(one, &mut watch).map(|g| vec![g]),
            many => self.pipeline.generate_batch(many, &mut watch),
        }
        .map_err(Stop::from);
        self.note_factor_cache();
        match result {
            // A cancel or the time limit that came after the decode's last check (its last
            // frame batch) still holds, so the job ends as the client was told.
            Ok(_) if bounds.stop() => Err(bounds.why()),
            Err(stop) if stop.state == State::Cancelled => Err(bounds.why()),
            r => r,
        }
    }

    /// When a job started at `started` must end (`--job-timeout`), with the limit.
    fn deadline(&self, started: Instant) -> Option<(Duration, Instant)> {
        let limit = self.shared.config.limits.job_timeout?;
        // Checked: a deadline past what `Instant` holds is no deadline (the flag is bounded at
        // a year, a library caller may pass more).
        started.checked_add(limit).map(|d| (limit, d))
    }

    /// Step 5: the mp4 (written under a temporary name, then renamed). A DELETE or the time
    /// limit that comes while it is written stops ffmpeg: the job ends as the client was told,
    /// without its video.
    fn write_video(
        &self,
        gen: v2l_runtime::pipeline::Generation,
        p: &VideoParams,
        dir: &Path,
        bounds: &Bounds,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(), Stop> {
        timings.extend(gen.timings.ms.iter().map(|(k, v)| (k.clone(), *v)));
        let t = Instant::now();
        if crate::fault::once("slow-mp4") {
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let rgb = v2l_runtime::video::to_rgb8(&gen.frames)?;
        let path = dir.join(VIDEO_FILE);
        v2l_runtime::video::write_mp4_until(&path, &rgb, p.fps, &|| bounds.stop()).map_err(
            |e| match e {
                RuntimeError::Cancelled => bounds.why(),
                e => Stop::failed(
                    JobErrorKind::Storage,
                    format!(
                        "the video could not be written: {}",
                        e.to_string().replace(&*dir.to_string_lossy(), "<job>")
                    ),
                ),
            },
        )?;
        timings.insert("encode_mp4".into(), ms(t));
        if bounds.stop() {
            let _ = std::fs::remove_file(&path);
            return Err(bounds.why());
        }
        Ok(())
    }

    /// A stored LoRA by id: the cache, else its file (then cached). `(lora, from cache)`.
    fn stored_lora(&self, id: &str) -> Result<(Arc<Lora>, bool), Stop> {
        self.shared.jobs.store.use_lora(id);
        match self.shared.cache.get(id) {
            Some(l) => Ok((l, true)),
            None => self.load_stored(id).map(|l| (l, false)),
        }
    }

    fn load_stored(&self, id: &str) -> Result<Arc<Lora>, Stop> {
        let path = self.shared.jobs.store.lora_path(id);
        let l = Arc::new(
            v2l_runtime::lora::format::read(&path, Some(&self.shared.facts.modules))
                .map_err(|e| stored_lora_error(e.into(), &path, id))?,
        );
        self.shared.cache.insert(id, l.clone());
        Ok(l)
    }

    /// A reference clip's LoRA: cached, stored, or predicted now from the job's clip (then
    /// stored and cached). `(lora, from cache)`.
    fn reference_lora(
        &mut self,
        id: &str,
        weight: f32,
        dir: &Path,
    ) -> Result<(Arc<Lora>, bool), Stop> {
        let store = &self.shared.jobs.store;
        if let Some(l) = self.shared.cache.get(id) {
            // Deleted a moment before the cache forgot it: stored again, so the id this job
            // reports can be downloaded.
            if !store.use_lora(id) {
                let path = store.lora_path(id);
                v2l_runtime::lora::format::write(&path, &l, LoraFormat::Diffusers)
                    .map_err(|e| stored_lora_error(e.into(), &path, id))?;
                store.use_lora(id);
            }
            return Ok((l, true));
        }
        if store.use_lora(id) {
            return self.load_stored(id).map(|l| (l, false));
        }
        let path = store.lora_path(id);
        let clip = crate::store::load_frames(&dir.join(REFERENCE_FILE))?;
        let prediction = self.pipeline.predict(&clip, weight)?;
        let lora = Arc::new(prediction.lora);
        v2l_runtime::lora::format::write(&path, &lora, LoraFormat::Diffusers)
            .map_err(|e| stored_lora_error(e.into(), &path, id))?;
        // Its store is its first use, stamped in order (`Store::use_lora`).
        store.use_lora(id);
        self.shared.cache.insert(id, lora.clone());
        self.shared.prune_loras();
        Ok((lora, false))
    }

    /// Publishes this worker's kept factor inputs for `/metrics`.
    fn note_factor_cache(&self) {
        let stats = self.pipeline.factor_cache_stats();
        let mut all = self
            .shared
            .factor_caches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = all.get_mut(self.factor_slot) {
            *s = stats;
        }
    }

    fn make_resident(&mut self, wanted: Option<(String, Arc<Lora>, f32)>) -> Result<(), Stop> {
        let key = wanted.as_ref().map(|(id, _, m)| (id.clone(), m.to_bits()));
        if key == self.resident {
            return Ok(());
        }
        let applied = wanted.map(|(id, lora, multiplier)| AppliedLora {
            lora,
            source: format!("lora:{id}").into(),
            multiplier,
        });
        // Until the switch is known to have finished, the weights are not any LoRA's.
        self.resident = Some((String::new(), 0));
        let set = self.pipeline.set_lora(applied.as_ref());
        self.note_factor_cache();
        set?;
        self.resident = key;
        Ok(())
    }
}

/// What jobs must share to run in one batch: latent size, steps and prompt length (text
/// prompts only: uploaded embeddings may differ in length).
#[derive(Clone, Debug, PartialEq)]
struct BatchKey {
    frames: usize,
    height: usize,
    width: usize,
    steps: usize,
    max_sequence_length: usize,
}

/// Job `id`'s batch key, when it is a queued video job with a text prompt and no step cache
/// (whose skip decisions are per DiT call: such a job runs alone).
fn batch_key(store: &crate::store::Store, id: &str) -> Option<BatchKey> {
    let job = store.get(id).ok()??;
    if job.kind != Kind::Video {
        return None;
    }
    let JobParams::Video(p) = job.params else {
        return None;
    };
    p.prompt.as_ref()?;
    if p.cache.is_some() {
        return None;
    }
    Some(BatchKey {
        frames: p.frames,
        height: p.height,
        width: p.width,
        steps: p.steps,
        max_sequence_length: p.max_sequence_length,
    })
}

/// A run's bounds: the jobs whose DELETE stops it (all of them, for a batch) and the time
/// limit, with what stopped it first, so that a DELETE that lands a moment before the limit is
/// a cancel even if the run returns after the limit has passed.
struct Bounds<'a> {
    jobs: &'a [(&'a str, &'a Live)],
    deadline: Option<(Duration, Instant)>,
    /// The server's queue: a shutdown whose grace is over stops the run too.
    queue: &'a crate::jobs::Jobs,
    cause: OnceLock<Cause>,
}

impl<'a> Bounds<'a> {
    fn new(
        jobs: &'a [(&'a str, &'a Live)],
        deadline: Option<(Duration, Instant)>,
        queue: &'a crate::jobs::Jobs,
    ) -> Self {
        Bounds {
            jobs,
            deadline,
            queue,
            cause: OnceLock::new(),
        }
    }

    /// Whether the run should stop now (recording why, the first time).
    fn stop(&self) -> bool {
        let over = self.deadline.is_some_and(|(_, d)| Instant::now() > d);
        let deleted = (self.jobs.iter()).all(|(_, l)| l.cancel.load(Ordering::SeqCst));
        stop_cause(&self.cause, over, deleted, self.queue.stopping())
    }

    /// How a stopped run ends.
    fn why(&self) -> Stop {
        self.stop();
        match (self.cause.get(), self.deadline) {
            (Some(Cause::TimeLimit), Some((limit, _))) => Stop::failed(
                JobErrorKind::Timeout,
                format!(
                    "stopped after the job's time limit of {} s (--job-timeout)",
                    limit.as_secs()
                ),
            ),
            (Some(Cause::Shutdown), _) => Stop {
                state: State::Queued,
                error: JobError {
                    kind: JobErrorKind::Interrupted,
                    message: "stopped by the server's shutdown; queued again for its next start"
                        .into(),
                },
            },
            _ => cancelled(),
        }
    }

    /// Runs `work` so that a DELETE or the time limit reaches the ONNX Runtime call in flight
    /// (a DiT step is minutes at a real size on a CPU), and names what stopped it.
    fn run<R>(&self, work: impl FnOnce() -> Result<R, Stop>) -> Result<R, Stop> {
        match v2l_runtime::session::interruptible(|| self.stop(), work) {
            Err(stop) if stop.state == State::Cancelled => Err(self.why()),
            r => r,
        }
    }
}

/// A failure reading or writing stored LoRA `id` at `path`, as its job reports it: clients
/// never see server paths, a stored LoRA is named by its id (and a temporary file beside it,
/// which a failed write may name, by the store's name).
fn stored_lora_error(e: RuntimeError, path: &Path, id: &str) -> Stop {
    let mut message = e
        .to_string()
        .replace(&path.display().to_string(), &format!("stored LoRA `{id}`"));
    if let Some(dir) = path.parent() {
        message = message.replace(&dir.display().to_string(), "<stored LoRAs>");
    }
    let error = Stop::from(e).error;
    Stop {
        error: JobError { message, ..error },
        state: State::Failed,
    }
}

/// A generation's jobs, watched by the pipeline: each step's progress stored and published,
/// and after each frame batch of a reference clip's encode, each step and each frame batch of
/// the decode, whether the run should stop ([`Bounds`]).
struct Watch<'a> {
    bounds: &'a Bounds<'a>,
    store: &'a crate::store::Store,
}

impl Watch<'_> {
    fn go_on(&mut self) -> bool {
        !self.bounds.stop()
    }
}

/// Why a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    TimeLimit,
    Deleted,
    /// The server's shutdown, its grace over (`--shutdown-grace`, or a second signal).
    Shutdown,
}

/// Whether to stop, recording the first cause seen (of several at once: the time limit, then
/// a DELETE, then the shutdown, which queues the job again).
fn stop_cause(cause: &OnceLock<Cause>, over: bool, deleted: bool, shutdown: bool) -> bool {
    let now = match (over, deleted, shutdown) {
        (true, _, _) => Cause::TimeLimit,
        (false, true, _) => Cause::Deleted,
        (false, false, true) => Cause::Shutdown,
        (false, false, false) => return false,
    };
    cause.get_or_init(|| now);
    true
}

impl v2l_runtime::pipeline::Progress for Watch<'_> {
    fn reference(&mut self, _done: usize, _of: usize) -> bool {
        self.go_on()
    }

    fn step(&mut self, done: usize, of: usize) -> bool {
        for (id, live) in self.bounds.jobs {
            live.status.send_modify(|s| {
                s.step = done;
                s.steps = of;
            });
            if let Err(e) = self.store.progress(id, done, of) {
                eprintln!("v2l-serve: job {id}: progress not stored: {e}");
            }
        }
        self.go_on()
    }

    fn decode(&mut self, _done: usize, _of: usize) -> bool {
        self.go_on()
    }
}

fn cancelled() -> Stop {
    Stop {
        state: State::Cancelled,
        error: JobError {
            kind: JobErrorKind::Cancelled,
            message: "cancelled by DELETE".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_to_stop_a_run_names_it() {
        let cause = OnceLock::new();
        assert!(!stop_cause(&cause, false, false, false));
        assert_eq!(cause.get(), None);
        // A DELETE, then the time limit passing while the run winds down: still a cancel.
        assert!(stop_cause(&cause, false, true, false));
        assert!(stop_cause(&cause, true, true, false));
        assert_eq!(cause.get(), Some(&Cause::Deleted));
        let cause = OnceLock::new();
        assert!(stop_cause(&cause, true, true, false));
        assert!(stop_cause(&cause, false, true, false));
        assert_eq!(cause.get(), Some(&Cause::TimeLimit));
        // The shutdown queues a job again, unless its client had deleted it.
        let cause = OnceLock::new();
        assert!(stop_cause(&cause, false, true, true));
        assert_eq!(cause.get(), Some(&Cause::Deleted));
        let cause = OnceLock::new();
        assert!(stop_cause(&cause, false, false, true));
        assert_eq!(cause.get(), Some(&Cause::Shutdown));
    }
}
