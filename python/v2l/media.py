"""Media in and out through ffmpeg (as v2l itself uses it): images and clips → RGB8, frames → mp4."""

import os
import subprocess
import tempfile

# Demuxers for untrusted bytes: containers and still images only (no playlists), as v2l-serve.
_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,png_pipe,jpeg_pipe,webp_pipe"


def decode(data: bytes, height: int, width: int, max_frames: int = 1, timeout: float = 30.0) -> bytes:
    """Image or video bytes → at most `max_frames` RGB8 frames of height × width (bicubic)."""
    with tempfile.NamedTemporaryFile(prefix="v2l-upload-") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            ["ffmpeg", "-v", "error", "-nostdin", "-protocol_whitelist", "file",
             "-format_whitelist", _FORMATS, "-i", f.name, "-frames:v", str(max_frames),
             "-vf", f"scale={width}:{height}:flags=bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
            capture_output=True, timeout=timeout, check=False,
        )
    frame = height * width * 3
    if out.returncode != 0 or not out.stdout or len(out.stdout) % frame:
        msg = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ValueError("cannot decode: " + (msg[-1] if msg else "no frames"))
    return out.stdout


def encode_mp4(video, fps: int = 8) -> bytes:
    """A `v2l.Video` → H.264 mp4 bytes (yuv420p), as `v2l-run` writes them."""
    fd, path = tempfile.mkstemp(prefix="v2l-", suffix=".mp4")
    os.close(fd)
    try:
        subprocess.run(
            ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
             "-s", f"{video.width}x{video.height}", "-r", str(fps), "-i", "-",
             "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
             "-crf", "12", "-movflags", "+faststart", path],
            input=video.rgb, capture_output=True, check=True,
        )
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)
