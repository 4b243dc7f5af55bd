//! The Python package's Ray Serve deployment, installed from the wheel: a venv sees `.v2l/py`'s
//! Ray and gets v2l by `pip install <wheel>` (no checkout on `sys.path`, no `V2L_LIBRARY`); a
//! local Ray instance (CPU, loopback) runs two replicas; requests carry LoRA ids through Serve's
//! model multiplexing. Every answer equals the C ABI's frames for the same request bitwise, and
//! each LoRA is served by the replica that holds it (one LoRA per replica: a third one evicts).
//! Needs `ray[serve]` in `.v2l/py` (scripts/setup-tests.sh installs it).

#![allow(clippy::unwrap_used)]

use crate::common::*;
use crate::wheel::{build_wheel, c_abi_frames, venv_with};

use std::path::{Path, PathBuf};
use std::process::Command;

use v2l_runtime::lora::format::{self, Factor, LoraFormat};

/// Writes LoRAs a (the fixture's PEFT file), b (its A factors negated) and c (B halved).
fn loras(dir: &Path) -> Vec<PathBuf> {
    let peft = tiny().join("peft_lora/pytorch_lora_weights.safetensors");
    let base = format::read(&peft, None).unwrap();
    let scaled = |a: f32, b: f32| {
        let mut l = base.clone();
        let scale = |f: &Factor, s: f32| {
            let v: Vec<f32> = f.to_f32().iter().map(|x| x * s).collect();
            Factor::from_f32(f.shape, &v)
        };
        for layer in &mut l.layers {
            layer.a = scale(&layer.a, a);
            layer.b = scale(&layer.b, b);
        }
        l
    };
    [
        ("a", scaled(1.0, 1.0)),
        ("b", scaled(-1.0, 1.0)),
        ("c", scaled(1.0, 0.5)),
    ]
    .iter()
    .map(|(name, l)| {
        let p = dir.join(format!("{name}.safetensors"));
        format::write(&p, l, LoraFormat::Diffusers).unwrap();
        p
    })
    .collect()
}

#[test]
fn ray_serve_routes_by_lora_and_matches_the_c_abi() {
    let python = workspace().join(".v2l/py/bin/python");
    let has_ray = Command::new(&python)
        .args(["-c", "import ray.serve"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_ray,
        "{} has no ray[serve]: run bash scripts/setup-tests.sh",
        python.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let wheel = build_wheel(&tmp.path().join("dist"));
    let venv_python = venv_with(
        &tmp.path().join("venv"),
        &wheel,
        Some(&workspace().join(".v2l/py")),
    );
    let engine = build_engine(tmp.path());
    let lora_dir = tmp.path().join("loras");
    std::fs::create_dir(&lora_dir).unwrap();
    let files = loras(&lora_dir);
    let inp = inputs();
    let frame = tmp.path().join("first.rgb");
    std::fs::write(&frame, &inp.first_frame.rgb).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();

    let o = Command::new(&venv_python)
        .arg(workspace().join("python/tests/ray_serve_check.py"))
        .args([&engine, &lora_dir, &frame, &out])
        .env_remove("PYTHONPATH")
        .env_remove("V2L_LIBRARY")
        .env_remove("ORT_DYLIB_PATH")
        .env("V2L_MAX_LORAS_PER_REPLICA", "1")
        .env("RAY_USAGE_STATS_ENABLED", "0")
        // Ray Serve kills an HTTP proxy not ready within 5 s; on a busy 2-core machine (a
        // decode running beside the test suite) that killed it before it started.
        .env("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
        .env("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "120")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // The same requests through the C ABI.
    let mut expected = std::collections::BTreeMap::new();
    expected.insert("base", c_abi_frames(&engine, None));
    for (name, file) in ["a", "b", "c"].iter().zip(&files) {
        expected.insert(*name, c_abi_frames(&engine, Some(file)));
    }
    assert_ne!(expected["a"], expected["b"]);
    assert_ne!(expected["a"], expected["c"]);

    let summary: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let mut replica_of = std::collections::BTreeMap::new();
    for s in summary.iter().filter(|s| s.get("lora").is_some()) {
        let (i, name) = (s["i"].as_u64().unwrap(), s["lora"].as_str().unwrap());
        let got = std::fs::read(out.join(format!("{i}_{name}.rgb"))).unwrap();
        assert!(
            got == expected[name],
            "request {i} ({name}): not the C ABI's frames"
        );
        if name != "base" {
            let r = s["replica"].as_str().unwrap().to_string();
            let first = replica_of.entry(name.to_string()).or_insert(r.clone());
            assert_eq!(*first, r, "LoRA {name} moved between replicas: {summary:?}");
        }
    }
    assert_ne!(
        replica_of["a"], replica_of["b"],
        "a and b share a replica: {summary:?}"
    );
    // c was loaded where a or b was (one LoRA per replica): that replica had loaded twice.
    let c = summary.iter().find(|s| s["lora"] == "c").unwrap();
    assert_eq!(c["loads"], 2, "{summary:?}");
    let bad = summary
        .iter()
        .find(|s| s.get("bad_status").is_some())
        .unwrap();
    assert_eq!(
        (
            bad["bad_status"].as_u64(),
            bad["bad_body"]["error"]["field"].as_str()
        ),
        (Some(400), Some("image"))
    );
    let missing = summary
        .iter()
        .find(|s| s.get("missing_status").is_some())
        .unwrap();
    assert_eq!(missing["missing_status"], 404, "{missing}");
    assert!(
        !missing.to_string().contains(&*lora_dir.to_string_lossy()),
        "a server path leaked: {missing}"
    );
    let module = summary
        .iter()
        .find_map(|s| s.get("v2l_module"))
        .and_then(|m| m.as_str())
        .unwrap();
    assert!(
        module.starts_with(&*tmp.path().join("venv").to_string_lossy()),
        "v2l was not imported from the installed wheel: {module}"
    );
}

/// The Python package refuses what the C ABI would silently misread: a NUL inside a prompt or
/// a path (C strings end there) and a seed outside `uint64_t` (ctypes wraps -1 to 2^64 - 1).
#[test]
fn python_refuses_nul_characters_and_out_of_range_seeds() {
    let python = workspace().join(".v2l/py/bin/python");
    let script = r#"
import v2l
cases = [
    (v2l._c_text, ("prompt", "a red car\0 in the snow")),
    (v2l._c_path, ("engine\0/x",)),
    (lambda: v2l.Generator.generate(None, b"", height=64, width=64, frames=17, prompt="p", seed=-1), ()),
    (lambda: v2l.Generator.generate(None, b"", height=64, width=64, frames=17, prompt="p", seed=2**64), ()),
]
for f, args in cases:
    try:
        f(*args)
    except ValueError as e:
        print("refused:", e)
    else:
        raise SystemExit("accepted")
"#;
    let o = Command::new(&python)
        .args(["-c", script])
        .env("PYTHONPATH", workspace().join("python"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.matches("refused:").count(), 4, "{out}");
    assert!(out.contains("NUL") && out.contains("seed is -1"), "{out}");
}
