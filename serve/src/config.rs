//! What the server was started with, and what it learned from the engine on start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use v2l_runtime::engine::Engine;

/// Per-request bounds (each a `--max-*` flag).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub frames: usize,
    /// Height × width.
    pub pixels: usize,
    pub steps: usize,
    /// A whole request body.
    pub upload_bytes: usize,
    /// Frames decoded from a reference clip at most.
    pub reference_frames: usize,
    /// Wall-clock bound on decoding one upload.
    pub decode_timeout: Duration,
    /// Pixels an uploaded picture may declare (checked by the decoder before it allocates).
    pub source_pixels: usize,
    /// Uploads decoded at once at most; more wait their turn.
    pub decodes: usize,
    /// Wall-clock bound on running one job, from its start (its LoRA's prediction included);
    /// it stops the ONNX Runtime call in flight.
    pub job_timeout: Option<Duration>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            frames: 49,
            pixels: 720 * 480,
            steps: 100,
            upload_bytes: 64 << 20,
            reference_frames: 49,
            decode_timeout: Duration::from_secs(30),
            source_pixels: 4096 * 4096,
            decodes: 2,
            job_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

/// How the server runs: engine, state directory, queue, limits, auth.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: PathBuf,
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    /// Pipelines, each running one job at a time.
    pub workers: usize,
    /// GPUs the workers go to in turn (worker `i` on `devices[i % len]`); empty: device 0.
    pub devices: Vec<u32>,
    /// ONNX Runtime threads per pipeline (0: its default).
    pub threads: usize,
    /// Jobs waiting at most; more get `429`.
    pub queue: usize,
    pub lora_cache_bytes: u64,
    /// Per worker, `unfused` only: laid-out factor inputs kept for LoRAs switched away from
    /// (on a GPU in its memory), so a switch back moves no factor (`--factor-cache-mb`).
    pub factor_cache_bytes: u64,
    /// Bearer token required on `/v1/*` when set.
    pub token: Option<String>,
    /// Host names (beyond IP literals and `localhost`) a request's `Host` and a browser's
    /// `Origin` may name (`--allow-host`): a DNS-rebinding page names its own domain.
    pub allowed_hosts: Vec<String>,
    /// Ended jobs kept, by count and age (`--keep-jobs`, `--keep-hours`), pruned at start and
    /// whenever a job ends; stored LoRAs, by count and bytes (`--keep-loras`,
    /// `--keep-lora-mb`), pruned at start and whenever one is stored.
    pub retention: crate::store::Retention,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub connections: usize,
    /// A request's header must arrive whole within this, or the connection is closed.
    pub header_timeout: Duration,
    /// An upload's body must arrive whole within this, or the request ends `408`.
    pub body_timeout: Duration,
    /// Video jobs that may share DiT calls (1: none); needs the `unfused` strategy.
    pub batch: usize,
    /// How long a job waits for others to share its DiT calls.
    pub batch_wait: Duration,
    /// How LoRAs reach the DiT; `None`: the engine's own choice.
    pub lora_strategy: Option<v2l_runtime::lora::strategy::Strategy>,
    /// After SIGTERM, how long running jobs may go on before they are stopped and queued
    /// again for the next start (`--shutdown-grace`); `None`: until they end. A second
    /// signal stops them at once either way.
    pub shutdown_grace: Option<Duration>,
    pub limits: RequestLimits,
}

impl Config {
    /// The GPU worker `i` runs on.
    pub fn device_of(&self, worker: usize) -> u32 {
        match self.devices.len() {
            0 => 0,
            n => self.devices[worker % n],
        }
    }
}

/// What requests are checked against, read from the engine once.
#[derive(Clone, Debug)]
pub struct EngineFacts {
    /// Content hash of the engine's manifest and bundle record: part of every LoRA cache key.
    pub key: String,
    pub default_frames: Option<usize>,
    pub default_height: Option<usize>,
    pub default_width: Option<usize>,
    /// The one size the DiT runs at, where it has a learned positional table.
    pub fixed_size: Option<(usize, usize, usize)>,
    /// Height and width must be multiples of this (VAE stride × patch size).
    pub multiple: usize,
    pub text_embed_dim: usize,
    pub text_sequence_length: usize,
    pub has_text_encoder: bool,
    pub has_hypernet: bool,
    /// Denoising steps the scheduler can take (its `num_train_timesteps`).
    pub scheduler_steps: usize,
    /// The DiT's LoRA-targetable modules.
    pub modules: Vec<String>,
    /// The same linears with their shapes: an uploaded LoRA must fit them.
    pub targets: Vec<v2l_contracts::LinearInfo>,
    /// What the engine deploys (a Fun-InP engine reads reference clips at their stored size
    /// and resizes them like PIL, as VideoX-Fun's `predict_i2v.py` does).
    pub pipeline: v2l_contracts::PipelineKind,
}

