//! Builds the CogVideoX VAE encoder/decoder graphs from the tiny fixture and checks their
//! interface (no ONNX Runtime here: numeric parity lives with the runtime's loop).

use std::path::{Path, PathBuf};

use v2l_export::cogvideox_vae::{self, CacheSpec, SpatialScale};
use v2l_export::{Checkpoint, ExportError};
use v2l_graphs::{Dim, ExternalData};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-tiny/vae")
}

fn names(specs: &[CacheSpec]) -> Vec<String> {
    specs.iter().map(|c| c.module().to_string()).collect()
}

#[test]
fn tiny_vae_graphs_have_the_cache_contract() {
    let ck = Checkpoint::open_dir(&fixture()).expect("fixture");
    let vae = cogvideox_vae::export(&ck).expect("export");
    assert!(vae.unused_keys.is_empty(), "unused: {:?}", vae.unused_keys);

    // Encoder: conv_in, 4 down blocks × 1 resnet × 2, mid 2 × 2, conv_out.
    let mut want = vec!["encoder.conv_in".to_string()];
    for i in 0..4 {
        want.push(format!("encoder.down_blocks.{i}.resnets.0.conv1"));
        want.push(format!("encoder.down_blocks.{i}.resnets.0.conv2"));
    }
    for j in 0..2 {
        want.push(format!("encoder.mid_block.resnets.{j}.conv1"));
        want.push(format!("encoder.mid_block.resnets.{j}.conv2"));
    }
    want.push("encoder.conv_out".into());
    assert_eq!(names(&vae.encoder_caches), want);
    let shapes: Vec<[usize; 5]> = vae
        .encoder_caches
        .iter()
        .map(|c| c.shape(1, 64, 64))
        .collect();
    assert_eq!(shapes[0], [1, 3, 2, 64, 64]);
    assert_eq!(shapes[3], [1, 8, 2, 32, 32]); // down_blocks.1 conv1
    assert_eq!(shapes[5], [1, 8, 2, 16, 16]); // down_blocks.2 conv1 (8 -> 16)
    assert_eq!(shapes[6], [1, 16, 2, 16, 16]);
    assert_eq!(shapes[13], [1, 16, 2, 8, 8]); // conv_out

    // Decoder: conv_in, mid 2 × 2, 4 up blocks × 2 resnets × 2, conv_out.
    assert_eq!(vae.decoder_caches.len(), 22);
    let d = &vae.decoder_caches;
    assert_eq!(d[0].module(), "decoder.conv_in");
    assert_eq!(d[5].module(), "decoder.up_blocks.0.resnets.0.conv1");
    assert_eq!(d[9].spatial_divisor, SpatialScale { num: 2, den: 1 }); // up_blocks.1
    assert_eq!(d[13].shape(1, 8, 8), [1, 16, 2, 32, 32]); // up_blocks.2.resnets.0.conv1
    assert_eq!(d[14].shape(1, 8, 8), [1, 8, 2, 32, 32]);
    assert_eq!(d[21].module(), "decoder.conv_out");
    assert_eq!(d[21].shape(1, 8, 8), [1, 8, 2, 64, 64]);

    // Every cache is an input named `cache_in.*` and an output named `cache_out.*`.
    for (g, caches, main, out) in [
        (
            &vae.encoder,
            &vae.encoder_caches,
            "video",
            vec!["posterior_mean", "posterior_logvar"],
        ),
        (&vae.decoder, &vae.decoder_caches, "latents", vec!["sample"]),
    ] {
        let ins: Vec<&str> = g.inputs().iter().map(|i| i.name.as_str()).collect();
        let outs: Vec<&str> = g.outputs().iter().map(|o| o.name.as_str()).collect();
        assert_eq!(ins[..2], [main, "first_batch"]);
        assert_eq!(ins.len(), 2 + caches.len());
        assert_eq!(outs[..out.len()], out[..]);
        for (k, c) in caches.iter().enumerate() {
            assert_eq!(ins[2 + k], c.name);
            assert_eq!(outs[out.len() + k], c.output_name());
        }
        assert_eq!(g.inputs()[1].dims, vec![Dim::Fixed(1)]);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    for (g, name) in [(&vae.encoder, "enc.onnx"), (&vae.decoder, "dec.onnx")] {
        let p = dir.path().join(name);
        v2l_graphs::save(g, &p, ExternalData::Never).expect("save");
        assert!(std::fs::metadata(&p).expect("written").len() > 100_000);
    }
}

#[test]
fn quant_conv_is_reported_unsupported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(fixture().join("config.json")).expect("config");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["use_quant_conv"] = true.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    std::fs::copy(
        fixture().join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let ck = Checkpoint::open_dir(dir.path()).expect("open");
    match cogvideox_vae::export(&ck) {
        Err(ExportError::Unsupported { what, .. }) => {
            assert!(what.contains("use_quant_conv"), "{what}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("quant_conv accepted"),
    }
}
