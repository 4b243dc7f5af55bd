//! Writing a [`Graph`] as an ONNX model file, with external data for large models.
//!
//! Protobuf messages are limited to 2 GiB, and CogVideoX-5B is 22 GB in f32, so weights go to
//! a side file (`<model>.onnx.data`, referenced by relative path as the ONNX external-data spec
//! says) once they exceed [`EXTERNAL_THRESHOLD`]. Tensors are streamed from their source buffers
//! one at a time, so writing never holds a second copy of the model in memory. Both files are
//! written under temporary names and renamed at the end: an interrupted export leaves no
//! half-written model behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use v2l_contracts::atomic::temp_sibling;

use crate::builder::{Dim, Graph, Initializer, IoSpec, TensorData, OPSET};
use crate::dtype::{convert_floats, DType};
use crate::proto;

/// Models whose weights exceed this many bytes are written with external data.
///
/// Not just protobuf's 2 GiB limit: ONNX Runtime builds a session from external data 3× faster
/// than from a big protobuf (a 600 MB CogVideoX-5B block: 0.53 s against 1.5–1.8 s), and the
/// bundle's DiT variants then share one weight file instead of carrying a copy each.
pub const EXTERNAL_THRESHOLD: u64 = 64 << 20;

/// Initializers smaller than this stay inside the protobuf even in external mode.
const INLINE_MAX: usize = 1024;

/// Why a graph could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initializer {name}: cannot convert {from} to {to}")]
    Convert {
        name: String,
        from: DType,
        to: DType,
    },
    #[error("initializer {name}: {got} bytes of data for {want} bytes of {dtype}{dims:?}")]
    Size {
        name: String,
        got: usize,
        want: usize,
        dtype: DType,
        dims: Vec<i64>,
    },
}

/// How weights are stored in the written model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// External data above [`EXTERNAL_THRESHOLD`], inline below.
    #[default]
    Auto,
    Always,
    Never,
}

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub model: PathBuf,
    pub data: Option<PathBuf>,
    pub weight_bytes: u64,
}

/// Writes `graph` to `path` (and `path` + `.data` in external mode).
pub fn save(graph: &Graph, path: &Path, mode: ExternalData) -> Result<Written, WriteError> {
    let weight_bytes: u64 = graph.initializers.iter().map(|i| i.byte_len() as u64).sum();
    let external = match mode {
        ExternalData::Auto => weight_bytes > EXTERNAL_THRESHOLD,
        ExternalData::Always => true,
        ExternalData::Never => false,
    };
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError::Io {
            path: p.clone(),
            source,
        }
    };

    let data_path = PathBuf::from(format!("{}.data", path.display()));
    let data_name = data_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Both files are temporary siblings until everything is written; dropped on any error.
    let tmp_model = temp_sibling(path, ".tmp").map_err(io_err(path))?;
    let tmp_data = if external {
        Some(temp_sibling(&data_path, ".tmp").map_err(io_err(&data_path))?)
    } else {
        None
    };

    {
        let mut initializers = Vec::with_capacity(graph.initializers.len());
        let mut data_file = match &tmp_data {
            Some(t) => Some(BufWriter::with_capacity(
                8 << 20,
                t.reopen().map_err(io_err(&data_path))?,
            )),
            None => None,
        };
        let mut offset: u64 = 0;
        let mut scratch = Vec::new();
        for init in &graph.initializers {
            scratch.clear();
            encode_data(init, &mut scratch)?;
            let mut t = proto::TensorProto {
                name: init.name.clone(),
                dims: init.dims.clone(),
                data_type: init.dtype.onnx_code(),
                ..Default::default()
            };
            match data_file.as_mut() {
                Some(f) if scratch.len() > INLINE_MAX => {
                    // Align each tensor to 64 bytes so a loader may map it directly.
                    let pad = (64 - offset % 64) % 64;
                    f.write_all(&vec![0u8; pad as usize])
                        .map_err(io_err(&data_path))?;
                    offset += pad;
                    f.write_all(&scratch).map_err(io_err(&data_path))?;
                    t.data_location = proto::data_location::EXTERNAL;
                    t.external_data = vec![
                        entry("location", &data_name),
                        entry("offset", &offset.to_string()),
                        entry("length", &scratch.len().to_string()),
                    ];
                    offset += scratch.len() as u64;
                }
                // Copy small tensors out of the reused buffer: taking it would hand its whole
                // (largest-tensor-sized) capacity to a 100-byte tensor.
                Some(_) => t.raw_data = scratch.clone(),
                None => t.raw_data = std::mem::take(&mut scratch),
            }
            initializers.push(t);
        }
        if let Some(mut f) = data_file {
            f.flush().map_err(io_err(&data_path))?;
            f.get_ref().sync_all().map_err(io_err(&data_path))?;
        }
        let model = to_model_proto(graph, initializers);
        let bytes = model.encode_to_vec();
        std::fs::write(tmp_model.path(), bytes).map_err(io_err(path))?;
    }
    match tmp_data {
        Some(t) => {
            t.persist(&data_path).map_err(io_err(&data_path))?;
        }
        None if data_path.exists() => {
            // A stale side file from an earlier external export would confuse readers.
            std::fs::remove_file(&data_path).map_err(io_err(&data_path))?;
        }
        None => {}
    }
    tmp_model.persist(path).map_err(io_err(path))?;
    Ok(Written {
        model: path.to_path_buf(),
        data: external.then_some(data_path.clone()),
        weight_bytes,
    })
}

