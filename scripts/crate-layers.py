#!/usr/bin/env python3
"""Fails if a workspace crate depends (normal or build dependencies) on a crate above its layer.

Data flows one way: contracts -> graphs -> export / calibration / kernels / sampling -> runtime -> compile / tools
-> the front ends (bin, capi, serve) -> bench. Each crate may depend only on the crates this
table lists for it; a new workspace crate missing from the table is an error too, so the check
covers every crate. Dev-dependencies (tests) may reach further. Run by scripts/check-layers.sh.
"""
import json
import subprocess
import sys

ALLOWED = {
    "v2l-contracts": set(),
    "v2l-graphs": {"v2l-contracts"},
    "v2l-calibration": {"v2l-contracts", "v2l-graphs"},
    "v2l-export": {"v2l-contracts", "v2l-graphs"},
    "v2l-kernels": {"v2l-contracts", "v2l-graphs"},
    "v2l-sampling": {"v2l-contracts"},
    "v2l-runtime": {"v2l-contracts", "v2l-graphs", "v2l-kernels", "v2l-sampling"},
    "v2l-compile": {"v2l-contracts", "v2l-graphs", "v2l-calibration", "v2l-runtime"},
    "v2l-tools": {"v2l-contracts", "v2l-runtime", "v2l-export"},
    "v2l-serve": {"v2l-contracts", "v2l-runtime"},
    "v2l-capi": {"v2l-contracts", "v2l-graphs", "v2l-runtime", "v2l-export", "v2l-compile", "v2l-tools"},
    "v2l-cli": {"v2l-contracts", "v2l-graphs", "v2l-calibration", "v2l-export", "v2l-runtime",
                "v2l-compile", "v2l-tools", "v2l-serve"},
    "v2l-tests": {"v2l-contracts", "v2l-graphs", "v2l-export", "v2l-runtime", "v2l-compile", "v2l-tools"},
    "v2l-bench": {"v2l-cli", "v2l-contracts", "v2l-graphs", "v2l-export", "v2l-runtime",
                  "v2l-compile", "v2l-tools", "v2l-serve"},
}


def main():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"]))
    names = {p["name"] for p in meta["packages"]}
    bad = []
    for p in meta["packages"]:
        name = p["name"]
        if name not in ALLOWED:
            bad.append(f"{name} is not in scripts/crate-layers.py's table: give it its layer")
            continue
        for d in p["dependencies"]:
            if d["name"] in names and d["kind"] != "dev" and d["name"] not in ALLOWED[name]:
                bad.append(f"{name} depends on {d['name']}, above its layer")
    for line in bad:
        print(f"check-layers: {line}", file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"check-layers: {len(names)} crates, each depends only on the layers below it")


if __name__ == "__main__":
    main()
