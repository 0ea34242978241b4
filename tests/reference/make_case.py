#!/usr/bin/env python3
"""Writes a random V-MoE layer test case as a safetensors file.

usage: python3 make_case.py --out case.safetensors --seed S --tokens T --d D --m M
           --experts E --k K [--capacity-factor C | --capacity N] [--multiple-of 4]
           [--round] [--bpr 0|1] [--group-size G] [--noise-std X --with-noise]
           [--importance-weight W --load-weight W --gshard-weight W] [--all-to-one]

Tensors (float32): x [T,D], dy [T,D], router.weight [E,D], experts.fc1.weight [E,M,D],
experts.fc1.bias [E,M], experts.fc2.weight [E,D,M], experts.fc2.bias [E,D], and with
--with-noise: noise [T,E] = (noise_std / E) * N(0,1) (already scaled).
Metadata (strings): num_experts, k, capacity_factor | capacity, multiple_of,
ceil_or_round, bpr, group_size, noise_std, importance_weight, load_weight, gshard_weight.

Without --capacity, the capacity factor defaults to 1.0; --capacity-factor 0 means
dropless. --noise-std without --with-noise is ignored: no noise tensor and noise_std "0.0"
are written (a noise-free case, load loss 0; an implementation in training mode
would otherwise draw noise of its own, which no reference can reproduce). Deterministic for a given seed.
Prints the capacity, the number of dropped choices and the smallest routing margins
(a margin below ~1e-5 may make float32 and float64 routing disagree).
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference as ref  # noqa: E402


def build(a):
    T, D, M, E, K = a.tokens, a.d, a.m, a.experts, a.k
    if not 1 <= K <= E:
        raise SystemExit(f"need 1 <= k <= experts (k={K}, experts={E})")
    G = a.group_size or T
    if T % G:
        raise SystemExit(f"--group-size {G} does not divide --tokens {T}")
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((T, D))
    dy = rng.standard_normal((T, D))
    wr = rng.standard_normal((E, D)) * (a.router_scale / math.sqrt(D))
    w1 = rng.standard_normal((E, M, D)) / math.sqrt(D)
    b1 = 0.1 * rng.standard_normal((E, M))
    w2 = rng.standard_normal((E, D, M)) / math.sqrt(M)
    b2 = 0.1 * rng.standard_normal((E, D))
    noise01 = rng.standard_normal((T, E))
    sigma = a.noise_std / E
    noise = sigma * noise01
    if a.all_to_one:
        # feature 0 is a constant 1; router row 0 reads it with a large weight,
        # the other rows ignore it -> every token's top-1 is expert 0.
        x[:, 0] = 1.0
        wr[1:, 0] = 0.0
        wr[0, 0] = 4.0
        for _ in range(60):
            zn = x.astype(np.float32) @ wr.astype(np.float32).T
            if a.with_noise and a.noise_std:
                zn = zn + noise.astype(np.float32)
            if np.all(np.argmax(zn, axis=1) == 0) and np.min(zn[:, 0] - np.max(zn[:, 1:], axis=1)) > 1.0:
                break
            wr[0, 0] *= 1.25
        else:
            raise SystemExit("could not make every token prefer expert 0")
    tensors = {
        "x": x, "dy": dy, "router.weight": wr,
        "experts.fc1.weight": w1, "experts.fc1.bias": b1,
        "experts.fc2.weight": w2, "experts.fc2.bias": b2,
    }
    if a.with_noise:
        tensors["noise"] = noise
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    meta = {
        "num_experts": str(E),
        "k": str(K),
        "multiple_of": str(a.multiple_of),
        "ceil_or_round": "round" if a.round else "ceil",
        "bpr": str(int(a.bpr)),
        "group_size": str(G),
        # Without a noise tensor the case is noise-free: record noise_std 0 so that an
        # implementation in training mode does not draw noise of its own.
        "noise_std": repr(float(a.noise_std)) if a.with_noise else "0.0",
        "importance_weight": repr(float(a.importance_weight)),
        "load_weight": repr(float(a.load_weight)),
        "gshard_weight": repr(float(a.gshard_weight)),
    }
    if a.capacity is not None:
        meta["capacity"] = str(a.capacity)
    else:
        meta["capacity_factor"] = repr(float(1.0 if a.capacity_factor is None else a.capacity_factor))
    return tensors, meta


def canonicalise_header(path):
    """safetensors writes the metadata map in hash order; rewrite the JSON header with
    sorted keys (tensor data and offsets unchanged) so a seed gives identical bytes."""
    import json
    import struct
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


def margins(case, out):
    """Smallest top-k boundary gap and (for BPR) smallest gap between top-1 gates."""
    s = ref.settings(case)
    z = case["x"] @ case["router.weight"].T
    if s["use_noise"]:
        z = z + case["noise"]
    p = ref.softmax(z)
    ps = -np.sort(-p, axis=1)
    K, E = s["k"], p.shape[1]
    gaps = [ps[:, i] - ps[:, i + 1] for i in range(min(K, E - 1))]
    topk_gap = float(np.min(gaps)) if gaps else float("inf")
    bpr_gap = float("inf")
    if s["bpr"]:
        S = s["group_size"]
        top1 = ps[:, 0].reshape(-1, S)
        for row in top1:
            r = np.sort(row)
            if r.size > 1:
                bpr_gap = min(bpr_gap, float(np.min(np.diff(r))))
    return topk_gap, bpr_gap


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a random V-MoE layer case (safetensors).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--m", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    cg = ap.add_mutually_exclusive_group()
    cg.add_argument("--capacity-factor", type=float, default=None)
    cg.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--multiple-of", type=int, default=4)
    ap.add_argument("--round", action="store_true", help="round() instead of ceil()")
    ap.add_argument("--bpr", type=int, choices=(0, 1), default=0)
    ap.add_argument("--group-size", type=int, default=0, help="0 = all tokens (default)")
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--with-noise", action="store_true")
    ap.add_argument("--importance-weight", type=float, default=0.005)
    ap.add_argument("--load-weight", type=float, default=0.005)
    ap.add_argument("--gshard-weight", type=float, default=0.0)
    ap.add_argument("--router-scale", type=float, default=1.0,
                    help="router.weight ~ N(0, (scale^2)/D) (default 1)")
    ap.add_argument("--all-to-one", action="store_true",
                    help="every token's top-1 choice is expert 0")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.with_noise and a.noise_std == 0.0:
        ap.error("--with-noise needs --noise-std X with X != 0")

    tensors, meta = build(a)
    if ref._numpy_only():  # no safetensors package: numpy's own writer (same layout)
        ref.write_safetensors(tensors, a.out, metadata=meta)
    else:
        from safetensors.numpy import save_file
        save_file(tensors, a.out, metadata=meta)
        canonicalise_header(a.out)

    if not a.quiet:
        case = ref.load_case(a.out)
        out = ref.forward(case)
        kept = out["kept"]
        topk_gap, bpr_gap = margins(case, out)
        T = case["x"].shape[0]
        print(f"wrote {a.out}: T={T} D={a.d} M={a.m} E={a.experts} K={a.k} "
              f"group_size={meta['group_size']} capacity={out['capacity']} "
              f"bpr={meta['bpr']} noise={'on' if 'noise' in tensors else 'off'}; "
              f"dropped {int((~kept).sum())}/{kept.size} choices, "
              f"{int((~kept.any(axis=1)).sum())} tokens fully dropped; "
              f"min top-k gate gap {topk_gap:.3g}"
              + (f", min top-1 gap (BPR order) {bpr_gap:.3g}" if a.bpr else ""))
        if min(topk_gap, bpr_gap) < 1e-5:
            print("warning: a routing margin below 1e-5; float32 routing may differ, "
                  "consider another seed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
