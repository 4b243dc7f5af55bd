"""Two Ray Serve replicas on a local Ray instance (CPU, loopback), requests routed by LoRA id.

Usage: ray_serve_check.py ENGINE LORA_DIR FIRST_FRAME_RGB OUT_DIR
Sends a base request, then LoRAs a, b, a, b, a, b, then c (a third LoRA: with one LoRA per
replica, loading it evicts one), then a bad request. Writes each answer's frames to
OUT_DIR/<i>_<lora>.rgb and OUT_DIR/summary.json (lora, replica, loads per request); the Rust
test (capi/tests/python_ray.rs) compares the frames with the C ABI's bitwise and checks routing.
"""

import base64
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import ray
from ray import serve

from v2l.ray_serve import app

PROMPT = "A red car drives through a snowy forest at dusk."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, lora=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if lora:
        req.add_header("serve_multiplexed_model_id", lora)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def main():
    engine, lora_dir, frame_path, out = sys.argv[1:5]
    image = base64.b64encode(open(frame_path, "rb").read()).decode()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False, runtime_env={"env_vars": {
                 k: os.environ[k] for k in ("PYTHONPATH", "V2L_LIBRARY", "V2L_MAX_LORAS_PER_REPLICA", "ORT_DYLIB_PATH")
                 if k in os.environ}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app(engine, lora_dir, replicas=2, threads=1), name="v2l", route_prefix="/")
    url = f"http://127.0.0.1:{port}/"
    body = {"image_rgb": image, "prompt": PROMPT, "height": 64, "width": 64, "frames": 17,
            "steps": 2, "seed": 5, "format": "rgb"}
    summary = []
    for i, lora in enumerate([None, "a", "b", "a", "b", "a", "b", "c"]):
        status, headers, data = post(url, body, lora)
        if status != 200:
            raise SystemExit(f"request {i} ({lora}): {status} {data[:300]!r}")
        name = lora or "base"
        with open(os.path.join(out, f"{i}_{name}.rgb"), "wb") as f:
            f.write(data)
        h = {k.lower(): v for k, v in headers.items()}
        summary.append({"i": i, "lora": name, "replica": h["x-v2l-replica"], "loads": int(h["x-v2l-lora-loads"])})
        # A replica reports the LoRAs it holds to Ray Serve's router asynchronously; a request
        # sent before the report arrives is routed as if nothing were loaded (seen on a fast
        # machine: b went to a's replica, evicting a). Give the report time to arrive.
        time.sleep(2.0)
    status, _, data = post(url, {"prompt": PROMPT}, "a")
    summary.append({"bad_status": status, "bad_body": json.loads(data)})
    status, _, data = post(url, body, "no-such-lora")
    summary.append({"missing_status": status, "missing_body": json.loads(data)})
    import v2l
    summary.append({"v2l_module": v2l.__file__})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
