//! A soak of `v2l-serve` on loopback: 8 concurrent clients for 60 s (`V2L_SOAK_SECS`) mixing
//! valid jobs, bad uploads, slow clients and cancellations. It must end with no 5xx, a bounded
//! peak RSS (the server's VmHWM, printed), every accepted job in a final state, every
//! succeeded job's mp4 whole, and no temporary or scratch file left in the state directory.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use v2l_serve::client::Form;

use crate::common;
use crate::serve::Server;

const PROMPT: &str = "A red car drives through a snowy forest at dusk.";
/// The server's peak RSS may not exceed this (measured: see the printed figure).
const PEAK_RSS_LIMIT_MB: u64 = 512;

fn valid(image: &[u8], seed: usize) -> Form {
    Form::new()
        .file("image", image.to_vec())
        .text("prompt", PROMPT)
        .text("steps", 2)
        .text("seed", seed)
}

/// One of several bad requests, each refused with a 4xx.
fn bad(image: &[u8], i: usize) -> Form {
    match i % 4 {
        0 => Form::new()
            .file("image", b"not an image at all".to_vec())
            .text("prompt", PROMPT),
        1 => valid(image, i).text("guidance", "NaN"),
        2 => valid(image, i).file("lora", b"\x10\x00\x00\x00\x00\x00\x00\x00{}".to_vec()),
        _ => valid(image, i).text("height", 70),
    }
}

/// Sends a request header a line a second until the server cuts the connection.
fn slow(addr: &str) {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return;
    };
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = c.write_all(b"POST /v1/videos HTTP/1.1\r\n");
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    while t0.elapsed() < Duration::from_secs(20) {
        if c.write_all(b"X-Slow: 1\r\n").is_err() || matches!(c.read(&mut buf), Ok(0)) {
            return;
        }
    }
    panic!("a slow client stayed connected for 20 s");
}

fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

/// Files a finished run must not leave: temporaries (`.v2l-*`) and upload scratch files.
fn leftovers(state: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![state.join("tmp"), state.join("loras")];
    if let Ok(r) = std::fs::read_dir(state.join("jobs")) {
        dirs.extend(r.map(|e| e.unwrap().path()));
    }
    for d in dirs {
        let Ok(r) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in r {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(".v2l-") || d.ends_with("tmp") {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn eight_clients_for_a_minute_end_clean() {
    let secs: u64 = std::env::var("V2L_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let state = tmp.path().join("state");
    let s = Server::start(
        &engine,
        &state,
        &[
            "--queue",
            "4",
            "--header-timeout",
            "2",
            "--body-timeout",
            "3",
        ],
    );
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let accepted = Mutex::new(Vec::<String>::new());
    let statuses = Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let addr = s.addr().to_string();
    std::thread::scope(|sc| {
        for client in 0..8 {
            let (addr, image, accepted, statuses) = (&addr, &image, &accepted, &statuses);
            sc.spawn(move || {
                let c = v2l_serve::client::Client::new(&format!("http://{addr}"), None);
                let mut i = client;
                while Instant::now() < deadline {
                    let seen = |code: u16| *statuses.lock().unwrap().entry(code).or_default() += 1;
                    match i % 4 {
                        0 | 3 => {
                            let r = c.post("/v1/videos", &valid(image, i)).unwrap();
                            seen(r.status);
                            if r.status == 202 {
                                let id = r.json()["id"].as_str().unwrap().to_string();
                                if i % 4 == 3 {
                                    seen(c.delete(&format!("/v1/videos/{id}")).unwrap().status);
                                }
                                accepted.lock().unwrap().push(id);
                            }
                        }
                        1 => seen(c.post("/v1/videos", &bad(image, i / 4)).unwrap().status),
                        _ => slow(addr),
                    }
                    i += 1;
                }
            });
        }
    });
    let statuses = statuses.into_inner().unwrap();
    let accepted = accepted.into_inner().unwrap();
    let client = s.client();
    let mut ends = std::collections::BTreeMap::<String, usize>::new();
    for id in &accepted {
        let job = client.wait(id, Duration::from_secs(300)).unwrap();
        let state = job["state"].as_str().unwrap().to_string();
        if state == "succeeded" {
            let mp4 = client.get(&format!("/v1/videos/{id}/content")).unwrap();
            assert_eq!(mp4.status, 200);
            let p = tmp.path().join("check.mp4");
            std::fs::write(&p, &mp4.body).unwrap();
            let frames = v2l_runtime::video::read_frames(&p, 64, 64).unwrap();
            assert_eq!(frames.frames, 17, "job {id}: a cut mp4");
        }
        *ends.entry(state).or_default() += 1;
    }
    let rss = peak_rss_mb(s.pid());
    eprintln!(
        "soak {secs} s, 8 clients: statuses {statuses:?}; {} accepted jobs ended {ends:?}; \
         server peak RSS {rss} MB",
        accepted.len()
    );
    assert!(
        statuses.keys().all(|&c| c < 500),
        "a 5xx answer: {statuses:?}"
    );
    assert!(ends.get("succeeded").copied().unwrap_or(0) > 0, "{ends:?}");
    assert!(ends.get("cancelled").copied().unwrap_or(0) > 0, "{ends:?}");
    assert!(rss < PEAK_RSS_LIMIT_MB, "peak RSS {rss} MB");
    assert_eq!(leftovers(&state), Vec::<String>::new());
}
