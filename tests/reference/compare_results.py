#!/usr/bin/env python3
"""Compares two `moerun replay-moe` result files tensor by tensor: the same case run on two
backends (CPU and CUDA), or at two rank counts.

usage: python3 compare_results.py --a cpu.safetensors --b cuda.safetensors [--tol 1e-4]

Integer tensors (expert_index, slot) must be equal. Float tensors must agree to
max|a - b| / max(1e-6, max|a|) <= --tol (the rounding of fp32 sums taken in another order,
relative to the tensor's scale). Every tensor of --a must be in --b with its shape.
Prints one line per tensor with the measured difference; exit 0 all ok, 1 any failure,
77 numpy missing. Reads the files with numpy alone when `safetensors` is not installed.
"""

import argparse
import os
import sys

try:
    import numpy as np
except Exception as exc:  # pragma: no cover
    print(f"SKIP: numpy not importable ({exc})")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference as ref  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compare two replay-moe result files.")
    ap.add_argument("--a", required=True, help="the reference side (e.g. the CPU result)")
    ap.add_argument("--b", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    try:
        a, b = ref.load_tensors(args.a), ref.load_tensors(args.b)
    except Exception as exc:
        print(f"FAIL cannot load: {exc}")
        return 1
    failed = 0
    for name in sorted(a):
        x = a[name]
        if name not in b:
            print(f"FAIL {name:28s} missing from {args.b}")
            failed += 1
            continue
        y = b[name]
        if x.shape != y.shape:
            print(f"FAIL {name:28s} shape {list(y.shape)} != {list(x.shape)}")
            failed += 1
            continue
        if np.issubdtype(x.dtype, np.integer):
            bad = int(np.sum(x != y))
            ok = bad == 0
            msg = "equal" if ok else f"{bad} of {x.size} differ"
        else:
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            if not np.all(np.isfinite(y64)):
                ok, msg = False, "non-finite values"
            else:
                diff = float(np.max(np.abs(x64 - y64))) if x.size else 0.0
                scale = max(1e-6, float(np.max(np.abs(x64))) if x.size else 0.0)
                ok = diff / scale <= args.tol
                msg = f"max abs diff {diff:.3e}, relative to max|a| {diff / scale:.3e}"
        print(f"{'ok  ' if ok else 'FAIL'} {name:28s} {msg}")
        failed += 0 if ok else 1
    print(f"{'PASSED' if failed == 0 else 'FAILED'}: {len(a) - failed}/{len(a)} tensors within "
          f"tol {args.tol:g} ({os.path.basename(args.a)} vs {os.path.basename(args.b)})")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
