//! `v2l-serve`'s resource bounds, measured on the real server on loopback (tiny engine):
//! declared picture sizes, concurrent decodes, queue places held before decoding, header and
//! body timeouts and the connection cap. Every bound is asserted as a measured number: the
//! peak RSS of the decoder, the count of decoders alive at once, seconds until a slow
//! connection is closed.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use v2l_serve::client::Form;

use crate::common;
use crate::serve::Server;

const PROMPT: &str = "A red car drives through a snowy forest at dusk.";

/// A CRC-32 (PNG chunks) and Adler-32 (zlib) of `data`.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// A 1-bit palette PNG declaring `side × side` pixels, its zlib stream in stored (uncompressed)
/// blocks: 32 MB for 16000², which ffmpeg decodes to an 8-bit frame of 256 MB.
fn big_png(side: u32) -> Vec<u8> {
    let row = 1 + side.div_ceil(8) as usize;
    let raw = vec![0u8; row * side as usize];
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend((b.len() as u16).to_le_bytes());
        z.extend((!(b.len() as u16)).to_le_bytes());
        z.extend(*b);
    }
    z.extend(adler32(&raw).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([1, 3, 0, 0, 0]); // bit depth 1, palette
    chunk(b"IHDR", &ihdr);
    chunk(b"PLTE", &[0, 0, 0, 255, 255, 255]);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}

/// An ffmpeg for the server (`V2L_FFMPEG`) that logs each upload decode (the calls with
/// `-max_pixels`): `start <t>`, then `end <t> <peak RSS KiB>` from GNU time. It waits 0.3 s
/// first, so decodes that could overlap do.
fn logging_ffmpeg(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("decodes.log");
    let script = dir.join("ffmpeg-logging");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
case "$*" in *-max_pixels*) ;; *) exec ffmpeg "$@" ;; esac
log='{log}'
echo "start $(date +%s.%N)" >> "$log"
sleep 0.3
/usr/bin/time -f '%M' -o "$log.$$" ffmpeg "$@"
rc=$?
echo "end $(date +%s.%N) $(tail -n 1 "$log.$$")" >> "$log"
rm -f "$log.$$"
exit $rc
"#,
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, log)
}

/// (decodes started, most alive at once, peak RSS KiB of each) from the wrapper's log.
fn decode_log(log: &Path) -> (usize, usize, Vec<u64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut events: Vec<(f64, i32)> = Vec::new();
    let mut rss = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let t: f64 = f[1].parse().unwrap();
        if f[0] == "start" {
            events.push((t, 1));
        } else {
            events.push((t, -1));
            rss.push(f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0));
        }
    }
    events.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut alive, mut most) = (0, 0);
    for (_, d) in &events {
        alive += d;
        most = most.max(alive);
    }
    let started = events.iter().filter(|e| e.1 == 1).count();
    (started, most as usize, rss)
}

fn video_form(image: Vec<u8>) -> Form {
    Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .text("steps", 2)
        .text("seed", 5)
}

