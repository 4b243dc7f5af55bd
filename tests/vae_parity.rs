//! The exported CogVideoX VAE, driven through diffusers' frame batching with the causal-conv
//! cache, computes what diffusers computes (fixture `vae_io`: 17 frames = encoder batches of
//! 9 + 8 frames, 5 latent frames = decoder batches of 3 + 2).

use v2l_contracts::io::vae as vae_io;
use v2l_export::{cogvideox_vae, Checkpoint, Manifest};
use v2l_graphs::{save, ExternalData};
use v2l_runtime::engine::Engine;
use v2l_runtime::vae::Vae;
use v2l_runtime::SessionOptions;
use v2l_tests::*;

fn export_tiny_vae(dir: &std::path::Path) -> Vae {
    export_vae(&tiny().join("vae"), dir)
}

/// The diffusers CogVideoX VAE in `checkpoint`, exported into `dir` and loaded on the CPU.
fn export_vae(checkpoint: &std::path::Path, dir: &std::path::Path) -> Vae {
    std::fs::create_dir_all(dir).unwrap();
    let ck = Checkpoint::open_dir(checkpoint).unwrap();
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
    Vae::load(&Engine::open(dir).unwrap(), &SessionOptions::default()).unwrap()
}

/// The CPU form of a GPU engine's lowering of graph `f` in `dir` to `dtype` (each node reads
/// the low values widened and rounds its output), written beside it; `rows`: with the
/// GroupNorms rewritten as a cuda engine's lowered graphs have them (`GroupNormApply::OnRows`).
pub(crate) fn cpu_form(
    dir: &std::path::Path,
    f: &str,
    dtype: v2l_graphs::DType,
    rows: bool,
) -> String {
    use v2l_graphs::passes::{group_norm_row_stats, lower_precision, GroupNormApply, Lowering};
    let mut src = dir.join(f);
    let mut m = v2l_graphs::read_model(&src).unwrap();
    if rows {
        assert!(group_norm_row_stats(&mut m, GroupNormApply::OnRows) > 0);
        src = dir.join(format!("rows_{f}"));
        v2l_graphs::write_model(&src, &m).unwrap();
    }
    let name = format!("cpu_{dtype}_{}{f}", ["", "rows_"][rows as usize]);
    let data = dir.join(format!("{name}.data"));
    let how = Lowering {
        dtype,
        emulate: true,
        low_caches: false,
        low_factors: false,
        low_gelu: false,
        half_attention: false,
        half_gelu: false,
    };
    let weights = v2l_graphs::passes::WeightFile::Write(&data);
    lower_precision(&mut m, &src, weights, how).unwrap();
    v2l_graphs::write_model(&dir.join(&name), &m).unwrap();
    name
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

/// Tiled encode and decode (diffusers' `enable_tiling()`, fixture `vae_tiling_io` made by
/// `fixtures/gen/vae_tiling.py`): 64×64 frames cut into 2×2 overlapping 48-px tiles, each run
/// through the frame-batch loop alone, blended and stitched as diffusers does.
#[test]
fn tiled_vae_matches_diffusers_enable_tiling() {
    use v2l_runtime::vae::{Tiling, TilingMode};
    let dir = tempfile::tempdir().unwrap();
    let mut vae = export_tiny_vae(dir.path());
    let path = tiny().join("vae_tiling_io.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let t: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["tiling"]).unwrap();
    let f = |k: &str| t[k].as_f64().unwrap();
    vae.tiling = TilingMode::On;
    vae.tile = Tiling {
        sample_height: f("tile_sample_min_height") as usize,
        sample_width: f("tile_sample_min_width") as usize,
        overlap_height: f("tile_overlap_factor_height"),
        overlap_width: f("tile_overlap_factor_width"),
        factor: 8,
        auto_max_pixels: v2l_runtime::vae::AUTO_MAX_UNTILED_PIXELS,
    };
    let io = load("vae_io.safetensors");
    let tiled = load("vae_tiling_io.safetensors");
    let (mean, logvar) = vae.encode(&io["video"]).unwrap();
    assert_close(
        "tiled posterior_mean",
        &mean,
        &tiled["tiled_posterior_mean"],
        F32_REL_L2,
    );
    assert_close(
        "tiled posterior_logvar",
        &logvar,
        &tiled["tiled_posterior_logvar"],
        F32_REL_L2,
    );
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_close(
        "tiled decoded",
        &decoded,
        &tiled["tiled_decoded"],
        F32_REL_L2,
    );
    // Tiling really happened: the tiled result is not the untiled one.
    let seam = decoded.rel_l2(&io["decoded"]);
    eprintln!("tiled vs untiled decode: relative L2 {seam:.3e}");
    assert!(seam > 1e-3, "{seam}");
    // `auto` leaves these small frames untiled.
    vae.tiling = TilingMode::Auto;
    assert_close(
        "auto decoded",
        &vae.decode(&io["latents"]).unwrap(),
        &io["decoded"],
        F32_REL_L2,
    );
}

/// `v2l-compile` for ONNX Runtime ties every cache output to its conv (so the padded conv
/// inputs are not held to the end of the decoder, `passes::carried_outputs_first`): the
/// compiled VAE computes bitwise what the export computes.
#[test]
fn compiled_vae_ties_its_caches_and_computes_the_same() {
    use v2l_runtime::backend::{Backend, Precision};
    let dir = tempfile::tempdir().unwrap();
    let mut exported = export_tiny_vae(&dir.path().join("export"));
    let engine = dir.path().join("engine");
    v2l_compile::compile(
        &dir.path().join("export"),
        &engine,
        Backend::Cpu,
        Precision::Fp32,
    )
    .unwrap();
    let manifest = Manifest::read(&engine).unwrap();
    let entry = manifest.vae.as_ref().unwrap();
    for (file, caches) in [
        (&entry.encoder, entry.encoder_caches.len()),
        (&entry.decoder, entry.decoder_caches.len()),
    ] {
        let m = v2l_graphs::read_model(&engine.join(file)).unwrap();
        let ties = m
            .graph
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type == "Size" && n.name.ends_with("/after_cache/Size"))
            .count();
        assert!(caches > 0);
        assert_eq!(ties, caches, "{file}");
    }
    let mut compiled =
        Vae::load(&Engine::open(&engine).unwrap(), &SessionOptions::default()).unwrap();
    let io = load("vae_io.safetensors");
    let (m0, l0) = exported.encode(&io["video"]).unwrap();
    let (m1, l1) = compiled.encode(&io["video"]).unwrap();
    assert_eq!(m0.data, m1.data);
    assert_eq!(l0.data, l1.data);
    let d0 = exported.decode(&io["latents"]).unwrap();
    let d1 = compiled.decode(&io["latents"]).unwrap();
    assert_eq!(d0.data, d1.data);
    assert_close("decoded", &d1, &io["decoded"], F32_REL_L2);
}

/// The device-resident loop: the caches carried from frame batch to frame batch in memory the
/// session allocates (on a GPU, its device memory; here, to test the path on the CPU provider,
/// host memory from the session's allocator) give bitwise the frames and latents of today's
/// loop, on a clip long enough for several batches each way.
#[test]
fn caches_carried_in_session_memory_give_the_same_frames() {
    use v2l_runtime::backend::{Backend, Precision};
    let dir = tempfile::tempdir().unwrap();
    export_tiny_vae(&dir.path().join("export"));
    let engine = dir.path().join("engine");
    v2l_compile::compile(
        &dir.path().join("export"),
        &engine,
        Backend::Cpu,
        Precision::Fp32,
    )
    .unwrap();
    let e = Engine::open(&engine).unwrap();
    let mut host = Vae::load(&e, &SessionOptions::default()).unwrap();
    let carried = SessionOptions {
        carry_in_session_memory: true,
        ..Default::default()
    };
    let mut device = Vae::load(&e, &carried).unwrap();
    // Bound runs (what CUDA graphs need): each batch's inputs copied into the buffers of its
    // shapes, the caches from the previous batch's output buffers; twice, so the second
    // clip runs on buffers bound by the first.
    let bound = SessionOptions {
        bound_runs: true,
        ..carried.clone()
    };
    let mut replayed = Vae::load(&e, &bound).unwrap();
    // A GPU's sessions: the first frame batch in one, the rest in another (each convolution's
    // cuDNN plan built once a shape); twice, so the second clip runs on both as built.
    let split = SessionOptions {
        first_batch_session: true,
        ..carried.clone()
    };
    // The same with both sessions on the process's one arena (a cuda engine's sessions), so
    // the caches one session allocates are read by the other.
    let _held = SHARED_ARENA
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let shared = SessionOptions {
        shared_arena: true,
        ..split.clone()
    };
    let mut split = Vae::load(&e, &split).unwrap();
    let mut shared = Vae::load(&e, &shared).unwrap();
    let io = load("vae_io.safetensors");
    // More than one frame batch each way, so the later ones run in the second session.
    let vae = e.manifest.vae.as_ref().unwrap();
    let (video, latents) = (io["video"].shape[2], io["latents"].shape[2]);
    assert!(vae.encoder_batches(video).unwrap().len() > 1);
    assert!(vae.decoder_batches(latents).unwrap().len() > 1);
    let (m0, l0) = host.encode(&io["video"]).unwrap();
    let (m1, l1) = device.encode(&io["video"]).unwrap();
    assert_eq!(m0.data, m1.data);
    assert_eq!(l0.data, l1.data);
    let d0 = host.decode(&io["latents"]).unwrap();
    let d1 = device.decode(&io["latents"]).unwrap();
    assert_eq!(d0.shape, d1.shape);
    assert_eq!(d0.data, d1.data);
    assert_close("carried decode", &d1, &io["decoded"], F32_REL_L2);
    for round in 0..2 {
        for (what, vae) in [
            ("split", &mut split),
            ("shared", &mut shared),
            ("bound", &mut replayed),
        ] {
            let (m, l) = vae.encode(&io["video"]).unwrap();
            assert!(
                m.data == m0.data && l.data == l0.data,
                "{what} encode {round}"
            );
            let d = vae.decode(&io["latents"]).unwrap();
            assert!(
                d.shape == d0.shape && d.data == d0.data,
                "{what} decode {round}"
            );
        }
    }
    let entry = e.manifest.vae.clone().unwrap();
    let graphs = e.vae_graphs(&entry);
    assert_first_batch_ignores_caches(&engine, &entry, &graphs, &io["video"], &io["latents"]);
}

/// GPU engines below fp32 run the VAE in their precision (`bundle.json` `vae_lowered`): bf16
/// at opset 22, where CUDA's `Conv` takes bf16, fp16 at the export's. Their CPU form (each node
/// reads the low values widened and rounds its output, as a GPU kernel with f32 accumulation
/// does; GroupNorms in f32 as torch computes them) decodes diffusers' fixture latents and
/// encodes its clip no further from diffusers' f32 VAE than diffusers' own bf16 VAE is.
#[test]
fn gpu_engines_lower_the_vae_within_diffusers_bf16_distance() {
    use v2l_graphs::DType;
    use v2l_runtime::backend::{Backend, Precision};
    let dir = tempfile::tempdir().unwrap();
    export_tiny_vae(&dir.path().join("export"));
    let bound: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("../vae_bf16.json")).unwrap()).unwrap();
    let bound = |what: &str| bound["cogvideox-tiny"][what].as_f64().unwrap();
    let io = load("vae_io.safetensors");
    for (precision, dtype, opset) in [
        (Precision::Bf16, DType::BF16, 22),
        (Precision::Fp16, DType::F16, 17),
    ] {
        // The default (the decoder's spatial norms applied on the normalized rows), and with
        // `--folded-norms` (every norm applied folded, in f32).
        let (engine, folded_engine) = (
            dir.path().join(format!("cuda-{}", precision.name())),
            dir.path().join(format!("cuda-{}-folded", precision.name())),
        );
        let folded = v2l_compile::Options {
            folded_norms: true,
            ..Default::default()
        };
        for (out, opts) in [(&engine, Default::default()), (&folded_engine, folded)] {
            let export = dir.path().join("export");
            v2l_compile::compile_with(&export, out, Backend::Cuda, precision, &opts).unwrap();
        }
        let d = Engine::open(&folded_engine).unwrap();
        let folded = d.bundle.as_ref().unwrap().vae_lowered.clone().unwrap();
        let g = v2l_graphs::read_model(&folded_engine.join(&folded.decoder)).unwrap();
        let scaled = |g: &v2l_graphs::proto::GraphProto| {
            g.node
                .iter()
                .filter(|n| n.op_type == "Mul" && n.input[1].contains("RowScaleUp"))
                .count()
        };
        assert_eq!(scaled(g.graph.as_ref().unwrap()), 0);
        let e = Engine::open(&engine).unwrap();
        let bundle = e.bundle.as_ref().unwrap();
        let lowered = bundle.vae_lowered.clone().expect("vae_lowered");
        let entry = e.manifest.vae.clone().unwrap();
        assert_eq!(e.vae_graphs(&entry), lowered);
        for f in [&lowered.encoder, &lowered.decoder] {
            let m = v2l_graphs::read_model(&engine.join(f)).unwrap();
            assert_eq!(m.opset_import[0].version, opset, "{f}");
            let g = m.graph.unwrap();
            let low_weights = g
                .initializer
                .iter()
                .filter(|t| t.data_type == dtype.onnx_code())
                .count();
            assert!(low_weights > 0, "{f}: no {dtype} weights");
            assert!(
                g.node.iter().all(|n| n.op_type != "Identity" || opset < 21),
                "{f}"
            );
            // The caches carry in the engine's precision and nothing casts them: each value
            // was low before any node read it, so the engine computes what it did with f32
            // caches, without two casts per conv and batch and at half the carried memory.
            let caches = match f == &lowered.encoder {
                true => &entry.encoder_caches,
                false => &entry.decoder_caches,
            };
            assert!(!caches.is_empty(), "{f}");
            for c in caches {
                let (out, low) = (c.output_name(), Some(dtype.onnx_code()));
                assert_eq!(elem_type(&g.input, &c.name), low, "{f}: {}", c.name);
                assert_eq!(elem_type(&g.output, &out), low, "{f}: {out}");
                let cast = g.node.iter().find(|n| {
                    n.op_type == "Cast" && (n.input.contains(&c.name) || n.output.contains(&out))
                });
                assert!(cast.is_none(), "{f}: {cast:?}");
            }
            // The GroupNorms' row statistics read the low-type activation
            // (`passes::group_norm_row_stats`), and only their mean and deviation are f32.
            let stats: Vec<_> = g
                .node
                .iter()
                .filter(|n| n.op_type == "LayerNormalization")
                .collect();
            assert!(!stats.is_empty(), "{f}");
            for n in stats {
                let rows = g
                    .node
                    .iter()
                    .find(|p| p.output.contains(&n.input[0]))
                    .unwrap();
                assert_eq!(rows.op_type, "Reshape", "{f}: {}", n.name);
                let x = g
                    .node
                    .iter()
                    .find(|p| p.output.contains(&rows.input[0]))
                    .unwrap();
                assert_ne!(x.op_type, "Cast", "{f}: {} reads a cast", n.name);
            }
            // The decoder's applies over upsampled maps scale the normalized rows in the low
            // type: nothing casts the rows, the product or the sum.
            let made_by = |t: &str| g.node.iter().find(|p| p.output.iter().any(|o| o == t));
            let read_by = |t: &str| -> Vec<&v2l_graphs::proto::NodeProto> {
                g.node
                    .iter()
                    .filter(|c| c.input.iter().any(|i| i == t))
                    .collect()
            };
            let on_rows: Vec<_> = g
                .node
                .iter()
                .filter(|n| n.op_type == "Mul" && n.input[1].contains("RowScaleUp"))
                .collect();
            assert_eq!(on_rows.is_empty(), f == &lowered.encoder, "{f}");
            for mul in on_rows {
                let view = made_by(&mul.input[0]).unwrap();
                assert_ne!(view.op_type, "Cast", "{f}");
                // Nothing casts the rows in the activation's shape either (its `Shape`s read
                // them as they are).
                let rows = read_by(&view.input[0]);
                assert!(
                    rows.iter().all(|c| c.op_type != "Cast"),
                    "{f}: {}",
                    view.name
                );
                for add in read_by(&mul.output[0]) {
                    assert_eq!(add.op_type, "Add", "{f}");
                    let after = read_by(&add.output[0]);
                    assert!(
                        after.iter().all(|c| c.op_type != "Cast"),
                        "{f}: {} → {:?}",
                        add.name,
                        after
                            .iter()
                            .map(|c| (&c.name, &c.op_type, &c.attribute))
                            .collect::<Vec<_>>()
                    );
                }
            }
            for main in [vae_io::VIDEO, vae_io::LATENTS, vae_io::SAMPLE] {
                for vs in [&g.input, &g.output] {
                    let t = elem_type(vs, main);
                    assert!(
                        t.is_none() || t == Some(DType::F32.onnx_code()),
                        "{f}: {main}"
                    );
                }
            }
        }
        // The CPU form of the same lowering, from the engine's f32 graphs; `rows`: with the
        // GroupNorms rewritten as the cuda graphs have them (their applies over upsampled
        // maps on the normalized rows, in the low type).
        let cpu_of = |f: &str, rows: bool| cpu_form(&engine, f, dtype, rows);
        let cpu = |f: &str| cpu_of(f, false);
        let twins = v2l_contracts::bundle::VaeGraphs {
            encoder: cpu(&entry.encoder),
            decoder: cpu(&entry.decoder),
        };
        assert_first_batch_ignores_caches(&engine, &entry, &twins, &io["video"], &io["latents"]);
        let mut vae =
            Vae::load_graphs(&engine, entry.clone(), &twins, &SessionOptions::default()).unwrap();
        let decoded = vae.decode(&io["latents"]).unwrap();
        let (mean, _) = vae.encode(&io["video"]).unwrap();
        for (what, got, want, limit) in [
            ("decode", &decoded, &io["decoded"], bound("decode")),
            (
                "encode",
                &mean,
                &io["posterior_mean"],
                bound("encode_posterior_mean"),
            ),
        ] {
            let err = got.rel_l2(want);
            eprintln!(
                "{} {what}: {err:.2e} from diffusers' f32 VAE (its bf16: {limit:.2e})",
                precision.name()
            );
            assert!(
                err > 1e-6 && err < limit,
                "{} {what}: {err:e} (bound {limit:e})",
                precision.name()
            );
        }
        // The decoder as a cuda engine computes its norms: three roundings where the apply
        // scales an upsampled map (normalized rows, product, sum), as PyTorch's bf16 spatial
        // norm has, still within diffusers' own bf16 distance. (The CPU's row statistics sum
        // in one pass; on the tiny fixture in f32 that is 3e-7 from the export's, below.)
        let rows = v2l_contracts::bundle::VaeGraphs {
            encoder: twins.encoder.clone(),
            decoder: cpu_of(&entry.decoder, true),
        };
        let mut vae =
            Vae::load_graphs(&engine, entry.clone(), &rows, &SessionOptions::default()).unwrap();
        let on_rows = vae.decode(&io["latents"]).unwrap();
        let err = on_rows.rel_l2(&io["decoded"]);
        let limit = bound("decode");
        eprintln!(
            "{} decode, applies on the rows: {err:.2e} from diffusers' f32 VAE (its bf16: {limit:.2e}; folded: {:.2e})",
            precision.name(),
            decoded.rel_l2(&io["decoded"])
        );
        assert!(err > 1e-6 && err < limit, "{err:e} (bound {limit:e})");
        assert_ne!(on_rows.data, decoded.data);
    }
}

