"""Media in and out through ffmpeg (as v2l itself uses it): images and clips → RGB8, frames → mp4.

ffmpeg is taken from $V2L_FFMPEG, else from PATH, else from the `imageio-ffmpeg` package (a
dependency of the wheel, which ships a static ffmpeg with libx264), so `pip install v2l` alone
can write an mp4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from . import Video

# Demuxers for untrusted bytes: containers and still images only (no playlists), as v2l-serve.
_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,png_pipe,jpeg_pipe,webp_pipe"


def ffmpeg_exe(required: bool = True) -> Optional[str]:
    """The ffmpeg binary: $V2L_FFMPEG, else `ffmpeg` on PATH, else imageio-ffmpeg's."""
    exe = os.environ.get("V2L_FFMPEG") or shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # not installed, or its binary is missing for this platform
        if required:
            raise RuntimeError(
                "ffmpeg not found: put it on PATH, set V2L_FFMPEG, or `pip install imageio-ffmpeg`"
                f" ({e})"
            ) from e
        return None


def decode(data: bytes, height: int, width: int, max_frames: int = 1, timeout: float = 30.0) -> bytes:
    """Image or video bytes → at most `max_frames` RGB8 frames of height × width (bicubic)."""
    with tempfile.NamedTemporaryFile(prefix="v2l-upload-") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(
            [str(ffmpeg_exe()), "-v", "error", "-nostdin", "-protocol_whitelist", "file",
             "-format_whitelist", _FORMATS, "-i", f.name, "-fps_mode", "passthrough", "-frames:v", str(max_frames),
             "-vf", f"scale={width}:{height}:flags=bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
            capture_output=True, timeout=timeout, check=False,
        )
    frame = height * width * 3
    if out.returncode != 0 or not out.stdout or len(out.stdout) % frame:
        msg = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ValueError("cannot decode: " + (msg[-1] if msg else "no frames"))
    return out.stdout


def encode_mp4(video: "Video", fps: int = 8) -> bytes:
    """A `v2l.Video` → H.264 mp4 bytes (yuv420p), as `v2l-run` writes them."""
    fd, path = tempfile.mkstemp(prefix="v2l-", suffix=".mp4")
    os.close(fd)
    try:
        out = subprocess.run(
            [str(ffmpeg_exe()), "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
             "-s", f"{video.width}x{video.height}", "-r", str(fps), "-i", "-",
             "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
             "-crf", "12", "-movflags", "+faststart", path],
            input=video.rgb, capture_output=True, check=False,
        )
        if out.returncode != 0:
            msg = out.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RuntimeError("ffmpeg could not encode the mp4: " + (msg[-1] if msg else "no output"))
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def write_mp4(video: "Video", path: "os.PathLike[str] | str", fps: int = 8) -> None:
    """Writes `video` as an mp4 at `path` (through a temporary name, then renamed: never half a file)."""
    data = encode_mp4(video, fps)
    tmp = f"{os.fspath(path)}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
