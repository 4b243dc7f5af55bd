#!/usr/bin/env python3
"""Fails if a diffusers model class name is spelled out as a string outside `contracts`.

The model contract (`contracts/src/family.rs`) is the one place that knows which transformer
and VAE classes v2l runs; everything else asks it (`Family::dit_class`, `vae_class`), so a new
family or kind is added in one place. Reads every non-test part of every crate's `src/` (a
file's `#[cfg(test)]` module and everything after it are tests). Run by scripts/check-layers.sh.
"""
import os
import re
import sys

CLASS = re.compile(r'"(?:CogVideoX|Wan)\w*Transformer3DModel"|"AutoencoderKL(?:CogVideoX|Wan)\w*"')
CRATES = ["graphs", "export", "compile", "calibration", "runtime", "capi", "serve", "bin", "tools"]


def non_test(text):
    cut = text.find("#[cfg(test)]")
    return text if cut < 0 else text[:cut]


def main():
    found = []
    for crate in CRATES:
        for dirpath, _, files in os.walk(os.path.join(crate, "src")):
            for name in files:
                if not name.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for no, line in enumerate(non_test(f.read()).splitlines(), 1):
                        if CLASS.search(line) and not line.lstrip().startswith("//"):
                            found.append(f"{path}:{no}: {line.strip()}")
    for f in found:
        print(f"check-class-names: a model class spelled outside contracts: {f}", file=sys.stderr)
    if found:
        print("check-class-names: use v2l_contracts::Family::{dit_class, vae_class}", file=sys.stderr)
        return 1
    print("check-class-names: model class names come only from contracts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
