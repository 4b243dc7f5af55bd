#!/usr/bin/env python3
"""Would an int8 p·v keep attention within 1e-2? The arithmetic behind docs/benchmarks.md's
"int8 attention: why not p·v too" (issue 45 asks the int8 kernel for <= 0.7x the bf16 one;
with q·kᵀ in int8 and p·v in bf16 the products' bound is 0.75x, so only an int8 p·v could get
there).

One head of 64, 256 queries against S keys, Gaussian q, k, v (q scaled by 1 or 2: softer or
sharper scores), in float64 as the reference. Each column changes one thing:
- V rounded to bf16 (what v2l's kernels multiply today);
- P as u8 (round(p·255), the row's max at 1): what `vpdpbusd` needs for an int8 p·v;
- V as s8 with one scale per channel, or per channel and block of 64 keys;
- P u8 and V s8 per block together.
Prints relative L2 against the reference.

Needs numpy:  python scripts/attention_pv_int8.py 5626
"""
import sys

import numpy as np

D = 64


def bf16(x):
    # Round to nearest bf16 (ties away; close enough for an error estimate).
    return ((x.astype(np.float32).view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)


def s8(x):
    scale = np.abs(x).max(0, keepdims=True) / 127
    return np.round(x / scale) * scale


def attention(q, k, v, p_u8=False, v_s8=None):
    s = q @ k.T / np.sqrt(D)
    p = np.exp(s - s.max(1, keepdims=True))
    if p_u8:
        p = np.round(p * 255) / 255
    if v_s8 == "channel":
        v = s8(v)
    elif v_s8 == "block":
        v = np.concatenate([s8(v[b:b + 64]) for b in range(0, len(v), 64)])
    elif v_s8 == "bf16":
        v = bf16(v)
    return (p @ v) / p.sum(1, keepdims=True)


def main():
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    rng = np.random.default_rng(0)
    for sharp in (1.0, 2.0):
        q = rng.standard_normal((256, D)) * sharp
        k = rng.standard_normal((keys, D))
        v = rng.standard_normal((keys, D))
        ref = attention(q, k, v)

        def rel(o):
            return np.linalg.norm(o - ref) / np.linalg.norm(ref)

        print(
            f"S={keys} q×{sharp:g}: V bf16 {rel(attention(q, k, v, v_s8='bf16')):.2e} | "
            f"P u8 {rel(attention(q, k, v, p_u8=True)):.2e} | "
            f"V s8/channel {rel(attention(q, k, v, v_s8='channel')):.2e} | "
            f"V s8/64-key block {rel(attention(q, k, v, v_s8='block')):.2e} | "
            f"P u8 + V s8/block {rel(attention(q, k, v, p_u8=True, v_s8='block')):.2e}"
        )


if __name__ == "__main__":
    main()