/// GPU engines take each GroupNorm's row statistics from one `LayerNormalization` over the
/// activation (`passes::group_norm_row_stats`): every GroupNorm of both graphs is rewritten,
/// the centred activation and its square are gone (each apply scales the activation and
/// shifts by `H − mean·S`, or, `OnRows` in the decoder's upsampled norms, scales the
/// normalized rows), and the rewritten graphs encode and decode what the exported ones do, on
/// the CPU provider in f32, in either form.
#[test]
fn gpu_group_norm_row_stats_compute_what_the_export_does() {
    use v2l_graphs::passes::{group_norm_row_stats, GroupNormApply};
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let mut exported = export_tiny_vae(&export);
    let entry = Engine::open(&export).unwrap().manifest.vae.unwrap();
    let in_norm = |n: &v2l_graphs::proto::NodeProto| n.name.contains(".group_norm/");
    let rewrite = |f: &str, apply: GroupNormApply| {
        let mut m = v2l_graphs::read_model(&export.join(f)).unwrap();
        let count = |m: &v2l_graphs::proto::ModelProto, op: &str| {
            let g = m.graph.as_ref().unwrap();
            g.node
                .iter()
                .filter(|n| n.op_type == op && in_norm(n))
                .count()
        };
        // Two levels of means for the mean and two for the mean square, per GroupNorm.
        let norms = count(&m, "ReduceMean") / 4;
        assert!(norms > 0, "{f}");
        assert_eq!(group_norm_row_stats(&mut m, apply), norms, "{f}");
        let g = m.graph.as_ref().unwrap();
        let stats = g.node.iter().filter(|n| n.op_type == "LayerNormalization");
        assert_eq!(stats.count(), norms, "{f}");
        assert_eq!(count(&m, "ReduceMean"), 2 * norms, "{f}");
        let squares = g.node.iter().filter(|n| {
            n.op_type == "Mul"
                && in_norm(n)
                && n.input.first() == n.input.get(1)
                && !n.name.contains("/Row")
        });
        assert_eq!(squares.count(), 0, "{f}");
        // Every apply scales the activation itself: no centred copy is written, and each norm
        // has its shift moved by the centring (`H − mean·S`).
        let made_by = |t: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == t));
        let centred = g.node.iter().filter(|n| {
            n.op_type == "Reshape"
                && in_norm(n)
                && made_by(&n.input[0]).is_some_and(|p| p.op_type == "Sub")
        });
        assert_eq!(centred.count(), 0, "{f}");
        let shifts = g.node.iter().filter(|n| n.name.contains("/Shift_")).count();
        // On the rows: the decoder's applies over upsampled maps (some, not all: the first
        // blocks run at the latents' size).
        let on_rows = g
            .node
            .iter()
            .filter(|n| n.name.contains("/RowShift_"))
            .count();
        match (apply, f == entry.decoder.as_str()) {
            (GroupNormApply::OnRows, true) => assert!(on_rows > 0 && shifts > 0, "{f}"),
            _ => assert_eq!(on_rows, 0, "{f}"),
        }
        assert_eq!(shifts + on_rows, norms, "{f}");
        // Twice is the same as once.
        assert_eq!(group_norm_row_stats(&mut m.clone(), apply), 0, "{f}");
        let name = format!("row_stats_{apply:?}_{f}");
        v2l_graphs::write_model(&export.join(&name), &m).unwrap();
        name
    };
    let io = load("vae_io.safetensors");
    let want_decoded = exported.decode(&io["latents"]).unwrap();
    let want_encoded = exported.encode(&io["video"]).unwrap().0;
    for apply in [GroupNormApply::Folded, GroupNormApply::OnRows] {
        let graphs = v2l_contracts::bundle::VaeGraphs {
            encoder: rewrite(&entry.encoder, apply),
            decoder: rewrite(&entry.decoder, apply),
        };
        let mut vae =
            Vae::load_graphs(&export, entry.clone(), &graphs, &SessionOptions::default()).unwrap();
        // Only how the f32 sums are ordered differs; a wrong row, group or count would be off
        // by a factor.
        let got = vae.decode(&io["latents"]).unwrap();
        assert_close(&format!("{apply:?} decode"), &got, &want_decoded, 1e-5);
        eprintln!(
            "{apply:?} decode: {:.2e} from the export's",
            got.rel_l2(&want_decoded)
        );
        let got = vae.encode(&io["video"]).unwrap().0;
        assert_close(&format!("{apply:?} encode"), &got, &want_encoded, 1e-5);
    }
}

