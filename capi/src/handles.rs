//! The three opaque handle kinds and the registry of live handles: a NULL, freed, foreign or
//! wrong-kind handle is refused without being dereferenced.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::types::V2lStatus;
use v2l_runtime::engine::Engine;
use v2l_runtime::lora::format::Lora;
use v2l_runtime::pipeline::Pipeline;
use v2l_runtime::SessionOptions;

/// An opened engine: immutable, shareable between threads.
pub struct V2lEngine {
    pub(crate) dir: Engine,
    pub(crate) opts: SessionOptions,
}

/// A loaded pipeline (its own ONNX Runtime sessions) and its applied LoRA. One call at a time;
/// `v2l_generator_cancel` from any thread.
pub struct V2lGenerator {
    pub(crate) pipeline: Mutex<Pipeline>,
    /// The tokenizer and text encoder, loaded on the first request with prompt text.
    pub(crate) prompts: Mutex<v2l_runtime::pipeline::PromptEncoders>,
    pub(crate) opts: SessionOptions,
    pub(crate) cancel: AtomicBool,
    /// Set by `v2l_generator_free`: a generation still running on another thread stops.
    pub(crate) freed: AtomicBool,
    /// Stops the ONNX Runtime call a generation is in, for a cancel or a free from another
    /// thread (no thread of v2l's own watches: a C caller's threads stay plain).
    pub(crate) interrupt: v2l_runtime::session::Interrupt,
    pub(crate) text_embed_dim: usize,
    /// The engine (plain data): the noise layout and what a request must carry.
    pub(crate) engine: Engine,
    /// The VAE's loop contract (how many frames a decode returns).
    pub(crate) vae: v2l_contracts::manifest::VaeEntry,
}

/// A LoRA: immutable, shareable between threads and generators.
pub struct V2lLora {
    /// Shared with every generator it is applied to: no copy per switch, and one identity, by
    /// which a generator finds the factor inputs it kept for it.
    pub(crate) lora: Arc<Lora>,
    pub(crate) source: PathBuf,
}

pub(crate) enum Entry {
    Engine(Arc<V2lEngine>),
    Generator(Arc<V2lGenerator>),
    Lora(Arc<V2lLora>),
}

impl Entry {
    fn kind(&self) -> &'static str {
        match self {
            Entry::Engine(_) => "an engine",
            Entry::Generator(_) => "a generator",
            Entry::Lora(_) => "a LoRA",
        }
    }
}

/// Live handles by address. The registry owns one reference of each; calls clone it for their
/// duration, so freeing a handle another thread is using releases it when that call returns.
static HANDLES: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());

fn handles() -> MutexGuard<'static, BTreeMap<usize, Entry>> {
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) trait Handle: Sized {
    /// "an engine", "a generator", "a LoRA".
    const KIND: &'static str;
    fn wrap(a: Arc<Self>) -> Entry;
    fn get(e: &Entry) -> Option<&Arc<Self>>;
}

impl Handle for V2lEngine {
    const KIND: &'static str = "an engine";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Engine(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Engine(a) => Some(a),
            _ => None,
        }
    }
}

impl Handle for V2lGenerator {
    const KIND: &'static str = "a generator";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Generator(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Generator(a) => Some(a),
            _ => None,
        }
    }
}

impl Handle for V2lLora {
    const KIND: &'static str = "a LoRA";
    fn wrap(a: Arc<Self>) -> Entry {
        Entry::Lora(a)
    }
    fn get(e: &Entry) -> Option<&Arc<Self>> {
        match e {
            Entry::Lora(a) => Some(a),
            _ => None,
        }
    }
}

pub(crate) fn register<T: Handle>(v: T) -> *mut T {
    let a = Arc::new(v);
    let p = Arc::as_ptr(&a) as *mut T;
    handles().insert(p as usize, T::wrap(a));
    p
}

fn not_live<T: Handle>(arg: &str) -> Error {
    Error::new(
        V2lStatus::InvalidHandle,
        format!(
            "`{arg}` is not a live handle of {} (already freed, or not made by v2l)",
            T::KIND
        ),
    )
}

fn wrong_kind<T: Handle>(arg: &str, e: &Entry) -> Error {
    Error::new(
        V2lStatus::InvalidHandle,
        format!("`{arg}` is the handle of {}, not of {}", e.kind(), T::KIND),
    )
}

pub(crate) fn lookup<T: Handle>(p: *const T, arg: &str) -> Result<Arc<T>> {
    if p.is_null() {
        return Err(Error::new(
            V2lStatus::InvalidHandle,
            format!("`{arg}` is NULL"),
        ));
    }
    let h = handles();
    let e = h.get(&(p as usize)).ok_or_else(|| not_live::<T>(arg))?;
    T::get(e).cloned().ok_or_else(|| wrong_kind::<T>(arg, e))
}

/// Removes a handle from the registry (NULL: nothing to do) and returns the registry's
/// reference, to be dropped outside the registry lock.
pub(crate) fn unregister<T: Handle>(p: *mut T, arg: &str) -> Result<Option<Arc<T>>> {
    if p.is_null() {
        return Ok(None);
    }
    let mut h = handles();
    let key = p as usize;
    let e = h.get(&key).ok_or_else(|| not_live::<T>(arg))?;
    if T::get(e).is_none() {
        return Err(wrong_kind::<T>(arg, e));
    }
    let removed = h.remove(&key).and_then(|e| T::get(&e).cloned());
    if h.is_empty() {
        // Free the map's last node too: no v2l memory outlives the last handle.
        drop(std::mem::take(&mut *h));
    }
    Ok(removed)
}
