//! The exported Wan2.1 VAE (`AutoencoderKLWan`), driven through diffusers' chunk loop (the first
//! frame alone, then 4 frames; one latent frame at a time) with its causal-conv caches, computes
//! what diffusers computes (fixture `wan-tiny/vae_io`, made by `tests/fixtures/gen/wan_vae.py`:
//! 9 frames = encoder chunks of 1 + 4 + 4, 4 latent frames decoded to 13).

use v2l_export::{vae, Checkpoint, Manifest};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::engine::Engine;
use v2l_runtime::vae::Vae;
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};
use v2l_tests::*;

/// The Wan issue's bound for a component in float32.
const REL_L2: f64 = 1e-5;

fn export_wan_vae(dir: &std::path::Path) -> Vae {
    let ck = Checkpoint::open_dir(&fixtures().join("wan-tiny/vae")).unwrap();
    let ex = vae::export(&ck).unwrap();
    assert_eq!(ex.class_name, "AutoencoderKLWan");
    assert!(ex.unused_keys.is_empty(), "unused: {:?}", ex.unused_keys);
    save(&ex.encoder, &dir.join("e.onnx"), ExternalData::Auto).unwrap();
    save(&ex.decoder, &dir.join("d.onnx"), ExternalData::Auto).unwrap();
    let manifest = Manifest {
        format_version: v2l_export::manifest::FORMAT_VERSION,
        vae: Some(ex.manifest_entry("e.onnx", "d.onnx")),
        ..Default::default()
    };
    manifest.write(dir).unwrap();
    Vae::load(&Engine::open(dir).unwrap(), &SessionOptions::default()).unwrap()
}

#[test]
fn wan_vae_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_wan_vae(dir.path());
    let io = read_safetensors(&fixtures().join("wan-tiny/vae_io.safetensors")).unwrap();
    let (mean, logvar) = vae.encode(&io["video"]).unwrap();
    assert_close("posterior_mean", &mean, &io["posterior_mean"], REL_L2);
    assert_close("posterior_logvar", &logvar, &io["posterior_logvar"], REL_L2);
    let sample = vae.decode(&io["latents"]).unwrap();
    assert_eq!(vae.entry.decoded_frames(4), 13);
    assert_close("sample", &sample, &io["sample"], REL_L2);
    let e = Engine::open(dir.path()).unwrap();
    let entry = e.manifest.vae.clone().unwrap();
    let graphs = e.vae_graphs(&entry);
    assert_first_batch_ignores_caches(dir.path(), &entry, &graphs, &io["video"], &io["latents"]);
}

/// Bound runs (what CUDA graphs need) give the frames of plain runs, bitwise, twice over:
/// Wan's first frame batch has the shapes of later ones but yields one frame where they yield
/// four, so a set of buffers is chosen by `first_batch`'s value as well as by shapes. So do
/// a GPU's sessions, the first frame batch in one and the rest in another.
#[test]
fn wan_vae_bound_runs_give_the_frames_of_plain_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut plain = export_wan_vae(dir.path());
    let e = Engine::open(dir.path()).unwrap();
    let opts = SessionOptions {
        bound_runs: true,
        carry_in_session_memory: true,
        ..Default::default()
    };
    let mut bound = Vae::load(&e, &opts).unwrap();
    let split = SessionOptions {
        first_batch_session: true,
        carry_in_session_memory: true,
        ..Default::default()
    };
    let mut split = Vae::load(&e, &split).unwrap();
    let io = read_safetensors(&fixtures().join("wan-tiny/vae_io.safetensors")).unwrap();
    let (m0, l0) = plain.encode(&io["video"]).unwrap();
    let d0 = plain.decode(&io["latents"]).unwrap();
    for round in 0..2 {
        let (m2, l2) = split.encode(&io["video"]).unwrap();
        assert!(m2 == m0 && l2 == l0, "split encode {round}");
        assert!(
            split.decode(&io["latents"]).unwrap() == d0,
            "split decode {round}"
        );
        let (m1, l1) = bound.encode(&io["video"]).unwrap();
        assert!(m1 == m0 && l1 == l0, "encode {round}");
        assert!(
            bound.decode(&io["latents"]).unwrap() == d0,
            "decode {round}"
        );
    }
}

#[test]
fn wan_vae_refuses_frame_counts_its_loop_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_wan_vae(dir.path());
    // diffusers would silently drop the last 3 frames of 8.
    let err = vae
        .encode(&Tensor::zeros(vec![1, 3, 8, 16, 16]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`video`") && err.contains("1 + 4"), "{err}");
}

/// A bf16 or fp16 GPU engine runs both of Wan's VAE graphs lowered (its encoder's time
/// downsampling pads in its conv, so no `Pad` keeps it in f32). Their CPU form (each node reads
/// the low values widened and rounds its output) encodes diffusers' clip and decodes its latents
/// no further from diffusers' f32 VAE than diffusers' own bf16 VAE is
/// (`fixtures/vae_bf16.json`).
#[test]
fn wan_vae_lowered_keeps_diffusers_bf16_distance() {
    use v2l_graphs::DType;
    let dir = tempfile::tempdir().unwrap();
    export_wan_vae(dir.path());
    let e = Engine::open(dir.path()).unwrap();
    let entry = e.manifest.vae.clone().unwrap();
    let encoder = v2l_graphs::read_model(&dir.path().join(&entry.encoder)).unwrap();
    assert!(
        encoder
            .graph
            .unwrap()
            .node
            .iter()
            .all(|n| n.op_type != "Pad"),
        "a Pad node has no bf16 CUDA kernel"
    );
    let bound: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("vae_bf16.json")).unwrap()).unwrap();
    let bound = |what: &str| bound["wan-tiny"][what].as_f64().unwrap();
    let io = read_safetensors(&fixtures().join("wan-tiny/vae_io.safetensors")).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let cpu = |f: &str| crate::vae_parity::cpu_form(dir.path(), f, dtype, false);
        let twins = v2l_contracts::bundle::VaeGraphs {
            encoder: cpu(&entry.encoder),
            decoder: cpu(&entry.decoder),
        };
        let mut vae = Vae::load_graphs(
            dir.path(),
            entry.clone(),
            &twins,
            &SessionOptions::default(),
        )
        .unwrap();
        let (mean, _) = vae.encode(&io["video"]).unwrap();
        let sample = vae.decode(&io["latents"]).unwrap();
        for (what, got, want, limit) in [
            (
                "encode",
                &mean,
                &io["posterior_mean"],
                bound("encode_posterior_mean"),
            ),
            ("decode", &sample, &io["sample"], bound("decode")),
        ] {
            let err = got.rel_l2(want);
            eprintln!(
                "wan {dtype} {what}: {err:.2e} from diffusers' f32 VAE (its bf16: {limit:.2e})"
            );
            assert!(
                err > 1e-6 && err < limit,
                "{dtype} {what}: {err:e} (bound {limit:e})"
            );
        }
    }
}