fn entry(k: &str, v: &str) -> proto::StringStringEntryProto {
    proto::StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

/// Appends `init`'s bytes in its declared type to `out`.
fn encode_data(init: &Initializer, out: &mut Vec<u8>) -> Result<(), WriteError> {
    let want = init.byte_len();
    match &init.data {
        TensorData::Owned(b) => out.extend_from_slice(b),
        TensorData::Shared { stored, .. } => {
            let bytes = init.data.stored_bytes();
            convert_floats(bytes, *stored, init.dtype, out).ok_or_else(|| WriteError::Convert {
                name: init.name.clone(),
                from: *stored,
                to: init.dtype,
            })?;
        }
    }
    if out.len() != want {
        return Err(WriteError::Size {
            name: init.name.clone(),
            got: out.len(),
            want,
            dtype: init.dtype,
            dims: init.dims.clone(),
        });
    }
    Ok(())
}

fn value_info(io: &IoSpec) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value as D, Dimension};
    let dim = io
        .dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => D::DimValue(*v),
                Dim::Named(s) => D::DimParam(s.clone()),
            }),
        })
        .collect();
    proto::ValueInfoProto {
        name: io.name.clone(),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: io.dtype.onnx_code(),
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
        }),
        doc_string: String::new(),
    }
}

fn to_model_proto(graph: &Graph, initializer: Vec<proto::TensorProto>) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: 8,
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "v2l".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(proto::GraphProto {
            node: graph.nodes.clone(),
            name: graph.name.clone(),
            initializer,
            input: graph.inputs.iter().map(value_info).collect(),
            output: graph.outputs.iter().map(value_info).collect(),
            ..Default::default()
        }),
        metadata_props: graph.metadata.iter().map(|(k, v)| entry(k, v)).collect(),
        ..Default::default()
    }
}