/// A GroupNorm apply in another form than the exporter's (here the encoder's first, its
/// product's operands swapped) keeps its centred activation: its statistics are still
/// rewritten, the other norms fold, and the encoder still encodes what the export does.
#[test]
fn gpu_group_norm_apply_of_another_form_keeps_its_centring() {
    use v2l_graphs::passes::{group_norm_row_stats, GroupNormApply};
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let mut exported = export_tiny_vae(&export);
    let entry = Engine::open(&export).unwrap().manifest.vae.unwrap();
    let mut m = v2l_graphs::read_model(&export.join(&entry.encoder)).unwrap();
    let g = m.graph.as_mut().unwrap();
    let made_by = |g: &v2l_graphs::proto::GraphProto, t: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == t))
            .cloned()
    };
    // The product that scales the centred activation: `Mul(Reshape(Sub(..)), S)`.
    let apply = g
        .node
        .iter()
        .position(|n| {
            n.op_type == "Mul"
                && n.name.contains(".group_norm/")
                && made_by(g, &n.input[0]).is_some_and(|r| {
                    r.op_type == "Reshape"
                        && made_by(g, &r.input[0]).is_some_and(|d| d.op_type == "Sub")
                })
        })
        .unwrap();
    g.node[apply].input.swap(0, 1);
    let norms = g
        .node
        .iter()
        .filter(|n| n.op_type == "Sub" && n.name.contains(".group_norm/"))
        .count();
    assert_eq!(group_norm_row_stats(&mut m, GroupNormApply::Folded), norms);
    let g = m.graph.as_ref().unwrap();
    let shifts = g.node.iter().filter(|n| n.name.contains("/Shift_")).count();
    assert_eq!(shifts, norms - 1);
    let name = format!("row_stats_{}", entry.encoder);
    v2l_graphs::write_model(&export.join(&name), &m).unwrap();
    let graphs = v2l_contracts::bundle::VaeGraphs {
        encoder: name,
        decoder: entry.decoder.clone(),
    };
    let mut vae = Vae::load_graphs(&export, entry, &graphs, &SessionOptions::default()).unwrap();
    let io = load("vae_io.safetensors");
    let (want, got) = (exported.encode(&io["video"]), vae.encode(&io["video"]));
    assert_close("encode", &got.unwrap().0, &want.unwrap().0, 1e-5);
}

