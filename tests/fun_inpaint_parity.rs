//! VideoX-Fun's `CogVideoXFunInpaintPipeline` parts (the Video2LoRA release's backbone) against
//! the authors' own classes (fixture `cogvideox-fun-inp-tiny`): the plain DDIM sampler
//! (`DDIM_Origin`), the numpy RoPE grid, the Fun VAE's decode batching and the 33-channel DiT.

use std::path::PathBuf;

use v2l_runtime::scheduler::{DdimScheduler, Sampler, SchedulerConfig};
use v2l_runtime::tensor::Data;
use v2l_runtime::Tensor;
use v2l_tests::*;

/// Exactness bound for the float32 scheduler step (the issue's ≤ 1e-6).
const EXACT_REL_L2: f64 = 1e-6;

pub fn fun() -> PathBuf {
    fixtures().join("cogvideox-fun-inp-tiny")
}

fn fun_io(name: &str) -> std::collections::BTreeMap<String, Tensor> {
    v2l_runtime::read_safetensors(&fun().join(name)).expect("fixture file")
}

fn plain_ddim() -> DdimScheduler {
    let cfg = SchedulerConfig::from_file(fun().join("scheduler/scheduler_config.json")).unwrap();
    DdimScheduler::with_sampler(&cfg, Sampler::Ddim).unwrap()
}

#[test]
fn plain_ddim_matches_diffusers_ddim_scheduler() {
    let io = fun_io("scheduler_io.safetensors");
    let mut s = plain_ddim();
    for n in [4usize, 50] {
        s.set_timesteps(n).unwrap();
        let Data::I64(want) = &io[&format!("timesteps_{n}")].data else {
            panic!("timesteps are int64")
        };
        assert_eq!(s.timesteps(), &want[..], "{n} steps");
    }
    let ac: Vec<f32> = s.alphas_cumprod().iter().map(|&a| a as f32).collect();
    let want = io["alphas_cumprod"].as_f32("alphas_cumprod").unwrap();
    assert_close(
        "DDIMScheduler alphas_cumprod",
        &Tensor::f32(vec![ac.len()], ac),
        &Tensor::f32(vec![want.len()], want.to_vec()),
        EXACT_REL_L2,
    );
    s.set_timesteps(4).unwrap();
    let (x, m) = (&io["step_sample"], &io["step_model_output"]);
    let (xs, ms) = (x.as_f32("x").unwrap(), m.as_f32("m").unwrap());
    for &t in s.timesteps() {
        let got = Tensor::f32(x.shape.clone(), s.step(ms, t, xs).unwrap());
        assert_close(
            &format!("DDIMScheduler step at t={t}"),
            &got,
            &io[&format!("step_prev_sample_t{t}")],
            EXACT_REL_L2,
        );
    }
    // `DDIMScheduler` has no `snr_shift_scale`: a shifted config gives it the same schedule,
    // while `CogVideoXDDIMScheduler` moves (CogVideoX-2B's configs set 3.0).
    let mut cfg =
        SchedulerConfig::from_file(fun().join("scheduler/scheduler_config.json")).unwrap();
    cfg.snr_shift_scale = 3.0;
    let shifted = DdimScheduler::with_sampler(&cfg, Sampler::Ddim).unwrap();
    assert_eq!(shifted.alphas_cumprod(), s.alphas_cumprod());
    let cog = DdimScheduler::new(&cfg).unwrap();
    let moved = cog.alphas_cumprod()[500] / s.alphas_cumprod()[500];
    eprintln!("CogVideoXDDIMScheduler with snr_shift_scale 3: alphas_cumprod[500] × {moved:.3}");
    assert!((moved - 1.0).abs() > 0.1);
}

