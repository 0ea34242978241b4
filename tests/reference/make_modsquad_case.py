#!/usr/bin/env python3
"""Writes a random Mod-Squad layer case (docs/modsquad_case_format.md) as safetensors.

usage: python3 make_modsquad_case.py --out case.safetensors [--seed S] [--layer mlp|attention]
           [--experts E] [--k K] [--tasks T] [--passes N] [--pass-tasks "0,2,1"]
           [--batch B] [--seq-len L] [--d D] [--hidden H | --head-dim dh]
           [--mi-weight W] [--mi-per-rank 0|1]
           [--capacity-factor C | --capacity N] [--multiple-of 4] [--round]
           [--bpr 0|1] [--group-size G] [--with-noise] [--with-usage] [--quiet]

Defaults: the tiny CI case (mlp, E=4, k=2, T=3, N=3, B=2, L=3, D=6, H=8, dh=4), dropless
(capacity factor 0), BPR on, one routing group, mi_weight 1.0 (large, so that the MI
gradient is visible next to sum(y*dy); the paper uses 0.005), mi_per_rank 0.
Pass p has task p % T unless --pass-tasks lists the N task ids.

Values (float32): router.weight ~ N(0, (2/sqrt(D))^2) (gates clearly not uniform), expert and
kv weights ~ N(0, 1/fan_in), biases ~ 0.1 N(0,1), x, dy ~ N(0,1); --with-noise: pass{p}.noise
= 0.1 N(0,1) (already scaled); --with-usage: usage ~ U(0, 2) (nonnegative).

Routing stability: the generator redraws the values (sub-seeds (seed, attempt), so the
output is deterministic for --seed) until the smallest top-k margin (the gap between
consecutive gates among a token's k+1 largest: choice order and the k-th/(k+1)-th boundary)
and, with BPR, the smallest top-1-gate gap between two tokens with the same expert at the
same choice rank (over all tokens, so it covers every grouping and rank count) are
>= --min-margin (default 1e-4), so float32 and float64 routing agree. It prints both margins,
the capacity and the number of dropped choices.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modsquad_reference as ref  # noqa: E402


def draw(a, rng, pass_tasks):
    E, T, N, B, L, D = a.experts, a.tasks, a.passes, a.batch, a.seq_len, a.d
    t = {"router.weight": rng.standard_normal((T, E, D)) * (2.0 / math.sqrt(D))}
    if a.layer == "mlp":
        H = a.hidden
        t["experts.fc1.weight"] = rng.standard_normal((E, H, D)) / math.sqrt(D)
        t["experts.fc1.bias"] = 0.1 * rng.standard_normal((E, H))
        t["experts.fc2.weight"] = rng.standard_normal((E, D, H)) / math.sqrt(H)
        t["experts.fc2.bias"] = 0.1 * rng.standard_normal((E, D))
    else:
        dh = a.head_dim
        t["experts.q.weight"] = rng.standard_normal((E, dh, D)) / math.sqrt(D)
        t["experts.o.weight"] = rng.standard_normal((E, D, dh)) / math.sqrt(dh)
        t["kv.weight"] = rng.standard_normal((2 * dh, D)) / math.sqrt(D)
        t["kv.bias"] = 0.1 * rng.standard_normal(2 * dh)
    if a.with_usage:
        t["usage"] = rng.uniform(0.0, 2.0, (T, E))
    for p in range(N):
        t[f"pass{p}.x"] = rng.standard_normal((B, L, D))
        t[f"pass{p}.dy"] = rng.standard_normal((B, L, D))
        if a.with_noise:
            t[f"pass{p}.noise"] = 0.1 * rng.standard_normal((B * L, E))
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}
    for p in range(N):
        t[f"pass{p}.task"] = np.array([pass_tasks[p]], dtype=np.int32)
    return t


def metadata(a):
    m = {
        "layer": a.layer, "num_experts": str(a.experts), "k": str(a.k), "tasks": str(a.tasks),
        "passes": str(a.passes), "seq_len": str(a.seq_len), "mi_weight": repr(float(a.mi_weight)),
        "mi_per_rank": str(a.mi_per_rank), "multiple_of": str(a.multiple_of),
        "ceil_or_round": "round" if a.round else "ceil", "bpr": str(a.bpr),
        "group_size": str(a.group_size),
    }
    if a.capacity is not None:
        m["capacity"] = str(a.capacity)
    else:
        m["capacity_factor"] = repr(float(a.capacity_factor))
    return m


def canonicalise_header(path):
    """safetensors writes the metadata map in hash order; rewrite the JSON header with
    sorted keys (data and offsets unchanged) so a seed gives identical bytes."""
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    canon = {}
    if meta is not None:
        canon["__metadata__"] = dict(sorted(meta.items()))
    canon.update(sorted(header.items()))
    text = json.dumps(canon, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a random Mod-Squad layer case (safetensors).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", choices=("mlp", "attention"), default="mlp")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--pass-tasks", default=None, help='comma list of task ids, e.g. "0,2,1"')
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=3)
    ap.add_argument("--d", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=8, help="expert hidden width (mlp)")
    ap.add_argument("--head-dim", type=int, default=4, help="dh (attention)")
    ap.add_argument("--mi-weight", type=float, default=1.0)
    ap.add_argument("--mi-per-rank", type=int, choices=(0, 1), default=0)
    cg = ap.add_mutually_exclusive_group()
    cg.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless (default)")
    cg.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--multiple-of", type=int, default=4)
    ap.add_argument("--round", action="store_true", help="round() instead of ceil()")
    ap.add_argument("--bpr", type=int, choices=(0, 1), default=1)
    ap.add_argument("--group-size", type=int, default=0, help="0 = all tokens of a rank")
    ap.add_argument("--with-noise", action="store_true")
    ap.add_argument("--with-usage", action="store_true")
    ap.add_argument("--min-margin", type=float, default=1e-4)
    ap.add_argument("--max-attempts", type=int, default=500)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    if a.pass_tasks is not None:
        try:
            pass_tasks = [int(v) for v in a.pass_tasks.split(",")]
        except ValueError:
            ap.error(f"--pass-tasks {a.pass_tasks!r}: want a comma list of integers")
        if len(pass_tasks) != a.passes:
            ap.error(f"--pass-tasks lists {len(pass_tasks)} tasks, --passes is {a.passes}")
    else:
        pass_tasks = [p % a.tasks for p in range(a.passes)]
    if any(not 0 <= t < a.tasks for t in pass_tasks):
        ap.error(f"task ids must be in 0..{a.tasks - 1}")
    if a.capacity is not None and a.capacity < 1:
        ap.error("--capacity must be >= 1")

    from safetensors.numpy import save_file
    meta = metadata(a)
    best = None
    for attempt in range(a.max_attempts):
        rng = np.random.default_rng([a.seed, attempt])
        tensors = draw(a, rng, pass_tasks)
        case = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in tensors.items()}
        try:
            s = ref.settings(case, meta)
            topk_gap, bpr_gap, out = ref.margins(case, s)
        except ref.CaseError as exc:
            raise SystemExit(f"error: {exc}")
        margin = min(topk_gap, bpr_gap)
        if best is None or margin > best[0]:
            best = (margin, attempt, tensors, topk_gap, bpr_gap, out)
        if margin >= a.min_margin:
            break
    margin, attempt, tensors, topk_gap, bpr_gap, out = best
    if margin < a.min_margin:
        print(f"warning: no draw in {a.max_attempts} attempts has routing margins >= "
              f"{a.min_margin:g}; writing the best (attempt {attempt}, margin {margin:.3g})",
              file=sys.stderr)
    save_file(tensors, a.out, metadata=meta)
    canonicalise_header(a.out)
    if not a.quiet:
        kept = out["kept"]
        print(f"wrote {a.out}: layer={a.layer} E={a.experts} k={a.k} T={a.tasks} N={a.passes} "
              f"tasks {pass_tasks} B={a.batch} L={a.seq_len} D={a.d} "
              + (f"H={a.hidden}" if a.layer == "mlp" else f"dh={a.head_dim}")
              + f" group_size={a.group_size} capacity={out['capacity']} bpr={a.bpr} "
              f"noise={'on' if a.with_noise else 'off'} usage={'on' if a.with_usage else 'off'} "
              f"mi_weight={a.mi_weight:g} mi_per_rank={a.mi_per_rank} (attempt {attempt}); "
              f"dropped {int((~kept).sum())}/{kept.size} choices; "
              f"min top-k gate gap {topk_gap:.3g}"
              + (f", min BPR top-1 gap {bpr_gap:.3g}" if a.bpr else "")
              + f"; loss.mi {out['loss.mi']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
