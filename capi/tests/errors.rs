//! One classification of faults behind both front ends: every runtime error's kind, the exit
//! code a `v2l-*` command gives for it and the C status `libv2l` returns, as one snapshot. A
//! change to either mapping shows up here as a reviewed diff.

use std::path::Path;

use v2l::testing::status_of;
use v2l_runtime::lora::fuse::FuseError;
use v2l_runtime::RuntimeError;

#[test]
fn one_mapping_to_exit_codes_and_c_statuses() {
    let limits = v2l_runtime::limits::Limits::default();
    let errors: Vec<RuntimeError> = vec![
        limits.check_video(48, 64, 64, 16).unwrap_err().into(),
        v2l_runtime::request::finite(v2l_runtime::request::Field::Guidance, f32::NAN)
            .unwrap_err()
            .into(),
        v2l_runtime::read_safetensors(Path::new("/nonexistent/x.safetensors")).unwrap_err(),
        v2l_runtime::tensor::parse_safetensors(
            b"not a safetensors file",
            Path::new("x.safetensors"),
        )
        .unwrap_err(),
        RuntimeError::Manifest(v2l_contracts::ManifestError::Io {
            path: "export/manifest.json".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
        }),
        RuntimeError::MissingTensor {
            path: "in.safetensors".into(),
            name: "timestep".into(),
        },
        v2l_runtime::lora::format::parse(b"junk", Path::new("l.safetensors"), None)
            .unwrap_err()
            .into(),
        RuntimeError::Fuse {
            what: "l.safetensors".into(),
            source: FuseError::NonFinite {
                name: "transformer_blocks.0.attn1.to_q".into(),
                index: 3,
                value: f32::NAN,
            },
        },
        RuntimeError::OrtMissing {
            searched: ".v2l/onnxruntime".into(),
        },
        RuntimeError::Ort {
            context: "dit.onnx".into(),
            message: "bad shape".into(),
        },
        RuntimeError::Engine {
            dir: "engine".into(),
            message: "holds no DiT".into(),
        },
        RuntimeError::MissingOutput {
            graph: "DiT".into(),
            output: "sample".into(),
        },
        RuntimeError::LoraLayer {
            layer: "transformer_blocks.0.attn1.to_q".into(),
            message: "the fused weight is not finite".into(),
        },
        RuntimeError::Internal {
            what: "scheduler".into(),
            message: "set_timesteps was not called".into(),
        },
        RuntimeError::Cancelled,
    ];
    let table: Vec<String> = errors
        .iter()
        .map(|e| {
            format!(
                "{:?} | exit {} | {:?} | {e}",
                e.kind(),
                e.kind().exit_code(),
                status_of(e)
            )
        })
        .collect();
    insta::assert_snapshot!(table.join("\n"));
}