/// Defect 6: a small PNG declaring 16000×16000 is refused by the decoder before it allocates
/// (peak RSS measured against the same decode without the bound); a burst of 40 requests at
/// `--queue 2 --max-decodes 1` decodes only what the queue takes, one at a time.
#[test]
fn uploads_are_bounded_in_declared_pixels_and_in_concurrent_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let (ffmpeg, log) = logging_ffmpeg(tmp.path());
    let s = Server::start_with(
        &engine,
        &tmp.path().join("state"),
        &["--queue", "2", "--max-decodes", "1", "--workers", "1"],
        |c| {
            c.env("V2L_FFMPEG", &ffmpeg);
        },
    );
    let client = s.client();

    let png = big_png(16000);
    let r = client.post("/v1/videos", &video_form(png.clone())).unwrap();
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let err = r.json();
    assert_eq!(err["error"]["field"], "image", "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("16000x16000") && msg.contains("16777216"),
        "{msg}"
    );
    let (_, _, rss) = decode_log(&log);
    let bounded = rss[0];
    // The same file through ffmpeg without the bound, for the figure it replaces.
    let file = tmp.path().join("big.png");
    std::fs::write(&file, &png).unwrap();
    let o = Command::new("/usr/bin/time")
        .args(["-f", "%M", "ffmpeg", "-v", "error", "-nostdin", "-i"])
        .arg(&file)
        .args([
            "-frames:v",
            "1",
            "-vf",
            "scale=64:64",
            "-f",
            "rawvideo",
            "-",
        ])
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    let unbounded: u64 = String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("decoder peak RSS: {bounded} KiB bounded, {unbounded} KiB unbounded");
    assert!(
        bounded < 200 * 1024 && bounded * 2 < unbounded,
        "bounded {bounded} KiB vs unbounded {unbounded} KiB"
    );
    std::fs::remove_file(&log).unwrap();

    // The burst: every request that was not refused at once was decoded, and no other.
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..40)
            .map(|_| {
                let form = video_form(image.clone());
                let c = s.client();
                sc.spawn(move || c.post("/v1/videos", &form).unwrap().status)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted = statuses.iter().filter(|&&c| c == 202).count();
    let refused = statuses.iter().filter(|&&c| c == 429).count();
    assert_eq!(accepted + refused, 40, "{statuses:?}");
    let (started, most, _) = decode_log(&log);
    eprintln!("burst of 40: {accepted} accepted, {refused} refused, {started} decodes, at most {most} at once");
    assert!(refused >= 30, "{statuses:?}");
    assert_eq!(started, accepted, "a refused request was decoded");
    assert_eq!(most, 1, "--max-decodes 1 ran {most} decoders at once");
}

/// A raw connection that sends `head` and then `drip` one byte a second until the server
/// closes it; returns the seconds it stayed open (capped at `cap`).
fn slow_client(addr: &str, head: Vec<u8>, drip: &'static [u8], cap: Duration) -> f64 {
    let t0 = Instant::now();
    let Ok(mut c) = TcpStream::connect(addr) else {
        return 0.0;
    };
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    if c.write_all(&head).is_err() {
        return t0.elapsed().as_secs_f64();
    }
    let mut buf = [0u8; 4096];
    let mut i = 0;
    let mut last = Instant::now();
    while t0.elapsed() < cap {
        match c.read(&mut buf) {
            Ok(0) => return t0.elapsed().as_secs_f64(),
            Ok(_) => {} // a 408 answer; the close follows
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return t0.elapsed().as_secs_f64(),
        }
        if !drip.is_empty() && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            if c.write_all(&drip[i % drip.len()..][..1]).is_err() {
                return t0.elapsed().as_secs_f64();
            }
            i += 1;
        }
    }
    cap.as_secs_f64()
}

/// Defect 7: 20 clients sending a header line a second, 20 sending a body byte a second and
/// 55 sending nothing, against a server limited to 100 open files with `--max-connections
/// 40`: every one is closed within its timeout (plus the wait for a connection slot), and
/// `/healthz` answers meanwhile.
#[test]
fn slow_clients_are_cut_off_and_cannot_starve_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = common::engine(tmp.path());
    let s = Server::start_with(
        &engine,
        &tmp.path().join("state"),
        &[
            "--header-timeout",
            "2",
            "--body-timeout",
            "3",
            "--max-connections",
            "40",
        ],
        |c| unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 100,
                    rlim_max: 100,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        },
    );
    let addr = s.addr().to_string();
    let (ctype, body) = video_form(vec![0; 1000]).encode();
    let cap = Duration::from_secs(40);
    let (open_secs, health) = std::thread::scope(|sc| {
        let mut hs = Vec::new();
        for i in 0..95 {
            let addr = addr.clone();
            let (ctype, body) = (ctype.clone(), body.clone());
            hs.push(sc.spawn(move || match i % 5 {
                0 | 1 => slow_client(
                    &addr,
                    b"POST /v1/videos HTTP/1.1\r\n".to_vec(),
                    b"X-Slow: 1\r\n",
                    cap,
                ),
                2 | 3 => {
                    let head = format!(
                        "POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let mut h = head.into_bytes();
                    h.extend(&body[..100]);
                    slow_client(&addr, h, b"x", cap)
                }
                _ => slow_client(&addr, Vec::new(), b"", cap),
            }));
        }
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let health = loop {
            let r = s.client().get("/healthz");
            if matches!(&r, Ok(r) if r.status == 200) || t0.elapsed() > cap {
                break t0.elapsed().as_secs_f64();
            }
        };
        let open: Vec<f64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        (open, health)
    });
    let longest = open_secs.iter().cloned().fold(0.0, f64::max);
    eprintln!("95 slow connections: the longest stayed {longest:.1} s; /healthz answered after {health:.1} s");
    // Three rounds of 40 connections, each cut after at most 3 s, plus slack for a busy machine.
    assert!(
        longest < 20.0,
        "a slow connection stayed open {longest:.1} s: {open_secs:?}"
    );
    assert!(health < 20.0, "/healthz took {health:.1} s");
    let r = s.client().get("/healthz").unwrap();
    assert_eq!(r.status, 200);
}