/// The element type a graph declares for its input or output `name`.
fn elem_type(vs: &[v2l_graphs::proto::ValueInfoProto], name: &str) -> Option<i32> {
    use v2l_graphs::proto::type_proto::Value;
    let v = vs.iter().find(|v| v.name == name)?;
    match v.r#type.as_ref()?.value.as_ref()? {
        Value::TensorType(t) => Some(t.elem_type),
    }
}

/// A cache a graph declares bf16 (a GPU engine's lowered VAE) is carried as bf16 both ways the
/// runtime carries caches: in session memory (a GPU's; here the CPU provider's), starting
/// unwritten, and from the host, starting at zeros of its declared type. Each batch after the
/// first reads exactly the previous batch's last two frames.
#[test]
fn low_precision_caches_carry_in_their_declared_type() {
    use half::bf16;
    use v2l_graphs::{DType, Graph};
    use v2l_runtime::tensor::Data;
    use v2l_runtime::{Model, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let mut g = Graph::new("carry");
    let x = g.input(
        "x",
        DType::F32,
        vec![1.into(), 2.into(), "t".into(), 2.into(), 2.into()],
    );
    let cache_dims = vec![1.into(), 2.into(), 2.into(), 2.into(), 2.into()];
    let cache = g.input("cache_in.c", DType::BF16, cache_dims.clone());
    let xb = g.cast(&x, DType::BF16);
    let padded = g.concat(&[&cache, &xb], 2);
    let cache_out = g.slice(&padded, 2, -2, i64::MAX);
    let y = g.cast(&padded, DType::F32);
    g.output(&y, "y", DType::F32, vec![]);
    g.output(&cache_out, "cache_out.c", DType::BF16, cache_dims);
    let path = dir.path().join("carry.onnx");
    save(&g, &path, ExternalData::Never).unwrap();
    let shapes = vec![("cache_in.c".to_string(), vec![1, 2, 2, 2, 2])];
    let links = [("cache_in.c".to_string(), "cache_out.c".to_string())];
    // Three batches of 3 frames; values exact in bf16 so the expected frames are the inputs.
    let batch = |i: usize| {
        let v: Vec<f32> = (0..24)
            .map(|k| (k as f32 - 11.0) * 0.25 + i as f32)
            .collect();
        Tensor::f32(vec![1, 2, 3, 2, 2], v)
    };
    let frames = |t: &Tensor, from: usize, to: usize| t.slice_axis(2, from, to).unwrap().data;
    let mut outs: Vec<Vec<Tensor>> = Vec::new();
    for (in_session, bound_runs) in [(true, false), (false, false), (true, true)] {
        let opts = SessionOptions {
            carry_in_session_memory: in_session,
            bound_runs,
            ..Default::default()
        };
        let mut m = Model::load(&path, &opts).unwrap();
        let (mut carry, mut feed) = match m.unwritten_carry(&shapes).unwrap() {
            Some(c) => (c, std::collections::BTreeMap::new()),
            None => (Default::default(), m.zero_inputs(shapes.clone()).unwrap()),
        };
        assert_eq!(in_session, feed.is_empty());
        if let Some(z) = feed.get("cache_in.c") {
            assert_eq!(z.data, Data::BF16(vec![bf16::ZERO; 16]));
        }
        let mut ys = Vec::new();
        for i in 0..3 {
            feed.insert("x".into(), batch(i));
            let mut out = m
                .run_carrying(&feed, &mut carry, &links, &["y"], true)
                .unwrap();
            feed.remove("cache_in.c");
            ys.push(out.remove("y").unwrap());
        }
        outs.push(ys);
    }
    for ys in &outs {
        for (i, y) in ys.iter().enumerate() {
            assert_eq!(y.shape, [1, 2, 5, 2, 2]);
            assert_eq!(frames(y, 2, 5), batch(i).data, "batch {i}");
            if i > 0 {
                assert_eq!(frames(y, 0, 2), frames(&batch(i - 1), 1, 3), "batch {i}");
            }
        }
    }
    assert_eq!(frames(&outs[1][0], 0, 2), Data::F32(vec![0.0; 16]));
}

/// The GroupNorm rewrites at CogVideoX's real VAE widths (128–512 channels, 32 groups; diffusers'
/// random initialisation), from `V2L_REAL_VAE` as `tests/fixtures/gen/vae_real_width.py` writes
/// it: the f32 rewrites, folded and on the rows, decode what the export does; the bf16 CPU
/// forms of the lowered decoder, with the exported norms and with a cuda engine's, decode no
/// further from diffusers' fp32 than diffusers' bf16 does.
#[test]
#[ignore = "needs V2L_REAL_VAE from tests/fixtures/gen/vae_real_width.py (torch, 860 MB)"]
fn real_width_group_norm_rewrites() {
    use v2l_graphs::passes::{group_norm_row_stats, GroupNormApply};
    let Some(real) = std::env::var_os("V2L_REAL_VAE").map(std::path::PathBuf::from) else {
        panic!("set V2L_REAL_VAE (tests/fixtures/gen/vae_real_width.py)");
    };
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let mut exported = export_vae(&real.join("vae"), &export);
    let entry = Engine::open(&export).unwrap().manifest.vae.unwrap();
    let io = v2l_runtime::read_safetensors(&real.join("io.safetensors")).unwrap();
    let want = exported.decode(&io["latents"]).unwrap();
    assert_close("export", &want, &io["decoded"], F32_REL_L2);
    let load = |decoder: String| {
        let graphs = v2l_contracts::bundle::VaeGraphs {
            encoder: entry.encoder.clone(),
            decoder,
        };
        Vae::load_graphs(&export, entry.clone(), &graphs, &SessionOptions::default()).unwrap()
    };
    for apply in [GroupNormApply::Folded, GroupNormApply::OnRows] {
        let mut m = v2l_graphs::read_model(&export.join(&entry.decoder)).unwrap();
        assert!(group_norm_row_stats(&mut m, apply) > 0);
        let name = format!("{apply:?}_{}", entry.decoder);
        v2l_graphs::write_model(&export.join(&name), &m).unwrap();
        let got = load(name).decode(&io["latents"]).unwrap();
        eprintln!("{apply:?} f32: {:.2e} from the export's", got.rel_l2(&want));
        assert_close(&format!("{apply:?}"), &got, &want, 1e-5);
    }
    let low = v2l_runtime::read_safetensors(&real.join("io_bf16.safetensors")).unwrap();
    let limit = low["decoded_bf16"].rel_l2(&io["decoded"]);
    for rows in [false, true] {
        let name = cpu_form(&export, &entry.decoder, v2l_graphs::DType::BF16, rows);
        let err = load(name)
            .decode(&io["latents"])
            .unwrap()
            .rel_l2(&io["decoded"]);
        eprintln!("bf16, rows {rows}: {err:.2e} from diffusers' fp32 (its bf16: {limit:.2e})");
        assert!(
            err > 1e-6 && err < limit,
            "rows {rows}: {err:e} (bound {limit:e})"
        );
    }
}
