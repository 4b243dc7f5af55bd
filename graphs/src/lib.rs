//! `v2l-graphs`: ONNX model IO and a small typed graph builder.
//!
//! The bottom layer of v2l. `export` builds architectures with [`Graph`], this crate writes
//! them with [`save`]; `runtime` reads the written models back with [`read_model`]. Nothing here
//! knows about any particular model.

// Checkpoints and graphs come from users: no unwrap, expect or unchecked indexing outside
// tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod builder;
pub mod check;
pub mod dtype;
pub mod passes;
pub mod placement;
pub mod proto;
pub mod quant;
pub mod split;
pub mod write;

pub use builder::{Attr, Dim, Graph, Initializer, IoSpec, TensorData, Value, OPSET};
pub use dtype::DType;
pub use write::{
    external_data_files, for_each_initializer, locate_initializers, read_initializers, read_model,
    save, write_model, ExternalData, InitializerData, InitializerInfo, WriteError, Written,
};

/// `g` saved to a temporary file and read back as the model passes rewrite (unit tests).
#[cfg(test)]
pub(crate) fn saved_model(g: &Graph) -> proto::ModelProto {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.onnx");
    save(g, &p, ExternalData::Auto).unwrap();
    read_model(&p).unwrap()
}
