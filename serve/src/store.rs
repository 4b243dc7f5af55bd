//! Job state that survives the process: one SQLite database and one directory per job under
//! `--state-dir`.
//!
//! ```text
//! state/
//!   jobs.sqlite            jobs: id, kind, state, params, progress, error, timings, lora_id
//!   jobs/<id>/             decoded inputs (image, reference, prompt embeddings), video.mp4
//!   loras/<lora_id>.safetensors   predicted and uploaded LoRAs (diffusers format)
//! ```
//!
//! A job is written before its `202` is sent, so an accepted job is never lost. On open, a job
//! left `running` by a process that died is marked failed with the reason, and `queued` jobs
//! are handed back to be run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

pub use crate::params::{JobParams, Kind, PARAMS_VERSION};

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "queued" => State::Queued,
            "running" => State::Running,
            "succeeded" => State::Succeeded,
            "cancelled" => State::Cancelled,
            _ => State::Failed,
        }
    }

    /// The state `name` names, if any (`parse` reads the store's own, where anything else is
    /// a failure).
    pub fn named(name: &str) -> Option<State> {
        [
            State::Queued,
            State::Running,
            State::Succeeded,
            State::Failed,
            State::Cancelled,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }
}

/// Why a job failed: a stable `kind` for programs, a message for people.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub kind: JobErrorKind,
    pub message: String,
}

/// A failed job's `error.kind`, as clients match it (snake_case in JSON and in the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorKind {
    /// A request value the pipeline refused (`RuntimeError`'s bad input).
    BadInput,
    /// An input file that could not be read as what it claims.
    BadFile,
    /// A LoRA that could not be read or applied.
    Lora,
    /// ONNX Runtime could not be loaded.
    RuntimeUnavailable,
    /// ONNX Runtime failed while running.
    Runtime,
    /// Cancelled by a client.
    Cancelled,
    /// Over `--job-timeout`.
    Timeout,
    /// The state directory refused a write (a full disk).
    Storage,
    /// The server stopped while the job ran.
    Interrupted,
    /// A fault of the server's own (a worker panic, a record that vanished).
    Internal,
}

impl JobErrorKind {
    pub const ALL: [JobErrorKind; 10] = [
        JobErrorKind::BadInput,
        JobErrorKind::BadFile,
        JobErrorKind::Lora,
        JobErrorKind::RuntimeUnavailable,
        JobErrorKind::Runtime,
        JobErrorKind::Cancelled,
        JobErrorKind::Timeout,
        JobErrorKind::Storage,
        JobErrorKind::Interrupted,
        JobErrorKind::Internal,
    ];

    /// The name clients see.
    pub fn name(self) -> &'static str {
        match self {
            JobErrorKind::BadInput => "bad_input",
            JobErrorKind::BadFile => "bad_file",
            JobErrorKind::Lora => "lora",
            JobErrorKind::RuntimeUnavailable => "runtime_unavailable",
            JobErrorKind::Runtime => "runtime",
            JobErrorKind::Cancelled => "cancelled",
            JobErrorKind::Timeout => "timeout",
            JobErrorKind::Storage => "storage",
            JobErrorKind::Interrupted => "interrupted",
            JobErrorKind::Internal => "internal",
        }
    }
}

/// One job as stored and as `GET /v1/videos/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: Kind,
    pub state: State,
    /// Unix seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// Denoising steps done and in all.
    pub step: usize,
    pub steps: usize,
    pub error: Option<JobError>,
    /// Stage → milliseconds (`lora`, `lora_fuse`, `denoise`, `total`, ...).
    pub timings: BTreeMap<String, f64>,
    /// The LoRA the job ran with or predicted.
    pub lora_id: Option<String>,
    /// Whether that LoRA came from the cache.
    pub lora_cached: Option<bool>,
    /// The validated request, typed.
    pub params: JobParams,
}

impl JobRecord {
    /// A new job, queued now.
    pub fn queued(id: &str, params: JobParams) -> JobRecord {
        JobRecord {
            id: id.to_string(),
            kind: params.kind(),
            state: State::Queued,
            created_at: now(),
            started_at: None,
            finished_at: None,
            step: 0,
            steps: 0,
            error: None,
            timings: BTreeMap::new(),
            lora_id: None,
            lora_cached: None,
            params,
        }
    }
}

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The database could not be opened or read as one: a corrupt or foreign file.
    #[error("job database {path}: {source}; restore it, or move the state directory away to start afresh")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The database is gone or empty while job directories remain: starting afresh would
    /// silently forget those jobs.
    #[error("job database {db} is {state}, but {jobs} holds {count} job director{}; restore the database, or move {jobs} away to start afresh", if *.count == 1 { "y" } else { "ies" })]
    Orphaned {
        db: PathBuf,
        state: &'static str,
        jobs: PathBuf,
        count: usize,
    },
    #[error("job database: {0}")]
    Json(#[from] serde_json::Error),
    /// A job's stored parameters this server cannot read.
    #[error("job {id}: stored parameters: {message}")]
    Params { id: String, message: String },
    #[error("job database lock poisoned by a panic")]
    Poisoned,
    /// Another server owns the state directory: two would fail each other's running jobs.
    #[error("--state-dir {dir} is in use by another v2l-serve ({holder}); stop it first, or give this one its own --state-dir")]
    InUse { dir: PathBuf, holder: String },
}

