#!/usr/bin/env python3
"""ONNX Runtime's int8 GEMM as an int8 engine calls it (`com.microsoft.DynamicQuantizeMatMul`),
the two weight storages side by side in one process, on the DiT's real linear shapes:

- s8: symmetric int8 codes, zero point 0 (v2l's int8 engines before the u8u8 scheme): ONNX
  Runtime's u8·s8 kernel, which pairs products in saturating int16 on CPUs without VNNI;
- u8: the same codes + 128, zero point 128 (`int8_scheme: "u8u8"`): its u8·u8 kernel, exact
  on every x86-64 CPU.

Both get the same weights and activations (a few outlier channels, as DiT activations have).
Prints the CPU model and ISA flags, then per shape: relative L2 against the exact product of
the int8 weights with f32 activations, and the median time of --repeat runs.

Needs numpy, onnx and onnxruntime (e.g. `python3 -m venv /tmp/b && /tmp/b/bin/pip install
numpy onnx onnxruntime`); run the same Python under `qemu-x86_64 -cpu Haswell` to see an
AVX2-only CPU's kernels:

    python scripts/bench_int8_gemm.py --repeat 7
"""
import argparse
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (tokens, in, out): one CFG batch of 1,378 tokens (CogVideoX-5B at 9 frames 256x384) through
# an attention projection, the feed-forward in and out.
SHAPES = [(2756, 3072, 3072), (2756, 3072, 12288), (2756, 12288, 3072)]


def cpu():
    model, flags = platform.processor(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                     "avx512_bf16", "amx_tile", "amx_int8"] if f in have]
                break
    except OSError:
        pass
    return model, flags


def graph(m, k, n, q, scale, kind):
    if kind == "s8":
        b = numpy_helper.from_array(np.ascontiguousarray(q.T), "B")
        inits, ins = [b, numpy_helper.from_array(scale, "s")], ["x", "B", "s"]
    else:
        b = numpy_helper.from_array(np.ascontiguousarray((q.T.astype(np.int16) + 128).astype(np.uint8)), "B")
        zp = numpy_helper.from_array(np.full(n, 128, np.uint8), "zp")
        inits, ins = [b, numpy_helper.from_array(scale, "s"), zp], ["x", "B", "s", "zp"]
    node = helper.make_node("DynamicQuantizeMatMul", ins, ["y"], domain="com.microsoft")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                              helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="one 256x512x512 product (quick, e.g. under qemu)")
    a = ap.parse_args()
    model, flags = cpu()
    print(f"CPU: {model}; ISA: {' '.join(flags) or 'none of the listed'}; onnxruntime {ort.__version__}; "
          f"{a.threads} threads; medians of {a.repeat}")
    rng = np.random.default_rng(0)
    for m, k, n in ([(256, 512, 512)] if a.small else SHAPES):
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, :8] += 6.0
        scale = (np.abs(w).max(1) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        exact = x.astype(np.float64) @ (q.astype(np.float64) * scale[:, None]).T
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        row = []
        for kind in ["s8", "u8"]:
            s = ort.InferenceSession(graph(m, k, n, q, scale, kind), so, providers=["CPUExecutionProvider"])
            y = s.run(None, {"x": x})[0]
            ts = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                s.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            err = np.linalg.norm(y - exact) / np.linalg.norm(exact)
            row.append(f"{kind}: rel L2 {err:.3e}, {np.median(ts) * 1e3:7.1f} ms "
                       f"({'/'.join(f'{t * 1e3:.0f}' for t in ts)})")
        print(f"{m}x{k}x{n}: " + " | ".join(row))


if __name__ == "__main__":
    main()
