//! A worker: one loaded pipeline on its own thread, running one job at a time from the queue.
//!
//! A job's LoRA is resolved through the cache (a hit skips the VAE encode of the clip and the
//! hypernetwork), then made the pipeline's resident LoRA: consecutive jobs with the same LoRA
//! switch nothing, and a different one is one exact rewrite of the union of touched layers from
//! the base weights (the engine's switch), never a fuse on top of another LoRA.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::format::{Lora, LoraFormat};
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{Pipeline, Request, RequestLora};
use v2l_runtime::session::SessionOptions;
use v2l_runtime::text::prompt::PromptEncoder;
use v2l_runtime::RuntimeError;

use crate::cache::LoraCache;
use crate::config::{Config, EngineFacts};
use crate::form::{LoraChoice, LoraParams, VideoParams};
use crate::jobs::{Jobs, Live, Snapshot};
use crate::metrics::Metrics;
use crate::store::{JobError, JobRecord, Kind, State};

/// Everything the HTTP handlers and the workers share.
pub struct Shared {
    pub config: Config,
    pub facts: EngineFacts,
    pub jobs: Jobs,
    pub cache: LoraCache,
    pub metrics: Metrics,
}

/// Files in a job's directory.
pub const IMAGE_FILE: &str = "image.safetensors";
pub const REFERENCE_FILE: &str = "reference.safetensors";
pub const PROMPT_FILE: &str = "prompt_embeds.safetensors";
pub const VIDEO_FILE: &str = "video.mp4";

/// Why a job did not succeed.
struct Stop {
    state: State,
    error: JobError,
}

impl Stop {
    fn failed(kind: &str, message: impl Into<String>) -> Stop {
        Stop {
            state: State::Failed,
            error: JobError {
                kind: kind.into(),
                message: message.into(),
            },
        }
    }
}

impl From<RuntimeError> for Stop {
    fn from(e: RuntimeError) -> Stop {
        use v2l_runtime::error::ErrorKind as K;
        let kind = match e.kind() {
            K::BadInput => "bad_input",
            K::BadFile => "bad_file",
            K::Lora => "lora",
            K::OrtUnavailable => "runtime_unavailable",
            K::Runtime => "runtime",
            K::Cancelled => "cancelled",
        };
        Stop::failed(kind, e.to_string())
    }
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Stop {
        Stop::failed("internal", e.to_string())
    }
}

/// The thread that runs queued jobs on one pipeline.
pub struct Worker {
    shared: Arc<Shared>,
    engine: Engine,
    opts: SessionOptions,
    pipeline: Pipeline,
    prompts: Option<PromptEncoder>,
    /// `(lora id, multiplier bits)` the pipeline holds; `None` for the base weights.
    resident: Option<(String, u32)>,
}

impl Worker {
    /// Loads a pipeline (VAE, DiT, hypernetwork sessions) for `engine`.
    pub fn load(shared: Arc<Shared>, engine: Engine) -> Result<Worker, RuntimeError> {
        let opts = engine.session_options(shared.config.threads);
        let pipeline = match shared.config.lora_strategy {
            Some(s) => Pipeline::load_with_strategy(engine.clone(), &opts, s)?,
            None => Pipeline::load(engine.clone(), &opts)?,
        };
        Ok(Worker {
            shared,
            engine,
            opts,
            pipeline,
            prompts: None,
            resident: None,
        })
    }

    /// Runs jobs until the queue drains.
    pub fn run(mut self) {
        while let Some((id, live)) = self.shared.jobs.next() {
            let last = self.run_job(&id, &live);
            self.shared.jobs.finished(&id, last);
        }
    }