/// The 33-channel Fun transformer: `[noisy | mask | masked]` is the DiT's `hidden_states`, and
/// the RoPE tables are the Fun pipeline's numpy grids.
#[test]
fn fun_dit_and_rope_match_the_authors_transformer() {
    use v2l_export::{cogvideox_dit, Checkpoint};
    let ck = Checkpoint::open_dir(&fun().join("transformer")).unwrap();
    let ex = cogvideox_dit::export(&ck, &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dit.onnx");
    v2l_graphs::save(&ex.graph, &path, v2l_graphs::ExternalData::Auto).unwrap();
    let mut model = v2l_runtime::Model::load(&path, &Default::default()).unwrap();
    let io = fun_io("dit_io.safetensors");
    let (cos, sin) = v2l_runtime::rope::cogvideox_fun_rope(16, 5, 8, 12, 2, 8, 12).unwrap();
    let rows = cos.len() / 16;
    assert_close(
        "Fun rope_cos",
        &Tensor::f32(vec![rows, 16], cos),
        &io["rope_cos"],
        EXACT_REL_L2,
    );
    assert_close(
        "Fun rope_sin",
        &Tensor::f32(vec![rows, 16], sin),
        &io["rope_sin"],
        EXACT_REL_L2,
    );
    let mut inputs = pick(
        &io,
        &["encoder_hidden_states", "timestep", "rope_cos", "rope_sin"],
    );
    inputs.insert("hidden_states".into(), io["hidden_states_33"].clone());
    let out = model.run(&inputs).unwrap();
    assert_close("Fun DiT sample", &out["sample"], &io["output"], F32_REL_L2);
}

fn fun_vae(
    dir: &std::path::Path,
    decode: v2l_export::cogvideox_vae::DecodeLoop,
) -> v2l_runtime::vae::Vae {
    fun_vae_of(&fun(), dir, decode)
}

/// The VAE of the model folder `model`, exported for `decode`'s loop into `dir` and loaded.
fn fun_vae_of(
    model: &std::path::Path,
    dir: &std::path::Path,
    decode: v2l_export::cogvideox_vae::DecodeLoop,
) -> v2l_runtime::vae::Vae {
    use v2l_export::{cogvideox_vae, Checkpoint, Manifest};
    let ck = Checkpoint::open_dir(&model.join("vae")).unwrap();
    let ex = cogvideox_vae::export_for(&ck, decode).unwrap();
    v2l_graphs::save(
        &ex.encoder,
        &dir.join("e.onnx"),
        v2l_graphs::ExternalData::Auto,
    )
    .unwrap();
    v2l_graphs::save(
        &ex.decoder,
        &dir.join("d.onnx"),
        v2l_graphs::ExternalData::Auto,
    )
    .unwrap();
    let raw: serde_json::Value = ck.config(cogvideox_vae::CLASS_NAME).unwrap();
    let manifest = Manifest {
        format_version: v2l_export::manifest::FORMAT_VERSION,
        vae: Some(ex.manifest_entry("e.onnx", "d.onnx", raw)),
        ..Default::default()
    };
    manifest.write(dir).unwrap();
    let engine = v2l_runtime::engine::Engine::open(dir).unwrap();
    v2l_runtime::vae::Vae::load(&engine, &Default::default()).unwrap()
}

/// The Fun VAE: diffusers' encoder, and a decoder that takes latent frame 0 alone and then two
/// at a time, doubling every later frame in time. diffusers' own loop differs on these latents.
#[test]
fn fun_vae_decodes_with_the_fun_frame_loop() {
    use v2l_export::cogvideox_vae::DecodeLoop;
    let io = fun_io("vae_io.safetensors");
    let d = tempfile::tempdir().unwrap();
    let mut vae = fun_vae(d.path(), DecodeLoop::Fun);
    let (mean, logvar) = vae.encode(&io["video"]).unwrap();
    assert_close(
        "Fun posterior_mean",
        &mean,
        &io["posterior_mean"],
        F32_REL_L2,
    );
    assert_close(
        "Fun posterior_logvar",
        &logvar,
        &io["posterior_logvar"],
        F32_REL_L2,
    );
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_close("Fun decoded", &decoded, &io["decoded"], F32_REL_L2);

    // An even latent count ends on a one-frame batch that is still doubled (4 → 13 frames),
    // and the batches before it decode as they do for 5 latents (GroupNorm is per batch).
    let four = io["latents"].slice_axis(2, 0, 4).unwrap();
    let short = vae.decode(&four).unwrap();
    assert_eq!(short.shape, vec![1, 3, 13, 64, 96]);
    let head = |t: &Tensor| t.slice_axis(2, 0, 9).unwrap();
    assert!(
        head(&short) == head(&decoded),
        "the first two batches moved"
    );

    let d2 = tempfile::tempdir().unwrap();
    let mut stock = fun_vae(d2.path(), DecodeLoop::Diffusers);
    let err = stock.decode(&io["latents"]).unwrap().rel_l2(&io["decoded"]);
    eprintln!("diffusers' decode loop against the Fun VAE's: relative L2 {err:.3e}");
    assert!(err > 1e-3);
}

/// `--scheduler dpm` against diffusers' `CogVideoXDPMScheduler` (fixture `dpm_io`, made by
/// `gen/cogvideox_dpm.py`): the schedule, the timesteps and four chained steps, first and second
/// order, with diffusers' recorded noise draws, at `snr_shift_scale` 1 and 3.
#[test]
fn dpm_matches_diffusers_cogvideox_dpm_scheduler() {
    let io = fun_io("dpm_io.safetensors");
    for (tag, shift) in [("snr1", 1.0), ("snr3", 3.0)] {
        let mut cfg =
            SchedulerConfig::from_file(fun().join("scheduler/scheduler_config.json")).unwrap();
        cfg.snr_shift_scale = shift;
        let mut s = DdimScheduler::with_sampler(&cfg, Sampler::Dpm).unwrap();
        let ac: Vec<f32> = s.alphas_cumprod().iter().map(|&a| a as f32).collect();
        assert_close(
            &format!("{tag} alphas_cumprod"),
            &Tensor::f32(vec![ac.len()], ac),
            &io[&format!("{tag}.alphas_cumprod")],
            EXACT_REL_L2,
        );
        for n in [4usize, 50] {
            s.set_timesteps(n).unwrap();
            let Data::I64(want) = &io[&format!("{tag}.timesteps_{n}")].data else {
                panic!("timesteps are int64")
            };
            assert_eq!(s.timesteps(), &want[..], "{tag}: {n} steps");
        }
        s.set_timesteps(4).unwrap();
        let ts = s.timesteps().to_vec();
        let mut x = io[&format!("{tag}.sample")].as_f32("x").unwrap().to_vec();
        let mut old: Option<Vec<f32>> = None;
        let shape = io[&format!("{tag}.sample")].shape.clone();
        for (i, &t) in ts.iter().enumerate() {
            let m = io[&format!("{tag}.model_output_{i}")].as_f32("m").unwrap();
            let mut draws = 0;
            let mut noise = |k: usize| {
                draws += 1;
                io[&format!("{tag}.noise_{i}_{k}")]
                    .as_f32("z")
                    .unwrap()
                    .to_vec()
            };
            let back = i.checked_sub(1).map(|j| ts[j]);
            let step = s
                .step_dpm(m, t, back, &x, old.as_deref(), &mut noise)
                .unwrap();
            let recorded = (0..3)
                .filter(|k| io.contains_key(&format!("{tag}.noise_{i}_{k}")))
                .count();
            assert_eq!(draws, recorded, "{tag} step {i}: noise draws");
            for (name, got) in [
                ("prev_sample", &step.prev_sample),
                ("pred_original", &step.pred_original),
            ] {
                assert_close(
                    &format!("{tag} dpm step {i} (t={t}) {name}"),
                    &Tensor::f32(shape.clone(), got.clone()),
                    &io[&format!("{tag}.{name}_{i}")],
                    EXACT_REL_L2,
                );
            }
            x = step.prev_sample;
            old = Some(step.pred_original);
        }
    }
}

/// Variant B's Fun VAE (`cogvideox-fun-inp-tiny-b`): 13 frames at 80×64, so 4 latent frames whose
/// last decode batch is a single, time-doubled frame, against the authors' VAE.
#[test]
fn fun_vae_decodes_an_even_latent_count_as_upstream() {
    use v2l_export::cogvideox_vae::DecodeLoop;
    let b = fixtures().join("cogvideox-fun-inp-tiny-b");
    let io = v2l_runtime::read_safetensors(&b.join("vae_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut vae = fun_vae_of(&b, d.path(), DecodeLoop::Fun);
    let (mean, _) = vae.encode(&io["video"]).unwrap();
    assert_close("B posterior_mean", &mean, &io["posterior_mean"], F32_REL_L2);
    assert_eq!(io["latents"].shape[2], 4);
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_close(
        "B decoded (4 latent frames)",
        &decoded,
        &io["decoded"],
        F32_REL_L2,
    );
}
