//! `v2l_tools::measure` measures what `training/measure.py` measures (fixture `effects/`,
//! made by `tests/fixtures/gen/measure_fixture.py`): one uint8 clip of `training/effects.py`
//! per effect and a static one, each with Python's label, confidence, scores and motion.

use v2l_runtime::tensor::Data;
use v2l_runtime::video::Frames;
use v2l_tests::fixtures;
use v2l_tools::measure::{measure, EFFECTS};

/// Bound on |rust − python| / max(|python|, 1) for every motion quantity, score and confidence.
/// Both sides are f64 with the same operations in the same order, except numpy's BLAS/LAPACK
/// calls (luma and chroma `@`, JᵀJ, `np.linalg.solve`, the 3×3 compositions), whose summation
/// order and FMA use the Rust code does not copy: that is rounding only, and measured at
/// ≤ 5e-14 (hue, an angle summed over 16 pairs, is the largest). 1e-9 leaves room for libm
/// differences between machines; a departure from the algorithm (a different LM step, a
/// flipped retry, another percentile) shows at 1e-6 or more.
const TOL: f64 = 1e-9;

const MOTION: [&str; 7] = [
    "rotation_deg",
    "log_zoom",
    "pan_x",
    "pan_y",
    "hue_deg",
    "log_gain",
    "ncc",
];

fn diff(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1.0)
}

#[test]
fn measure_matches_training_measure_py() {
    let dir = fixtures().join("effects");
    let clips = v2l_runtime::read_safetensors(&dir.join("clips.safetensors")).unwrap();
    let truth: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("measure.json")).unwrap()).unwrap();
    let truth = truth["clips"].as_object().unwrap();
    let mut names: Vec<&str> = EFFECTS.to_vec();
    names.push("static");
    assert_eq!(truth.len(), names.len());
    let mut worst = [0.0f64; MOTION.len()];
    let mut worst_other = 0.0f64;
    for name in names {
        let want = &truth[name];
        let t = &clips[name];
        let Data::U8(rgb) = &t.data else {
            panic!("{name}: not uint8")
        };
        let [frames, height, width, 3] = t.shape[..] else {
            panic!("{name}: shape {:?}", t.shape)
        };
        let clip = Frames {
            frames,
            height,
            width,
            rgb: rgb.clone(),
        };
        let m = measure(&clip).unwrap();
        let expected = if name == "static" { "none" } else { name };
        assert_eq!(want["label"], expected, "{name}: the fixture's own label");
        assert_eq!(m.label, want["label"], "{name}: label");
        let motion = serde_json::to_value(m.motion).unwrap();
        for (w, q) in worst.iter_mut().zip(MOTION) {
            let (got, py) = (
                motion[q].as_f64().unwrap(),
                want["motion"][q].as_f64().unwrap(),
            );
            let d = diff(got, py);
            assert!(
                d <= TOL,
                "{name} {q}: rust {got:e}, python {py:e} ({d:.1e})"
            );
            *w = w.max(d);
        }
        for (effect, got) in m.scores {
            let py = want["scores"][effect].as_f64().unwrap();
            let d = diff(got, py);
            assert!(
                d <= TOL,
                "{name} score {effect}: rust {got:e}, python {py:e}"
            );
            worst_other = worst_other.max(d);
        }
        let d = diff(m.confidence, want["confidence"].as_f64().unwrap());
        assert!(
            d <= TOL,
            "{name} confidence: {} vs {}",
            m.confidence,
            want["confidence"]
        );
        worst_other = worst_other.max(d);
    }
    for (q, w) in MOTION.iter().zip(worst) {
        eprintln!("{q}: largest difference {w:.1e}");
    }
    eprintln!("scores and confidence: largest difference {worst_other:.1e}");
}
