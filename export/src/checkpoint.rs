//! Reading checkpoints: diffusers model directories and plain safetensors files.
//!
//! Files are memory-mapped and tensors are handed to the graph builder as references into the
//! maps ([`TensorData::Shared`]), so exporting a 22 GB model never holds a second copy of it.
//! Every key read is recorded, so an exporter can report the checkpoint tensors it did not use.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::de::DeserializeOwned;
use v2l_graphs::{DType, TensorData};

use crate::error::{ExportError, Result};

/// A tensor found in a checkpoint, not yet copied.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl TensorRef {
    /// Reads the tensor as f32 (a copy; for small tensors such as buffers and tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        // `open` only admits float dtypes, so conversion cannot fail.
        let _ = v2l_graphs::dtype::convert_floats(
            self.data.stored_bytes(),
            self.dtype,
            DType::F32,
            &mut out,
        );
        v2l_graphs::dtype::f32_values(&out, DType::F32).unwrap_or_default()
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One or more safetensors files seen as a single key space, plus an optional `config.json`.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    config: Option<(PathBuf, serde_json::Value)>,
    used: RefCell<BTreeSet<String>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    /// Opens a diffusers or transformers model directory: `config.json` and either a single
    /// weights file (`diffusion_pytorch_model.safetensors`, transformers' `model.safetensors`)
    /// or a sharded set listed in its `.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            v2l_contracts::input::read_text(&config_path, v2l_contracts::input::InputKind::Record)
                .map_err(io(&config_path))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ExportError::Config {
                path: config_path.clone(),
                message: e.to_string(),
            })?;
        let stems = ["diffusion_pytorch_model", "model"];
        let index = stems
            .iter()
            .map(|s| dir.join(format!("{s}.safetensors.index.json")))
            .find(|p| p.exists());
        let files: Vec<PathBuf> = if let Some(index) = index {
            let text =
                v2l_contracts::input::read_text(&index, v2l_contracts::input::InputKind::Record)
                    .map_err(io(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ExportError::Config {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ExportError::Config {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = stems
                .iter()
                .map(|s| dir.join(format!("{s}.safetensors")))
                .find(|p| p.exists())
                .ok_or_else(|| ExportError::Io {
                    path: dir.join("diffusion_pytorch_model.safetensors"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no weights file (nor a sharded index; transformers' model.safetensors is read too)",
                    ),
                })?;
            vec![single]
        };
        let mut ck = Self::open_files(dir, &files)?;
        ck.config = Some((config_path, config));
        Ok(ck)
    }

    /// The directory's `config.json`, as parsed (no class check).
    pub fn raw_config(&self) -> Result<&serde_json::Value> {
        self.config
            .as_ref()
            .map(|(_, v)| v)
            .ok_or_else(|| ExportError::Config {
                path: self.dir.join("config.json"),
                message: "no config.json".into(),
            })
    }

    /// Opens a single safetensors file (hypernetwork, LiLoRA, LoRA files).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(
            path.parent().unwrap_or(Path::new(".")),
            &[path.to_path_buf()],
        )
    }

    fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(io(path))?;
            // SAFETY: the map is read-only; a checkpoint modified while v2l reads it is the
            // caller's race, as with any memory-mapped reader (safetensors, PyTorch).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(path))?;
            let bad = |message: String| ExportError::Safetensors {
                path: path.clone(),
                message,
            };
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| bad(safetensors_problem(&e)))?;
            let (header_len, _) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| bad(safetensors_problem(&e)))?;
            let base = 8 + header_len;
            for (key, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F64 => DType::F64,
                    safetensors::Dtype::I64 => DType::I64,
                    other => {
                        return Err(ExportError::DType {
                            path: path.clone(),
                            key,
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                let data = view.data();
                let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
                debug_assert!(start >= base);
                entries.insert(
                    key,
                    Entry {
                        file: i,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
            files.push((path.clone(), Arc::new(mmap)));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
            config: None,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// Each file with the keys it holds (sorted), in opening order.
    pub fn files(&self) -> Vec<(PathBuf, Vec<String>)> {
        let mut out: Vec<(PathBuf, Vec<String>)> = self
            .files
            .iter()
            .map(|(p, _)| (p.clone(), Vec::new()))
            .collect();
        for (k, e) in &self.entries {
            if let Some((_, keys)) = out.get_mut(e.file) {
                keys.push(k.clone());
            }
        }
        for (_, keys) in &mut out {
            keys.sort();
        }
        out
    }

    /// The directory (or the file's parent) the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a key lives in, or the first file for a missing key (for error messages).
    pub fn path_of(&self, key: &str) -> &Path {
        let i = self.entries.get(key).map(|e| e.file).unwrap_or(0);
        self.files
            .get(i)
            .map(|(p, _)| p.as_path())
            .unwrap_or(&self.dir)
    }

    /// Deserialises `config.json` after checking its `_class_name`.
    pub fn config<T: DeserializeOwned>(&self, expected_class: &str) -> Result<T> {
        let (path, value) = self.config.as_ref().ok_or_else(|| ExportError::Config {
            path: self.dir.join("config.json"),
            message: "no config.json".into(),
        })?;
        let class = value
            .get("_class_name")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        if class != expected_class {
            return Err(ExportError::UnknownClass {
                path: path.clone(),
                found: class.to_string(),
                expected: expected_class.to_string(),
            });
        }
        serde_json::from_value(value.clone()).map_err(|e| ExportError::Config {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        k.sort_unstable();
        k
    }

    /// Looks up `key` without checking its shape.
    /// Every tensor's name and shape, sorted by name (for checking a layout function).
    pub fn layout(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = self
            .keys()
            .into_iter()
            .filter_map(|k| self.get(k).ok().map(|t| (k.to_string(), t.shape)))
            .collect();
        v.sort();
        v
    }

    pub fn get(&self, key: &str) -> Result<TensorRef> {
        let e = self
            .entries
            .get(key)
            .ok_or_else(|| ExportError::MissingKey {
                path: self.path_of(key).to_path_buf(),
                key: key.to_string(),
            })?;
        self.used.borrow_mut().insert(key.to_string());
        let buffer: Arc<dyn AsRef<[u8]> + Send + Sync> = self
            .files
            .get(e.file)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| ExportError::MissingKey {
                path: self.dir.clone(),
                key: key.to_string(),
            })?;
        Ok(TensorRef {
            key: key.to_string(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: TensorData::Shared {
                buffer,
                start: e.start,
                end: e.end,
                stored: e.dtype,
            },
        })
    }

    /// Looks up a float tensor whose shape must be `expected`.
    pub fn tensor(&self, key: &str, expected: &[usize]) -> Result<TensorRef> {
        let t = self.get(key)?;
        if t.shape != expected {
            return Err(ExportError::Shape {
                path: self.path_of(key).to_path_buf(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        if !t.dtype.is_float() {
            return Err(ExportError::DType {
                path: self.path_of(key).to_path_buf(),
                key: key.into(),
                dtype: t.dtype.to_string(),
            });
        }
        Ok(t)
    }

    /// Keys that no exporter asked for, sorted (reported so a silently ignored weight shows).
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.keys()
            .into_iter()
            .filter(|k| !used.contains(*k))
            .map(String::from)
            .collect()
    }
}

pub use v2l_contracts::safetensors_problem;

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| t.2.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                (
                    t.0.to_string(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.1.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    #[test]
    fn sharded_directory_reads_all_shards_and_reports_unused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"_class_name": "X", "n": 2}"#,
        )
        .unwrap();
        write_st(
            &d.path().join("a.safetensors"),
            &[("w1", vec![2], vec![1.0, 2.0])],
        );
        write_st(
            &d.path().join("b.safetensors"),
            &[("w2", vec![1], vec![3.0]), ("extra", vec![1], vec![0.0])],
        );
        std::fs::write(
            d.path().join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map": {"w1": "a.safetensors", "w2": "b.safetensors", "extra": "b.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open_dir(d.path()).unwrap();
        assert_eq!(ck.tensor("w1", &[2]).unwrap().to_f32(), vec![1.0, 2.0]);
        assert_eq!(ck.tensor("w2", &[1]).unwrap().to_f32(), vec![3.0]);
        assert_eq!(ck.unused_keys(), vec!["extra".to_string()]);
        let err = ck.tensor("w1", &[3]).unwrap_err().to_string();
        assert!(
            err.contains("a.safetensors") && err.contains("`w1`") && err.contains("[3]"),
            "{err}"
        );
        let err = ck.get("nope").unwrap_err().to_string();
        assert!(err.contains("missing tensor `nope`"), "{err}");
        let err = ck.config::<serde_json::Value>("Y").unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("`X`"), "{err}");
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        write_st(&p, &[("w", vec![4], vec![1.0; 4])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let err = Checkpoint::open_file(&p).err().unwrap().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }
}
