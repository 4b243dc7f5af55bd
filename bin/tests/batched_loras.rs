//! Many LoRAs in one DiT call: a batch of four requests with LoRA X, LoRA Y, no LoRA and X at
//! scale 0.5 (each its own seed), denoised together on an `unfused` engine, gives each
//! request's solo video: for CogVideoX (X: the reference clip's Video2LoRA LoRA, Y: the PEFT
//! fixture) and Wan2.1 T2V (X: the Wan PEFT fixture, Y: X with its A factors negated), end to
//! end to mp4. And rank padding (`v2l-compile --max-rank`) is exact.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use v2l_runtime::engine::Engine;
use v2l_runtime::lora::format::{self, Factor};
use v2l_runtime::lora::strategy::Strategy;
use v2l_runtime::lora::AppliedLora;
use v2l_runtime::pipeline::{Generation, Pipeline, Request, RequestLora, RequestParts};
use v2l_runtime::{read_safetensors, SessionOptions, Tensor};

use crate::common::tolerance::EFFECT_REL_L2;
use crate::common::CheckOn;
use crate::common::{self, frames_of, tiny};

fn load(engine: &Path) -> Pipeline {
    load_with(engine, &SessionOptions::default())
}

fn load_with(engine: &Path, opts: &SessionOptions) -> Pipeline {
    Pipeline::load_with_strategy(Engine::open(engine).unwrap(), opts, Strategy::Unfused).unwrap()
}

fn file_lora(path: &Path, multiplier: f32) -> AppliedLora {
    AppliedLora {
        lora: format::read(path, None).unwrap().into(),
        source: path.to_path_buf(),
        multiplier,
    }
}

/// `l` with every A factor negated: another LoRA of the same shapes.
fn negated(l: &AppliedLora) -> AppliedLora {
    let mut lora = (*l.lora).clone();
    for layer in &mut lora.layers {
        let v: Vec<f32> = layer.a.to_f32().iter().map(|x| -x).collect();
        layer.a = Factor::from_f32(layer.a.shape, &v);
    }
    AppliedLora {
        lora: lora.into(),
        source: "negated".into(),
        multiplier: l.multiplier,
    }
}

fn at(l: &AppliedLora, multiplier: f32) -> AppliedLora {
    AppliedLora {
        multiplier,
        ..l.clone()
    }
}

/// The tiny fixture's PEFT LoRA at multiplier 1.
fn peft_lora() -> AppliedLora {
    file_lora(
        &tiny().join("peft_lora/pytorch_lora_weights.safetensors"),
        1.0,
    )
}

