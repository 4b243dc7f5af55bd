"""v2l for Python: a thin ctypes binding over libv2l, v2l's C ABI (capi/include/v2l.h).

Nothing here computes anything: every call goes to the Rust library, so Python gets the same
videos, bit for bit, as the CLI, the C ABI and v2l-serve. No third-party packages are needed.

    import v2l
    engine = v2l.Engine("engine/")                 # v2l-compile bundle or v2l-export pipeline
    gen = v2l.Generator(engine)                    # one loaded pipeline; one call at a time
    lora = engine.load_lora("effect.safetensors")  # or gen.predict_lora_from_video("ref.mp4", 480, 720)
    gen.set_lora(lora)
    frames = gen.generate(first_frame_rgb, height=480, width=720, frames=49, prompt="a red car")

Installed from the wheel (`pip install v2l-*.whl`; build it with `bash scripts/build-wheel.sh`),
libv2l.so sits inside this package. Otherwise it is found at $V2L_LIBRARY, else in the
workspace's target/release/ (`cargo build --release -p v2l-capi`). ONNX Runtime comes from the
`onnxruntime` package (a dependency of the wheel) unless ORT_DYLIB_PATH says otherwise, and ffmpeg
from PATH, else from the `imageio-ffmpeg` package (see `v2l.media.ffmpeg_exe`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Union

from . import media

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["Engine", "Generator", "Lora", "V2lError", "Video", "library"]

ABI_VERSION = 6


class V2lError(RuntimeError):
    """A failed v2l call: `status` is the V2L_STATUS_* name, the message says what and why."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class _Params(ctypes.Structure):
    # V2lGenerateParams, field for field (ABI version 4).
    _fields_ = [
        ("frames", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("width", ctypes.c_uint32),
        ("steps", ctypes.c_uint32),
        ("guidance", ctypes.c_float),
        ("seed", ctypes.c_uint64),
        ("first_frame", ctypes.POINTER(ctypes.c_uint8)),
        ("first_frame_len", ctypes.c_size_t),
        ("prompt_embeds", ctypes.POINTER(ctypes.c_float)),
        ("negative_prompt_embeds", ctypes.POINTER(ctypes.c_float)),
        ("embed_len", ctypes.c_uint32),
        ("embed_dim", ctypes.c_uint32),
        ("noise", ctypes.POINTER(ctypes.c_float)),
        ("noise_len", ctypes.c_size_t),
        ("prompt", ctypes.c_char_p),
        ("negative_prompt", ctypes.c_char_p),
        ("max_sequence_length", ctypes.c_uint32),
        ("image_embeds", ctypes.POINTER(ctypes.c_float)),
        ("image_embed_len", ctypes.c_uint32),
        ("image_embed_dim", ctypes.c_uint32),
        ("scheduler", ctypes.c_char_p),
        ("inpaint_noise", ctypes.POINTER(ctypes.c_float)),
        ("inpaint_noise_len", ctypes.c_size_t),
        ("cache", ctypes.c_char_p),
    ]


class _EngineOptions(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_uint32), ("device", ctypes.c_uint32)]


_PROGRESS = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
_lib = None
_lib_lock = threading.Lock()



def _c_text(name: str, text: str) -> bytes:
    """`text` as the C string the ABI reads; a NUL would cut it short silently, so it is refused."""
    if "\0" in text:
        raise ValueError(f"{name} contains a NUL character")
    return text.encode("utf-8")


def _c_path(path: PathLike) -> bytes:
    """A path as the C string the ABI reads; a NUL would cut it short silently, so it is refused."""
    b = os.fsencode(path)
    if b"\0" in b:
        raise ValueError(f"path {path!r} contains a NUL character")
    return b

def _find_library() -> str:
    env = os.environ.get("V2L_LIBRARY")
    if env:
        return env
    here = Path(__file__).resolve().parent
    for candidate in [here / "libv2l.so", here.parent.parent / "target" / "release" / "libv2l.so"]:
        if candidate.is_file():
            return str(candidate)
    raise V2lError(
        "V2L_STATUS_IO",
        "libv2l.so not found: install the wheel (bash scripts/build-wheel.sh), set V2L_LIBRARY, "
        "or build it with `cargo build --release -p v2l-capi`",
    )


