//! The embedded default model (`models/cogvideox-effects`, trained by `training/` on the demo's
//! procedural effects) against diffusers (fixture `tests/fixtures/cogvideox-effects`, made by
//! `tests/fixtures/gen/cogvideox_effects.py`): the DiT with and without a predicted LoRA, and
//! whole generations from the demo's first frame with each demo reference clip. The random-weight
//! tiny model checks every code path; this one checks that the numbers hold on trained weights,
//! where activations have real structure, and that the effect v2l's clips show (measured in
//! Rust) is the effect diffusers' clips show (measured by `training/measure.py`).

use std::collections::BTreeMap;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::strategy::{DitRunner, Strategy};
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{Pipeline, RequestLora, RequestParts};
use v2l_runtime::video::to_rgb8;
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};
use v2l_tools::measure::measure;

use crate::common;
use crate::common::tolerance::F32_REL_L2;
use common::CheckOn;
use common::{effects_model, engine_of, frames_of};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cogvideox-effects")
}

/// Asserts `got` within `bound` relative L2 of the fixture's `name`, printing the error.
fn close(what: &str, got: &Tensor, io: &BTreeMap<String, Tensor>, name: &str, bound: f64) {
    let err = got.rel_l2(&io[name]);
    eprintln!("{what} {name}: relative L2 {err:.3e} (bound {bound:.0e})");
    assert!(err <= bound, "{what} {name}: {err:.3e} > {bound:.0e}");
}

#[test]
fn trained_model_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let eng = engine_of(&effects_model(), d.path(), &[]);
    let io = read_safetensors(&fixture().join("e2e_io.safetensors")).unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("e2e.json")).unwrap()).unwrap();
    let steps = summary["steps"].as_u64().unwrap() as usize;
    let effects: Vec<String> = summary["runs"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "base")
        .cloned()
        .collect();
    assert!(effects.len() >= 2, "{effects:?}");

    let mut p = Pipeline::load(Engine::open(&eng).unwrap(), &SessionOptions::default()).unwrap();
    let mut req = RequestParts {
        steps,
        guidance: summary["guidance"].as_f64().unwrap() as f32,
        ..common::cogvideox_request(&io)
    };
    // Latents after every step, then the decoded frames, with the LoRA off and with each
    // reference clip's LoRA (predicted by the exported hypernetwork from the clip's frames).
    let mut runs = vec![(
        "base".to_string(),
        p.generate(&req.on(&p), &mut |_, _| true).unwrap(),
    )];
    for e in &effects {
        req.lora = RequestLora::Reference(frames_of(&io[&format!("{e}_reference_u8")]), 1.0);
        runs.push((
            e.clone(),
            p.generate(&req.on(&p), &mut |_, _| true).unwrap(),
        ));
    }
    for (name, g) in &runs {
        if name != "base" {
            close(
                name,
                g.reference_latents.as_ref().unwrap(),
                &io,
                &format!("{name}_reference_latents"),
                F32_REL_L2,
            );
            close(
                name,
                g.hyper_weights.as_ref().unwrap(),
                &io,
                &format!("{name}_hyper_weights"),
                F32_REL_L2,
            );
        }
        assert_eq!(g.latents_steps.len(), steps);
        for (i, l) in g.latents_steps.iter().enumerate() {
            close(name, l, &io, &format!("{name}_latents_step{i}"), 1e-4);
        }
        close(name, &g.frames, &io, &format!("{name}_frames"), 1e-4);
        // The effect the demo prints: the Rust measurement of v2l's clip names the effect that
        // training/measure.py read in diffusers' clip.
        let m = measure(&to_rgb8(&g.frames).unwrap()).unwrap();
        let want = summary["runs"][name.as_str()]["label"].as_str().unwrap();
        eprintln!(
            "{name}: v2l's clip shows {} ({:.2}), diffusers' {want}",
            m.label, m.confidence
        );
        assert_eq!(m.label, want, "{name}");
    }

    // One DiT call, without and with one reference's LoRA (fixture `dit_io`).
    let dit_io = read_safetensors(&fixture().join("dit_io.safetensors")).unwrap();
    let inputs: BTreeMap<String, Tensor> = dit_io
        .iter()
        .filter(|(k, _)| !k.starts_with("output"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let lora_of = summary["dit_io_lora"].as_str().unwrap();
    let lora = AppliedLora {
        lora: p
            .predict(&frames_of(&io[&format!("{lora_of}_reference_u8")]), 1.0)
            .unwrap()
            .lora
            .into(),
        source: lora_of.into(),
        multiplier: 1.0,
    };
    let engine = Engine::open(&eng).unwrap();
    let opts = engine.session_options(0);
    for strategy in [Strategy::Fused, Strategy::Unfused] {
        let mut dit = DitRunner::load(&engine, &opts, strategy).unwrap();
        let base = dit.run(&inputs).unwrap()["sample"].clone();
        close(&format!("{strategy:?} DiT"), &base, &dit_io, "output", 1e-4);
        dit.set_lora(&engine, Some(&lora)).unwrap();
        let with = dit.run(&inputs).unwrap()["sample"].clone();
        close(
            &format!("{strategy:?} DiT"),
            &with,
            &dit_io,
            "output_with_lilora",
            F32_REL_L2,
        );
    }
}

/// The embedded model compiles below fp32. Its learned positional table takes only its own
/// size (17 frames at 64×64), so the compile's accuracy samples run at that size; at any other
/// size its DiT graph cannot run (until 2026-11-26 `--precision int8` failed here).
#[test]
fn the_embedded_model_compiles_to_int8_with_its_accuracy_recorded() {
    let d = tempfile::tempdir().unwrap();
    let eng = engine_of(&effects_model(), d.path(), &["--precision", "int8"]);
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eng.join("bundle.json")).unwrap()).unwrap();
    let accuracy = bundle["accuracy"].as_array().unwrap();
    let dit = accuracy.iter().find(|a| a["stage"] == "dit").unwrap();
    assert!(
        dit["inputs"]
            .as_str()
            .unwrap()
            .contains("17 frames 64x64 px"),
        "{dit}"
    );
    // 9.3e-3 on 2026-11-26 (AVX-512 VNNI, bf16 attention kernel): the int8 bound holds.
    let e = dit["rel_l2"].as_f64().unwrap();
    assert!(e > 0.0 && e <= common::tolerance::INT8_REL_L2, "{dit}");
    assert!(accuracy.iter().any(|a| a["stage"] == "frames"), "{bundle}");
}