/// The tiny DiT's fixture inputs (batch 2), without its outputs.
fn dit_inputs() -> std::collections::BTreeMap<String, Tensor> {
    read_safetensors(&tiny().join("dit_io.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("output"))
        .collect()
}

/// The four requests: X, Y, none, X at 0.5, seeds 11 to 14.
fn four(engine: &Engine, base: &RequestParts, x: &AppliedLora, y: &AppliedLora) -> Vec<Request> {
    let loras = [
        RequestLora::Loras(vec![x.clone()]),
        RequestLora::Loras(vec![y.clone()]),
        RequestLora::Base,
        RequestLora::Loras(vec![at(x, 0.5)]),
    ];
    seeded(engine, base, loras.map(|l| (l, base.guidance)))
}

/// Requests with these LoRAs and guidance scales, seeds 11 on.
fn seeded(
    engine: &Engine,
    base: &RequestParts,
    loras: impl IntoIterator<Item = (RequestLora, f32)>,
) -> Vec<Request> {
    let (h, w) = (base.noise.shape[3] * 8, base.noise.shape[4] * 8);
    loras
        .into_iter()
        .enumerate()
        .map(|(i, (lora, guidance))| RequestParts {
            lora,
            guidance,
            noise: engine
                .seeded_noise(base.frames, h, w, 11 + i as u64)
                .unwrap(),
            ..base.clone()
        })
        .map(|parts| parts.check(engine).unwrap())
        .collect()
}

/// Frames as the mp4 holds them: written by `write_mp4`, decoded by ffmpeg.
fn mp4_frames(g: &Generation, dir: &Path, name: &str) -> Vec<u8> {
    let rgb = v2l_runtime::video::to_rgb8(&g.frames).unwrap();
    let p = dir.join(name);
    v2l_runtime::video::write_mp4(&p, &rgb, 8).unwrap();
    v2l_runtime::video::read_frames(&p, rgb.height, rgb.width)
        .unwrap()
        .rgb
}

/// Solo runs against one batched run; returns the largest relative L2 of the final latents
/// (0 when bitwise equal) after checking the videos.
fn solo_equals_batch(p: &mut Pipeline, reqs: &[Request], dir: &Path) -> f64 {
    let solo: Vec<Generation> = reqs
        .iter()
        .map(|r| p.generate(r, &mut |_, _| true).unwrap())
        .collect();
    let batch = p.generate_batch(reqs, &mut |_, _| true).unwrap();
    assert_eq!(batch.len(), reqs.len());
    let mut worst = 0f64;
    for (i, (s, b)) in solo.iter().zip(&batch).enumerate() {
        let (ls, lb) = (
            s.latents_steps.last().unwrap(),
            b.latents_steps.last().unwrap(),
        );
        let d = if ls == lb { 0.0 } else { ls.rel_l2(lb) };
        eprintln!("request {i}: relative L2 from solo {d:e}");
        worst = worst.max(d);
        if d == 0.0 {
            assert!(s.frames == b.frames, "request {i}: frames differ");
            assert!(
                mp4_frames(s, dir, &format!("solo{i}.mp4"))
                    == mp4_frames(b, dir, &format!("batch{i}.mp4")),
                "request {i}: the mp4s differ"
            );
        }
    }
    // The four are different videos: the batch did not mix them up.
    for i in 0..reqs.len() {
        for j in i + 1..reqs.len() {
            let (a, b) = (
                batch[i].latents_steps.last().unwrap(),
                batch[j].latents_steps.last().unwrap(),
            );
            assert!(
                a.rel_l2(b) > EFFECT_REL_L2,
                "requests {i} and {j} gave the same latents"
            );
        }
    }
    worst
}

#[test]
fn a_mixed_lora_batch_gives_each_cogvideox_request_its_solo_video() {
    let d = tempfile::tempdir().unwrap();
    let eng = common::engine(d.path());
    let io = read_safetensors(&tiny().join("e2e_io.safetensors")).unwrap();
    let mut p = load(&eng);
    let x = AppliedLora {
        lora: p
            .predict(&frames_of(&io["reference_u8"]), 1.0)
            .unwrap()
            .lora
            .into(),
        source: "x".into(),
        multiplier: 1.0,
    };
    let y = peft_lora();
    let base = common::cogvideox_request(&io);
    let engine = Engine::open(&eng).unwrap();
    let reqs = four(&engine, &base, &x, &y);
    let worst = solo_equals_batch(&mut p, &reqs, d.path());
    eprintln!("CogVideoX mixed batch of 4: largest relative L2 from solo {worst:e}");
    assert_eq!(worst, 0.0, "not bitwise: {worst:e}");
    // A GPU session's way, the four slots' factors made in one buffer and each input a view
    // into it, gives the same batch.
    let packed = SessionOptions {
        pack_fixed_inputs: true,
        ..Default::default()
    };
    let last = |g: Vec<Generation>| -> Vec<Tensor> {
        g.into_iter()
            .map(|g| g.latents_steps.last().unwrap().clone())
            .collect()
    };
    let want = last(p.generate_batch(&reqs, &mut |_, _| true).unwrap());
    let mut q = load_with(&eng, &packed);
    assert!(last(q.generate_batch(&reqs, &mut |_, _| true).unwrap()) == want);
}

/// Two other batches, each request's video against its solo run:
/// - four requests with one LoRA share one slot of factors over the whole batch (eight
///   samples): bitwise;
/// - requests running different numbers of guidance samples (one at guidance 1) take one slot
///   per sample: within rounding (a request's branch rows are split otherwise than alone).
#[test]
fn batches_of_one_lora_and_of_mixed_guidance_give_each_request_its_solo_video() {
    let d = tempfile::tempdir().unwrap();
    let eng = common::engine(d.path());
    let io = read_safetensors(&tiny().join("e2e_io.safetensors")).unwrap();
    let mut p = load(&eng);
    let x = peft_lora();
    let y = negated(&x);
    let base = common::cogvideox_request(&io);
    let g = base.guidance;
    assert!(g > 1.0, "the fixture request runs guidance");
    let engine = Engine::open(&eng).unwrap();
    let cases = [
        ("four with one LoRA", vec![(&x, g); 4], 0.0),
        (
            "with and without guidance",
            vec![(&x, g), (&y, 1.0), (&x, g)],
            1e-5,
        ),
    ];
    for (what, loras, bound) in cases {
        let loras = loras
            .into_iter()
            .map(|(l, g)| (RequestLora::Loras(vec![l.clone()]), g));
        let reqs = seeded(&engine, &base, loras);
        let worst = solo_equals_batch(&mut p, &reqs, d.path());
        eprintln!("CogVideoX batch, {what}: largest relative L2 from solo {worst:e}");
        assert!(worst <= bound, "{what}: {worst:e}");
    }
}

#[test]
fn a_mixed_lora_batch_gives_each_wan_request_its_solo_video() {
    let wan = tiny().join("../wan-tiny");
    let io = read_safetensors(&wan.join("e2e_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let eng = common::wan_engine(
        d.path(),
        &[
            ("transformer", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
            ("text_encoder", "text_encoder"),
        ],
    );
    let mut p = load(&eng);
    let x = file_lora(&wan.join("lora/pytorch_lora_weights.safetensors"), 1.0);
    let y = negated(&x);
    let base = common::wan_t2v_request(&io, 3);
    let engine = Engine::open(&eng).unwrap();
    let reqs = four(&engine, &base, &x, &y);
    let worst = solo_equals_batch(&mut p, &reqs, d.path());
    eprintln!("Wan mixed batch of 4: largest relative L2 from solo {worst:e}");
    assert_eq!(worst, 0.0, "not bitwise: {worst:e}");
}

/// Factors padded to `--max-rank` with zero rows and columns give the unpadded outputs.
#[test]
fn rank_padding_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let (pd, qd) = (d.path().join("plain"), d.path().join("padded"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&qd).unwrap();
    let plain = common::engine_with(&pd, &[]);
    let padded = common::engine_with(&qd, &["--max-rank", "64"]);
    assert_eq!(
        Engine::open(&padded).unwrap().bundle.unwrap().max_rank,
        Some(64)
    );
    let io = read_safetensors(&tiny().join("e2e_io.safetensors")).unwrap();
    let y = peft_lora();
    let rank = y.lora.layers.iter().map(|l| l.rank()).max().unwrap();
    assert!(rank < 64, "the fixture LoRA has rank {rank}");
    let req = RequestParts {
        lora: RequestLora::Loras(vec![y]),
        ..common::cogvideox_request(&io)
    };
    let run = |eng: &Path| -> Tensor {
        let mut p = load(eng);
        p.generate(&req.on(&p), &mut |_, _| true)
            .unwrap()
            .latents_steps
            .last()
            .unwrap()
            .clone()
    };
    let (a, b) = (run(&plain), run(&padded));
    assert!(a == b, "padded to 64: relative L2 {:e}", a.rel_l2(&b));
}

/// A TensorRT bundle (CPU side: TensorRT cannot run here) takes LoRA factors as inputs by
/// default: its unfused DiT passes the TensorRT checks, its factor inputs have a dynamic
/// sample axis and rank, and the DiT's session gets an optimisation profile over the batch with
/// the factors at the engine's `--max-rank`.
#[test]
fn a_tensorrt_bundle_takes_lora_factors_as_inputs() {
    use v2l_graphs::proto::tensor_shape_proto::dimension::Value as D;
    let d = tempfile::tempdir().unwrap();
    let eng = common::engine_with(d.path(), &["--backend", "tensorrt"]);
    let engine = Engine::open(&eng).unwrap();
    let bundle = engine.bundle.clone().unwrap();
    assert_eq!(bundle.lora_strategy, Strategy::Unfused);
    assert_eq!(bundle.max_rank, Some(64));
    let graph = v2l_graphs::read_model(
        &eng.join(
            &bundle
                .dit_variants
                .file(
                    v2l_contracts::bundle::VariantGraph::Strategy(Strategy::Unfused),
                    false,
                )
                .unwrap(),
        ),
    )
    .unwrap();
    let dit = engine.manifest.dit.as_ref().unwrap();
    let targets: Vec<(String, v2l_graphs::DType)> = dit
        .lora_targets
        .iter()
        .map(|t| (format!("{}.weight", t.name), v2l_graphs::DType::F32))
        .collect();
    let problems = v2l_graphs::check::tensorrt_problems(&graph, &targets);
    assert!(problems.is_empty(), "{problems:?}");
    let t = &dit.lora_targets[0];
    let [a, _, _] = v2l_graphs::passes::lora_input_names(&format!("{}.weight", t.name));
    let input = graph
        .graph
        .as_ref()
        .unwrap()
        .input
        .iter()
        .find(|i| i.name == a)
        .unwrap();
    let Some(v2l_graphs::proto::type_proto::Value::TensorType(tt)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        panic!("{a} has no tensor type")
    };
    let dims: Vec<_> = tt
        .shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.value.clone())
        .collect();
    assert!(matches!(dims[0], Some(D::DimParam(_))), "samples: {dims:?}");
    assert!(matches!(dims[1], Some(D::DimParam(_))), "rank: {dims:?}");
    assert_eq!(dims[2], Some(D::DimValue(t.in_features as i64)));

    let opts = engine.dit_options(&engine.session_options(1));
    let trt = opts.backend.tensorrt_options();
    let get = |k: &str| {
        trt.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let min = get("trt_profile_min_shapes");
    let max = get("trt_profile_max_shapes");
    assert!(
        min.contains(&format!("{a}:1x64x{}", t.in_features)),
        "{min}"
    );
    assert!(
        max.contains(&format!("{a}:8x64x{}", t.in_features)),
        "{max}"
    );
    assert!(
        min.contains("hidden_states:1x") && max.contains("hidden_states:8x"),
        "{min}"
    );
}

/// Kept factor inputs (`DitRunner::set_factor_cache`): switching back to a LoRA used before
/// hands its kept inputs to the session and gives the outputs of laying them out anew, bitwise,
/// through plain and bound runs, with every layout packed in one buffer (a GPU session's way),
/// and bound runs over packed inputs (a GPU session's with CUDA graphs),
/// and after the DiT is cut for step caching; the budget drops the
/// least recently used; a refused LoRA changes neither the inputs nor what is kept.
#[test]
fn kept_factor_inputs_give_the_outputs_of_fresh_ones() {
    use v2l_runtime::lora::factors::FactorCacheStats;
    use v2l_runtime::lora::strategy::DitRunner;
    // Bound runs with packed inputs (views into one buffer) used to hang in ort's copy of a
    // view, under a lock it already held.
    let _watchdog = common::watchdog(
        "kept_factor_inputs_give_the_outputs_of_fresh_ones",
        std::time::Duration::from_secs(600),
    );

    let d = tempfile::tempdir().unwrap();
    let eng = common::engine(d.path());
    let engine = Engine::open(&eng).unwrap();
    let inputs = dit_inputs();
    let x = peft_lora();
    let (y, z) = (negated(&x), at(&x, 0.5));
    let loras = [Some(&x), Some(&y), Some(&z), None];
    let plain = engine.session_options(0);
    let bound = SessionOptions {
        bound_runs: true,
        ..plain.clone()
    };
    // A GPU session's way: every layout made in one buffer, each input a view into it.
    let packed = SessionOptions {
        pack_fixed_inputs: true,
        ..plain.clone()
    };
    // A cuda engine's with CUDA graphs: both.
    let bound_packed = SessionOptions {
        bound_runs: true,
        pack_fixed_inputs: true,
        ..plain.clone()
    };
    let sample = |r: &mut DitRunner| r.run(&inputs).unwrap().remove("sample").unwrap();
    // Each LoRA laid out by a runner of its own that keeps nothing.
    let fresh = |opts: &SessionOptions, l: Option<&AppliedLora>, cut: bool| {
        let mut r = DitRunner::load(&engine, opts, Strategy::Unfused).unwrap();
        r.set_lora(&engine, l).unwrap();
        if cut {
            r.cut_for_caching(&engine).unwrap();
        }
        sample(&mut r)
    };
    let want: Vec<Tensor> = loras.iter().map(|l| fresh(&plain, *l, false)).collect();
    for i in 0..want.len() {
        for j in i + 1..want.len() {
            assert!(want[i].rel_l2(&want[j]) > EFFECT_REL_L2, "{i} and {j}");
        }
    }
    let stats = |r: &DitRunner| {
        let s = r.factor_cache_stats();
        (s.entries, s.hits, s.misses)
    };
    for opts in [&plain, &bound, &packed, &bound_packed] {
        let what = match (opts.bound_runs, opts.pack_fixed_inputs) {
            (true, true) => "bound and packed",
            (true, false) => "bound",
            (false, true) => "packed",
            _ => "plain",
        };
        let mut r = DitRunner::load(&engine, opts, Strategy::Unfused).unwrap();
        // Loading laid one slot out, which serves both samples (CFG): a miss, nothing kept.
        assert!(sample(&mut r) == want[3], "{what}: the base");
        assert_eq!(stats(&r), (0, 0, 1), "{what}");
        r.set_factor_cache(1 << 30);
        let switch = |r: &mut DitRunner, k: usize| {
            r.set_lora(&engine, loras[k]).unwrap();
            assert!(sample(r) == want[k], "{what}: LoRA {k} differs");
        };
        // X, Y, Z laid out; the base was kept: one slot (rank 1, zeros) for both samples.
        switch(&mut r, 0);
        let base_bytes = r.factor_cache_stats().bytes;
        let one_slot: u64 = engine
            .dit_targets()
            .unwrap()
            .iter()
            .map(|t| 4 * (t.in_features + t.out_features + 1) as u64)
            .sum();
        assert_eq!(base_bytes, one_slot, "{what}: the base's kept inputs");
        switch(&mut r, 1);
        let one = r.factor_cache_stats().bytes - base_bytes;
        switch(&mut r, 2);
        switch(&mut r, 3);
        assert_eq!(stats(&r), (3, 1, 4), "{what}");
        for k in [0, 2, 1, 3, 0] {
            switch(&mut r, k);
        }
        assert_eq!(stats(&r), (3, 6, 4), "{what}");
        // The same LoRA again: nothing to do, not even a hit.
        switch(&mut r, 0);
        assert_eq!(stats(&r), (3, 6, 4), "{what}");

        // A LoRA that matches no layer of the DiT is refused: X stays, the kept stay.
        let mut stray = (*x.lora).clone();
        stray.layers[0].module = "no_such_block.attn1.to_q".into();
        let stray = AppliedLora {
            lora: stray.into(),
            ..x.clone()
        };
        assert!(r.set_lora(&engine, Some(&stray)).is_err(), "{what}");
        assert!(
            sample(&mut r) == want[0],
            "{what}: the refused LoRA changed X"
        );
        assert_eq!(stats(&r), (3, 6, 4), "{what}");

        // Room for one LoRA's layout: the least recently used go (the base's stays).
        r.set_factor_cache(one);
        assert_eq!(stats(&r), (1, 6, 4), "{what}");
        switch(&mut r, 1); // laid out again; X kept, the base dropped
        switch(&mut r, 2); // laid out again over X's inputs; Y kept
        switch(&mut r, 1); // Y kept: a hit
        assert_eq!(stats(&r), (1, 7, 6), "{what}");
        let s: FactorCacheStats = r.factor_cache_stats();
        assert!(s.bytes <= one, "{what}: {} bytes kept over {one}", s.bytes);

        // Cut for step caching: the new sessions take Y anew; Z's kept inputs serve them.
        r.cut_for_caching(&engine).unwrap();
        assert!(
            sample(&mut r) == fresh(opts, loras[1], true),
            "{what}: cut, Y"
        );
        r.set_lora(&engine, loras[2]).unwrap();
        assert!(
            sample(&mut r) == fresh(opts, loras[2], true),
            "{what}: cut, Z"
        );
        assert_eq!(stats(&r), (1, 8, 7), "{what}");
    }
}

/// `set_sample_loras` gives each of its slots an equal group of consecutive samples: two slots
/// over a batch of two give each sample its own LoRA (the rows of that LoRA's whole-batch run);
/// three slots do not split two samples, and the run says so.
#[test]
fn slots_split_the_dit_batch_into_equal_groups() {
    use v2l_runtime::lora::strategy::DitRunner;

    let d = tempfile::tempdir().unwrap();
    let eng = common::engine(d.path());
    let engine = Engine::open(&eng).unwrap();
    let inputs = dit_inputs();
    assert_eq!(inputs[v2l_contracts::io::dit::HIDDEN_STATES].shape[0], 2);
    let x = peft_lora();
    let y = negated(&x);
    let mut r = DitRunner::load(&engine, &engine.session_options(0), Strategy::Unfused).unwrap();
    let sample = |r: &mut DitRunner| r.run(&inputs).unwrap().remove("sample").unwrap();
    let row = |t: &Tensor, i: usize| t.slice_axis(0, i, i + 1).unwrap();
    r.set_lora(&engine, Some(&x)).unwrap();
    let all_x = sample(&mut r);
    r.set_lora(&engine, Some(&y)).unwrap();
    let all_y = sample(&mut r);
    assert!(row(&all_x, 0).rel_l2(&row(&all_y, 0)) > EFFECT_REL_L2);
    r.set_sample_loras(&engine, &[Some(&x), Some(&y)]).unwrap();
    let mixed = sample(&mut r);
    assert!(row(&mixed, 0) == row(&all_x, 0), "sample 0 took X");
    assert!(row(&mixed, 1) == row(&all_y, 1), "sample 1 took Y");
    r.set_sample_loras(&engine, &[Some(&x), Some(&y), None])
        .unwrap();
    let e = r.run(&inputs).unwrap_err().to_string();
    assert!(
        e.contains("2 samples do not split into the 3 groups"),
        "{e}"
    );
    let e = r.set_sample_loras(&engine, &[]).unwrap_err().to_string();
    assert!(e.contains("none given"), "{e}");
}