/// The server's resident memory in MiB, from /proc.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Downloads are streamed from disk: 60 concurrent slow downloads of a 17 MB result (each
/// reading its first bytes, then waiting) raise the server's RSS by under 100 MB. Each used
/// to read the whole mp4 into memory (75 MB to 1.1 GB).
#[test]
fn slow_downloads_of_a_large_video_are_streamed() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let state = d.path().join("state");
    let s = Server::start(&engine, &state, &[]);
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let (job, _) = s
        .client()
        .generate(&video_form(image), Duration::from_secs(120))
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    // The job's result, made 17 MB: what is served is the file on disk.
    let video = state.join("jobs").join(&id).join("video.mp4");
    assert!(video.is_file(), "{}", video.display());
    let big: Vec<u8> = (0..17u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&video, &big).unwrap();
    let before = rss_mb(s.pid());
    let request = format!(
        "GET /v1/videos/{id}/content HTTP/1.1\r\nHost: {}\r\n\r\n",
        s.addr()
    );
    let mut readers = Vec::new();
    for _ in 0..60 {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut head = [0u8; 4096];
        let n = c.read(&mut head).unwrap();
        assert!(
            String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head[..n])
        );
        readers.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    let grown = rss_mb(s.pid()) - before;
    eprintln!("60 slow downloads of 17 MB: RSS {before:.0} MB -> +{grown:.0} MB");
    assert!(grown < 100.0, "RSS grew by {grown:.0} MB");
    // A whole download still gives every byte.
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.write_all(
        format!(
            "GET /v1/videos/{id}/content HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            s.addr()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    let body = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(all.len() - body, big.len());
    assert!(all[body..] == big[..]);
    drop(readers);
}

/// A 49-frame 480x720 reference clip (ffmpeg's test pattern) in `dir`: seconds to encode on
/// the tiny VAE.
fn reference_clip(dir: &Path) -> PathBuf {
    let clip = dir.join("ref.mp4");
    let o = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .args(["testsrc=size=720x480:rate=8", "-frames:v", "49"])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    clip
}

/// Waits until job `id` reports its first denoising step done.
fn until_step_1(c: &v2l_serve::client::Client, id: &str) {
    let t = Instant::now();
    loop {
        let j = c.get(&format!("/v1/videos/{id}")).unwrap().json();
        if j["step"] == 1 {
            return;
        }
        assert!(j["state"] == "queued" || j["state"] == "running", "{j}");
        assert!(t.elapsed() < Duration::from_secs(120), "{j}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Posts a video job that must be accepted; its id.
fn accepted(c: &v2l_serve::client::Client, form: &Form) -> String {
    let r = c.post("/v1/videos", form).unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

/// Cancellation that means it: a DELETE that comes after the last denoising step (while the
/// VAE decodes) ends the job `cancelled`, not `succeeded` with no video to speak of the
/// cancel, after the decode's current frame batch; and `--job-timeout` bounds the whole job,
/// the decode included.
#[test]
fn a_cancel_or_time_limit_during_the_decode_holds() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    // One step at a large size: the decode of 25 frames at 480x720 outlasts the polling.
    let form = || {
        Form::new()
            .file("image", image.clone())
            .text("prompt", PROMPT)
            .text("seed", 5)
            .text("steps", 1)
            .text("frames", 25)
            .text("height", 480)
            .text("width", 720)
    };
    let submit = |c: &v2l_serve::client::Client| accepted(c, &form());
    let s = Server::start(&engine, &d.path().join("state"), &[]);
    let c = s.client();
    let id = submit(&c);
    let t = Instant::now();
    loop {
        let j = c.get(&format!("/v1/videos/{id}")).unwrap().json();
        if j["step"] == 1 || j["state"] != "running" && j["state"] != "queued" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{j}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let del = c.delete(&format!("/v1/videos/{id}")).unwrap();
    assert_eq!(del.status, 202, "{}", String::from_utf8_lossy(&del.body));
    let t = Instant::now();
    let end = c.wait(&id, Duration::from_secs(300)).unwrap();
    assert_eq!(end["state"], "cancelled", "{end}");
    // The whole decode takes some 30 s here (2 cores), a frame batch of it about one: the
    // cancel cuts the batch short (since 2026-11-29; it waited for the batch before, and for
    // the whole decode before 2026-11-28).
    let waited = t.elapsed();
    eprintln!(
        "DELETE during the decode: ended after {:.2} s",
        waited.as_secs_f64()
    );
    assert!(
        waited < Duration::from_secs(10),
        "waited {waited:?} for the decode"
    );
    assert_eq!(
        c.get(&format!("/v1/videos/{id}/content")).unwrap().status,
        409
    );
    drop(s);

    let s = Server::start(
        &engine,
        &d.path().join("state-timeout"),
        &["--job-timeout", "1"],
    );
    let c = s.client();
    let t = Instant::now();
    let id = submit(&c);
    let end = c.wait(&id, Duration::from_secs(300)).unwrap();
    eprintln!(
        "--job-timeout 1: ended after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(end["state"], "failed", "{end}");
    assert!(end.to_string().contains("timeout"), "{end}");
}

/// `--job-timeout` counts from the job's start, its LoRA's prediction included: a job whose
/// 49-frame 480x720 reference clip alone takes seconds to encode ends `failed` (timeout) inside
/// that encode, and so does a `POST /v1/loras` of that clip. The limit used to start with the
/// denoising, after the prediction, and not to bound a LoRA's prediction at all.
#[test]
fn a_time_limit_bounds_the_lora_prediction_too() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let clip = reference_clip(d.path());
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let form = Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .file("reference", std::fs::read(&clip).unwrap())
        .text("steps", 1)
        .text("frames", 49)
        .text("height", 480)
        .text("width", 720);
    let s = Server::start(&engine, &d.path().join("state-1s"), &["--job-timeout", "1"]);
    let c = s.client();
    let t = Instant::now();
    let id = accepted(&c, &form);
    let end = c.wait(&id, Duration::from_secs(300)).unwrap();
    let took = t.elapsed();
    eprintln!(
        "--job-timeout 1, prediction at 49x480x720: ended after {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["error"]["kind"], "timeout", "{end}");
    assert_eq!(end["step"], 0, "stopped before the first step: {end}");
    // The prediction alone takes 16 s here (2 cores; `POST /v1/loras`): the job ended in
    // 1.8 s, where it used to predict, then time out 1 s into the denoising.
    assert!(took < Duration::from_secs(8), "ended after {took:?}");
    // `POST /v1/loras` runs a job of its own, bounded alike (it used to have no limit).
    let lora = Form::new()
        .file("reference", std::fs::read(&clip).unwrap())
        .text("height", 480)
        .text("width", 720);
    let t = Instant::now();
    let r = c.post("/v1/loras", &lora).unwrap();
    let took = t.elapsed();
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{body}");
    assert!(body.contains("time limit of 1 s"), "{body}");
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
}

/// A DELETE that comes while the mp4 is written (held 3 s by the `slow-mp4` fault point) ends
/// the job `cancelled`, without its video: the client was told 202. It used to end
/// `succeeded`.
#[test]
fn a_cancel_while_the_mp4_is_written_holds() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let s = Server::start_with(&engine, &d.path().join("state"), &[], |c| {
        c.env("V2L_FAULT", "slow-mp4");
    });
    let c = s.client();
    let form = Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .text("seed", 5)
        .text("steps", 1);
    let id = accepted(&c, &form);
    until_step_1(&c, &id);
    // The tiny decode takes milliseconds; the write is held for 3 s after it.
    std::thread::sleep(Duration::from_secs(1));
    let del = c.delete(&format!("/v1/videos/{id}")).unwrap();
    assert_eq!(del.status, 202, "{}", String::from_utf8_lossy(&del.body));
    let end = c.wait(&id, Duration::from_secs(60)).unwrap();
    assert_eq!(end["state"], "cancelled", "{end}");
    assert_eq!(
        c.get(&format!("/v1/videos/{id}/content")).unwrap().status,
        409
    );
    let video = d.path().join("state/jobs").join(&id).join("video.mp4");
    assert!(!video.exists(), "{} left", video.display());
}

/// A DELETE reaches the ONNX Runtime call in flight: sent as soon as the first of three
/// denoising steps at 25x480x720 (9,458 tokens) is reported, it ends the job `cancelled` at
/// step 1, the second step cut short within a node. It used to finish that step and stop at
/// its check (step 2).
#[test]
fn a_cancel_during_a_step_stops_it() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let s = Server::start(&engine, &d.path().join("state"), &[]);
    let c = s.client();
    let form = Form::new()
        .file("image", image)
        .text("prompt", PROMPT)
        .text("steps", 3)
        .text("frames", 25)
        .text("height", 480)
        .text("width", 720);
    let id = accepted(&c, &form);
    until_step_1(&c, &id);
    let del = c.delete(&format!("/v1/videos/{id}")).unwrap();
    assert_eq!(del.status, 202, "{}", String::from_utf8_lossy(&del.body));
    let t = Instant::now();
    let end = c.wait(&id, Duration::from_secs(300)).unwrap();
    let waited = t.elapsed();
    eprintln!(
        "DELETE during step 2: ended after {:.2} s",
        waited.as_secs_f64()
    );
    assert_eq!(end["state"], "cancelled", "{end}");
    assert_eq!(end["step"], 1, "the second step was cut short: {end}");
}

/// Retention: a job's decoded inputs go when it ends (cancelled too), and DELETE on an ended
/// job removes it and its files. 20 submit + DELETE loops, each with a 49-frame 480x720
/// reference (50 MB decoded), leave under 50 MB in the state directory, which `/metrics`
/// reports. (Each loop used to leave its 50 MB behind.)
#[test]
fn submit_and_delete_loops_leave_the_state_directory_small() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let state = d.path().join("state");
    let clip = reference_clip(d.path());
    let reference = std::fs::read(&clip).unwrap();
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let s = Server::start(&engine, &state, &["--queue", "4"]);
    let c = s.client();
    let form = |steps: u32| {
        Form::new()
            .file("image", image.clone())
            .text("prompt", PROMPT)
            .file("reference", reference.clone())
            .text("frames", 49)
            .text("height", 480)
            .text("width", 720)
            .text("steps", steps)
    };
    let submit = |f: Form| -> String {
        let r = c.post("/v1/videos", &f).unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    };
    // One long job keeps the worker busy, so the loops' jobs wait in the queue.
    let busy = submit(form(50));
    for _ in 0..20 {
        let id = submit(form(2));
        let first = c.delete(&format!("/v1/videos/{id}")).unwrap();
        assert!(matches!(first.status, 200 | 202), "{}", first.status);
        if first.status == 202 {
            c.wait(&id, Duration::from_secs(120)).unwrap();
        }
        let second = c.delete(&format!("/v1/videos/{id}")).unwrap();
        assert_eq!(second.json()["state"], "deleted");
        assert!(!state.join("jobs").join(&id).exists());
    }
    let del = c.delete(&format!("/v1/videos/{busy}")).unwrap();
    assert!(matches!(del.status, 200 | 202));
    c.wait(&busy, Duration::from_secs(300)).unwrap();
    let du = |p: &Path| -> u64 {
        fn walk(p: &Path) -> u64 {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| walk(&e.unwrap().path()))
                    .sum(),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        walk(p)
    };
    let bytes = du(&state);
    eprintln!(
        "state directory after 20 submit+DELETE loops: {:.1} MB",
        bytes as f64 / 1e6
    );
    assert!(bytes < 50_000_000, "{bytes} bytes left");
    let metrics = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(metrics.contains("v2l_state_dir_bytes "), "{metrics}");
}

/// Results kept for a configured count: with `--keep-jobs 2`, the third job's end deletes the
/// first with its files; with `--keep-hours`, jobs that ended longer ago go at the next start.
#[test]
fn ended_jobs_beyond_the_retention_are_deleted() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let state = d.path().join("state");
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let s = Server::start(&engine, &state, &["--keep-jobs", "2"]);
    let c = s.client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (job, _) = c
            .generate(&video_form(image.clone()), Duration::from_secs(120))
            .unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        c.get(&format!("/v1/videos/{}", ids[0])).unwrap().status,
        404
    );
    assert!(!state.join("jobs").join(&ids[0]).exists());
    for id in &ids[1..] {
        assert_eq!(
            c.get(&format!("/v1/videos/{id}/content")).unwrap().status,
            200
        );
    }
    drop(s);
    let bad = Command::new(env!("CARGO_BIN_EXE_v2l-serve"))
        .args(["--engine", "x", "--keep-jobs", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// A worker that survives its job: a panic inside a job (the `worker-panic` fault point of
/// debug builds) fails that job alone, with kind `internal`, and the next job succeeds. A worker
/// thread that ends (`worker-exit`) turns `/readyz` to 503 and new submissions away, instead of
/// queueing them for no one.
#[test]
fn a_worker_panic_fails_its_job_alone_and_a_gone_worker_shows_in_readyz() {
    let d = tempfile::tempdir().unwrap();
    let engine = common::engine(d.path());
    let image = std::fs::read(common::tiny().join("first_frame.png")).unwrap();
    let form = || {
        Form::new()
            .file("image", image.clone())
            .text("prompt", PROMPT)
            .text("seed", 5)
            .text("steps", 1)
    };
    let submit = |c: &v2l_serve::client::Client| accepted(c, &form());

    let s = Server::start_with(&engine, &d.path().join("state"), &[], |c| {
        c.env("V2L_FAULT", "worker-panic");
    });
    let c = s.client();
    let (first, second) = (submit(&c), submit(&c));
    let end = c.wait(&first, Duration::from_secs(120)).unwrap();
    assert_eq!(end["state"], "failed", "{end}");
    assert_eq!(end["error"]["kind"], "internal", "{end}");
    assert!(end.to_string().contains("panicked"), "{end}");
    let end = c.wait(&second, Duration::from_secs(120)).unwrap();
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(c.get("/readyz").unwrap().status, 200);
    drop(s);

    let s = Server::start_with(&engine, &d.path().join("state-exit"), &[], |c| {
        c.env("V2L_FAULT", "worker-exit");
    });
    let c = s.client();
    let id = submit(&c);
    let end = c.wait(&id, Duration::from_secs(120)).unwrap();
    assert_eq!(end["state"], "succeeded", "{end}");
    let t = Instant::now();
    let ready = loop {
        let r = c.get("/readyz").unwrap();
        if r.status != 200 || t.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        ready.status,
        503,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert!(ready.json()["status"]
        .as_str()
        .unwrap()
        .contains("no worker"));
    let r = c.post("/v1/videos", &form()).unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["kind"], "no_worker");
    let metrics = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(metrics.lines().any(|l| l == "v2l_workers 0"), "{metrics}");
}