impl EngineFacts {
    /// What the runtime's request builder needs of the engine.
    pub fn request_defaults(&self) -> v2l_runtime::request::EngineDefaults {
        v2l_runtime::request::EngineDefaults {
            frames: self.default_frames,
            height: self.default_height,
            width: self.default_width,
            multiple: self.multiple,
            text_sequence_length: Some(self.text_sequence_length),
            fixed_size: self.fixed_size,
            scheduler_steps: Some(self.scheduler_steps),
        }
    }

    pub fn of(engine: &Engine) -> Result<EngineFacts, String> {
        let dit = engine.manifest.dit.as_ref().ok_or(
            "the engine holds no DiT; export the whole pipeline with `v2l-export pipeline`",
        )?;
        let mut h = blake3::Hasher::new();
        for name in [
            v2l_contracts::manifest::FILE_NAME,
            v2l_runtime::bundle::FILE_NAME,
        ] {
            // A plain export directory has no bundle record; the manifest alone then keys it.
            if let Ok(bytes) = v2l_contracts::input::read_regular(
                &engine.dir.join(name),
                v2l_contracts::input::InputKind::Record,
            ) {
                h.update(&bytes);
            }
        }
        // A compiled engine's record hashes every file; a plain export directory has none, so
        // the files a predicted LoRA depends on are hashed here (re-exported with another
        // LiLoRA, the manifest can stay byte for byte the same).
        if !engine.dir.join(v2l_runtime::bundle::FILE_NAME).is_file() {
            for f in engine.prediction_files() {
                let mut file =
                    std::fs::File::open(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                std::io::copy(&mut file, &mut h).map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
        let (default_frames, default_height, default_width) = engine.default_size();
        if engine.manifest.scheduler.is_none() {
            return Err("the engine holds no scheduler config; export the whole pipeline with `v2l-export pipeline`".into());
        }
        let scheduler_steps = engine.train_timesteps().map_err(|e| e.to_string())?;
        Ok(EngineFacts {
            key: h.finalize().to_hex()[..32].to_string(),
            default_frames,
            fixed_size: engine.fixed_size(),
            default_height,
            default_width,
            multiple: v2l_runtime::request::frame_multiple(engine),
            text_embed_dim: dit.text_embed_dim,
            text_sequence_length: engine.text_sequence_length().unwrap_or(226),
            has_text_encoder: engine.manifest.text_encoder.is_some(),
            has_hypernet: engine.manifest.hypernet.is_some(),
            scheduler_steps,
            modules: dit.lora_targets.iter().map(|t| t.name.clone()).collect(),
            targets: dit.lora_targets.clone(),
            pipeline: engine.pipeline_kind().map_err(|e| e.to_string())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_go_to_the_devices_in_turn() {
        let mut c = Config {
            engine: PathBuf::new(),
            addr: "127.0.0.1:0".parse().unwrap(),
            state_dir: PathBuf::new(),
            workers: 5,
            devices: Vec::new(),
            threads: 0,
            queue: 1,
            lora_cache_bytes: 0,
            factor_cache_bytes: 0,
            token: None,
            allowed_hosts: Vec::new(),
            retention: Default::default(),
            shutdown_grace: None,
            connections: 1,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            batch: 1,
            batch_wait: Duration::ZERO,
            lora_strategy: None,
            limits: RequestLimits::default(),
        };
        assert_eq!((0..5).map(|i| c.device_of(i)).collect::<Vec<_>>(), [0; 5]);
        c.devices = vec![2, 3];
        assert_eq!(
            (0..5).map(|i| c.device_of(i)).collect::<Vec<_>>(),
            [2, 3, 2, 3, 2]
        );
    }
}
