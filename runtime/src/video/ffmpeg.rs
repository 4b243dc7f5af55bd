//! Video files through ffmpeg (the cargo feature `video`): reading clips and first frames at a
//! size, bounded decoding of untrusted uploads, and mp4 and contact-sheet output.

use std::path::Path;
use std::process::{Command, Stdio};
use v2l_contracts::io::files as files_io;

use super::frames::Frames;
use crate::error::{Result, RuntimeError};

/// The ffmpeg program: `V2L_FFMPEG` when set (the Python wheel points it at `imageio-ffmpeg`'s
/// binary when none is on `PATH`), else `ffmpeg` from `PATH`.
fn ffmpeg() -> Command {
    Command::new(std::env::var_os("V2L_FFMPEG").unwrap_or_else(|| "ffmpeg".into()))
}

/// Refuses a media path that is neither a regular file nor (where `dirs`) a directory: a FIFO
/// would block ffmpeg's open forever, a device would stream until a limit stops it. A file
/// over the media limit (`V2L_MAX_MEDIA_BYTES`) is refused too. Only the metadata is read,
/// nothing is opened.
fn check_media_path(path: &Path, dirs: bool) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| RuntimeError::Io {
        path: path.into(),
        source: match source.kind() {
            std::io::ErrorKind::NotFound => {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")
            }
            _ => source,
        },
    })?;
    if meta.is_file() {
        use v2l_contracts::input::InputKind;
        let picture = path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"]
                .iter()
                .any(|p| e.eq_ignore_ascii_case(p))
        });
        let kind = if picture {
            InputKind::Image
        } else {
            InputKind::Media
        };
        return kind
            .check_size(meta.len())
            .map_err(|e| bad(path, e.to_string()));
    }
    if dirs && meta.is_dir() {
        return Ok(());
    }
    Err(bad(
        path,
        "not a regular file (a device, a pipe or a socket): give a video file or a directory of PNGs",
    ))
}

