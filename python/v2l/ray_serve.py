"""Scale-out on Ray Serve: replicas of a v2l generator, with requests routed by LoRA id.

Each replica holds one loaded pipeline. A request names its LoRA with Ray Serve's model
multiplexing (`serve_multiplexed_model_id: <lora id>` header, or
`handle.options(multiplexed_model_id=...)`), so Serve sends it to a replica that already holds
that LoRA; a replica keeps at most V2L_MAX_LORAS_PER_REPLICA LoRAs (default 2), least recently
used evicted first. LoRA ids name files `<id>.safetensors` in `lora_dir` (for instance
v2l-serve's `<state>/loras`, where POST /v1/loras puts predicted and uploaded LoRAs).

    from ray import serve
    from v2l.ray_serve import app
    serve.run(app("engine/", "/var/lib/v2l/loras", replicas=2), route_prefix="/")

Request body (JSON): `image` (base64 PNG/JPEG/WebP) or `image_rgb` (base64 RGB8, height × width
× 3), `prompt`, optional `negative_prompt`, `height`, `width`, `frames`, `steps`, `guidance`,
`seed`, `lora_scale`, `format` ("mp4", default, or "rgb"). The answer carries
`x-v2l-replica` (which replica ran it) and `x-v2l-lora-loads` (LoRA files that replica loaded).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import v2l
from v2l import media

MAX_LORAS = int(os.environ.get("V2L_MAX_LORAS_PER_REPLICA", "2"))
_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _bad(field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"kind": "bad_field", "field": field, "message": message}}, status_code=400)


@serve.deployment(max_ongoing_requests=1)
class V2lDeployment:
    def __init__(self, engine: str, lora_dir: str, threads: int = 0) -> None:
        self.engine = v2l.Engine(engine, threads)
        self.generator = v2l.Generator(self.engine)
        self.lora_dir = lora_dir
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        self.replica = getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "replica")
        self.loads = 0
        self.applied = None  # (lora object, scale) the generator holds
        self.lock = asyncio.Lock()

    @serve.multiplexed(max_num_models_per_replica=MAX_LORAS)
    async def get_lora(self, lora_id: str) -> v2l.Lora:
        path = os.path.join(self.lora_dir, lora_id + ".safetensors")
        if not os.path.isfile(path):
            raise KeyError(lora_id)
        lora = await asyncio.to_thread(self.engine.load_lora, path)
        self.loads += 1
        return lora

    async def __call__(self, request: Request) -> Response:
        try:
            body = await request.json()
        except Exception:
            return _bad("body", "expected a JSON object")
        if not isinstance(body, dict):
            return _bad("body", "expected a JSON object")
        lora_id = serve.get_multiplexed_model_id()
        if lora_id and not _ID.fullmatch(lora_id):
            return _bad("serve_multiplexed_model_id", "a LoRA id is 1-64 letters, digits, - or _")
        try:
            height, width = int(body.get("height", 64)), int(body.get("width", 64))
            frames, steps = int(body.get("frames", 17)), int(body.get("steps", 50))
            guidance, seed = float(body.get("guidance", 6.0)), int(body.get("seed", 0))
            scale = float(body.get("lora_scale", 1.0))
        except (TypeError, ValueError) as e:
            return _bad("body", f"a number field is not a number ({e})")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _bad("prompt", "required (text)")
        try:
            if "image_rgb" in body:
                image = base64.b64decode(body["image_rgb"], validate=True)
            elif "image" in body:
                raw = base64.b64decode(body["image"], validate=True)
                image = await asyncio.to_thread(media.decode, raw, height, width)
            else:
                return _bad("image", "required: `image` (base64 PNG/JPEG) or `image_rgb`")
        except ValueError as e:
            return _bad("image", str(e))
        async with self.lock:
            try:
                lora = await self.get_lora(lora_id) if lora_id else None
            except KeyError:
                return JSONResponse({"error": {"kind": "not_found", "field": "serve_multiplexed_model_id",
                                               "message": f"no LoRA `{lora_id}` here"}}, status_code=404)
            except v2l.V2lError as e:
                # The message names the file; clients know it by its id.
                return _bad("serve_multiplexed_model_id", e.message.replace(self.lora_dir, "<loras>"))
            want = None if lora is None else (lora, scale)
            if want != self.applied:
                if lora is None:
                    self.generator.clear_lora()
                else:
                    self.generator.set_lora(lora, scale)
                self.applied = want
            try:
                video = await asyncio.to_thread(
                    self.generator.generate, image, height=height, width=width, frames=frames,
                    prompt=prompt, negative_prompt=str(body.get("negative_prompt", "")),
                    steps=steps, guidance=guidance, seed=seed,
                )
            except v2l.V2lError as e:
                if e.status in ("V2L_STATUS_INVALID_ARGUMENT", "V2L_STATUS_BUFFER_SIZE"):
                    return _bad("body", e.message)
                raise
        headers = {"x-v2l-replica": str(self.replica), "x-v2l-lora-loads": str(self.loads)}
        if body.get("format") == "rgb":
            return Response(video.rgb, media_type="application/octet-stream", headers=headers)
        mp4 = await asyncio.to_thread(media.encode_mp4, video)
        return Response(mp4, media_type="video/mp4", headers=headers)


def app(engine: str, lora_dir: str, replicas: int = 2, threads: int = 0) -> serve.Application:
    """The Serve application: `replicas` generators for `engine`, LoRAs from `lora_dir`."""
    return V2lDeployment.options(num_replicas=replicas).bind(engine, lora_dir, threads)
