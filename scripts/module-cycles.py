#!/usr/bin/env python3
"""Fails if a crate's modules import each other in a cycle (layers flow one way).

For each crate given (its src/ directory), reads every non-test module's `crate::a::b` and
`super::x` paths, builds the module graph and prints each strongly connected component of
more than one module. Exit 1 when any is found. Run by scripts/check-layers.sh.
"""
import os
import re
import sys


def graph(root):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3]
            if rel in ("lib", "main") or rel.endswith("tests") or rel.startswith("bin/"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                src = f.read().split("#[cfg(test)]")[0]
            deps = set()
            for a, b in re.findall(r"crate::(\w+)(?:::(\w+))?", src):
                deps.add(f"{a}/{b}" if b and os.path.exists(f"{root}/{a}/{b}.rs") else a)
            parent = os.path.dirname(rel)
            for m in re.findall(r"super::(\w+)", src):
                if parent and os.path.exists(f"{root}/{parent}/{m}.rs"):
                    deps.add(f"{parent}/{m}")
                elif parent:
                    deps.add(parent)
            mods[rel] = deps - {rel}
    return mods


def cycles(mods):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in mods.get(v, ()):
            if w not in mods:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(mods):
        if v not in index:
            visit(v)
    return found


bad = 0
for root in sys.argv[1:]:
    mods = graph(root)
    for comp in cycles(mods):
        bad = 1
        print(f"module-cycles: {root}: {' <-> '.join(comp)}", file=sys.stderr)
        for m in comp:
            print(f"  {m} imports {sorted(x for x in mods[m] if x in comp)}", file=sys.stderr)
sys.exit(bad)
