//! The exported CogVideoX VAE, driven through diffusers' frame batching with the causal-conv
//! cache, computes what diffusers computes (fixture `vae_io`: 17 frames = encoder batches of
//! 9 + 8 frames, 5 latent frames = decoder batches of 3 + 2).

use v2l_export::{cogvideox_vae, Checkpoint, Manifest};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::stage::ExportDir;
use v2l_runtime::vae::Vae;
use v2l_runtime::SessionOptions;
use v2l_tests::*;

fn export_tiny_vae(dir: &std::path::Path) -> Vae {
    let ck = Checkpoint::open_dir(&tiny().join("vae")).unwrap();
    let ex = cogvideox_vae::export(&ck).unwrap();
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    save(&ex.encoder, &dir.join("e.onnx"), ExternalData::Auto).unwrap();
    save(&ex.decoder, &dir.join("d.onnx"), ExternalData::Auto).unwrap();
    let raw: serde_json::Value = ck.config(cogvideox_vae::CLASS_NAME).unwrap();
    let manifest = Manifest {
        format_version: v2l_export::manifest::FORMAT_VERSION,
        vae: Some(ex.manifest_entry("e.onnx", "d.onnx", raw)),
        ..Default::default()
    };
    manifest.write(dir).unwrap();
    Vae::load(&ExportDir::open(dir).unwrap(), &SessionOptions::default()).unwrap()
}

#[test]
fn vae_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_tiny_vae(dir.path());
    let io = load("vae_io.safetensors");
    let (mean, logvar) = vae.encode(&io["video"]).unwrap();
    assert_close("posterior_mean", &mean, &io["posterior_mean"], F32_REL_L2);
    assert_close(
        "posterior_logvar",
        &logvar,
        &io["posterior_logvar"],
        F32_REL_L2,
    );
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_close("decoded", &decoded, &io["decoded"], F32_REL_L2);
}

#[test]
fn vae_rejects_a_clip_with_no_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_tiny_vae(dir.path());
    let err = vae
        .encode(&v2l_runtime::Tensor::zeros(vec![1, 3, 0, 64, 64]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`video`") && err.contains("frames > 0"),
        "{err}"
    );
}

/// Another batch size, frame count (odd, three encoder batches) and aspect ratio.
#[test]
fn vae_runs_at_other_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_tiny_vae(dir.path());
    let video = v2l_runtime::Tensor::f32(vec![2, 3, 25, 32, 48], noise(2 * 3 * 25 * 32 * 48, 5));
    let (mean, logvar) = vae.encode(&video).unwrap();
    assert_eq!(mean.shape, vec![2, 16, 7, 4, 6]);
    assert_finite("mean", &mean);
    assert_finite("logvar", &logvar);
    let decoded = vae.decode(&mean).unwrap();
    assert_eq!(decoded.shape, vec![2, 3, 25, 32, 48]);
    assert_finite("decoded", &decoded);
}