    fn run_job(&mut self, id: &str, live: &Live) -> Snapshot {
        let shared = self.shared.clone();
        let store = &shared.jobs.store;
        let mut last = Snapshot {
            state: State::Failed,
            step: 0,
            steps: 0,
        };
        match store.start(id) {
            Ok(true) => {}
            Ok(false) => {
                last.state = State::Cancelled;
                return last;
            }
            Err(e) => {
                eprintln!("v2l-serve: job {id}: {e}");
                self.shared.jobs.unrecorded(
                    id,
                    State::Failed,
                    JobError {
                        kind: "storage".into(),
                        message: format!("the job could not be started ({e}); is the disk full?"),
                    },
                );
                return last;
            }
        }
        live.status.send_modify(|s| s.state = State::Running);
        let started = Instant::now();
        let mut timings = BTreeMap::new();
        let outcome = match store.get(id) {
            Ok(Some(job)) => self.run_record(&job, live, &mut timings),
            Ok(None) => Err(Stop::failed(
                "internal",
                "the job vanished from the database",
            )),
            Err(e) => Err(e.into()),
        };
        timings.insert("job".into(), started.elapsed().as_secs_f64() * 1e3);
        let snap = *live.status.borrow();
        last.step = snap.step;
        last.steps = snap.steps;
        let (state, error) = match outcome {
            Ok(()) => (State::Succeeded, None),
            Err(stop) => {
                // A cancellation is the client's wish, not an error.
                if stop.state == State::Failed {
                    let kind = format!("job_{}", stop.error.kind);
                    self.shared.metrics.error(&kind);
                }
                (stop.state, Some(stop.error))
            }
        };
        last.state = state;
        self.shared.metrics.stages(&timings);
        if let Err(e) = store.finish(id, state, &timings, error.as_ref()) {
            // The job cannot be shown as it ended: it ends `failed` (storage), its video is
            // not served, and the end is written once the store takes writes again.
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
                    kind: "storage".into(),
                    message: format!(
                        "the job's end could not be recorded ({e}); is the disk full?"
                    ),
                },
            );
        } else {
            self.shared.jobs.record_pending();
        }
        last
    }

    fn run_record(
        &mut self,
        job: &JobRecord,
        live: &Live,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(), Stop> {
        let dir = self.shared.jobs.store.job_dir(&job.id)?;
        match job.kind {
            Kind::Lora => {
                let p: LoraParams = serde_json::from_value(job.params.clone())
                    .map_err(|e| Stop::failed("internal", format!("stored parameters: {e}")))?;
                let t = Instant::now();
                let (_, cached) = self.reference_lora(&p.id, p.weight, &dir)?;
                timings.insert("lora".into(), ms(t));
                self.shared.jobs.store.set_lora(&job.id, &p.id, cached)?;
                Ok(())
            }
            Kind::Video => {
                let p: VideoParams = serde_json::from_value(job.params.clone())
                    .map_err(|e| Stop::failed("internal", format!("stored parameters: {e}")))?;
                self.video(&job.id, &p, &dir, live, timings)
            }
        }
    }

    fn video(
        &mut self,
        id: &str,
        p: &VideoParams,
        dir: &Path,
        live: &Live,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(), Stop> {
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
        // 2. Make it the resident LoRA (no work when it already is).
        let t = Instant::now();
        self.make_resident(wanted.map(|(lid, l, m, _)| (lid, l, m)))?;
        timings.insert("lora_switch".into(), ms(t));
        // 3. Prompt embeddings: text through the engine's T5 (cached by text), or as uploaded.
        let t = Instant::now();
        let (prompt_embeds, negative_prompt_embeds) = match &p.prompt {
            Some(text) => {
                if self.prompts.is_none() {
                    self.prompts = Some(PromptEncoder::load(&self.engine, &self.opts)?);
                }
                let enc = self
                    .prompts
                    .as_mut()
                    .ok_or_else(|| Stop::failed("internal", "no prompt encoder"))?;
                let mut quiet = |_| {};
                let (_, a) = enc.encode(text, p.max_sequence_length, &mut quiet)?;
                let (_, b) = enc.encode(&p.negative_prompt, p.max_sequence_length, &mut quiet)?;
                (a, b)
            }
            None => {
                let mut t = v2l_runtime::tensor::read_safetensors(&dir.join(PROMPT_FILE))?;
                let mut take = |name: &str| {
                    t.remove(name).ok_or_else(|| {
                        Stop::failed("internal", format!("stored `{name}` is missing"))
                    })
                };
                (take("prompt_embeds")?, take("negative_prompt_embeds")?)
            }
        };
        timings.insert("prompt".into(), ms(t));
        // 4. Generate, watching for cancellation and the job's time limit between steps.
        let image = crate::store::load_frames(&dir.join(IMAGE_FILE))?;
        let req = Request {
            image: Some(image),
            image_embeds: None,
            prompt_embeds,
            negative_prompt_embeds,
            frames: p.frames,
            steps: p.steps,
            guidance: p.guidance,
            noise: self
                .engine
                .seeded_noise(p.frames, p.height, p.width, p.seed)?,
            lora: RequestLora::Resident,
        };
        let deadline = self
            .shared
            .config
            .limits
            .job_timeout
            .map(|t| (t, Instant::now() + t));
        let mut timed_out = false;
        let result = self.pipeline.generate(&req, &mut |step, steps| {
            live.status.send_modify(|s| {
                s.step = step;
                s.steps = steps;
            });
            if let Err(e) = store.progress(id, step, steps) {
                eprintln!("v2l-serve: job {id}: progress not stored: {e}");
            }
            if deadline.is_some_and(|(_, d)| Instant::now() > d) {
                timed_out = true;
                return false;
            }
            !live.cancel.load(Ordering::SeqCst)
        });
        let gen = match result {
            Ok(g) => g,
            Err(RuntimeError::Cancelled) if timed_out => {
                let secs = deadline.map(|(t, _)| t.as_secs()).unwrap_or(0);
                return Err(Stop::failed(
                    "timeout",
                    format!("stopped after the job's time limit of {secs} s (--job-timeout)"),
                ));
            }
            Err(RuntimeError::Cancelled) => {
                return Err(Stop {
                    state: State::Cancelled,
                    error: JobError {
                        kind: "cancelled".into(),
                        message: "cancelled by DELETE".into(),
                    },
                })
            }
            Err(e) => return Err(e.into()),
        };
        timings.extend(gen.timings.iter().map(|(k, v)| (k.clone(), *v)));
        // 5. The mp4 (written under a temporary name, then renamed).
        let t = Instant::now();
        let rgb = v2l_runtime::video::to_rgb8(&gen.frames)?;
        v2l_runtime::video::write_mp4(&dir.join(VIDEO_FILE), &rgb, p.fps).map_err(|e| {
            Stop::failed(
                "storage",
                format!(
                    "the video could not be written: {}",
                    e.to_string().replace(&*dir.to_string_lossy(), "<job>")
                ),
            )
        })?;
        timings.insert("encode_mp4".into(), ms(t));
        Ok(())
    }

    /// A stored LoRA by id: the cache, else its file (then cached). `(lora, from cache)`.
    fn stored_lora(&self, id: &str) -> Result<(Arc<Lora>, bool), Stop> {
        match self.shared.cache.get(id) {
            Some(l) => Ok((l, true)),
            None => self.load_stored(id).map(|l| (l, false)),
        }
    }

    fn load_stored(&self, id: &str) -> Result<Arc<Lora>, Stop> {
        let path = self.shared.jobs.store.lora_path(id);
        // Clients never see server paths: a stored LoRA is named by its id.
        let l = Arc::new(
            v2l_runtime::lora::format::read(&path, Some(&self.shared.facts.modules)).map_err(
                |e| {
                    let message = e
                        .to_string()
                        .replace(&path.display().to_string(), &format!("stored LoRA `{id}`"));
                    Stop {
                        error: JobError {
                            message,
                            ..Stop::from(RuntimeError::from(e)).error
                        },
                        state: State::Failed,
                    }
                },
            )?,
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
        if let Some(l) = self.shared.cache.get(id) {
            return Ok((l, true));
        }
        let path = self.shared.jobs.store.lora_path(id);
        if path.exists() {
            return self.load_stored(id).map(|l| (l, false));
        }
        let clip = crate::store::load_frames(&dir.join(REFERENCE_FILE))?;
        let prediction = self.pipeline.predict(&clip, weight)?;
        let lora = Arc::new(prediction.lora);
        v2l_runtime::lora::format::write(&path, &lora, LoraFormat::Diffusers)
            .map_err(RuntimeError::from)?;
        self.shared.cache.insert(id, lora.clone());
        Ok((lora, false))
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
        self.pipeline.set_lora(applied.as_ref())?;
        self.resident = key;
        Ok(())
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