/// The `.png` regular files of `dir`, sorted (anything else named `.png` is skipped).
fn pngs_in(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut pngs: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| RuntimeError::Io {
            path: dir.into(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
        .collect();
    pngs.sort();
    // Each picture is held to the limits of a file given alone.
    for p in &pngs {
        check_media_path(p, false)?;
    }
    Ok(pngs)
}

fn is_safetensors_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// A safetensors clip's `reference_u8 [F, H, W, 3]` at its own size, at most `max_frames`.
fn reference_tensor(path: &Path, max_frames: usize) -> Result<Frames> {
    let t = crate::tensor::read_safetensors(path)?;
    let r = t
        .get(files_io::REFERENCE_U8)
        .ok_or_else(|| RuntimeError::MissingTensor {
            path: path.into(),
            name: files_io::REFERENCE_U8.into(),
        })?;
    let mut f = Frames::from_u8_tensor(r).map_err(|m| bad(path, format!("`reference_u8`: {m}")))?;
    f.truncate(max_frames);
    if f.frames == 0 {
        return Err(bad(path, NO_FRAMES));
    }
    Ok(f)
}

/// What a media file with no picture in it is told (an audio-only mp4, say).
const NO_VIDEO_STREAM: &str = "holds no video stream (audio only, or not a video)";

/// What a media file whose video stream decodes to nothing is told.
const NO_FRAMES: &str = "the video has no frames";

fn bad(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::BadFile {
        path: path.into(),
        message: message.into(),
    }
}

/// Reads a reference clip, resized to `height × width` (ffmpeg bicubic) where it is decoded by
/// ffmpeg; a safetensors clip must already have that size. At most the frame limit
/// (`V2L_MAX_FRAMES`, 257) is decoded: the rest of a long clip is never read.
pub fn read_frames(path: &Path, height: usize, width: usize) -> Result<Frames> {
    let max = crate::limits::Limits::from_env()?.max_frames;
    read_frames_at_most(path, height, width, max)
}

/// Reads a reference clip at the size it is stored at (no resize): for pipelines that resize
/// it themselves (VideoX-Fun's reads with OpenCV, then resizes with PIL). The size comes from
/// the safetensors tensor, or from ffprobe for a video or a directory of PNGs.
pub fn read_frames_at_source_size(path: &Path) -> Result<Frames> {
    let max = crate::limits::Limits::from_env()?.max_frames;
    check_media_path(path, true)?;
    if is_safetensors_path(path) {
        let f = reference_tensor(path, max)?;
        crate::limits::Limits::from_env()?.check_frame_size(f.height, f.width, 1)?;
        return Ok(f);
    }
    let (h, w) = source_size(path).ok_or_else(|| {
        bad(
            path,
            "cannot tell the clip's size (ffprobe found no video stream; ffprobe comes with ffmpeg: bash scripts/setup.sh)",
        )
    })?;
    read_frames_at_most(path, h, w, max)
}

/// A reference clip at the generation size `height × width`, as the engine's pipeline
/// prepares it: VideoX-Fun's (`kind` Fun-InP) reads every frame at its stored size and resizes
/// it with PIL's bicubic filter; the others decode straight to the size (ffmpeg bicubic). The
/// one reader of `v2l-run --reference`, `v2l-lora predict` and the C ABI.
pub fn read_reference(
    path: &Path,
    kind: v2l_contracts::PipelineKind,
    height: usize,
    width: usize,
) -> Result<Frames> {
    match kind {
        v2l_contracts::PipelineKind::CogvideoxFunInpaint => {
            read_frames_at_source_size(path)?.resized_like_pil(height, width)
        }
        _ => read_frames(path, height, width),
    }
}

/// [`read_frames`], decoding at most `max_frames` frames (1 for a first frame given as a video).
pub fn read_frames_at_most(
    path: &Path,
    height: usize,
    width: usize,
    max_frames: usize,
) -> Result<Frames> {
    crate::limits::Limits::from_env()?.check_frame_size(height, width, 1)?;
    check_media_path(path, true)?;
    let frames = if is_safetensors_path(path) {
        let f = reference_tensor(path, max_frames)?;
        if (f.height, f.width) != (height, width) {
            return Err(bad(
                path,
                format!(
                    "frames are {}×{}, the model needs {height}×{width}",
                    f.height, f.width
                ),
            ));
        }
        f
    } else if path.is_dir() {
        let mut pngs = pngs_in(path)?;
        pngs.truncate(max_frames);
        let mut rgb = Vec::new();
        for p in &pngs {
            rgb.extend(ffmpeg_decode(p, height, width, 1)?);
        }
        Frames {
            frames: pngs.len(),
            height,
            width,
            rgb,
        }
    } else {
        let rgb = ffmpeg_decode(path, height, width, max_frames)?;
        Frames {
            frames: rgb.len() / (height * width * 3),
            height,
            width,
            rgb,
        }
    };
    if frames.frames == 0 {
        return Err(bad(path, NO_FRAMES));
    }
    Ok(frames)
}

/// The stored size `(height, width)` of the first video stream of `path` (or of the first PNG
/// of a directory), by ffprobe; `None` where it cannot tell (a safetensors clip, no ffprobe).
pub fn source_size(path: &Path) -> Option<(usize, usize)> {
    check_media_path(path, true).ok()?;
    let file = if path.is_dir() {
        pngs_in(path).ok()?.into_iter().next()?
    } else if is_safetensors_path(path) {
        return None;
    } else {
        path.to_path_buf()
    };
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-protocol_whitelist", "file"])
        .args(["-format_whitelist", LOCAL_FORMATS])
        .args(["-select_streams", "v:0", "-show_entries"])
        .args([PROBE_ENTRIES, "-of", "json"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    displayed_size(&out.stdout)
}

/// What the probes ask ffprobe for: the first video stream's stored size and its display
/// rotation (a phone's portrait clip is stored landscape with a display matrix).
const PROBE_ENTRIES: &str = "stream=width,height:stream_side_data=rotation";

/// `(height, width)` of the first video stream as a player shows it, from ffprobe's JSON for
/// [`PROBE_ENTRIES`]: a ±90° rotation swaps the stored sides. ffmpeg rotates the decoded
/// frames the same way (its `-autorotate`, on by default), so the frames v2l reads are upright
/// at this size. `None` without a video stream of a positive size.
fn displayed_size(json: &[u8]) -> Option<(usize, usize)> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let s = v.get("streams")?.as_array()?.first()?;
    let (w, h) = (s.get("width")?.as_u64()?, s.get("height")?.as_u64()?);
    if w == 0 || h == 0 {
        return None;
    }
    let rotation = s
        .get("side_data_list")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .find_map(|d| d.get("rotation").and_then(|r| r.as_f64()))
        .unwrap_or(0.0);
    let quarter_turns = (rotation / 90.0).round() as i64;
    let (h, w) = (usize::try_from(h).ok()?, usize::try_from(w).ok()?);
    Some(match quarter_turns.rem_euclid(2) {
        1 => (w, h),
        _ => (h, w),
    })
}

/// A warning when `path`'s frames are resized to `height × width` with another aspect ratio
/// (more than 1 % apart): diffusers and upstream Video2LoRA resize without cropping, so v2l
/// does too, but the picture is squashed and the user should know.
pub fn aspect_warning(path: &Path, height: usize, width: usize) -> Option<String> {
    let (sh, sw) = source_size(path)?;
    if sh == 0 || sw == 0 || height == 0 || width == 0 {
        return None;
    }
    let (src, dst) = (sw as f64 / sh as f64, width as f64 / height as f64);
    ((src / dst - 1.0).abs() > 0.01).then(|| {
        format!(
            "{}: {sw}x{sh} (aspect {src:.2}) is resized to {width}x{height} (aspect {dst:.2}) without cropping, as diffusers does; crop it first to keep its proportions",
            path.display()
        )
    })
}

/// Decodes every frame of `path` to RGB24 at `height × width` with ffmpeg.
fn ffmpeg_decode(path: &Path, height: usize, width: usize, max_frames: usize) -> Result<Vec<u8>> {
    ffmpeg_decode_with(path, height, width, None, max_frames)
}

/// How far ffmpeg may go on media from an untrusted source (a server upload).
#[derive(Clone, Copy, Debug)]
pub struct UntrustedMedia {
    /// Frames decoded at most; the rest of the clip is not read.
    pub max_frames: usize,
    /// Wall-clock bound on the decode; ffmpeg is killed past it.
    pub timeout: std::time::Duration,
    /// Pixels (width × height) a stored picture may declare. ffmpeg's decoders check the
    /// declared size against it (`-max_pixels`) before allocating a frame, so a small PNG that
    /// declares 16000×16000 is refused without the gigabyte its decode would take.
    pub max_pixels: usize,
}

/// Demuxers allowed for untrusted media: containers and still images only, so a playlist
/// (HLS, concat) cannot make ffmpeg read other files or URLs.
const UNTRUSTED_FORMATS: &str =
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,png_pipe,jpeg_pipe,webp_pipe";

/// Demuxers allowed for a local file given on the command line or through the C ABI: the
/// untrusted set and a few more containers, and still no playlist (concat, HLS) or image
/// sequence pattern (`p%d.png`): each of those opens other files, a FIFO among them would
/// block ffmpeg forever, and none is a clip a user means to hand over as one file.
const LOCAL_FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,png_pipe,jpeg_pipe,\
                             webp_pipe,bmp_pipe,tiff_pipe,mpegts,mpeg,flv,ogg";

/// Decodes untrusted media at `path` (its name says nothing: the format is probed from the
/// bytes) to at most `limits.max_frames` RGB8 frames of `height × width`, local file protocol
/// and container/image demuxers only, killed after `limits.timeout`.
pub fn read_untrusted(
    path: &Path,
    height: usize,
    width: usize,
    limits: UntrustedMedia,
) -> Result<Frames> {
    check_media_path(path, false)?;
    // The caller bounds the size (a server's request check, or `limits.max_pixels` at the
    // source size): the CLI's `V2L_MAX_PIXELS` is not this caller's limit.
    if height == 0 || width == 0 {
        return Err(bad(path, format!("cannot be read at {width}x{height}")));
    }
    let rgb = ffmpeg_decode_with(path, height, width, Some(limits), limits.max_frames)?;
    let frames = rgb.len() / (height * width * 3).max(1);
    if frames == 0 {
        return Err(bad(path, NO_FRAMES));
    }
    Ok(Frames {
        frames,
        height,
        width,
        rgb,
    })
}

/// [`read_untrusted`] at the size the media is stored at: for pipelines that resize a reference
/// clip themselves (VideoX-Fun's). The size is probed with ffprobe under the same protocol and
/// format whitelist and time bound, and must be within `limits.max_pixels`.
pub fn read_untrusted_at_source_size(path: &Path, limits: UntrustedMedia) -> Result<Frames> {
    check_media_path(path, false)?;
    let probe = std::env::var_os("V2L_FFMPEG")
        .map(std::path::PathBuf::from)
        .and_then(|f| f.parent().map(|d| d.join("ffprobe")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "ffprobe".into());
    let child = Command::new(probe)
        .args([
            "-v",
            "error",
            "-protocol_whitelist",
            "file",
            "-format_whitelist",
        ])
        .arg(UNTRUSTED_FORMATS)
        .args(["-select_streams", "v:0", "-show_entries", PROBE_ENTRIES])
        .args(["-of", "json"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::Tool {
            tool: "ffprobe".into(),
            message: format!(
                "cannot start ffprobe ({e}); it comes with ffmpeg (bash scripts/setup.sh)"
            ),
        })?;
    let (_, stdout, _) =
        wait_bounded(child, Some(limits.timeout), &never).map_err(|e| match e {
            Waited::Io(source) => RuntimeError::Io {
                path: path.into(),
                source,
            },
            Waited::TimedOut(_) => bad(path, "probing the media took too long; it is malformed"),
            Waited::Stopped => RuntimeError::Cancelled,
        })?;
    let (h, w) = displayed_size(&stdout).ok_or_else(|| bad(path, NO_VIDEO_STREAM))?;
    if h.saturating_mul(w) > limits.max_pixels {
        return Err(RuntimeError::MediaTooLarge {
            path: path.into(),
            size: format!("{w}x{h}"),
            max_pixels: limits.max_pixels,
        });
    }
    read_untrusted(path, h, w, limits)
}

fn ffmpeg_decode_with(
    path: &Path,
    height: usize,
    width: usize,
    untrusted: Option<UntrustedMedia>,
    max_frames: usize,
) -> Result<Vec<u8>> {
    let mut cmd = ffmpeg();
    cmd.args(["-v", "error", "-nostdin", "-protocol_whitelist", "file"]);
    match untrusted {
        Some(u) => cmd.args([
            "-format_whitelist",
            UNTRUSTED_FORMATS,
            "-max_pixels",
            &u.max_pixels.min(i32::MAX as usize).to_string(),
        ]),
        None => cmd.args(["-format_whitelist", LOCAL_FORMATS]),
    };
    cmd.arg("-i").arg(path);
    // The frames as stored: without `passthrough` ffmpeg fills a variable-rate clip's gaps at
    // the stream's nominal rate (a 2-frame Matroska clip became 4 frames), where OpenCV and
    // imageio, which upstream reads clips with, return each stored frame once.
    cmd.args(["-fps_mode", "passthrough"]);
    cmd.args(["-frames:v", &max_frames.to_string()]);
    cmd.args([
        "-vf",
        &format!("scale={width}:{height}:flags=bicubic"),
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| RuntimeError::Tool {
        tool: "ffmpeg".into(),
        message: format!("cannot start ffmpeg ({e}); install it (bash scripts/setup.sh, or apt-get install ffmpeg)"),
    })?;
    let timeout = untrusted.map(|u| u.timeout);
    let (status, stdout, stderr) = wait_bounded(child, timeout, &never).map_err(|e| match e {
        Waited::Io(source) => RuntimeError::Io {
            path: path.into(),
            source,
        },
        Waited::Stopped => RuntimeError::Cancelled,
        Waited::TimedOut(t) => bad(
            path,
            format!(
                "decoding took longer than {:.0} s; the media is too long or malformed",
                t.as_secs_f64()
            ),
        ),
    })?;
    if !status.success() {
        let msg = String::from_utf8_lossy(&stderr);
        if let Some(u) = untrusted {
            if let Some(size) = oversized_picture(&msg) {
                return Err(RuntimeError::MediaTooLarge {
                    path: path.into(),
                    size: size.to_string(),
                    max_pixels: u.max_pixels,
                });
            }
        }
        if msg.contains("does not contain any stream") || msg.contains("matches no streams") {
            // An audio-only file: ffmpeg's words are about its output, not the input.
            return Err(bad(path, NO_VIDEO_STREAM));
        }
        let first = msg
            .lines()
            .last()
            .unwrap_or("ffmpeg failed")
            .trim()
            .to_string();
        return Err(bad(path, format!("cannot decode video: {first}")));
    }
    Ok(stdout)
}

/// Whether the file at `path` is a whole ISO-BMFF file: its top-level boxes tile it exactly
/// and include the index (`moov`) and the media (`mdat`).
fn mp4_is_whole(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let (mut at, mut moov, mut mdat) = (0usize, false, false);
    while at < bytes.len() {
        let Some(&[s0, s1, s2, s3, k0, k1, k2, k3]) = bytes.get(at..at + 8) else {
            return false;
        };
        let mut size = u32::from_be_bytes([s0, s1, s2, s3]) as usize;
        let kind = &[k0, k1, k2, k3];
        if size == 1 {
            let Some(large) = bytes.get(at + 8..at + 16) else {
                return false;
            };
            let mut b = [0u8; 8];
            b.copy_from_slice(large);
            size = u64::from_be_bytes(b) as usize;
        } else if size == 0 {
            size = bytes.len() - at;
        }
        if size < 8 {
            return false;
        }
        moov |= kind == b"moov";
        mdat |= kind == b"mdat";
        at = match at.checked_add(size) {
            Some(next) => next,
            None => return false,
        };
    }
    at == bytes.len() && moov && mdat
}

/// The declared size (`16000x16000`) when ffmpeg refused a picture over `-max_pixels`.
fn oversized_picture(stderr: &str) -> Option<&str> {
    let line = stderr
        .lines()
        .find(|l| l.contains("exceeds specified max pixel count"))?;
    let rest = &line[line.find("Picture size ")? + "Picture size ".len()..];
    rest.split_whitespace().next()
}

enum Waited {
    Io(std::io::Error),
    TimedOut(std::time::Duration),
    Stopped,
}

/// Never stops: for the tools whose work is short or bounded by a time limit.
fn never() -> bool {
    false
}

/// Reads all of a child's stream on a thread of its own, so the child never waits on a full
/// pipe.
fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            // A read error ends the output early; the exit status reports the failure.
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// Collects a child's output, killing it if it runs past `timeout` or once `stop` says so.
fn wait_bounded(
    mut child: std::process::Child,
    timeout: Option<std::time::Duration>,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), Waited> {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let started = std::time::Instant::now();
    let status = loop {
        // Asked before the exit status, so a stop that came while the child finished holds.
        let stopped = stop();
        match child.try_wait().map_err(Waited::Io)? {
            Some(s) if !stopped => break s,
            _ if stopped => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Waited::Stopped);
            }
            None if timeout.is_some_and(|t| started.elapsed() > t) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Waited::TimedOut(timeout.unwrap_or_default()));
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    };
    let joined = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    Ok((status, joined(out), joined(err)))
}

/// Has the kernel kill `cmd`'s process when the thread that starts it ends, the process with
/// it (Linux's parent-death signal): an encoder left running by a process that a signal ended
/// would write its temporary file again after the signal's clean-up removed it
/// (`v2l_contracts::atomic::remove_partial_outputs`). The thread outlives the child otherwise:
/// [`ffmpeg_encode`] waits for it.
fn ends_with_this_thread(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only `prctl`,
        // `getppid` and `_exit`, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent ended before the signal was asked for: none will come.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Pipes raw RGB24 frames into ffmpeg writing `path` (format from its extension), under a
/// temporary name renamed into place on success. Once `stop` says so (asked between frames
/// and while ffmpeg finishes), ffmpeg is killed, nothing is written and the result is
/// [`RuntimeError::Cancelled`].
fn ffmpeg_encode(
    path: &Path,
    rgb: &[u8],
    (width, height): (usize, usize),
    fps: u32,
    args: &[&str],
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    use std::io::Write;
    // ffmpeg picks the container from the extension: the temporary file keeps it. It is
    // deleted on every path that does not persist it.
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("mp4");
    let tmp_file =
        v2l_contracts::atomic::temp_sibling(path, &format!(".{ext}")).map_err(|source| {
            RuntimeError::Io {
                path: path.into(),
                source,
            }
        })?;
    let tmp = tmp_file.path().to_path_buf();
    let mut cmd = ffmpeg();
    ends_with_this_thread(&mut cmd);
    let mut child = cmd
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &format!("{width}x{height}"), "-r", &fps.to_string(), "-i", "-"])
        .args(args)
        .arg(&tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::Tool {
            tool: "ffmpeg".into(),
            message: format!("cannot start ffmpeg ({e}); install it (bash scripts/setup.sh, or apt-get install ffmpeg)"),
        })?;
    // A frame at a time, so a stop is heard between frames (x264 holds a few dozen back, so
    // writes wait on the encoder).
    // Read while the frames go in: a write waiting on ffmpeg, itself waiting on a full stderr
    // pipe, would never hear `stop`.
    let stderr = drain(child.stderr.take());
    let mut stopped = false;
    let wrote = child.stdin.take().map(|mut stdin| {
        for frame in rgb.chunks((width * height * 3).max(1)) {
            if stop() {
                stopped = true;
                break;
            }
            stdin.write_all(frame)?;
        }
        std::io::Result::Ok(())
        // `stdin` is dropped here: ffmpeg sees the end of its input.
    });
    let stop = || stopped || stop();
    let (status, _, _) = wait_bounded(child, None, &stop).map_err(|e| match e {
        Waited::Io(source) => RuntimeError::Io {
            path: path.into(),
            source,
        },
        Waited::Stopped | Waited::TimedOut(_) => RuntimeError::Cancelled,
    })?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() || !matches!(wrote, Some(Ok(()))) {
        let msg = String::from_utf8_lossy(&stderr);
        return Err(bad(
            path,
            format!(
                "ffmpeg could not write it: {}",
                msg.lines().last().unwrap_or("unknown error").trim()
            ),
        ));
    }
    // ffmpeg can exit 0 having failed to write (a full disk): an mp4 must be whole, index
    // included, and on disk before it takes the final name.
    if ext.eq_ignore_ascii_case("mp4") && !mp4_is_whole(&tmp) {
        return Err(bad(
            path,
            "ffmpeg wrote an incomplete mp4 (no index, or cut short); is the disk full?",
        ));
    }
    tmp_file
        .as_file()
        .sync_all()
        .map_err(|source| RuntimeError::Io {
            path: path.into(),
            source,
        })?;
    tmp_file.persist(path).map_err(|source| RuntimeError::Io {
        path: path.into(),
        source,
    })
}

/// Writes an H.264 mp4 (yuv420p, even-padded) at `fps`.
pub fn write_mp4(path: &Path, frames: &Frames, fps: u32) -> Result<()> {
    write_mp4_until(path, frames, fps, &never)
}

/// [`write_mp4`] that stops once `stop` says so (a cancel, a time limit), between frames or
/// while ffmpeg finishes: [`RuntimeError::Cancelled`], and no file at `path`.
pub fn write_mp4_until(
    path: &Path,
    frames: &Frames,
    fps: u32,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    ffmpeg_encode(
        path,
        &frames.rgb,
        (frames.width, frames.height),
        fps,
        &[
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "12",
            "-movflags",
            "+faststart",
        ],
        stop,
    )
}

/// Writes all frames tiled in a grid (`cols` per row, 2 px gaps) as one PNG, for people to look at.
pub fn write_contact_sheet(path: &Path, frames: &Frames, cols: usize) -> Result<()> {
    let cols = cols.clamp(1, frames.frames.max(1));
    let rows = frames.frames.div_ceil(cols);
    let gap = 2;
    let (fw, fh) = (frames.width, frames.height);
    let (w, h) = (cols * fw + (cols + 1) * gap, rows * fh + (rows + 1) * gap);
    if fw == 0 || fh == 0 {
        return Err(bad(path, format!("frames of {fw}x{fh} pixels")));
    }
    let mut sheet = vec![32u8; w * h * 3];
    for (i, frame) in frames
        .rgb
        .chunks_exact(fw * fh * 3)
        .take(frames.frames)
        .enumerate()
    {
        let (x0, y0) = (gap + (i % cols) * (fw + gap), gap + (i / cols) * (fh + gap));
        for (y, src) in frame.chunks_exact(fw * 3).enumerate() {
            let dst = ((y0 + y) * w + x0) * 3;
            if let Some(d) = sheet.get_mut(dst..dst + fw * 3) {
                d.copy_from_slice(src);
            }
        }
    }
    ffmpeg_encode(path, &sheet, (w, h), 1, &["-frames:v", "1"], &never)
}

#[cfg(test)]
mod tests {
    use super::{displayed_size, mp4_is_whole, oversized_picture, write_mp4_until, Frames};
    use crate::RuntimeError;

    /// A stop asked for while frames are piped in, or once all are in and ffmpeg is finishing,
    /// kills ffmpeg: `Cancelled`, and neither the mp4 nor its temporary sibling is left. Left
    /// alone, the same frames make a whole mp4, so the stop is what removed it.
    #[test]
    fn a_stop_while_the_mp4_is_encoded_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let frames = Frames {
            frames: 9,
            height: 48,
            width: 64,
            rgb: (0..9 * 48 * 64 * 3).map(|i| (i % 251) as u8).collect(),
        };
        let files = || -> Vec<_> {
            let mut v: Vec<_> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let out = d.path().join("out.mp4");
        // `stop` is asked before each frame, then while ffmpeg finishes: the 3rd question is
        // mid-clip, the 10th the first after the last frame.
        for nth in [1, 3, 10] {
            let asked = std::cell::Cell::new(0);
            let stop = || {
                asked.set(asked.get() + 1);
                asked.get() >= nth
            };
            let r = write_mp4_until(&out, &frames, 8, &stop);
            assert!(matches!(r, Err(RuntimeError::Cancelled)), "{nth}: {r:?}");
            assert!(files().is_empty(), "{nth}: {:?}", files());
        }
        write_mp4_until(&out, &frames, 8, &|| false).unwrap();
        assert!(mp4_is_whole(&out));
        assert_eq!(files(), ["out.mp4"]);
    }

    #[test]
    fn a_display_rotation_of_a_quarter_turn_swaps_the_sides() {
        let probe = |side: &str| {
            format!(r#"{{"programs": [], "streams": [{{"width": 128, "height": 64{side}}}]}}"#)
        };
        let rotated = |r: i32| probe(&format!(r#", "side_data_list": [{{"rotation": {r}}}]"#));
        assert_eq!(displayed_size(probe("").as_bytes()), Some((64, 128)));
        for r in [90, -90, 270] {
            assert_eq!(
                displayed_size(rotated(r).as_bytes()),
                Some((128, 64)),
                "{r}"
            );
        }
        assert_eq!(displayed_size(rotated(180).as_bytes()), Some((64, 128)));
        assert_eq!(displayed_size(br#"{"streams": []}"#), None);
        assert_eq!(
            displayed_size(br#"{"streams": [{"width": 0, "height": 64}]}"#),
            None
        );
        assert_eq!(displayed_size(b"128x64x"), None, "not JSON");
    }

    /// A phone's portrait clip (stored landscape with a 90 degree display matrix) read at its
    /// source size, as the Fun-InP path reads references: upright, at the size a player shows.
    /// It used to be refused as "no video stream" (ffprobe's `128x64x` did not parse).
    #[test]
    fn a_rotated_clip_is_read_upright_at_its_displayed_size() {
        let d = tempfile::tempdir().unwrap();
        let (plain, rot) = (d.path().join("plain.mp4"), d.path().join("rot.mp4"));
        let run = |args: &[&str]| {
            let o = std::process::Command::new("ffmpeg")
                .args(["-v", "error", "-y"])
                .args(args)
                .output()
                .expect("ffmpeg (bash scripts/setup.sh)");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        let (p, r) = (plain.to_str().unwrap(), rot.to_str().unwrap());
        run(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=128x64:rate=8",
            "-frames:v",
            "5",
        ]
        .into_iter()
        .chain(["-pix_fmt", "yuv420p", p])
        .collect::<Vec<_>>());
        run(&["-i", p, "-c", "copy", "-metadata:s:v:0", "rotate=90", r]);
        let limits = super::UntrustedMedia {
            max_frames: 10,
            timeout: std::time::Duration::from_secs(30),
            max_pixels: 1 << 20,
        };
        let f = super::read_untrusted_at_source_size(&rot, limits).unwrap();
        assert_eq!((f.frames, f.height, f.width), (5, 128, 64));
        let g = super::read_untrusted_at_source_size(&plain, limits).unwrap();
        assert_eq!((g.height, g.width), (64, 128));
        assert_eq!(super::source_size(&rot), Some((128, 64)));
    }

    #[test]
    fn an_mp4_cut_short_or_without_its_index_is_not_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.mp4");
        let boxed = |kind: &[u8], body: usize| {
            let mut b = ((8 + body) as u32).to_be_bytes().to_vec();
            b.extend(kind);
            b.extend(vec![0u8; body]);
            b
        };
        let whole = [boxed(b"ftyp", 16), boxed(b"moov", 40), boxed(b"mdat", 100)].concat();
        std::fs::write(&p, &whole).unwrap();
        assert!(mp4_is_whole(&p));
        std::fs::write(&p, &whole[..whole.len() - 1]).unwrap();
        assert!(!mp4_is_whole(&p), "cut short");
        std::fs::write(&p, [boxed(b"ftyp", 16), boxed(b"mdat", 100)].concat()).unwrap();
        assert!(!mp4_is_whole(&p), "no moov");
        std::fs::write(&p, b"").unwrap();
        assert!(!mp4_is_whole(&p), "empty");
    }

    #[test]
    fn reads_the_declared_size_from_ffmpegs_max_pixels_refusal() {
        let stderr = "[png @ 0x5] [IMGUTILS @ 0x7f] Picture size 16000x16000 exceeds specified \
                      max pixel count 16777216, see the documentation\nError marking filters";
        assert_eq!(oversized_picture(stderr), Some("16000x16000"));
        assert_eq!(
            oversized_picture("Invalid data found when processing input"),
            None
        );
    }
}
