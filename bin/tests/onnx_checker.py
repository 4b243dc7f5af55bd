"""Runs onnx.checker.check_model(full_check=True) on every model path given; exits 1 naming
the first invalid one. Used by bin/tests/valid_graphs.rs (the product itself needs no Python)."""
import sys

import onnx

bad = 0
for path in sys.argv[1:]:
    try:
        onnx.checker.check_model(path, full_check=True)
        print(f"ok {path}")
    except Exception as e:  # noqa: BLE001 - report every failure kind the same way
        print(f"INVALID {path}: {e}")
        bad += 1
sys.exit(1 if bad else 0)
