#!/usr/bin/env python3
"""Compares a V-MoE layer result file against the numpy float64 reference.

usage: python3 check_result.py --case case.safetensors --result result.safetensors
           [--grad-tol 1e-3] [--no-grads] [--eps 1e-6]

Result tensors: y [T,D], expert_index [T,K] (int), slot [T,K] (int), combine_weight [T,K],
scalars (shape [] or [1]) loss.importance, loss.load, loss.gshard, loss.aux_total, and
(unless --no-grads) grad.x, grad.router.weight, grad.experts.fc1.weight,
grad.experts.fc1.bias, grad.experts.fc2.weight, grad.experts.fc2.bias.

Checks:
  expert_index, slot            exactly (every choice, kept or dropped)
  combine_weight (kept choices), y, loss.*
                                |got - ref| <= atol + rtol*|ref| elementwise,
                                rtol = 1e-4, atol = 1e-6
  combine_weight (dropped)      either 0 or the raw gate (same tolerance)
  grad.*                        max|got - ref| / max(1, max|ref|) <= --grad-tol
                                (reference = central finite differences, float64)
Exit status: 0 all ok, 1 any failure (or an unusable case), 77 numpy missing. The files are
read with the `safetensors` package when installed, else with numpy alone.
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

RTOL = 1e-4
ATOL = 1e-6
LOSSES = ("loss.importance", "loss.load", "loss.gshard", "loss.aux_total")


def fmt_idx(shape, flat_i):
    return "[" + ",".join(str(int(i)) for i in np.unravel_index(int(flat_i), shape)) + "]" \
        if len(shape) else "[]"


class Checker:
    def __init__(self, result):
        self.result = result
        self.failed = 0
        self.lines = 0

    def line(self, ok, name, msg):
        print(f"{'ok  ' if ok else 'FAIL'} {name:28s} {msg}")
        self.lines += 1
        if not ok:
            self.failed += 1

    def get(self, name, ref_shape):
        if name not in self.result:
            self.line(False, name, "missing from result")
            return None
        a = np.asarray(self.result[name])
        size = int(np.prod(ref_shape)) if len(ref_shape) else 1
        if a.size != size:
            self.line(False, name, f"shape {list(a.shape)} != reference {list(ref_shape)}")
            return None
        return a.reshape(ref_shape)

    def exact(self, name, want, kept=None):
        got = self.get(name, want.shape)
        if got is None:
            return
        if not np.issubdtype(got.dtype, np.integer):
            if not np.all(np.isfinite(got)) or np.any(got != np.round(got)):
                self.line(False, name, f"non-integer values (dtype {got.dtype})")
                return
        got = got.astype(np.int64)
        bad = np.argwhere(got != want)
        if bad.size == 0:
            self.line(True, name, "exact match")
            return
        first = tuple(bad[0])
        extra = ""
        if kept is not None:
            n_kept_bad = int(np.sum((got != want) & kept))
            extra = f"; {n_kept_bad} of them on kept choices"
        self.line(False, name, f"{len(bad)} mismatches, first at {list(map(int, first))}: "
                               f"got {got[first]} want {want[first]}{extra}")

    def close(self, name, want, mask=None, alt=None):
        """Elementwise |got-want| <= ATOL + RTOL*|want| (on mask); alt: other
        acceptable values where mask is False."""
        got = self.get(name, np.shape(want))
        if got is None:
            return
        got = got.astype(np.float64)
        want = np.asarray(want, dtype=np.float64)
        err = np.abs(got - want)
        bad = ~(err <= ATOL + RTOL * np.abs(want))  # NaN counts as bad
        if mask is not None:
            bad_alt = np.zeros_like(bad)
            if alt is not None:
                ok_alt = np.zeros_like(bad)
                for a in alt:
                    ok_alt |= np.abs(got - a) <= ATOL + RTOL * np.abs(a)
                bad_alt = ~mask & ~ok_alt
            bad = (bad & mask) | bad_alt
            err = np.where(mask, err, 0.0)
        max_err = float(np.max(err)) if err.size else 0.0
        rel = max_err / max(ATOL, float(np.max(np.abs(want))) if want.size else ATOL)
        if not bad.any():
            extra = ""
            if mask is not None and alt is not None and (~mask).any():
                extra = f"; {int((~mask).sum())} dropped choices hold 0 or the raw gate"
            self.line(True, name, f"max abs err {max_err:.3e} (rel to max|ref| {rel:.3e}){extra}")
        else:
            i = int(np.argmax(bad.reshape(-1)))
            self.line(False, name, f"{int(bad.sum())} elements out of tolerance, first at "
                                   f"{fmt_idx(np.shape(want), i)}: got {got.reshape(-1)[i]:.9g} "
                                   f"want {want.reshape(-1)[i]:.9g}; max abs err {max_err:.3e}")

    def grad(self, name, want, tol):
        got = self.get(name, want.shape)
        if got is None:
            return
        got = got.astype(np.float64)
        diff = np.abs(got - want)
        if not np.all(np.isfinite(got)):
            self.line(False, name, "non-finite values")
            return
        i = int(np.argmax(diff.reshape(-1)))
        scale = max(1.0, float(np.max(np.abs(want))))
        err = float(diff.reshape(-1)[i]) / scale
        self.line(err <= tol, name,
                  f"rel err {err:.3e} (tol {tol:g}); worst {fmt_idx(want.shape, i)}: "
                  f"got {got.reshape(-1)[i]:.9g} want {want.reshape(-1)[i]:.9g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check a V-MoE layer result against the reference.")
    ap.add_argument("--case", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--grad-tol", type=float, default=1e-3)
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--eps", type=float, default=1e-6, help="finite-difference step")
    a = ap.parse_args(argv)

    try:
        case = ref.load_case(a.case)
        result = ref.load_tensors(a.result)
    except Exception as exc:
        print(f"FAIL cannot load case/result: {exc}")
        return 1
    try:
        out = ref.forward(case)
    except Exception as exc:
        print(f"FAIL reference forward: {exc}")
        return 1

    s = ref.settings(case)
    print(f"case {a.case}: T={case['x'].shape[0]} D={case['x'].shape[1]} "
          f"E={s['num_experts']} K={s['k']} group_size={s['group_size']} "
          f"capacity={out['capacity']} bpr={int(s['bpr'])} noise={'on' if s['use_noise'] else 'off'}; "
          f"kept {int(out['kept'].sum())}/{out['kept'].size} choices")
    print(f"tolerances: values rtol={RTOL:g} atol={ATOL:g} (|got-ref| <= atol + rtol*|ref|); "
          f"indices exact; grads max|diff|/max(1,max|ref|) <= {a.grad_tol:g}")

    if s["noise_std"] != 0.0 and "noise" not in case:
        print("note: the case has noise_std != 0 but no 'noise' tensor; the reference runs "
              "noise-free (load loss 0), so the implementation must too (eval mode)")

    c = Checker(result)
    kept = out["kept"]
    c.exact("expert_index", out["expert_index"].astype(np.int64))
    c.exact("slot", out["slot"].astype(np.int64), kept=kept)
    c.close("combine_weight", out["combine_weight"], mask=kept,
            alt=(np.zeros_like(out["gate"]), out["gate"]))
    c.close("y", out["y"])
    for name in LOSSES:
        c.close(name, np.array(out[name]))

    if not a.no_grads:
        try:
            grads = ref.gradients(case, eps=a.eps)
        except ref.RoutingFlipError as exc:
            print(f"FAIL finite differences unusable for this case: {exc}")
            return 1
        for name in ref.GRAD_PARAMS:
            c.grad("grad." + name, grads["grad." + name], a.grad_tol)

    print(f"{'PASSED' if c.failed == 0 else 'FAILED'}: {c.lines - c.failed}/{c.lines} ok")
    return 0 if c.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
