//! `v2l-serve` end to end: the real server on loopback, driven by a real HTTP client
//! (`v2l_serve::client`, ureq), against the tiny engine.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use v2l_serve::client::{Client, Form};

use crate::common;

/// A running `v2l-serve`, killed when dropped.
pub(crate) struct Server {
    child: Child,
    base: String,
    /// What it printed before it listened.
    start_log: Vec<String>,
    log: std::sync::mpsc::Receiver<String>,
}

impl Server {
    pub(crate) fn start(engine: &Path, state: &Path, extra: &[&str]) -> Server {
        Server::start_with(engine, state, extra, |_| {})
    }

    /// [`Server::start`], with `setup` adjusting the command first (environment, limits).
    pub(crate) fn start_with(
        engine: &Path,
        state: &Path,
        extra: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_v2l-serve"));
        cmd.arg("--engine")
            .arg(engine)
            .arg("--state-dir")
            .arg(state)
            .args(["--addr", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut start_log = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the server starts");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let base = rest.split(' ').next().unwrap().to_string();
                return Server {
                    child,
                    base,
                    start_log,
                    log: rx,
                };
            }
            start_log.push(line);
        }
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(&self.base, None)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` it listens on.
    pub(crate) fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// SIGTERM, then waits for the exit; returns the exit code and what it printed.
    pub(crate) fn terminate(mut self) -> (i32, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let mut log = std::mem::take(&mut self.start_log);
        log.extend(self.log.try_iter());
        (status.code().unwrap_or(-1), log.join("\n"))
    }

    pub(crate) fn kill_hard(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::tiny().join(name)).unwrap()
}

const PROMPT: &str = "A red car drives through a snowy forest at dusk.";
const LORA_FILE: &str = "peft_lora/pytorch_lora_weights.safetensors";

/// The three LoRA choices clients make, as form fields and as `v2l-run` flags.
fn choice(i: usize, steps: usize) -> (Form, Vec<String>) {
    let base = Form::new()
        .file("image", fixture("first_frame.png"))
        .text("prompt", PROMPT)
        .text("steps", steps)
        .text("seed", 5);
    let t = common::tiny();
    match i % 3 {
        0 => (base, vec![]),
        1 => (
            base.file("reference", fixture("reference.mp4")),
            vec![
                "--reference".into(),
                t.join("reference.mp4").display().to_string(),
            ],
        ),
        _ => (
            base.file("lora", fixture(LORA_FILE))
                .text("lora_scale", 0.7),
            vec![
                "--lora".into(),
                t.join(LORA_FILE).display().to_string(),
                "--lora-weights".into(),
                "0.7".into(),
            ],
        ),
    }
}

/// `v2l-run` with the same request, sequentially: the mp4 it writes.
fn cli_video(engine: &Path, dir: &Path, i: usize) -> Vec<u8> {
    cli_video_with(engine, dir, i, &[])
}

fn cli_video_with(engine: &Path, dir: &Path, i: usize, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(format!("cli{i}{}.mp4", extra.join("")));
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(engine)
        .arg("--image")
        .arg(common::tiny().join("first_frame.png"))
        .args([
            "--prompt", PROMPT, "--steps", "2", "--seed", "5", "--quiet", "-o",
        ])
        .arg(&out)
        .args(choice(i, 2).1)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn frames_of(mp4: &[u8], dir: &Path, name: &str) -> Vec<u8> {
    let p = dir.join(name);
    std::fs::write(&p, mp4).unwrap();
    v2l_runtime::video::read_frames(&p, 64, 64).unwrap().rgb
}

/// Eight concurrent clients with three different LoRAs (base, a reference clip's, an uploaded
/// file at 0.7) on two workers: every video equals the sequential `v2l-run` of its request
/// (no cross-talk); the reference clip's LoRA is predicted once and then served from the
/// cache; LoRA endpoints, events, cancellation, metrics and bad requests.
#[test]
fn concurrent_clients_get_exactly_the_cli_videos() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let server = Server::start(&engine, &state, &["--workers", "2", "--max-steps", "2000"]);
    let c = server.client();
    assert_eq!(c.get("/healthz").unwrap().status, 200);
    assert_eq!(c.get("/readyz").unwrap().status, 200);
    let doc = c.get("/openapi.json").unwrap().json();
    for path in [
        "/v1/videos",
        "/v1/videos/{id}",
        "/v1/videos/{id}/events",
        "/v1/videos/{id}/content",
        "/v1/loras",
        "/v1/loras/{id}",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }

    let expected: Vec<Vec<u8>> = (0..3).map(|i| cli_video(&engine, tmp.path(), i)).collect();
    assert_ne!(
        expected[0], expected[1],
        "the LoRAs must change the video for this test to mean anything"
    );
    assert_ne!(expected[0], expected[2]);
    let results: Vec<(usize, serde_json::Value, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let c = server.client();
                s.spawn(move || {
                    let (job, mp4) = c
                        .generate(&choice(i, 2).0, Duration::from_secs(120))
                        .unwrap();
                    (i, job, mp4)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, job, mp4) in &results {
        let want = &expected[i % 3];
        if mp4 != want {
            // Same pixels is what matters; the container bytes are checked to be equal too.
            assert_eq!(
                frames_of(mp4, tmp.path(), "a.mp4"),
                frames_of(want, tmp.path(), "b.mp4"),
                "client {i} got another request's video"
            );
            panic!("client {i}: same frames but different mp4 bytes");
        }
        assert_eq!(job["state"], "succeeded");
    }
    // Three reference jobs: the clip's LoRA was predicted at most twice (two workers may
    // race on the first miss) and served from the cache after.
    let cached = results
        .iter()
        .filter(|(i, j, _)| i % 3 == 1 && j["lora_cached"] == true)
        .count();
    assert!(cached >= 1, "no reference job hit the cache");

    // The reference clip's LoRA through /v1/loras equals `v2l-lora predict`.
    let r = c
        .post(
            "/v1/loras",
            &Form::new().file("reference", fixture("reference.mp4")),
        )
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "already predicted by the jobs: {}",
        String::from_utf8_lossy(&r.body)
    );
    let id = r.json()["lora_id"].as_str().unwrap().to_string();
    let served = c.get(&format!("/v1/loras/{id}")).unwrap();
    assert_eq!(served.status, 200);
    let served_path = tmp.path().join("served.safetensors");
    std::fs::write(&served_path, &served.body).unwrap();
    let cli_path = tmp.path().join("cli_lora.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-lora"))
        .args(["predict", "--engine"])
        .arg(&engine)
        .arg("--reference")
        .arg(common::tiny().join("reference.mp4"))
        .arg("-o")
        .arg(&cli_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &PathBuf| v2l_runtime::lora::format::read(p, None).unwrap().layers;
    assert_eq!(read(&served_path), read(&cli_path));
    // An uploaded file gets an id and comes back as a diffusers file with the same factors.
    let up = c
        .post("/v1/loras", &Form::new().file("lora", fixture(LORA_FILE)))
        .unwrap();
    assert_eq!(up.status, 201);
    let up_id = up.json()["lora_id"].as_str().unwrap().to_string();
    std::fs::write(
        &served_path,
        c.get(&format!("/v1/loras/{up_id}")).unwrap().body,
    )
    .unwrap();
    assert_eq!(read(&served_path), read(&common::tiny().join(LORA_FILE)));
    // ... and a job naming it by id is the CLI's video with that file.
    let (job, mp4) = c
        .generate(
            &choice(0, 2)
                .0
                .text("lora_id", &up_id)
                .text("lora_scale", 0.7),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(mp4, expected[2], "lora_id gave another video: {job}");
    assert_eq!(job["lora_cached"], true);

    // Events: progress in order, then one `end`.
    let r = c
        .post("/v1/videos", &choice(1, 2).0.text("steps", 3))
        .unwrap();
    // (`steps` given twice is refused by name)
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (400, Some("steps"))
    );
    let form = Form::new()
        .file("image", fixture("first_frame.png"))
        .text("prompt", PROMPT)
        .text("steps", 6)
        .file("reference", fixture("reference.mp4"));
    let id = c.post("/v1/videos", &form).unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let events = c.events(&id).unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["state"], "succeeded", "{events:?}");
    let steps: Vec<u64> = events.iter().filter_map(|e| e["step"].as_u64()).collect();
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]) && steps.last() == Some(&6),
        "{events:?}"
    );

    // Cancellation: a queued job at once, a running one after its current step.
    // 1000 steps at 128×128: seconds of work, long enough to cancel while it runs.
    let long = |steps: usize| choice(0, steps).0.text("height", 128).text("width", 128);
    let running = c.post("/v1/videos", &long(1000)).unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let running2 = c.post("/v1/videos", &long(1000)).unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let queued = c.post("/v1/videos", &long(2)).unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = c.delete(&format!("/v1/videos/{queued}")).unwrap();
    assert_eq!(
        (d.status, d.json()["state"].as_str()),
        (200, Some("cancelled"))
    );
    // DELETE on an ended job forgets it with its files.
    let d = c.delete(&format!("/v1/videos/{queued}")).unwrap();
    assert_eq!(
        (d.status, d.json()["state"].as_str()),
        (200, Some("deleted"))
    );
    assert_eq!(c.get(&format!("/v1/videos/{queued}")).unwrap().status, 404);
    assert_eq!(
        c.delete(&format!("/v1/videos/{queued}")).unwrap().status,
        404
    );
    for id in [&running, &running2] {
        // Wait until it runs, then cancel it.
        while c.get(&format!("/v1/videos/{id}")).unwrap().json()["state"] == "queued" {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(c.delete(&format!("/v1/videos/{id}")).unwrap().status, 202);
        let j = c.wait(id, Duration::from_secs(60)).unwrap();
        assert_eq!(j["state"], "cancelled", "{j}");
        assert!(j["step"].as_u64().unwrap() < 1000);
        assert_eq!(
            c.get(&format!("/v1/videos/{id}/content")).unwrap().status,
            409
        );
    }
    // The workers are healthy after cancellations: a base job is still the CLI's video.
    let (_, mp4) = c
        .generate(&choice(0, 2).0, Duration::from_secs(60))
        .unwrap();
    assert_eq!(mp4, expected[0], "a cancelled run left state behind");

    // Bad requests: each a 4xx naming the field, none a 5xx.
    let img = fixture("first_frame.png");
    let bad: Vec<(Form, u16, &str)> = vec![
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("steps", 1500),
            400,
            "steps",
        ),
        (Form::new().text("prompt", "x"), 400, "image"),
        (Form::new().file("image", img.clone()), 400, "prompt"),
        (
            Form::new()
                .file("image", b"GIF89a garbage".to_vec())
                .text("prompt", "x"),
            400,
            "image",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("frames", 6),
            400,
            "frames",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("width", 100000),
            400,
            "height/width",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("guidance", "inf"),
            400,
            "guidance",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("cache", "first-block:often"),
            400,
            "cache",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("colour", "red"),
            400,
            "colour",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .file("lora", b"not a lora".to_vec()),
            400,
            "lora",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .text("lora_id", "../../../etc/passwd"),
            404,
            "lora_id",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .file("reference", b"\x00\x00\x00\x18ftypmp42".to_vec()),
            400,
            "reference",
        ),
        (
            Form::new()
                .file("image", img.clone())
                .text("prompt", "x")
                .file("reference", img.clone()),
            400,
            "reference",
        ),
    ];
    for (form, status, field) in bad {
        let r = c.post("/v1/videos", &form).unwrap();
        let e = r.json();
        assert_eq!(
            (r.status, e["error"]["field"].as_str()),
            (status, Some(field)),
            "{e}"
        );
        assert!(
            !e.to_string().contains(&*state.to_string_lossy()),
            "a server path leaked: {e}"
        );
    }
    for (path, status) in [
        ("/v1/videos/nope", 404),
        ("/v1/videos/nope/content", 404),
        ("/v1/loras/nope", 404),
        ("/v1/loras/..%2F..%2Fjobs.sqlite", 404),
        ("/nope", 404),
    ] {
        assert_eq!(c.get(path).unwrap().status, status, "{path}");
    }
    let not_multipart = c.delete("/v1/loras").unwrap();
    assert_eq!(not_multipart.status, 405);

    let metrics = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    for needle in [
        "v2l_lora_cache_hits_total",
        "v2l_errors_total{kind=\"bad_field\"}",
        "v2l_stage_seconds_bucket{stage=\"job\"",
        "v2l_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("v2l_lora_cache_hits_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(hits >= 2, "{metrics}");
}

/// Nothing lost: a full queue says 429 with Retry-After; SIGTERM finishes the running job and
/// keeps the queued ones, which run after a restart; results stay downloadable; a job killed
/// mid-run is failed with the reason. With a bearer token, requests without it are refused.
#[test]
fn queued_jobs_survive_a_restart_and_a_crash_fails_the_running_one() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef-token\n").unwrap();
    let args = [
        "--queue",
        "2",
        "--max-steps",
        "5000",
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let server = Server::start(&engine, &state, &args);
    let anon = server.client();
    let c = Client::new(&server.base, Some("0123456789abcdef-token".into()));
    let (form, _) = choice(0, 2);
    let r = anon.post("/v1/videos", &form).unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["kind"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        Client::new(&server.base, Some("wrong-token-wrong-token".into()))
            .get("/v1/videos/x")
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        anon.get("/healthz").unwrap().status,
        200,
        "probes need no token"
    );

    let submit = |c: &Client, steps: usize| {
        let r = c.post("/v1/videos", &choice(0, steps).0).unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    };
    let long = submit(&c, 1000);
    while c.get(&format!("/v1/videos/{long}")).unwrap().json()["state"] == "queued" {
        std::thread::sleep(Duration::from_millis(5));
    }
    let q1 = submit(&c, 2);
    let q2 = submit(&c, 3);
    let full = c.post("/v1/videos", &choice(0, 2).0).unwrap();
    assert_eq!(full.status, 429);
    assert!(full.retry_after.is_some());
    assert_eq!(c.get("/readyz").unwrap().status, 503);

    let (code, log) = server.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("2 queued job(s) kept"), "{log}");

    let server = Server::start(&engine, &state, &args);
    let c = Client::new(&server.base, Some("0123456789abcdef-token".into()));
    let j = c.get(&format!("/v1/videos/{long}")).unwrap().json();
    assert_eq!(
        j["state"], "succeeded",
        "SIGTERM let the running job finish: {j}"
    );
    assert_eq!(j["step"], 1000);
    for id in [&q1, &q2] {
        assert_eq!(
            c.wait(id, Duration::from_secs(60)).unwrap()["state"],
            "succeeded"
        );
    }
    let video = c.get(&format!("/v1/videos/{long}/content")).unwrap();
    assert_eq!(video.status, 200);
    assert_eq!(&video.body[4..8], b"ftyp");

    // A crash (SIGKILL) mid-job: after a restart the job is failed, with the reason.
    let doomed = submit(&c, 1000);
    while c.get(&format!("/v1/videos/{doomed}")).unwrap().json()["state"] == "queued" {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill_hard();
    let server = Server::start(&engine, &state, &args);
    let c = Client::new(&server.base, Some("0123456789abcdef-token".into()));
    let j = c.get(&format!("/v1/videos/{doomed}")).unwrap().json();
    assert_eq!(
        (j["state"].as_str(), j["error"]["kind"].as_str()),
        (Some("failed"), Some("interrupted")),
        "{j}"
    );
    assert_eq!(
        c.get(&format!("/v1/videos/{q1}/content")).unwrap().status,
        200
    );
}

/// `--shutdown-grace`: a job still running when the grace after SIGTERM is over is stopped
/// within the node in flight and queued again, not failed, and the next start runs it from its
/// first step. Without the flag, a second signal does the same at once.
#[test]
fn a_job_running_past_the_shutdown_grace_is_queued_again() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let args = ["--max-steps", "1000"];
    let running = |c: &Client, id: &str| loop {
        let j = c.get(&format!("/v1/videos/{id}")).unwrap().json();
        if j["state"] == "running" && j["step"].as_u64().unwrap_or(0) >= 1 {
            return j;
        }
        assert!(
            ["queued", "running"].contains(&j["state"].as_str().unwrap()),
            "{j}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };

    let server = Server::start(
        &engine,
        &state,
        &[&args[..], &["--shutdown-grace", "1"]].concat(),
    );
    let c = server.client();
    let r = c.post("/v1/videos", &choice(0, 1000).0).unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    running(&c, &id);
    let t = std::time::Instant::now();
    let (code, log) = server.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(log.contains("--shutdown-grace is over"), "{log}");
    assert!(log.contains("queued again for its next start"), "{log}");
    assert!(log.contains("1 queued job(s) kept"), "{log}");

    // The next start runs it again, from its first step; a second signal stops it at once.
    let server = Server::start(&engine, &state, &args);
    let c = server.client();
    let j = running(&c, &id);
    assert!(j["error"].is_null(), "{j}");
    // SAFETY: signalling the server's process, ours to end.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    let (code, log) = server.terminate();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("a second signal: stopping the running jobs"),
        "{log}"
    );

    let server = Server::start(&engine, &state, &args);
    let c = server.client();
    let j = c.get(&format!("/v1/videos/{id}")).unwrap().json();
    assert!(
        ["queued", "running"].contains(&j["state"].as_str().unwrap()),
        "{j}"
    );
    c.delete(&format!("/v1/videos/{id}")).unwrap();
    let ended = c.wait(&id, Duration::from_secs(60)).unwrap();
    assert_eq!(ended["state"], "cancelled", "{ended}");
}

/// The contract (`reference`: a video or a safetensors `reference_u8` clip, as `v2l-run
/// --reference` takes it): the server's video from a safetensors clip equals the CLI's.
#[test]
fn a_safetensors_reference_gives_the_cli_video() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let io =
        v2l_runtime::tensor::read_safetensors(&common::tiny().join("e2e_io.safetensors")).unwrap();
    let clip = tmp.path().join("clip.safetensors");
    let mut only = std::collections::BTreeMap::new();
    only.insert("reference_u8".to_string(), io["reference_u8"].clone());
    v2l_runtime::tensor::write_safetensors(&clip, &only).unwrap();

    let s = Server::start(&engine, &tmp.path().join("state"), &[]);
    let form = Form::new()
        .file("image", fixture("first_frame.png"))
        .file("reference", std::fs::read(&clip).unwrap())
        .text("prompt", PROMPT)
        .text("steps", 2)
        .text("seed", 5);
    let (job, served) = s
        .client()
        .generate(&form, Duration::from_secs(120))
        .unwrap();
    assert!(job["lora_id"].is_string(), "{job}");

    let out = tmp.path().join("cli.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .arg("--image")
        .arg(common::tiny().join("first_frame.png"))
        .arg("--reference")
        .arg(&clip)
        .args([
            "--prompt", PROMPT, "--steps", "2", "--seed", "5", "--quiet", "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = std::fs::read(&out).unwrap();
    assert!(
        frames_of(&served, tmp.path(), "served.mp4") == frames_of(&cli, tmp.path(), "cli2.mp4"),
        "the server's video from a safetensors reference differs from v2l-run's"
    );
    // Without the hypernetwork's input it would be the base video: the clip mattered.
    let base = cli_video(&engine, tmp.path(), 0);
    assert_ne!(
        frames_of(&base, tmp.path(), "base.mp4"),
        frames_of(&cli, tmp.path(), "cli3.mp4")
    );
}

/// `--batch 4`: eight concurrent clients with three LoRA choices (none, a reference clip's, an
/// uploaded file at 0.7) on one worker share DiT calls, and every video is still the one
/// `v2l-run` makes for that request alone (same `unfused` strategy).
#[test]
fn batched_jobs_get_exactly_their_solo_videos() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let server = Server::start(
        &engine,
        &tmp.path().join("state"),
        &["--workers", "1", "--batch", "4", "--batch-wait-ms", "300"],
    );
    let unfused = ["--lora-strategy", "unfused"];
    let expected: Vec<Vec<u8>> = (0..3)
        .map(|i| cli_video_with(&engine, tmp.path(), i, &unfused))
        .collect();
    // The reference clip's LoRA first, alone: then every batch finds it stored.
    let c = server.client();
    c.generate(&choice(1, 2).0, Duration::from_secs(120))
        .unwrap();
    let results: Vec<(usize, serde_json::Value, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let c = server.client();
                s.spawn(move || {
                    let (job, mp4) = c
                        .generate(&choice(i, 2).0, Duration::from_secs(120))
                        .unwrap();
                    (i, job, mp4)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut batched = 0;
    for (i, job, mp4) in &results {
        assert!(
            frames_of(mp4, tmp.path(), "a.mp4") == frames_of(&expected[i % 3], tmp.path(), "b.mp4"),
            "client {i}: not its solo video ({job})"
        );
        if job["timings"]["batch_size"].as_f64().unwrap_or(1.0) > 1.0 {
            batched += 1;
        }
    }
    assert!(batched >= 2, "no jobs shared a DiT call: {results:?}");
    // The reference clip's LoRA twice in turn: the second switch finds its factor inputs kept
    // (`--factor-cache-mb`, on by default), and the video is still the CLI's.
    for _ in 0..2 {
        let (job, mp4) = c
            .generate(&choice(1, 2).0, Duration::from_secs(120))
            .unwrap();
        assert!(
            frames_of(&mp4, tmp.path(), "a.mp4") == frames_of(&expected[1], tmp.path(), "b.mp4"),
            "with kept factor inputs: not its solo video ({job})"
        );
    }
    let metrics = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert!(value("v2l_factor_cache_hits_total") >= 1, "{metrics}");
    assert!(value("v2l_factor_cache_entries") >= 1, "{metrics}");
    assert!(value("v2l_factor_cache_bytes") > 0, "{metrics}");
    // Without the unfused strategy, batching is refused at start.
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-serve"))
        .arg("--engine")
        .arg(&engine)
        .arg("--state-dir")
        .arg(tmp.path().join("state2"))
        .args(["--batch", "2", "--lora-strategy", "bound"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora-strategy unfused"));
}

/// A CogVideoX-Fun-InP engine (Video2LoRA's released backbone) served: with a reference clip at
/// its source size (48×80, as a safetensors clip and as the mp4), the server's video equals
/// `v2l-run`'s, for the default sampler, for `scheduler=dpm` and with step caching
/// (`cache=first-block:1e9`).
#[test]
fn a_fun_inpaint_engine_serves_the_cli_video() {
    let tmp = tempfile::tempdir().unwrap();
    let fun = common::tiny().join("../cogvideox-fun-inp-tiny");
    let engine = common::engine_of(&fun, tmp.path(), &[]);
    let io = v2l_runtime::tensor::read_safetensors(&fun.join("e2e_io.safetensors")).unwrap();
    let write = |name: &str, tensors: &[(&str, &str)]| {
        let m: std::collections::BTreeMap<String, v2l_runtime::Tensor> = tensors
            .iter()
            .map(|(to, from)| (to.to_string(), io[*from].clone()))
            .collect();
        let p = tmp.path().join(name);
        v2l_runtime::tensor::write_safetensors(&p, &m).unwrap();
        p
    };
    let prompts = write(
        "prompts.safetensors",
        &[
            ("prompt_embeds", "prompt_embeds"),
            ("negative_prompt_embeds", "negative_prompt_embeds"),
        ],
    );
    let clip = write(
        "clip.safetensors",
        &[("reference_u8", "reference_u8_decoded")],
    );
    let s = Server::start(&engine, &tmp.path().join("state"), &[]);
    let fun_frames = |mp4: &[u8], name: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, mp4).unwrap();
        v2l_runtime::video::read_frames(&p, 64, 96).unwrap().rgb
    };
    for (i, (reference, scheduler, cache)) in [
        (clip.clone(), None, None),
        (fun.join("reference.mp4"), None, None),
        (clip.clone(), Some("dpm"), None),
        (clip.clone(), None, Some("first-block:1e9")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut form = Form::new()
            .file("image", std::fs::read(fun.join("first_frame.png")).unwrap())
            .file("prompt_embeds", std::fs::read(&prompts).unwrap())
            .file("reference", std::fs::read(&reference).unwrap())
            .text("frames", 17)
            .text("height", 64)
            .text("width", 96)
            .text("steps", 2)
            .text("seed", 5);
        if let Some(name) = scheduler {
            form = form.text("scheduler", name);
        }
        if let Some(cache) = cache {
            form = form.text("cache", cache);
        }
        let (_, served) = s
            .client()
            .generate(&form, Duration::from_secs(120))
            .unwrap();
        let out = tmp.path().join(format!("cli{i}.mp4"));
        let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
            .arg("--engine")
            .arg(&engine)
            .arg("--image")
            .arg(fun.join("first_frame.png"))
            .arg("--prompt-embeds")
            .arg(&prompts)
            .arg("--reference")
            .arg(&reference)
            .args(["--frames", "17", "--height", "64", "--width", "96"])
            .args(["--steps", "2", "--seed", "5", "--quiet", "-o"])
            .arg(&out)
            .args(scheduler.map(|n| ["--scheduler", n]).into_iter().flatten())
            .args(cache.map(|c| ["--cache", c]).into_iter().flatten())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            fun_frames(&served, &format!("s{i}.mp4"))
                == fun_frames(&std::fs::read(&out).unwrap(), &format!("c{i}.mp4")),
            "request {i}: the server's Fun-InP video differs from v2l-run's"
        );
    }
}

/// A Wan text-to-video engine is served (the form used to require `image` on every engine):
/// a job of prompt embeddings alone gives `v2l-run`'s frames for the same seed, a first frame
/// sent to it is a `400` naming `image`, and its OpenAPI form does not list `image`.
#[test]
fn a_wan_text_to_video_engine_serves_the_cli_video() {
    let tmp = tempfile::tempdir().unwrap();
    let wan = common::tiny().join("../wan-tiny");
    let model = common::wan_model_dir(
        &tmp.path().join("model"),
        &[
            ("transformer", "transformer"),
            ("vae", "vae"),
            ("scheduler_unipc", "scheduler"),
            ("text_encoder", "text_encoder"),
        ],
    );
    let engine = tmp.path().join("t2v");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-export"))
        .arg("pipeline")
        .arg(&model)
        .arg("-o")
        .arg(&engine)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let io = v2l_runtime::tensor::read_safetensors(&wan.join("e2e_io.safetensors")).unwrap();
    let prompts = tmp.path().join("prompts.safetensors");
    let m: std::collections::BTreeMap<String, v2l_runtime::Tensor> = [
        ("prompt_embeds", "t2v_prompt_embeds"),
        ("negative_prompt_embeds", "t2v_negative_prompt_embeds"),
    ]
    .iter()
    .map(|(to, from)| (to.to_string(), io[*from].clone()))
    .collect();
    v2l_runtime::tensor::write_safetensors(&prompts, &m).unwrap();
    let s = Server::start(&engine, &tmp.path().join("state"), &[]);
    let form = || {
        Form::new()
            .file("prompt_embeds", std::fs::read(&prompts).unwrap())
            .text("frames", 9)
            .text("height", 32)
            .text("width", 48)
            .text("steps", 3)
            .text("guidance", 5)
            .text("seed", 5)
    };
    let (_, served) = s
        .client()
        .generate(&form(), Duration::from_secs(120))
        .unwrap();
    let out = tmp.path().join("cli.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_v2l-run"))
        .arg("--engine")
        .arg(&engine)
        .arg("--prompt-embeds")
        .arg(&prompts)
        .args(["--frames", "9", "--height", "32", "--width", "48"])
        .args([
            "--steps",
            "3",
            "--guidance",
            "5",
            "--seed",
            "5",
            "--quiet",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let frames = |mp4: &[u8], name: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, mp4).unwrap();
        v2l_runtime::video::read_frames(&p, 32, 48).unwrap().rgb
    };
    assert!(
        frames(&served, "s.mp4") == frames(&std::fs::read(&out).unwrap(), "c.mp4"),
        "the server's T2V video differs from v2l-run's"
    );
    let with_image = form().file("image", fixture("first_frame.png"));
    let r = s.client().post("/v1/videos", &with_image).unwrap();
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["field"], "image");
    let doc = s.client().get("/openapi.json").unwrap().json();
    let video_form = &doc["components"]["schemas"]["VideoForm"];
    assert!(
        video_form["properties"].get("image").is_none(),
        "{video_form}"
    );
}

/// A Fun-InP engine reads its reference at the size it is stored at: that size is bounded by
/// the server's own `--max-source-pixels`, named in the answer, never by the CLI's
/// `V2L_MAX_PIXELS` (which the server used to name, and which `--max-source-pixels` did not
/// change).
#[test]
fn a_fun_inpaint_reference_is_bounded_by_the_servers_own_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let fun = common::tiny().join("../cogvideox-fun-inp-tiny");
    let engine = common::engine_of(&fun, tmp.path(), &[]);
    // The reference mp4 is stored at 48x80 = 3,840 pixels.
    let form = || {
        Form::new().file(
            "reference",
            std::fs::read(fun.join("reference.mp4")).unwrap(),
        )
    };
    let small_cli_limit = |c: &mut Command| {
        c.env("V2L_MAX_PIXELS", "1000");
    };
    let s = Server::start_with(
        &engine,
        &tmp.path().join("state-a"),
        &["--max-source-pixels", "100000"],
        small_cli_limit,
    );
    let reply = s.client().post("/v1/loras", &form()).unwrap();
    let body = String::from_utf8_lossy(&reply.body).to_string();
    assert!(reply.status < 300, "{}: {body}", reply.status);
    assert!(!body.contains("V2L_MAX_PIXELS"), "{body}");
    drop(s);
    let s = Server::start_with(
        &engine,
        &tmp.path().join("state-b"),
        &["--max-source-pixels", "2000"],
        small_cli_limit,
    );
    let reply = s.client().post("/v1/loras", &form()).unwrap();
    assert_eq!(
        reply.status,
        400,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let err = reply.json()["error"].clone();
    assert_eq!(err["field"], "reference", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("--max-source-pixels"), "{message}");
    assert!(!message.contains("V2L_MAX_PIXELS"), "{message}");
}

/// The LoRA cache keys on the weights a prediction depends on, export directories included:
/// re-exported in place with another LiLoRA (the manifest byte for byte the same), the
/// restarted server predicts again instead of answering `cached` with the old model's LoRA.
#[test]
fn a_re_exported_model_does_not_reuse_cached_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = common::tiny();
    let export = common::export_of(&tiny, &tmp.path().join("export"));
    let state = tmp.path().join("state");
    let form = || {
        Form::new().file(
            "reference",
            std::fs::read(tiny.join("reference.mp4")).unwrap(),
        )
    };
    let predict = || {
        let s = Server::start(&export, &state, &[]);
        let r = s.client().post("/v1/loras", &form()).unwrap();
        assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        let id = j["lora_id"].as_str().unwrap().to_string();
        let lora = s.client().get(&format!("/v1/loras/{id}")).unwrap().body;
        (j["cached"].as_bool(), lora)
    };
    let (_, first) = predict();
    let (cached, again) = predict();
    assert_eq!(cached, Some(true), "the same model's LoRA is cached");
    assert_eq!(first, again);
    // Another LiLoRA in place (its `up_aux` doubled).
    let lilora = export.join("lilora.safetensors");
    let mut t = v2l_runtime::read_safetensors(&lilora).unwrap();
    for (name, v) in t.iter_mut() {
        if name.contains("up") {
            if let v2l_runtime::tensor::Data::F32(x) = &mut v.data {
                x.iter_mut().for_each(|x| *x *= 2.0);
            }
        }
    }
    v2l_runtime::write_safetensors(&lilora, &t).unwrap();
    let (cached, changed) = predict();
    assert_eq!(
        cached,
        Some(false),
        "a re-exported model's LoRA came from the cache"
    );
    assert_ne!(first, changed);
}

/// Stored LoRAs are bounded (`--keep-loras`): beyond it the least recently used goes (a
/// download or a job naming one is a use), at once and at the next start; `DELETE
/// /v1/loras/{id}` removes one, but not while a job that names it is queued or running.
/// `GET /v1/loras` and `GET /v1/videos` list them, bad parameters named.
#[test]
fn stored_loras_beyond_keep_loras_go_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    // Three LoRA files with their own ids: the fixture's factors scaled by 1, 2 and 3.
    let base = v2l_runtime::lora::format::read(&common::tiny().join(LORA_FILE), None).unwrap();
    let file = |k: f32| {
        let mut l = base.clone();
        for layer in &mut l.layers {
            let a: Vec<f32> = layer.a.to_f32().iter().map(|x| x * k).collect();
            layer.a = v2l_runtime::lora::format::Factor::from_f32(layer.a.shape, &a);
        }
        let p = tmp.path().join(format!("lora{k}.safetensors"));
        v2l_runtime::lora::format::write(&p, &l, v2l_runtime::lora::format::LoraFormat::Diffusers)
            .unwrap();
        std::fs::read(p).unwrap()
    };
    let s = Server::start(&engine, &state, &["--keep-loras", "2"]);
    let c = s.client();
    let upload = |k: f32| {
        let r = c
            .post("/v1/loras", &Form::new().file("lora", file(k)))
            .unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["lora_id"].as_str().unwrap().to_string()
    };
    let status = |id: &str| c.get(&format!("/v1/loras/{id}")).unwrap().status;
    let (a, b) = (upload(1.0), upload(2.0));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(status(&a), 200); // a is now used more recently than b
    std::thread::sleep(Duration::from_millis(20));
    let c3 = upload(3.0);
    assert_eq!((status(&a), status(&b), status(&c3)), (200, 404, 200));
    let metrics = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(
        metrics.lines().any(|l| l == "v2l_stored_loras 2"),
        "{metrics}"
    );
    // The listing: most recently used first, the next to go last.
    let listed = c.get("/v1/loras").unwrap().json();
    let ids: Vec<&str> = listed["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lora_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c3.as_str(), a.as_str()], "{listed}");
    assert_eq!(listed["total"], 2);
    // Pages by `next`: the second page after the first, then none.
    let first = c.get("/v1/loras?limit=1").unwrap().json();
    assert_eq!(first["loras"][0]["lora_id"], c3.as_str(), "{first}");
    let next = first["next"].as_str().unwrap();
    let page = c
        .get(&format!("/v1/loras?limit=1&after={next}"))
        .unwrap()
        .json();
    assert_eq!(page["loras"][0]["lora_id"], a.as_str(), "{page}");
    assert!(page["next"].is_null(), "{page}");
    // A job naming the deleted id is refused before it is queued, as any unknown id.
    let job = choice(0, 2).0.text("lora_id", &b);
    let r = c.post("/v1/videos", &job).unwrap();
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["field"], "lora_id");

    // A job that names `a` keeps it from DELETE until the job has ended.
    let long = choice(0, 50).0.text("lora_id", &a);
    let r = c.post("/v1/videos", &long).unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job_id = r.json()["id"].as_str().unwrap().to_string();
    let refused = c.delete(&format!("/v1/loras/{a}")).unwrap();
    assert_eq!(
        refused.status,
        409,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"]["kind"], "lora_in_use");
    c.delete(&format!("/v1/videos/{job_id}")).unwrap();
    let ended = c.wait(&job_id, Duration::from_secs(120)).unwrap();
    assert_eq!(ended["state"], "cancelled", "{ended}");
    let listed = c.get("/v1/videos?state=cancelled").unwrap().json();
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["videos"][0]["id"], job_id.as_str());
    assert_eq!(c.get("/v1/videos?state=queued").unwrap().json()["total"], 0);
    for (query, field) in [
        ("state=nope", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=1", "offset"),
        ("after=1", "after"),
        ("bogus=1", "bogus"),
    ] {
        let r = c.get(&format!("/v1/videos?{query}")).unwrap();
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.json()["error"]["field"], field, "{query}");
    }
    let deleted = c.delete(&format!("/v1/loras/{a}")).unwrap();
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["state"], "deleted");
    assert_eq!(status(&a), 404);
    assert_eq!(c.delete(&format!("/v1/loras/{a}")).unwrap().status, 404);
    assert_eq!(c.delete("/v1/loras/..%2Fjobs").unwrap().status, 404);

    // At the next start the bound applies to what is stored: c3, then a again (newest).
    let a = upload(1.0);
    drop(c);
    s.terminate();
    let s = Server::start(&engine, &state, &["--keep-loras", "1"]);
    let c = s.client();
    let status = |id: &str| c.get(&format!("/v1/loras/{id}")).unwrap().status;
    assert_eq!((status(&a), status(&c3)), (200, 404));
    let (_, log) = s.terminate();
    assert!(
        log.contains("deleted 1 least recently used stored LoRA"),
        "{log}"
    );
}