/// Results of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The state directory: SQLite for job records, files for inputs and outputs.
pub struct Store {
    dir: PathBuf,
    conn: Mutex<Connection>,
    /// Stored LoRAs a request holds between naming them and its job's row ([`LoraPin`]): no
    /// prune or DELETE takes one. Locked across a prune's or a DELETE's look and unlink.
    pins: Arc<Mutex<HashMap<String, usize>>>,
    /// The latest use stamped on a stored LoRA ([`Store::use_lora`]); read from the files at
    /// the first use.
    last_use: Mutex<Option<std::time::SystemTime>>,
    /// `<state>/lock`, locked for as long as this store lives (the process's life): one owner
    /// per state directory. Released when the process ends, after its running job has.
    _owner: std::fs::File,
}

/// Takes `<dir>/lock` exclusively (an advisory `flock`, released by the kernel when the
/// process ends, however it ends) and writes this process's id into it for the next one's
/// error message.
fn own(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "pid unknown".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(StoreError::InUse {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}

/// What the state directory keeps; `None`: no bound of that kind. Ended jobs by count and
/// age (`--keep-jobs`, `--keep-hours`); stored LoRAs by count and bytes (`--keep-loras`,
/// `--keep-lora-mb`), the least recently used going first and none a queued or running job
/// names.
#[derive(Clone, Copy, Debug, Default)]
pub struct Retention {
    pub jobs: Option<usize>,
    pub age: Option<std::time::Duration>,
    pub loras: Option<usize>,
    pub lora_bytes: Option<u64>,
}

/// A stored LoRA kept from pruning and DELETE while held: a request holds it from naming the
/// LoRA (or storing it) until its job is queued, from when the job's row keeps it.
pub struct LoraPin {
    pins: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
}

impl Drop for LoraPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pins.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.id);
            }
        }
    }
}