/// Reads a model's protobuf (without resolving external data).
pub fn read_model(path: &Path) -> Result<proto::ModelProto, std::io::Error> {
    let bytes = std::fs::read(path)?;
    proto::ModelProto::decode(bytes.as_slice())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The external-data files a model's initializers point into (beside the model, as the
/// locations name them), each once, in order of first use.
pub fn external_data_files(path: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let model = read_model(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for t in model.graph.iter().flat_map(|g| &g.initializer) {
        let loc = t.external_data.iter().find(|e| e.key == "location");
        if let Some(loc) = loc.filter(|l| !Path::new(&l.value).is_absolute()) {
            let f = dir.join(&loc.value);
            if !files.contains(&f) {
                files.push(f);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_graph() -> Graph {
        let mut g = Graph::new("t");
        let x = g.input("x", DType::F32, vec!["n".into(), 2.into()]);
        let w = g.initializer(
            "layer.weight",
            DType::F32,
            vec![3, 2],
            TensorData::Owned((0..6).flat_map(|v| (v as f32).to_le_bytes()).collect()),
        );
        let y = g.linear(&x, &w, None, 3);
        g.output(&y, "y", DType::F32, vec!["n".into(), 3.into()]);
        g
    }

    #[test]
    fn inline_and_external_keep_names_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [ExternalData::Never, ExternalData::Always] {
            let p = dir.path().join(format!("{mode:?}.onnx"));
            let w = save(&tiny_graph(), &p, mode).unwrap();
            let m = read_model(&p).unwrap();
            let g = m.graph.unwrap();
            let t = g
                .initializer
                .iter()
                .find(|t| t.name == "layer.weight")
                .unwrap();
            assert_eq!(t.dims, vec![3, 2]);
            // 24 bytes is below INLINE_MAX, so even external mode keeps it inline.
            assert_eq!(t.raw_data.len(), 24);
            assert_eq!(w.data.is_some(), mode == ExternalData::Always);
            assert_eq!(g.output[0].name, "y");
        }
    }

    #[test]
    fn external_tensors_are_aligned_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Graph::new("big");
        let bytes: Vec<u8> = (0..4096u32)
            .flat_map(|v| (v as f32).to_le_bytes())
            .collect();
        g.initializer(
            "a",
            DType::F32,
            vec![4096],
            TensorData::Owned(bytes.clone()),
        );
        g.initializer(
            "b",
            DType::F32,
            vec![4096],
            TensorData::Owned(bytes.clone()),
        );
        let p = dir.path().join("m.onnx");
        let w = save(&g, &p, ExternalData::Always).unwrap();
        let data = std::fs::read(w.data.unwrap()).unwrap();
        let m = read_model(&p).unwrap();
        for t in &m.graph.unwrap().initializer {
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .unwrap()
                    .value
                    .parse::<usize>()
                    .unwrap()
            };
            let (off, len) = (get("offset"), get("length"));
            assert_eq!(off % 64, 0);
            assert_eq!(&data[off..off + len], &bytes[..]);
        }
        // No temporary files remain.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}

/// Reads the bytes of the named initializers of the model at `path` (inline or external data),
/// returning `(name, dtype, dims, bytes)` in the order asked. Missing names are reported by name.
pub fn read_initializers(
    path: &Path,
    names: &[String],
) -> Result<Vec<(String, DType, Vec<i64>, Vec<u8>)>, std::io::Error> {
    let mut out = Vec::with_capacity(names.len());
    for_each_initializer(path, names, &mut |name, dtype, dims, bytes| {
        out.push((name.to_string(), dtype, dims.to_vec(), bytes));
        Ok(())
    })?;
    Ok(out)
}

/// Where an initializer's bytes live.
#[derive(Clone, Debug, PartialEq)]
pub enum InitializerData {
    /// Inside the protobuf (copied out).
    Inline(Vec<u8>),
    /// In an external data file: a runtime can memory-map it instead of reading it.
    External {
        file: PathBuf,
        offset: u64,
        len: usize,
    },
}

/// One initializer of a written model: its type, shape and where its bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct InitializerInfo {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<i64>,
    pub data: InitializerData,
}

/// Finds the named initializers of the model at `path` without reading external data.
pub fn locate_initializers(
    path: &Path,
    names: &[String],
) -> Result<Vec<InitializerInfo>, std::io::Error> {
    let model = read_model(path)?;
    let graph = model.graph.unwrap_or_default();
    let by_name: std::collections::HashMap<&str, &proto::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let dir = path.parent().unwrap_or(Path::new("."));
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| invalid(format!("{}: no initializer `{name}`", path.display())))?;
        let dtype = DType::from_onnx_code(t.data_type)
            .ok_or_else(|| invalid(format!("`{name}`: unsupported data type {}", t.data_type)))?;
        let data = if t.data_location == proto::data_location::EXTERNAL {
            let get = |k: &str| {
                t.external_data
                    .iter()
                    .find(|e| e.key == k)
                    .map(|e| e.value.clone())
            };
            let loc = get("location")
                .ok_or_else(|| invalid(format!("`{name}`: external data without a location")))?;
            if Path::new(&loc).is_absolute() || loc.contains("..") {
                return Err(invalid(format!(
                    "`{name}`: external data location `{loc}` is outside the model's directory"
                )));
            }
            InitializerData::External {
                file: dir.join(&loc),
                offset: get("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
                len: get("length").and_then(|v| v.parse().ok()).unwrap_or(0),
            }
        } else if !t.raw_data.is_empty() {
            InitializerData::Inline(t.raw_data.clone())
        } else {
            InitializerData::Inline(t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        out.push(InitializerInfo {
            name: name.clone(),
            dtype,
            dims: t.dims.clone(),
            data,
        });
    }
    Ok(out)
}

/// Calls `f` with each named initializer in turn (name, dtype, dims, bytes), so a caller that
/// only hashes or converts weights holds one at a time, never the whole model.
pub fn for_each_initializer(
    path: &Path,
    names: &[String],
    f: &mut dyn FnMut(&str, DType, &[i64], Vec<u8>) -> Result<(), std::io::Error>,
) -> Result<(), std::io::Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files: std::collections::HashMap<PathBuf, File> = Default::default();
    for info in locate_initializers(path, names)? {
        let bytes = match info.data {
            InitializerData::Inline(b) => b,
            InitializerData::External { file, offset, len } => {
                let fh = match files.entry(file) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let opened = File::open(e.key())?;
                        e.insert(opened)
                    }
                };
                fh.seek(SeekFrom::Start(offset))?;
                let mut b = vec![0u8; len];
                fh.read_exact(&mut b)?;
                b
            }
        };
        f(&info.name, info.dtype, &info.dims, bytes)?;
    }
    Ok(())
}

/// Writes a model protobuf to `path` atomically (for passes over an existing model; tensors
/// keep their data location, so external data stays shared with the original).
pub fn write_model(path: &Path, model: &proto::ModelProto) -> Result<(), WriteError> {
    v2l_contracts::atomic::write_atomic(path, &model.encode_to_vec()).map_err(|source| {
        WriteError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
