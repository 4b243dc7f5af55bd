//! The Python package (`python/v2l`, ctypes over libv2l) and its Ray Serve deployment: a
//! local Ray instance (CPU, loopback) runs two replicas; requests carry LoRA ids through Serve's
//! model multiplexing. Every answer equals the C ABI's frames for the same request bitwise, and
//! each LoRA is served by the replica that holds it (one LoRA per replica: a third one evicts).
//! Needs `ray[serve]` in `.v2l/py` (scripts/setup.sh installs it).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use v2l::*;
use v2l_runtime::lora::format::{self, Factor, LoraFormat};

const PROMPT: &str = "A red car drives through a snowy forest at dusk.";

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
        "{} has no ray[serve]: run scripts/setup.sh",
        python.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let engine = build_engine(tmp.path());
    let lora_dir = tmp.path().join("loras");
    std::fs::create_dir(&lora_dir).unwrap();
    let files = loras(&lora_dir);
    let inp = inputs();
    let frame = tmp.path().join("first.rgb");
    std::fs::write(&frame, &inp.first_frame.rgb).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();

    let o = Command::new(&python)
        .arg(workspace().join("python/tests/ray_serve_check.py"))
        .args([&engine, &lora_dir, &frame, &out])
        .env("PYTHONPATH", workspace().join("python"))
        .env("V2L_LIBRARY", lib_dir().join("libv2l.so"))
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

    // The same requests through the C ABI, with the replicas' one thread per session (ONNX
    // Runtime's sums are bitwise reproducible at a given thread count, not across counts).
    let mut e = std::ptr::null_mut();
    let one = V2lEngineOptions { threads: 1 };
    ok(unsafe { v2l_engine_open(cpath(&engine).as_ptr(), &one, &mut e) });
    let g = generator(e);
    let prompt = CString::new(PROMPT).unwrap();
    let mut p = params(&inp, 17, 2, 5);
    p.prompt_embeds = std::ptr::null();
    p.negative_prompt_embeds = std::ptr::null();
    p.prompt = prompt.as_ptr();
    let mut expected = std::collections::BTreeMap::new();
    expected.insert("base", generate(g, &p));
    for (name, file) in ["a", "b", "c"].iter().zip(&files) {
        let mut l = std::ptr::null_mut();
        ok(unsafe { v2l_engine_load_lora(e, cpath(file).as_ptr(), &mut l) });
        ok(unsafe { v2l_generator_set_lora(g, l, 1.0) });
        expected.insert(*name, generate(g, &p));
        ok(unsafe { v2l_lora_free(l) });
    }
    ok(unsafe { v2l_generator_free(g) });
    ok(unsafe { v2l_engine_free(e) });
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