/// A LoRA id: 32 lowercase hex digits (the cache key), nothing that could name a path.
pub fn is_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What [`Store::delete_lora`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraDeleted {
    Deleted,
    /// A queued or running job names it: kept.
    InUse,
    Unknown,
}

/// A job's decoded inputs, written when it is accepted and read only by its run.
pub const IMAGE_FILE: &str = "image.safetensors";
pub const REFERENCE_FILE: &str = "reference.safetensors";
pub const PROMPT_FILE: &str = "prompt_embeds.safetensors";
const INPUT_FILES: [&str; 3] = [IMAGE_FILE, REFERENCE_FILE, PROMPT_FILE];

/// What [`Store::open`] found left by an earlier process.
pub struct Recovered {
    /// Queued jobs, oldest first, to run again.
    pub queued: Vec<String>,
    /// Jobs that were running when it stopped, now failed.
    pub interrupted: Vec<String>,
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Removes what a killed process was writing: temporary siblings (`.v2l-*`) of videos and
/// LoRAs, and upload scratch files. Nothing under those names is ever served.
fn remove_leftovers(dir: &Path) {
    let entries = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut dirs = vec![dir.join("loras"), dir.join("tmp")];
    dirs.extend(
        entries(&dir.join("jobs"))
            .into_iter()
            .filter(|p| p.is_dir()),
    );
    for d in dirs {
        let scratch = d.ends_with("tmp");
        for f in entries(&d) {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if (scratch || name.starts_with(".v2l-")) && f.is_file() {
                let _ = std::fs::remove_file(&f);
            }
        }
    }
}

/// Refuses a database `db` that is missing or empty while `jobs` holds job directories.
fn check_not_orphaned(db: &Path, jobs: &Path) -> Result<()> {
    let state = match std::fs::metadata(db) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => "empty",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing",
        Err(source) => {
            return Err(StoreError::Io {
                path: db.into(),
                source,
            })
        }
    };
    let count = std::fs::read_dir(jobs)
        .map_err(|source| StoreError::Io {
            path: jobs.into(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    if count == 0 {
        return Ok(());
    }
    Err(StoreError::Orphaned {
        db: db.into(),
        state,
        jobs: jobs.into(),
        count,
    })
}

impl Store {
    pub fn open(dir: &Path) -> Result<(Store, Recovered)> {
        for d in [dir.to_path_buf(), dir.join("jobs"), dir.join("loras")] {
            std::fs::create_dir_all(&d).map_err(|source| StoreError::Io { path: d, source })?;
        }
        let owner = own(dir)?;
        let db = dir.join("jobs.sqlite");
        check_not_orphaned(&db, &dir.join("jobs"))?;
        let (conn, interrupted, queued) = Store::recover(dir, &db).map_err(|e| match e {
            StoreError::Sql(source) => StoreError::Database {
                path: db.clone(),
                source,
            },
            other => other,
        })?;
        Ok((
            Store {
                dir: dir.to_path_buf(),
                conn: Mutex::new(conn),
                pins: Arc::default(),
                last_use: Mutex::default(),
                _owner: owner,
            },
            Recovered {
                queued,
                interrupted,
            },
        ))
    }

    /// Opens the database `db` of the state directory `dir`, creates its table, fails the
    /// jobs that were running, removes leftovers and lists the queued jobs.
    fn recover(dir: &Path, db: &Path) -> Result<(Connection, Vec<String>, Vec<String>)> {
        let conn = Connection::open(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY,
                 kind TEXT NOT NULL,
                 state TEXT NOT NULL,
                 created_at REAL NOT NULL,
                 started_at REAL,
                 finished_at REAL,
                 step INTEGER NOT NULL DEFAULT 0,
                 steps INTEGER NOT NULL DEFAULT 0,
                 error TEXT,
                 timings TEXT NOT NULL DEFAULT '{}',
                 lora_id TEXT,
                 lora_cached INTEGER,
                 params TEXT NOT NULL
             );",
        )?;
        let interrupted: Vec<String> = {
            let mut st = conn.prepare("SELECT id FROM jobs WHERE state = 'running'")?;
            let ids = st.query_map([], |r| r.get(0))?;
            ids.collect::<std::result::Result<_, _>>()?
        };
        let reason = serde_json::to_string(&JobError {
            kind: JobErrorKind::Interrupted,
            message:
                "the server stopped while this job was running (a crash or a kill); submit it again"
                    .into(),
        })?;
        conn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?1, error = ?2 WHERE state = 'running'",
            params![now(), reason],
        )?;
        remove_leftovers(dir);
        let queued: Vec<String> = {
            let mut st =
                conn.prepare("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, id")?;
            let ids = st.query_map([], |r| r.get(0))?;
            ids.collect::<std::result::Result<_, _>>()?
        };
        Ok((conn, interrupted, queued))
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// The directory of job `id`'s files (created).
    pub fn job_dir(&self, id: &str) -> Result<PathBuf> {
        let d = self.dir.join("jobs").join(id);
        std::fs::create_dir_all(&d).map_err(|source| StoreError::Io {
            path: d.clone(),
            source,
        })?;
        Ok(d)
    }

    /// Where LoRA `id` is stored (it may not be).
    pub fn lora_path(&self, id: &str) -> PathBuf {
        self.dir.join("loras").join(format!("{id}.safetensors"))
    }

    /// Marks stored LoRA `id` used now (its file's modification time, which outlives the
    /// process), so [`Store::prune_loras`] keeps it longest; false when it is not stored (only
    /// a regular file is: not a directory or a link someone put there).
    pub fn use_lora(&self, id: &str) -> bool {
        let path = self.lora_path(id);
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return false;
        }
        let touched = std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(self.use_stamp()));
        match touched {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            // Read-only files still serve; they only age as if unused.
            Err(e) => {
                eprintln!("v2l-serve: stored LoRA {id}: its use not recorded: {e}");
                true
            }
        }
    }

    /// Now, or a microsecond after the latest use stamped (kept across restarts in the files),
    /// whichever is later: uses stay in the order they came when the clock steps back (a host
    /// that booted a day fast, then corrected), so the latest use is never pruned first.
    fn use_stamp(&self) -> std::time::SystemTime {
        let mut last = self.last_use.lock().unwrap_or_else(|p| p.into_inner());
        let latest = *last.get_or_insert_with(|| {
            let stored = self.loras().unwrap_or_default();
            let newest = stored.iter().map(|l| l.2).max();
            newest.unwrap_or(std::time::UNIX_EPOCH)
        });
        let stamp = std::time::SystemTime::now().max(latest + std::time::Duration::from_micros(1));
        *last = Some(stamp);
        stamp
    }

    fn pins(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // Counts stay whole under a panic (each change is one statement).
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(&self, pins: &mut HashMap<String, usize>, id: &str) -> LoraPin {
        *pins.entry(id.to_string()).or_default() += 1;
        LoraPin {
            pins: self.pins.clone(),
            id: id.to_string(),
        }
    }

    /// Stored LoRA `id`, marked used ([`Store::use_lora`]) and held from pruning and DELETE
    /// until the pin drops; `None` when it is not stored.
    pub fn pin_lora(&self, id: &str) -> Option<LoraPin> {
        let mut pins = self.pins();
        self.use_lora(id).then(|| self.pin(&mut pins, id))
    }

    /// Holds `id` from pruning before it is stored: a LoRA about to be written.
    pub fn pin_new_lora(&self, id: &str) -> LoraPin {
        let mut pins = self.pins();
        self.pin(&mut pins, id)
    }

    /// The LoRA ids queued and running jobs name: to run with, or to predict and store.
    fn loras_in_use(&self) -> Result<HashSet<String>> {
        let conn = self.conn()?;
        let mut st =
            conn.prepare("SELECT kind, params FROM jobs WHERE state IN ('queued', 'running')")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut ids = HashSet::new();
        for row in rows {
            let (kind, text) = row?;
            let kind = Kind::parse(&kind);
            match JobParams::from_record(kind, &text) {
                Ok(JobParams::Lora(p)) => {
                    ids.insert(p.id);
                }
                Ok(JobParams::Video(p)) => match p.lora {
                    crate::params::LoraChoice::Stored { id, .. }
                    | crate::params::LoraChoice::Reference { id, .. } => {
                        ids.insert(id);
                    }
                    crate::params::LoraChoice::None => {}
                },
                // Such a job fails when it runs (`get` names why); it names nothing to keep.
                Err(_) => {}
            }
        }
        Ok(ids)
    }

    /// Stored LoRAs as `(id, bytes, last use)`, the most recently used first (`GET /v1/loras`).
    pub fn loras(&self) -> Result<Vec<(String, u64, std::time::SystemTime)>> {
        let dir = self.dir.join("loras");
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only what v2l-serve stores: not temporary siblings (`.v2l-*`) being written, nor
            // anything else put there.
            let Some(id) = name.strip_suffix(".safetensors").filter(|id| is_id(id)) else {
                continue;
            };
            // Gone since the listing (another prune, a DELETE), or not a file.
            let Some(meta) = entry.metadata().ok().filter(|m| m.is_file()) else {
                continue;
            };
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            all.push((id.to_string(), meta.len(), used));
        }
        all.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        Ok(all)
    }

    /// How many LoRAs are stored, and their bytes (for `/metrics`).
    pub fn lora_usage(&self) -> (usize, u64) {
        let all = self.loras().unwrap_or_default();
        (all.len(), all.iter().map(|l| l.1).sum())
    }

    /// Deletes stored LoRAs beyond `keep.loras` and `keep.lora_bytes`, the least recently
    /// used first ([`Store::use_lora`]), but none a queued or running job names nor a request
    /// holds ([`LoraPin`]); those count toward the bounds. Strictly by use: once one does not
    /// fit, every one used before it goes too, even one small enough to. The ids deleted; a
    /// file that will not go is said on stderr and left.
    pub fn prune_loras(&self, keep: &Retention) -> Result<Vec<String>> {
        if keep.loras.is_none() && keep.lora_bytes.is_none() {
            return Ok(Vec::new());
        }
        // Listed before the pins are locked (a LoRA stored meanwhile waits for the next
        // prune): the lock is held for the jobs' names and the unlinks only.
        let stored = self.loras()?;
        let pins = self.pins();
        let in_use = self.loras_in_use()?;
        let (mut count, mut bytes, mut full) = (0usize, 0u64, false);
        let mut gone = Vec::new();
        for (id, len, _) in stored {
            full = full
                || keep.loras.is_some_and(|n| count >= n)
                || keep.lora_bytes.is_some_and(|b| bytes + len > b);
            if !full || in_use.contains(&id) || pins.contains_key(&id) {
                count += 1;
                bytes += len;
                continue;
            }
            let path = self.lora_path(&id);
            match std::fs::remove_file(&path) {
                Ok(()) => gone.push(id),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("v2l-serve: {}: not deleted: {e}", path.display()),
            }
        }
        Ok(gone)
    }

    /// Deletes stored LoRA `id`, unless a queued or running job names it or a request holds it.
    pub fn delete_lora(&self, id: &str) -> Result<LoraDeleted> {
        let pins = self.pins();
        if pins.contains_key(id) || self.loras_in_use()?.contains(id) {
            return Ok(LoraDeleted::InUse);
        }
        let path = self.lora_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(LoraDeleted::Deleted),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LoraDeleted::Unknown),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    pub fn insert(&self, job: &JobRecord) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO jobs (id, kind, state, created_at, params) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                job.id,
                job.kind.name(),
                job.state.name(),
                job.created_at,
                job.params.to_record()?
            ],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                "SELECT id, kind, state, created_at, started_at, finished_at, step, steps, error,
                        timings, lora_id, lora_cached, params FROM jobs WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, f64>(3)?,
                        r.get::<_, Option<f64>>(4)?,
                        r.get::<_, Option<f64>>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, Option<String>>(8)?,
                        r.get::<_, String>(9)?,
                        r.get::<_, Option<String>>(10)?,
                        r.get::<_, Option<bool>>(11)?,
                        r.get::<_, String>(12)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            id,
            kind,
            state,
            created,
            started,
            finished,
            step,
            steps,
            error,
            timings,
            lora,
            cached,
            params,
        )) = row
        else {
            return Ok(None);
        };
        let kind = Kind::parse(&kind);
        let params =
            JobParams::from_record(kind, &params).map_err(|message| StoreError::Params {
                id: id.clone(),
                message,
            })?;
        Ok(Some(JobRecord {
            id,
            kind,
            state: State::parse(&state),
            created_at: created,
            started_at: started,
            finished_at: finished,
            step: step.max(0) as usize,
            steps: steps.max(0) as usize,
            error: error.map(|e| serde_json::from_str(&e)).transpose()?,
            timings: serde_json::from_str(&timings)?,
            lora_id: lora,
            lora_cached: cached,
            params,
        }))
    }

    /// The jobs of `kind` (in `state`, if given) as `(id, created_at)`, newest first: `limit`
    /// of them after the place `after` names (a job's `(created_at, id)`, which need not exist
    /// any more: a page is found the same after its jobs are deleted), and how many match in
    /// all.
    pub fn list(
        &self,
        kind: Kind,
        state: Option<State>,
        limit: usize,
        after: Option<(f64, &str)>,
    ) -> Result<(Vec<(String, f64)>, u64)> {
        let (kind, state) = (kind.name(), state.map(State::name));
        let conn = self.conn()?;
        let total: i64 = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE kind = ?1 AND (?2 IS NULL OR state = ?2)",
            params![kind, state],
            |r| r.get(0),
        )?;
        let mut st = conn.prepare(
            "SELECT id, created_at FROM jobs WHERE kind = ?1 AND (?2 IS NULL OR state = ?2)
             AND (?3 IS NULL OR created_at < ?3 OR (created_at = ?3 AND id < ?4))
             ORDER BY created_at DESC, id DESC LIMIT ?5",
        )?;
        let (at, id) = (after.map(|a| a.0), after.map(|a| a.1));
        let ids = st.query_map(params![kind, state, at, id, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok((
            ids.collect::<std::result::Result<_, _>>()?,
            total.max(0) as u64,
        ))
    }

    /// `queued` → `running`; false if the job is no longer queued (cancelled meanwhile).
    pub fn start(&self, id: &str) -> Result<bool> {
        let n = self.conn()?.execute(
            "UPDATE jobs SET state = 'running', started_at = ?2 WHERE id = ?1 AND state = 'queued'",
            params![id, now()],
        )?;
        Ok(n == 1)
    }

    pub fn progress(&self, id: &str, step: usize, steps: usize) -> Result<()> {
        self.conn()?.execute(
            "UPDATE jobs SET step = ?2, steps = ?3 WHERE id = ?1",
            params![id, step as i64, steps as i64],
        )?;
        Ok(())
    }

    pub fn set_lora(&self, id: &str, lora_id: &str, cached: bool) -> Result<()> {
        self.conn()?.execute(
            "UPDATE jobs SET lora_id = ?2, lora_cached = ?3 WHERE id = ?1",
            params![id, lora_id, cached],
        )?;
        Ok(())
    }

    /// Removes a job's decoded inputs (its first frame, reference clip and prompt embeddings
    /// as raw tensors: a 49-frame 480x720 reference is 50 MB), which only its run reads.
    pub fn remove_inputs(&self, id: &str) {
        let d = self.dir.join("jobs").join(id);
        for f in INPUT_FILES {
            match std::fs::remove_file(d.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("v2l-serve: job {id}: {f} not removed: {e}"),
            }
        }
    }

    /// Forgets an ended job: its row and its directory (the result included). False when it
    /// does not exist or has not ended.
    pub fn delete_ended(&self, id: &str) -> Result<bool> {
        let n = self.conn()?.execute(
            "DELETE FROM jobs WHERE id = ?1 AND state IN ('succeeded', 'failed', 'cancelled')",
            params![id],
        )?;
        if n == 1 {
            let d = self.dir.join("jobs").join(id);
            match std::fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { path: d, source }),
            }
        }
        Ok(n == 1)
    }

    /// Deletes ended jobs beyond `keep.jobs` (the most recently ended are kept) and those
    /// that ended more than `keep.age` ago, with their files; how many went.
    pub fn prune(&self, keep: &Retention) -> Result<usize> {
        let mut ids: Vec<String> = Vec::new();
        {
            let conn = self.conn()?;
            let mut st = conn.prepare(
                "SELECT id, finished_at FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY finished_at DESC, created_at DESC",
            )?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<f64>>(1)?))
            })?;
            let cutoff = keep.age.map(|a| now() - a.as_secs_f64());
            for (i, row) in rows.enumerate() {
                let (id, finished) = row?;
                let too_many = keep.jobs.is_some_and(|n| i >= n);
                let too_old = matches!((cutoff, finished), (Some(c), Some(f)) if f < c);
                if too_many || too_old {
                    ids.push(id);
                }
            }
        }
        let mut n = 0;
        for id in ids {
            if self.delete_ended(&id)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bytes under the state directory (for `/metrics`): the database, the jobs' files and the
    /// stored LoRAs.
    pub fn size_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => std::fs::read_dir(p)
                    .map(|r| r.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        walk(&self.dir)
    }

    /// A final state, with the timings and the error, if any.
    pub fn finish(
        &self,
        id: &str,
        state: State,
        timings: &BTreeMap<String, f64>,
        error: Option<&JobError>,
    ) -> Result<()> {
        let error = error.map(serde_json::to_string).transpose()?;
        self.remove_inputs(id);
        self.conn()?.execute(
            "UPDATE jobs SET state = ?2, finished_at = ?3, timings = ?4, error = ?5 WHERE id = ?1",
            params![
                id,
                state.name(),
                now(),
                serde_json::to_string(timings)?,
                error
            ],
        )?;
        Ok(())
    }

    /// A running job stopped by the server's shutdown, queued again as it was submitted (its
    /// inputs kept, its progress and its LoRA's record cleared), to run from the start at the
    /// next start; false if it was not running.
    pub fn requeue(&self, id: &str) -> Result<bool> {
        let n = self.conn()?.execute(
            "UPDATE jobs SET state = 'queued', started_at = NULL, step = 0, steps = 0,
             lora_id = NULL, lora_cached = NULL WHERE id = ?1 AND state = 'running'",
            params![id],
        )?;
        Ok(n == 1)
    }

    /// A queued job cancelled before it ran; false if it was not queued.
    pub fn cancel_queued(&self, id: &str) -> Result<bool> {
        let n = self.conn()?.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?2 WHERE id = ?1 AND state = 'queued'",
            params![id, now()],
        )?;
        if n == 1 {
            self.remove_inputs(id);
        }
        Ok(n == 1)
    }

    /// Jobs in each state (for `/metrics`).
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut m = BTreeMap::new();
        for r in rows {
            let (s, n) = r?;
            m.insert(s, n.max(0) as u64);
        }
        Ok(m)
    }
}