def _point_runtime_at_dependencies() -> None:
    """Tells libv2l where this environment's ONNX Runtime and ffmpeg are, unless already told.

    The Rust runtime would otherwise ask `python3` on PATH for `onnxruntime`, which need not be
    this interpreter (an unactivated venv, a Ray worker), and would look for ffmpeg on PATH only.
    """
    if "ORT_DYLIB_PATH" not in os.environ:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                capi = Path(root) / "capi"
                if any(capi.glob("libonnxruntime.so*")):
                    os.environ["ORT_DYLIB_PATH"] = str(capi)
                    break
    if "V2L_FFMPEG" not in os.environ:
        exe = media.ffmpeg_exe(required=False)
        if exe is not None:
            os.environ["V2L_FFMPEG"] = exe


def library() -> ctypes.CDLL:
    """libv2l, loaded once, with its ABI version checked."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        _point_runtime_at_dependencies()
        lib = ctypes.CDLL(_find_library())
        P, vp = ctypes.POINTER, ctypes.c_void_p
        sigs = {
            "v2l_abi_version": ([], ctypes.c_uint32),
            "v2l_last_error": ([], ctypes.c_char_p),
            "v2l_status_str": ([ctypes.c_int32], ctypes.c_char_p),
            "v2l_engine_open": ([ctypes.c_char_p, P(_EngineOptions), P(vp)], ctypes.c_int32),
            "v2l_engine_free": ([vp], ctypes.c_int32),
            "v2l_engine_load_lora": ([vp, ctypes.c_char_p, P(vp)], ctypes.c_int32),
            "v2l_generator_new": ([vp, P(vp)], ctypes.c_int32),
            "v2l_generator_free": ([vp], ctypes.c_int32),
            "v2l_generator_predict_lora_from_video": (
                [vp, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_float, P(vp)],
                ctypes.c_int32,
            ),
            "v2l_generator_set_lora": ([vp, vp, ctypes.c_float], ctypes.c_int32),
            "v2l_generator_clear_lora": ([vp], ctypes.c_int32),
            "v2l_generator_set_factor_cache": ([vp, ctypes.c_uint64], ctypes.c_int32),
            "v2l_generator_output_size": (
                [vp, P(_Params), P(ctypes.c_size_t), P(ctypes.c_uint32)],
                ctypes.c_int32,
            ),
            "v2l_generator_generate": (
                [vp, P(_Params), _PROGRESS, vp, P(ctypes.c_uint8), ctypes.c_size_t],
                ctypes.c_int32,
            ),
            "v2l_generator_cancel": ([vp], ctypes.c_int32),
            "v2l_lora_layer_count": ([vp, P(ctypes.c_size_t)], ctypes.c_int32),
            "v2l_lora_free": ([vp], ctypes.c_int32),
        }
        for name, (args, res) in sigs.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        abi = lib.v2l_abi_version()
        if abi != ABI_VERSION:
            raise V2lError(
                "V2L_STATUS_INVALID_ARGUMENT",
                f"libv2l has ABI version {abi}; this package speaks {ABI_VERSION}",
            )
        _lib = lib
        return lib


def _check(status: int) -> None:
    if status != 0:
        lib = library()
        raise V2lError(lib.v2l_status_str(status).decode(), lib.v2l_last_error().decode("utf-8", "replace"))


class _Handle:
    _free = ""

    def __init__(self, ptr: ctypes.c_void_p) -> None:
        self._ptr = ptr

    def close(self) -> None:
        """Frees the handle now (otherwise when garbage-collected): the `v2l_*_free` call."""
        if self._ptr:
            getattr(library(), self._free)(self._ptr)
            self._ptr = ctypes.c_void_p()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lora(_Handle):
    """A LoRA (from a file or predicted): immutable, shareable between generators.

    Freed by `v2l_lora_free`.
    """

    _free = "v2l_lora_free"

    @property
    def layers(self) -> int:
        """How many DiT layers it adapts (`v2l_lora_layer_count`)."""
        n = ctypes.c_size_t()
        _check(library().v2l_lora_layer_count(self._ptr, ctypes.byref(n)))
        return n.value


class Engine(_Handle):
    """An opened engine (checked once, `v2l_engine_open`); shareable between threads and generators.

    `path` is a `v2l-compile` bundle or a `v2l-export` pipeline directory; `threads` is ONNX
    Runtime's intra-op thread count per session (0: one per core); `device` is the GPU a cuda or
    tensorrt engine runs on, as CUDA numbers them (a CPU engine takes 0 only). Freed by
    `v2l_engine_free`.
    """

    _free = "v2l_engine_free"

    def __init__(self, path: PathLike, threads: int = 0, device: int = 0) -> None:
        for name, v in (("threads", threads), ("device", device)):
            if not 0 <= v < 2**32:
                raise ValueError(f"{name} is {v}; it must be an integer 0 to {2**32 - 1}")
        out = ctypes.c_void_p()
        opts = _EngineOptions(threads, device)
        _check(library().v2l_engine_open(_c_path(path), ctypes.byref(opts), ctypes.byref(out)))
        super().__init__(out)

    def load_lora(self, path: PathLike) -> Lora:
        """A standard LoRA file (diffusers/PEFT, kohya or ComfyUI safetensors), checked against
        the DiT (`v2l_engine_load_lora`)."""
        out = ctypes.c_void_p()
        _check(library().v2l_engine_load_lora(self._ptr, _c_path(path), ctypes.byref(out)))
        return Lora(out)


class Video:
    """Generated frames: RGB8, `frames × height × width × 3` bytes, row-major, interleaved."""

    def __init__(self, rgb: bytes, frames: int, height: int, width: int) -> None:
        self.rgb: bytes = rgb
        self.frames: int = frames
        self.height: int = height
        self.width: int = width

    def __repr__(self) -> str:
        return f"Video(frames={self.frames}, height={self.height}, width={self.width})"


Progress = Callable[[int, int], Optional[bool]]


class Generator(_Handle):
    """A loaded pipeline (its own ONNX Runtime sessions, `v2l_generator_new`) and its applied LoRA.

    One generation at a time; `cancel()` may be called from any thread. Freed by
    `v2l_generator_free`.
    """

    _free = "v2l_generator_free"

    def __init__(self, engine: Engine) -> None:
        out = ctypes.c_void_p()
        _check(library().v2l_generator_new(engine._ptr, ctypes.byref(out)))
        super().__init__(out)
        self._engine = engine  # keeps the engine alive as long as the generator

    def predict_lora_from_video(self, path: PathLike, height: int, width: int, weight: float = 1.0) -> Lora:
        """A reference clip's Video2LoRA LoRA; the clip is decoded by ffmpeg at height × width
        (`v2l_generator_predict_lora_from_video`)."""
        out = ctypes.c_void_p()
        _check(
            library().v2l_generator_predict_lora_from_video(
                self._ptr, _c_path(path), height, width, weight, ctypes.byref(out)
            )
        )
        return Lora(out)

    def set_lora(self, lora: Lora, scale: float = 1.0) -> None:
        """Applies `lora`, replacing any other: an exact switch (`v2l_generator_set_lora`)."""
        _check(library().v2l_generator_set_lora(self._ptr, lora._ptr, scale))

    def set_factor_cache(self, nbytes: int) -> None:
        """Keeps up to `nbytes` of laid-out LoRA factors for LoRAs switched away from, so that
        `set_lora` back to one (same `Lora`, same scale) moves none; `unfused` engines only (GPU
        and int8 engines' default); 0 keeps none (`v2l_generator_set_factor_cache`)."""
        if not 0 <= nbytes < 1 << 64:
            raise ValueError(f"nbytes: {nbytes} is not a byte count")
        _check(library().v2l_generator_set_factor_cache(self._ptr, nbytes))

    def clear_lora(self) -> None:
        """Back to the base weights (`v2l_generator_clear_lora`)."""
        _check(library().v2l_generator_clear_lora(self._ptr))

    def cancel(self) -> None:
        """Stops a running `generate` within the ONNX Runtime node in flight: its current step,
        or frame batch of its decode, is cut short (`v2l_generator_cancel`)."""
        _check(library().v2l_generator_cancel(self._ptr))

    def generate(
        self,
        first_frame: bytes,
        *,
        height: int,
        width: int,
        frames: int,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 50,
        guidance: float = 6.0,
        seed: int = 0,
        max_sequence_length: int = 0,
        scheduler: Optional[str] = None,
        cache: Optional[str] = None,
        progress: Optional[Progress] = None,
    ) -> Video:
        """First frame (RGB8 bytes, height × width × 3) + prompt text → frames.

        Sizes the output with `v2l_generator_output_size`, then runs `v2l_generator_generate`.
        `scheduler` picks a CogVideoX engine's sampler (`ddim`, `cogvideox-ddim` or `dpm`; None: the
        engine's default). `cache="first-block:0.1"` turns on step caching (diffusers' First Block
        Cache; None: off). `progress(step, steps)` is called after each denoising step (on
        the thread that runs the call); returning False cancels. Ctrl-C (KeyboardInterrupt)
        cancels too, within the ONNX Runtime node in flight, decode included, and is raised
        once the call has returned; the generator stays usable.
        """
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed is {seed}; it must be an integer 0 to 2**64 - 1")
        for name, v, top in (("frames", frames, 2**32), ("height", height, 2**32),
                             ("width", width, 2**32), ("steps", steps, 2**32),
                             ("max_sequence_length", max_sequence_length, 2**32)):
            if not 0 <= v < top:
                raise ValueError(f"{name} is {v}; it must be an integer 0 to {top - 1}")
        lib = library()
        image = (ctypes.c_uint8 * len(first_frame)).from_buffer_copy(first_frame)
        p = _Params()
        p.frames, p.height, p.width, p.steps = frames, height, width, steps
        p.guidance, p.seed = guidance, seed
        p.first_frame = ctypes.cast(image, ctypes.POINTER(ctypes.c_uint8))
        p.first_frame_len = len(first_frame)
        p.prompt = _c_text("prompt", prompt)
        p.negative_prompt = _c_text("negative_prompt", negative_prompt)
        p.max_sequence_length = max_sequence_length
        if scheduler is not None:
            p.scheduler = _c_text("scheduler", scheduler)
        if cache is not None:
            p.cache = _c_text("cache", cache)
        size, n = ctypes.c_size_t(), ctypes.c_uint32()
        _check(lib.v2l_generator_output_size(self._ptr, ctypes.byref(p), ctypes.byref(size), ctypes.byref(n)))
        out = (ctypes.c_uint8 * size.value)()
        raised = []

        def on_step(_user, step, total):
            if progress is None:
                return 0
            try:
                return 0 if progress(step, total) is not False else 1
            except BaseException as e:  # never unwind into Rust
                raised.append(e)
                return 1

        cb = _PROGRESS(on_step)
        # The call runs on a helper thread: Python delivers a KeyboardInterrupt to this one
        # only between bytecodes, which a call into C would hold back until its end (minutes
        # of decode on a CPU).
        ended, result = threading.Event(), []

        def call():
            try:
                result.append(lib.v2l_generator_generate(
                    self._ptr, ctypes.byref(p), cb, None, out, size.value))
            except BaseException as e:  # raised here, on the caller's thread
                result.append(e)
            finally:
                ended.set()

        worker = threading.Thread(target=call, name="v2l-generate", daemon=True)
        worker.start()
        try:
            while not ended.wait(0.1):
                pass
        except BaseException:
            lib.v2l_generator_cancel(self._ptr)
            worker.join()
            raise
        worker.join()
        status = result[0]
        if isinstance(status, BaseException):
            raise status
        if raised:
            raise raised[0]
        _check(status)
        return Video(bytes(out), n.value, height, width)
