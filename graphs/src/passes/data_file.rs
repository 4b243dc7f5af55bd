//! The external-data file a pass writes its new weights to (int8, int4, fp16/bf16): tensors
//! appended 64-byte aligned under a temporary name, renamed into place by [`DataFile::finish`],
//! so an interrupted compile leaves no half-written weight file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::edit::PassError;
use crate::dtype::DType;
use crate::proto;

pub(super) struct DataFile {
    path: PathBuf,
    /// The file name the tensor entries refer to (relative, as the ONNX spec says).
    name: String,
    tmp: v2l_contracts::atomic::Partial,
    file: std::io::BufWriter<std::fs::File>,
    offset: u64,
    tensors: Vec<proto::TensorProto>,
}

impl DataFile {
    pub(super) fn create(path: &Path) -> Result<DataFile, PassError> {
        let io = |e| PassError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let tmp = v2l_contracts::atomic::temp_sibling(path, ".tmp").map_err(io)?;
        let file = std::io::BufWriter::with_capacity(8 << 20, tmp.reopen().map_err(io)?);
        Ok(DataFile {
            path: path.to_path_buf(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            tmp,
            file,
            offset: 0,
            tensors: Vec::new(),
        })
    }

    /// Appends one tensor and records its entry.
    pub(super) fn append(
        &mut self,
        name: String,
        dtype: DType,
        dims: Vec<i64>,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let pad = (64 - self.offset % 64) % 64;
        self.file.write_all(&vec![0u8; pad as usize])?;
        self.offset += pad;
        self.file.write_all(bytes)?;
        let entry = |k: &str, v: String| proto::StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        self.tensors.push(proto::TensorProto {
            name,
            dims,
            data_type: dtype.onnx_code(),
            data_location: proto::data_location::EXTERNAL,
            external_data: vec![
                entry("location", self.name.clone()),
                entry("offset", self.offset.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            ..Default::default()
        });
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Flushes and renames the file into place; returns the entries of the tensors written.
    pub(super) fn finish(self) -> Result<Vec<proto::TensorProto>, PassError> {
        let path = self.path;
        let io = |e| PassError::Io {
            path: path.clone(),
            source: e,
        };
        let mut file = self.file;
        file.flush().map_err(io)?;
        drop(file);
        self.tmp.persist(&path).map_err(io)?;
        Ok(self.tensors)
    }
}