/// Saves decoded RGB8 frames (`frames [F, H, W, 3]` uint8 in safetensors).
pub fn save_frames(path: &Path, frames: &v2l_runtime::video::Frames) -> v2l_runtime::Result<()> {
    let t = v2l_runtime::Tensor {
        shape: vec![frames.frames, frames.height, frames.width, 3],
        data: v2l_runtime::tensor::Data::U8(frames.rgb.clone()),
    };
    v2l_runtime::tensor::write_safetensors(path, &BTreeMap::from([("frames".to_string(), t)]))
}

/// Frames saved by [`save_frames`].
pub fn load_frames(path: &Path) -> v2l_runtime::Result<v2l_runtime::video::Frames> {
    let mut all = v2l_runtime::tensor::read_safetensors(path)?;
    let bad = |message: &str| v2l_runtime::RuntimeError::BadFile {
        path: path.into(),
        message: message.into(),
    };
    let t = all
        .remove("frames")
        .ok_or_else(|| bad("no `frames` tensor"))?;
    match (t.shape.as_slice(), t.data) {
        (&[f, h, w, 3], v2l_runtime::tensor::Data::U8(rgb)) if rgb.len() == f * h * w * 3 => {
            Ok(v2l_runtime::video::Frames {
                frames: f,
                height: h,
                width: w,
                rgb,
            })
        }
        _ => Err(bad("`frames` is not uint8 [F, H, W, 3]")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn job_error_kinds_are_named_as_stored() {
        for k in JobErrorKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<JobErrorKind>(&json).unwrap(), k);
        }
        for k in [Kind::Video, Kind::Lora] {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
            assert_eq!(Kind::parse(k.name()), k);
        }
    }
    use crate::params::VideoParams;

    fn job(id: &str) -> JobRecord {
        JobRecord::queued(id, JobParams::Video(VideoParams::sample()))
    }

    /// A database that is empty or gone while job directories remain is refused, naming both;
    /// a corrupt one names its file. Without job directories a missing database starts afresh.
    #[test]
    fn a_lost_or_corrupt_database_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            for id in ["a", "b", "c"] {
                s.insert(&job(id)).unwrap();
                s.job_dir(id).unwrap();
            }
        }
        for state in ["empty", "missing"] {
            for f in ["jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"] {
                let _ = std::fs::remove_file(dir.path().join(f));
            }
            if state == "empty" {
                std::fs::write(&db, b"").unwrap();
            }
            let e = Store::open(dir.path()).err().unwrap().to_string();
            for needle in [
                db.to_str().unwrap(),
                state,
                "holds 3 job directories",
                dir.path().join("jobs").to_str().unwrap(),
            ] {
                assert!(e.contains(needle), "{needle} not in: {e}");
            }
        }
        std::fs::write(&db, vec![7u8; 8192]).unwrap();
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains(db.to_str().unwrap()), "{e}");
        let fresh = tempfile::tempdir().unwrap();
        assert!(Store::open(fresh.path()).is_ok());
    }

    #[test]
    fn a_reopened_store_requeues_queued_jobs_and_fails_running_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, r) = Store::open(dir.path()).unwrap();
            assert!(r.queued.is_empty() && r.interrupted.is_empty());
            for id in ["a", "b", "c"] {
                s.insert(&job(id)).unwrap();
            }
            assert!(s.start("a").unwrap());
            assert!(!s.start("a").unwrap(), "a running job cannot start again");
            assert!(s.cancel_queued("c").unwrap());
        }
        let (s, r) = Store::open(dir.path()).unwrap();
        assert_eq!(r.queued, vec!["b".to_string()]);
        assert_eq!(r.interrupted, vec!["a".to_string()]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.state, State::Failed);
        assert_eq!(a.error.unwrap().kind, JobErrorKind::Interrupted);
        assert_eq!(s.get("c").unwrap().unwrap().state, State::Cancelled);
        assert_eq!(
            s.get("b").unwrap().unwrap().params,
            JobParams::Video(VideoParams::sample())
        );
        assert!(s.get("zzz").unwrap().is_none());
    }

    #[test]
    fn jobs_are_listed_newest_first_by_kind_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let mut j = job(id);
            j.created_at = i as f64;
            s.insert(&j).unwrap();
        }
        let lora = crate::params::LoraParams {
            id: "x".into(),
            weight: 1.0,
        };
        s.insert(&JobRecord::queued("l", JobParams::Lora(lora)))
            .unwrap();
        s.start("b").unwrap();
        let ids = |v: (Vec<(String, f64)>, u64)| (v.0.into_iter().map(|j| j.0).collect(), v.1);
        let all = |state, limit, after| ids(s.list(Kind::Video, state, limit, after).unwrap());
        let v = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(all(None, 10, None), (v(&["d", "c", "b", "a"]), 4));
        // After d (created at 3): c and b. The place holds once d is gone, and a job created
        // at the same time sorts by id.
        assert_eq!(all(None, 2, Some((3.0, "d"))), (v(&["c", "b"]), 4));
        assert!(s.cancel_queued("d").unwrap() && s.delete_ended("d").unwrap());
        let mut e = job("e");
        e.created_at = 2.0;
        s.insert(&e).unwrap();
        assert_eq!(all(None, 2, Some((3.0, "d"))), (v(&["e", "c"]), 4));
        assert_eq!(all(None, 10, Some((2.0, "e"))), (v(&["c", "b", "a"]), 4));
        assert_eq!(all(Some(State::Running), 10, None), (v(&["b"]), 1));
        assert_eq!(all(Some(State::Failed), 10, None), (v(&[]), 0));
        assert_eq!(all(None, 10, Some((0.0, "a"))), (v(&[]), 4));
        assert_eq!(
            ids(s.list(Kind::Lora, None, 10, None).unwrap()),
            (v(&["l"]), 1)
        );
        assert_eq!(State::named("running"), Some(State::Running));
        assert_eq!(State::named("bogus"), None);
    }

    #[test]
    fn finishing_keeps_timings_and_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        s.insert(&job("x")).unwrap();
        s.start("x").unwrap();
        s.progress("x", 3, 4).unwrap();
        s.set_lora("x", "abc", true).unwrap();
        let t = BTreeMap::from([("total".to_string(), 12.5)]);
        let e = JobError {
            kind: JobErrorKind::Timeout,
            message: "too slow".into(),
        };
        s.finish("x", State::Failed, &t, Some(&e)).unwrap();
        let x = s.get("x").unwrap().unwrap();
        assert_eq!((x.step, x.steps), (3, 4));
        assert_eq!(x.timings, t);
        assert_eq!(x.error, Some(e));
        assert_eq!(
            (x.lora_id.as_deref(), x.lora_cached),
            (Some("abc"), Some(true))
        );
        assert_eq!(s.counts().unwrap()["failed"], 1);
    }

    /// A stored LoRA of `bytes` bytes, last used `age_s` seconds ago.
    fn stored(s: &Store, id: &str, bytes: usize, age_s: u64) {
        let path = s.lora_path(id);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(when).unwrap();
    }

    fn kept(s: &Store) -> Vec<String> {
        s.loras().unwrap().into_iter().map(|l| l.0).collect()
    }

    #[test]
    fn stored_loras_go_least_recently_used_first_but_never_one_a_job_names() {
        // Ids as the server makes them: 32 hex digits.
        let id = |c: char| c.to_string().repeat(32);
        let [a, b, c, d, e, big] = ['a', 'b', 'c', 'd', 'e', 'f'].map(id);
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        for (i, id) in [&a, &b, &c, &d, &e].into_iter().enumerate() {
            stored(&s, id, 100, 100 * (i as u64 + 1)); // a newest, e oldest
        }
        // Neither a file being written, nor what someone else put there, is a stored LoRA.
        let loras = dir.path().join("loras");
        std::fs::write(loras.join(".v2l-tmp.safetensors"), b"x").unwrap();
        std::fs::write(loras.join("style.safetensors"), b"x").unwrap();
        std::fs::create_dir(loras.join(format!("{}.safetensors", id('9')))).unwrap();
        assert_eq!(s.lora_usage(), (5, 500));
        assert!(s.use_lora(&d), "d is stored; now the most recently used");
        assert!(!s.use_lora(&id('0')));
        let unbounded = Retention::default();
        assert!(s.prune_loras(&unbounded).unwrap().is_empty());
        assert_eq!(
            kept(&s),
            [d.as_str(), a.as_str(), b.as_str(), c.as_str(), e.as_str()]
        );

        // A queued job names c (to run with), a running one e (to predict and store).
        let mut with_c = VideoParams::sample();
        with_c.lora = crate::params::LoraChoice::Stored {
            id: c.clone(),
            scale: 1.0,
        };
        s.insert(&JobRecord::queued("j1", JobParams::Video(with_c)))
            .unwrap();
        let predict_e = crate::params::LoraParams {
            id: e.clone(),
            weight: 1.0,
        };
        s.insert(&JobRecord::queued("j2", JobParams::Lora(predict_e)))
            .unwrap();
        s.start("j2").unwrap();
        let two = Retention {
            loras: Some(2),
            ..Retention::default()
        };
        assert_eq!(s.prune_loras(&two).unwrap(), [b.as_str()]);
        assert_eq!(kept(&s), [d.as_str(), a.as_str(), c.as_str(), e.as_str()]);
        assert_eq!(s.delete_lora(&c).unwrap(), LoraDeleted::InUse);

        // Once the jobs end, what they named goes like any other.
        s.finish("j2", State::Succeeded, &BTreeMap::new(), None)
            .unwrap();
        assert!(s.cancel_queued("j1").unwrap());
        assert_eq!(s.prune_loras(&two).unwrap(), [c.as_str(), e.as_str()]);
        assert_eq!(kept(&s), [d.as_str(), a.as_str()]);

        // Bytes: 150 keeps one file of 100.
        let bytes = Retention {
            lora_bytes: Some(150),
            ..Retention::default()
        };
        assert_eq!(s.prune_loras(&bytes).unwrap(), [a.as_str()]);
        // A request holding one (from naming it until its job is queued) keeps it from both.
        let pin = s.pin_lora(&d).unwrap();
        assert!(s.pin_lora(&id('0')).is_none());
        assert_eq!(s.delete_lora(&d).unwrap(), LoraDeleted::InUse);
        let none = Retention {
            loras: Some(0),
            ..bytes
        };
        assert!(s.prune_loras(&none).unwrap().is_empty());
        drop(pin);
        assert_eq!(s.delete_lora(&d).unwrap(), LoraDeleted::Deleted);
        assert_eq!(s.delete_lora(&d).unwrap(), LoraDeleted::Unknown);
        // One larger than the bound, held while its request queues its job.
        let pin = s.pin_new_lora(&big);
        stored(&s, &big, 400, 0);
        assert!(s.prune_loras(&bytes).unwrap().is_empty());
        drop(pin);
        assert_eq!(s.prune_loras(&bytes).unwrap(), [big.as_str()]);
        assert!(kept(&s).is_empty());
        assert_eq!(s.lora_usage(), (0, 0));
        for other in [".v2l-tmp", "style", &id('9')] {
            assert!(loras.join(format!("{other}.safetensors")).exists());
        }
        // A directory with a LoRA's name is not a stored LoRA.
        assert!(!s.use_lora(&id('9')));
    }

    /// Strictly by use: a newer LoRA too large for the bytes left takes every older one with
    /// it, a small one that would fit included. And a use is stamped after the latest one
    /// even when the clock is behind it (a file stamped a day ahead, as a host that booted
    /// fast leaves them).
    #[test]
    fn stored_loras_are_pruned_strictly_by_use_and_stamped_in_order() {
        let id = |c: char| c.to_string().repeat(32);
        let [a, b, c] = ['a', 'b', 'c'].map(id);
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        stored(&s, &a, 100, 30); // newest
        stored(&s, &b, 300, 60);
        stored(&s, &c, 10, 90); // oldest, small
        let bytes = Retention {
            lora_bytes: Some(150),
            ..Retention::default()
        };
        assert_eq!(s.prune_loras(&bytes).unwrap(), [b.as_str(), c.as_str()]);
        assert_eq!(kept(&s), [a.as_str()]);

        let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(86_400);
        stored(&s, &b, 10, 0);
        std::fs::File::options()
            .write(true)
            .open(s.lora_path(&b))
            .unwrap()
            .set_modified(ahead)
            .unwrap();
        assert!(s.use_lora(&a));
        assert_eq!(
            kept(&s),
            [a.as_str(), b.as_str()],
            "a, used last, comes first"
        );
    }
}
