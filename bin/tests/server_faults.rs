//! `v2l-serve` under storage faults: the disk filling up while a job writes its mp4 (the
//! state directory on a 20 MB tmpfs, so the test mounts one: it needs root, as CI has), and the
//! server SIGKILLed while ffmpeg writes an mp4. No partial video is ever served, and every job
//! ends in a state that tells the truth.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use v2l_serve::client::Form;

use crate::common;
use crate::serve::Server;

const PROMPT: &str = "A red car drives through a snowy forest at dusk.";

/// A tmpfs of `mb` MB mounted at `dir` until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mb: usize) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "this test mounts a small tmpfs to fill it, which needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An ffmpeg for the server (`V2L_FFMPEG`) that runs `before` (shell) ahead of every mp4
/// encode, and touches `<marks>.done` after it.
fn ffmpeg_with(dir: &Path, before: &str) -> PathBuf {
    let script = dir.join("ffmpeg-fault");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$*\" in *libx264*) ;; *) exec ffmpeg \"$@\" ;; esac\n{before}\n\
             ffmpeg \"$@\"\nrc=$?\ntouch '{done}'\nexit $rc\n",
            done = dir.join("encode.done").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

fn submit(s: &Server) -> String {
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let form = Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .text("steps", 2)
        .text("seed", 5);
    let r = s.client().post("/v1/videos", &form).unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

/// Files in the job's directory other than its inputs.
fn outputs(state: &Path, id: &str) -> Vec<String> {
    std::fs::read_dir(state.join("jobs").join(id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".safetensors"))
        .collect()
}

fn wait_for(path: &Path, what: &str) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} never happened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_disk_fails_the_job_as_storage_and_serves_no_partial_video() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let _fs = Tmpfs::mount(&state, 20);
    let filler = state.join("filler");
    // Fill the state directory's disk just before the mp4 is written.
    let ffmpeg = ffmpeg_with(
        tmp.path(),
        &format!(
            "dd if=/dev/zero of='{}' bs=64k 2>/dev/null",
            filler.display()
        ),
    );
    let s = Server::start_with(&engine, &state, &[], |c| {
        c.env("V2L_FFMPEG", &ffmpeg);
    });
    let client = s.client();
    let id = submit(&s);
    let job = client.wait(&id, Duration::from_secs(120)).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["error"]["kind"].as_str()),
        (Some("failed"), Some("storage")),
        "{job}"
    );
    assert!(
        !job.to_string().contains(&*state.to_string_lossy()),
        "a server path leaked: {job}"
    );
    assert!(
        outputs(&state, &id).is_empty(),
        "left: {:?}",
        outputs(&state, &id)
    );
    let content = client.get(&format!("/v1/videos/{id}/content")).unwrap();
    assert_ne!(content.status, 200);
    let ready = client.get("/readyz").unwrap();
    assert_eq!(
        ready.status,
        503,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert!(ready.json()["status"]
        .as_str()
        .unwrap()
        .contains("cannot take writes"));

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(client.get("/readyz").unwrap().status, 200);
    // After a restart the store tells the same story.
    let (code, _) = s.terminate();
    assert_eq!(code, 0);
    let s = Server::start(&engine, &state, &[]);
    let job = s.client().wait(&id, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["error"]["kind"].as_str()),
        (Some("failed"), Some("storage")),
        "{job}"
    );
}

#[test]
fn a_kill_during_the_mp4_write_leaves_no_video_and_an_interrupted_job() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let started = tmp.path().join("encode.started");
    let ffmpeg = ffmpeg_with(
        tmp.path(),
        &format!("touch '{}'; sleep 1", started.display()),
    );
    let s = Server::start_with(&engine, &state, &[], |c| {
        c.env("V2L_FFMPEG", &ffmpeg);
    });
    let id = submit(&s);
    wait_for(&started, "the mp4 encode");
    s.kill_hard();
    // The encoder dies with the server (since 2026-11-29: the parent-death signal; it used to
    // finish its temporary file as an orphan); nobody renames what it left.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !tmp.path().join("encode.done").exists(),
        "the encoder outlived the server"
    );
    let left = outputs(&state, &id);
    assert!(
        !left.contains(&"video.mp4".into()),
        "expected no video, at most the temporary mp4: {left:?}"
    );
    let s = Server::start(&engine, &state, &[]);
    let client = s.client();
    let job = client.wait(&id, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["error"]["kind"].as_str()),
        (Some("failed"), Some("interrupted")),
        "{job}"
    );
    assert!(
        outputs(&state, &id).is_empty(),
        "left: {:?}",
        outputs(&state, &id)
    );
    assert_ne!(
        client
            .get(&format!("/v1/videos/{id}/content"))
            .unwrap()
            .status,
        200
    );
}

/// Defect 2: a stored LoRA that went bad (found after a restart) fails its jobs with a
/// message naming the LoRA by id, never by its path on the server.
#[test]
fn a_bad_stored_lora_after_a_restart_fails_jobs_without_leaking_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    drop(Server::start(&engine, &state, &[])); // creates the state directory
    let id = "0123456789abcdef0123456789abcdef";
    // A LoRA whose metadata says alpha is null, as a damaged or foreign file can.
    let header = br#"{"__metadata__":{"lora_adapter_metadata":"{\"lora_alpha\":null}"}}"#;
    let mut bad = (header.len() as u64).to_le_bytes().to_vec();
    bad.extend(header);
    std::fs::write(state.join("loras").join(format!("{id}.safetensors")), bad).unwrap();
    let s = Server::start(&engine, &state, &[]);
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let form = Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .text("steps", 2)
        .text("lora_id", id);
    let r = s.client().post("/v1/videos", &form).unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let shown = if r.status == 202 {
        let job_id = r.json()["id"].as_str().unwrap().to_string();
        let job = s.client().wait(&job_id, Duration::from_secs(60)).unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        job.to_string()
    } else {
        assert_eq!(r.status, 400, "{text}");
        text
    };
    assert!(shown.contains(id), "the LoRA is not named: {shown}");
    assert!(
        !shown.contains(&*state.to_string_lossy()) && !shown.contains("/loras/"),
        "a server path leaked: {shown}"
    );
}
