//! The LoRA cache: predicted and uploaded LoRAs kept in memory, least recently used first out,
//! bounded in bytes.
//!
//! Users send the same reference clips and effects again and again; the video differs every
//! time (first frame, prompt, seed) but the LoRA does not, so the LoRA is what is cached. A
//! hit skips the VAE encode of the clip and the hypernetwork. Keys are content hashes
//! ([`lora_key`]), so the same clip under another name is a hit and another engine's LoRA never
//! is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use v2l_runtime::lora::format::Lora;

/// The cache key (and `lora_id`) of a LoRA: a hash of the engine, what the LoRA comes from and
/// every setting the prediction depends on. 32 hex digits.
pub fn lora_key(engine: &str, source: &str, settings: &str, bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    for part in [engine.as_bytes(), source.as_bytes(), settings.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(bytes);
    h.finalize().to_hex()[..32].to_string()
}

/// Bytes a LoRA holds (its factors).
pub fn lora_bytes(lora: &Lora) -> u64 {
    lora.layers
        .iter()
        .map(|l| (l.a.bytes.len() + l.b.bytes.len()) as u64)
        .sum()
}

struct Entry {
    lora: Arc<Lora>,
    bytes: u64,
    used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    bytes: u64,
    clock: u64,
}

/// An LRU cache of LoRAs bounded in bytes.
pub struct LoraCache {
    capacity: u64,
    inner: Mutex<Inner>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl LoraCache {
    pub fn new(capacity_bytes: u64) -> LoraCache {
        LoraCache {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent under a panic (each update is one statement); keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The LoRA under `key`, counted as a hit or a miss.
    pub fn get(&self, key: &str) -> Option<Arc<Lora>> {
        let mut inner = self.inner();
        inner.clock += 1;
        let clock = inner.clock;
        let found = inner.map.get_mut(key).map(|e| {
            e.used = clock;
            e.lora.clone()
        });
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `lora` under `key`, evicting the least recently used until it fits. A LoRA larger
    /// than the whole cache is not kept.
    pub fn insert(&self, key: &str, lora: Arc<Lora>) {
        let bytes = lora_bytes(&lora);
        if bytes > self.capacity {
            return;
        }
        let mut inner = self.inner();
        inner.clock += 1;
        let used = inner.clock;
        if let Some(old) = inner
            .map
            .insert(key.to_string(), Entry { lora, bytes, used })
        {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        while inner.bytes > self.capacity {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = inner.map.remove(&oldest) {
                inner.bytes -= e.bytes;
            }
        }
    }

    /// Forgets `key` (its stored file was deleted: the id is gone).
    pub fn remove(&self, key: &str) {
        let mut inner = self.inner();
        if let Some(e) = inner.map.remove(key) {
            inner.bytes -= e.bytes;
        }
    }

    /// `(entries, bytes)` held.
    pub fn usage(&self) -> (usize, u64) {
        let inner = self.inner();
        (inner.map.len(), inner.bytes)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use v2l_runtime::lora::format::{Factor, LoraFormat, LoraLayer};

    fn lora(n: usize) -> Arc<Lora> {
        Arc::new(Lora {
            format: LoraFormat::Diffusers,
            layers: vec![LoraLayer {
                module: "m".into(),
                a: Factor::from_f32([1, n], &vec![0.5; n]),
                b: Factor::from_f32([1, 1], &[1.0]),
                alpha: 1.0,
            }],
        })
    }

    #[test]
    fn evicts_the_least_recently_used_to_stay_within_its_bytes() {
        // Each LoRA is 4·n + 4 bytes: 44 for n = 10.
        let c = LoraCache::new(100);
        c.insert("a", lora(10));
        c.insert("b", lora(10));
        assert!(c.get("a").is_some()); // a is now more recent than b
        c.insert("c", lora(10)); // 132 > 100: b goes
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.usage(), (2, 88));
        assert_eq!(c.hits.load(Ordering::Relaxed), 3);
        assert_eq!(c.misses.load(Ordering::Relaxed), 1);
        c.insert("huge", lora(100)); // 404 bytes never fit
        assert!(c.get("huge").is_none());
        assert_eq!(c.usage(), (2, 88));
        c.insert("a", lora(10)); // replacing does not double count
        assert_eq!(c.usage(), (2, 88));
        c.remove("a");
        c.remove("never");
        assert!(c.get("a").is_none());
        assert_eq!(c.usage(), (1, 44));
    }

    #[test]
    fn keys_separate_engines_sources_and_settings() {
        let k = lora_key("e1", "reference", "weight=1", b"clip");
        assert_eq!(k.len(), 32);
        assert_eq!(k, lora_key("e1", "reference", "weight=1", b"clip"));
        for other in [
            lora_key("e2", "reference", "weight=1", b"clip"),
            lora_key("e1", "file", "weight=1", b"clip"),
            lora_key("e1", "reference", "weight=0.5", b"clip"),
            lora_key("e1", "reference", "weight=1", b"clip2"),
            // length-prefixed parts: moving a boundary changes the key
            lora_key("e1r", "eference", "weight=1", b"clip"),
        ] {
            assert_ne!(k, other);
        }
    }
}
