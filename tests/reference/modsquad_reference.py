#!/usr/bin/env python3
"""Independent numpy (float64) reference of one Mod-Squad MoE layer step.

Semantics: docs/modsquad_case_format.md (case file, one step of N task passes),
shared/specs/modsquad.md (per-task routers, gates softmax + 1e-4, the MI loss, usage EMA)
and shared/specs/vmoe-routing.md (capacity, K-major slots, BPR, no back-filling).
Written from those documents only (not from the C++ sources).

Conventions:
  * Everything in float64 (float32 case data is promoted).
  * Token stream (one rank): the passes concatenated in pass order; token s = pass p,
    image b, position l is s = p*B*L + b*L + l. Routing groups are `group_size`
    consecutive tokens of that stream (0: all N*B*L tokens form one group).
    forward(..., ranks=R) additionally reproduces the R-rank routing groups of the doc
    (rank r holds images [r*B/R, (r+1)*B/R) of every pass, its passes concatenated in
    pass order; groups are consecutive tokens of a rank's stream; dropless capacity =
    the largest per-expert load of any group on any rank). Only the routing (slots,
    drops, capacity) depends on R; everything else is computed globally (the
    mi_per_rank=1 per-rank MI estimate is NOT modelled; with R = 1 it equals the global
    one).
  * Gate of token s of task t: p = softmax(x_s W_t^T + noise_s) + 1e-4 (the 1e-4 is kept
    everywhere: top-k, BPR priority, combine weight, A). Top-k with ties to the lower
    expert; expert_index is reported for every choice, kept or dropped.
  * combine_weight[s, j] = p[s, e_j] for every choice (the doc's result format: "the raw
    gate, also for dropped choices"); only kept choices contribute to y.
  * capacity: capacity > 0 is used as given (not padded, as moe_reference.py);
    capacity_factor > 0: ceil(S k c / E) (or Python round, half to even), error if < 1,
    padded to multiple_of; capacity_factor == 0 (and no capacity): dropless, the largest
    per-expert load of any group (not padded; padding changes nothing observable).
  * MLP expert: fc2(GELU_erf(fc1(x))), both with bias.
    Attention: kv = x Wkv^T + bkv, K = kv[:, :dh], V = kv[:, dh:]; per kept choice
    q = Wq_e x_s, a = softmax(q K^T / sqrt(dh)) V over the L tokens of s's image;
    y_s = sum_j p[s, e_j] Wo_e a. queries = q and head_outputs = a ([B*L, k, dh],
    ungated, before Wo), zero for dropped choices.
  * Step statistics: A[t, e] = sum of p[s, e] over task t's tokens (all passes);
    count[e] = all top-k selections (kept or dropped); task_selections[t, e] likewise per
    task; usage_after = 0.95 * usage + 0.05 * task_selections for EVERY task row (a task
    without a pass in the step decays; a task with several passes is updated once with
    the selections of all its passes).
    MI (modsquad.md): N = sum count / k; P = A / (N + 1e-4); P(t) = sum_e P + 1e-4;
    P(e) = sum_t P + 1e-4; L_MI = -sum P log(P / (P(t) P(e)) + 1e-4). loss.mi is always
    reported; aux_total = mi_weight * L_MI when tasks > 2 (the `tasks` metadata = T),
    else 0.
  * Gradients: central finite differences (float64, eps 1e-6) of
    L = sum_p sum(y_p * dy_p) + aux_total w.r.t. every pass{p}.x and every weight
    (router.weight, experts.*, kv.*; not usage, noise). The routing (top-k, slots,
    capacity) is piecewise constant, as autodiff treats it; a perturbation that changes
    any of it raises RoutingFlipError.

CLI:
  python3 modsquad_reference.py --selftest
  python3 modsquad_reference.py --case C --write-result OUT [--no-grads] [--ranks R]
        [--float64] [--eps 1e-6]
"""

import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference as vref  # noqa: E402  (capacity(), route_group(), gelu_exact, softmax)

GATE_EPS = 1e-4
MI_EPS = 1e-4
USAGE_DECAY = 0.95

META_KEYS = ("layer", "num_experts", "k", "tasks", "passes", "seq_len", "mi_weight",
             "mi_per_rank", "capacity_factor", "capacity", "multiple_of", "ceil_or_round",
             "bpr", "group_size")
WEIGHTS = {
    "mlp": ("router.weight", "experts.fc1.weight", "experts.fc1.bias",
            "experts.fc2.weight", "experts.fc2.bias"),
    "attention": ("router.weight", "experts.q.weight", "experts.o.weight",
                  "kv.weight", "kv.bias"),
}


class RoutingFlipError(RuntimeError):
    """A finite-difference perturbation changed a routing decision."""


class CaseError(ValueError):
    """The case file does not follow docs/modsquad_case_format.md."""


# --------------------------------------------------------------------------
# Case loading and settings
# --------------------------------------------------------------------------

def load_case(path):
    """Tensors (floats promoted to float64, ints kept) and metadata strings."""
    from safetensors import safe_open
    case = {}
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            case[key] = t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t
    return case, dict(meta)


def _int(meta, key, default):
    v = meta.get(key)
    if v is None or str(v).strip() == "":
        return default
    try:
        f = float(v)
    except ValueError:
        raise CaseError(f"metadata {key}={v!r} is not a number")
    if f != int(f):
        raise CaseError(f"metadata {key}={v!r} is not an integer")
    return int(f)


def _float(meta, key, default):
    v = meta.get(key)
    if v is None or str(v).strip() == "":
        return default
    try:
        return float(v)
    except ValueError:
        raise CaseError(f"metadata {key}={v!r} is not a number")


def settings(case, meta):
    """Validated settings of a case (raises CaseError)."""
    bad = sorted(set(meta) - set(META_KEYS))
    if bad:
        raise CaseError(f"unknown metadata keys {bad}")
    layer = meta.get("layer", "")
    if layer not in WEIGHTS:
        raise CaseError(f"metadata layer={layer!r} (want mlp or attention)")
    for key in ("num_experts", "k", "tasks", "passes", "seq_len"):
        if key not in meta:
            raise CaseError(f"metadata {key} missing")
    s = {
        "layer": layer,
        "E": _int(meta, "num_experts", 0),
        "k": _int(meta, "k", 0),
        "T": _int(meta, "tasks", 0),
        "N": _int(meta, "passes", 0),
        "L": _int(meta, "seq_len", 0),
        "mi_weight": _float(meta, "mi_weight", 0.0),
        "mi_per_rank": _int(meta, "mi_per_rank", 0),
        "capacity_factor": _float(meta, "capacity_factor", 0.0),
        "capacity": _int(meta, "capacity", 0),
        "multiple_of": _int(meta, "multiple_of", 4),
        "ceil_or_round": meta.get("ceil_or_round", "ceil") or "ceil",
        "bpr": _int(meta, "bpr", 1),
        "group_size": _int(meta, "group_size", 0),
    }
    E, k, T, N, L = s["E"], s["k"], s["T"], s["N"], s["L"]
    if E < 1 or not 1 <= k <= E:
        raise CaseError(f"need 1 <= k <= num_experts (k={k}, E={E})")
    if T < 1 or N < 1 or L < 1:
        raise CaseError(f"need tasks, passes, seq_len >= 1 (got {T}, {N}, {L})")
    if s["mi_per_rank"] not in (0, 1) or s["bpr"] not in (0, 1):
        raise CaseError("mi_per_rank and bpr must be 0 or 1")
    if s["ceil_or_round"] not in ("ceil", "round"):
        raise CaseError(f"ceil_or_round={s['ceil_or_round']!r}")
    if s["capacity"] < 0 or s["capacity_factor"] < 0 or s["multiple_of"] < 0 or s["group_size"] < 0:
        raise CaseError("capacity, capacity_factor, multiple_of, group_size must be >= 0")

    allowed = set(WEIGHTS[layer]) | {"usage"}
    for p in range(N):
        allowed |= {f"pass{p}.task", f"pass{p}.x", f"pass{p}.dy", f"pass{p}.noise"}
    extra = sorted(set(case) - allowed)
    if extra:
        raise CaseError(f"unknown tensors {extra}")
    for name in WEIGHTS[layer]:
        if name not in case:
            raise CaseError(f"tensor {name} missing")
    Wr = case["router.weight"]
    if Wr.ndim != 3 or Wr.shape[:2] != (T, E):
        raise CaseError(f"router.weight shape {list(Wr.shape)} != [T={T}, E={E}, D]")
    D = Wr.shape[2]
    B = None
    tasks = []
    for p in range(N):
        for nm in ("task", "x", "dy"):
            if f"pass{p}.{nm}" not in case:
                raise CaseError(f"tensor pass{p}.{nm} missing")
        x = case[f"pass{p}.x"]
        if x.ndim != 3 or x.shape[1:] != (L, D):
            raise CaseError(f"pass{p}.x shape {list(x.shape)} != [B, L={L}, D={D}]")
        if B is None:
            B = x.shape[0]
        if x.shape[0] != B or B < 1:
            raise CaseError(f"pass{p}.x has B={x.shape[0]} (pass 0 has {B})")
        if case[f"pass{p}.dy"].shape != x.shape:
            raise CaseError(f"pass{p}.dy shape != pass{p}.x shape")
        tk = np.asarray(case[f"pass{p}.task"]).reshape(-1)
        if tk.size != 1 or not np.issubdtype(tk.dtype, np.integer) or not 0 <= int(tk[0]) < T:
            raise CaseError(f"pass{p}.task must be int32 [1] in 0..{T - 1}")
        tasks.append(int(tk[0]))
        nz = case.get(f"pass{p}.noise")
        if nz is not None and nz.shape != (B * L, E):
            raise CaseError(f"pass{p}.noise shape {list(nz.shape)} != [B*L, E]")
    if "usage" in case and case["usage"].shape != (T, E):
        raise CaseError("usage shape != [T, E]")
    if layer == "mlp":
        H = case["experts.fc1.weight"].shape[1]
        want = {"experts.fc1.weight": (E, H, D), "experts.fc1.bias": (E, H),
                "experts.fc2.weight": (E, D, H), "experts.fc2.bias": (E, D)}
        s["H"] = H
    else:
        dh = case["experts.q.weight"].shape[1]
        want = {"experts.q.weight": (E, dh, D), "experts.o.weight": (E, D, dh),
                "kv.weight": (2 * dh, D), "kv.bias": (2 * dh,)}
        s["dh"] = dh
    for name, shp in want.items():
        if case[name].shape != shp:
            raise CaseError(f"{name} shape {list(case[name].shape)} != {list(shp)}")
    s.update(D=D, B=B, tasks_of_pass=tasks)
    return s


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------

def mi_loss(A, N):
    """Minus the task-expert mutual information (modsquad.md). A: [T, E], N: tokens."""
    P = np.asarray(A, dtype=np.float64) / (N + MI_EPS)
    Pt = P.sum(axis=1, keepdims=True) + MI_EPS
    Pe = P.sum(axis=0, keepdims=True) + MI_EPS
    return float(-np.sum(P * np.log(P / (Pt * Pe) + MI_EPS)))


def mi_loss_grad_A(A, N):
    """Analytic dL_MI/dA (self-test only)."""
    c = N + MI_EPS
    P = np.asarray(A, dtype=np.float64) / c
    Pt = P.sum(axis=1, keepdims=True) + MI_EPS
    Pe = P.sum(axis=0, keepdims=True) + MI_EPS
    r = P / (Pt * Pe)
    w = P / (r + MI_EPS)  # P_te / (r_te + eps)
    # dL/dP_ab = -log(r_ab+eps) - [ w_ab/(Pt_a Pe_b) - sum_e w_ae P_ae/(Pt_a^2 Pe_e)
    #                               - sum_t w_tb P_tb/(Pt_t Pe_b^2) ]
    row = np.sum(w * P / (Pt ** 2 * Pe), axis=1, keepdims=True)
    col = np.sum(w * P / (Pt * Pe ** 2), axis=0, keepdims=True)
    dP = -np.log(r + MI_EPS) - (w / (Pt * Pe) - row - col)
    return dP / c


def routing_order(s, ranks=1):
    """Global token indices in routing-stream order, and the tokens a rank holds."""
    N, B, L = s["N"], s["B"], s["L"]
    if ranks < 1 or B % ranks:
        raise CaseError(f"B={B} is not divisible by ranks={ranks}")
    Bl = B // ranks
    order = []
    for r in range(ranks):
        for p in range(N):
            for b in range(r * Bl, (r + 1) * Bl):
                base = p * B * L + b * L
                order.extend(range(base, base + L))
    return np.asarray(order, dtype=np.int64), N * Bl * L


def _gelu(h):
    return vref.gelu_exact(h)


def forward(case, s, ranks=1):
    """One step. Returns (outputs, routing key for flip detection)."""
    E, k, T, N, L, B, D = s["E"], s["k"], s["T"], s["N"], s["L"], s["B"], s["D"]
    BL = B * L
    S_all = N * BL
    Wr = case["router.weight"]
    X = np.concatenate([case[f"pass{p}.x"].reshape(BL, D) for p in range(N)])
    task = np.repeat(np.asarray(s["tasks_of_pass"], dtype=np.int64), BL)

    # gates
    z = np.einsum("sd,sed->se", X, Wr[task])
    for p in range(N):
        nz = case.get(f"pass{p}.noise")
        if nz is not None:
            z[p * BL:(p + 1) * BL] += nz
    gates = vref.softmax(z) + GATE_EPS

    # routing, per group of the (rank) stream
    order, per_rank = routing_order(s, ranks)
    S = s["group_size"] or per_rank
    if per_rank % S:
        raise CaseError(f"group_size {S} does not divide the {per_rank} tokens a rank holds")
    G = S_all // S
    ei = vref.topk_indices(gates, k).astype(np.int64)  # [S_all, k]
    if s["capacity"] > 0:
        cap = vref.capacity(S, E, k, capacity=s["capacity"])
    elif s["capacity_factor"] > 0:
        cap = vref.capacity(S, E, k, capacity_factor=s["capacity_factor"],
                            multiple_of=s["multiple_of"], ceil_or_round=s["ceil_or_round"])
    else:
        cap = vref.capacity(S, E, k, capacity_factor=0.0,
                            expert_index=ei[order].reshape(G, S, k))
    slot = np.empty((S_all, k), dtype=np.int64)
    for g in range(G):
        idx = order[g * S:(g + 1) * S]
        gi, gs, _ = vref.route_group(gates[idx], k, cap, bool(s["bpr"]))
        assert np.array_equal(gi, ei[idx])
        slot[idx] = gs
    kept = slot < cap
    gsel = gates[np.arange(S_all)[:, None], ei]  # [S_all, k] raw gate of each choice
    w = np.where(kept, gsel, 0.0)

    out = {}
    rows = np.arange(S_all)[:, None]
    if s["layer"] == "mlp":
        W1, b1 = case["experts.fc1.weight"], case["experts.fc1.bias"]
        W2, b2 = case["experts.fc2.weight"], case["experts.fc2.bias"]
        h = np.einsum("sd,ehd->seh", X, W1) + b1[None]
        ye = np.einsum("seh,edh->sed", _gelu(h), W2) + b2[None]  # [S_all, E, D]
        y = np.einsum("sj,sjd->sd", w, ye[rows, ei])
    else:
        Wq, Wo = case["experts.q.weight"], case["experts.o.weight"]
        Wkv, bkv = case["kv.weight"], case["kv.bias"]
        dh = s["dh"]
        kv = X @ Wkv.T + bkv
        Kt = kv[:, :dh].reshape(-1, L, dh)  # [images, L, dh]
        V = kv[:, dh:].reshape(-1, L, dh)
        Q = np.einsum("sd,ehd->seh", X, Wq)  # [S_all, E, dh]
        Qi = Q.reshape(-1, L, E, dh)
        sc = np.einsum("iqeh,ikh->iqek", Qi, Kt) / math.sqrt(dh)
        sc = sc - sc.max(axis=-1, keepdims=True)
        att = np.exp(sc)
        att /= att.sum(axis=-1, keepdims=True)
        Ah = np.einsum("iqek,ikh->iqeh", att, V).reshape(S_all, E, dh)
        ye = np.einsum("seh,edh->sed", Ah, Wo)
        y = np.einsum("sj,sjd->sd", w, ye[rows, ei])
        km = kept[..., None]
        out["queries"] = np.where(km, Q[rows, ei], 0.0)
        out["head_outputs"] = np.where(km, Ah[rows, ei], 0.0)

    # step statistics
    A = np.zeros((T, E))
    np.add.at(A, task, gates)
    sel = np.zeros((T, E))
    np.add.at(sel, (np.repeat(task, k), ei.reshape(-1)), 1.0)
    count = sel.sum(axis=0)
    Ntok = float(count.sum()) / k
    mi = mi_loss(A, Ntok)
    aux = s["mi_weight"] * mi if T > 2 else 0.0
    usage0 = case.get("usage")
    usage0 = np.zeros((T, E)) if usage0 is None else usage0
    out.update({
        "gates": gates, "expert_index": ei, "slot": slot, "kept": kept,
        "combine_weight": gsel, "y": y, "capacity": cap,
        "step.gate_sums": A, "step.selection_counts": count, "step.task_selections": sel,
        "step.usage": USAGE_DECAY * usage0 + (1.0 - USAGE_DECAY) * sel,
        "loss.mi": mi, "loss.aux_total": aux,
    })
    return out, (ei, slot, cap)


def objective(case, s, out):
    N, B, L, D = s["N"], s["B"], s["L"], s["D"]
    dy = np.concatenate([case[f"pass{p}.dy"].reshape(B * L, D) for p in range(N)])
    return float(np.sum(out["y"] * dy) + out["loss.aux_total"])


def grad_params(s):
    return [f"pass{p}.x" for p in range(s["N"])] + list(WEIGHTS[s["layer"]])


def gradients(case, s, eps=1e-6, ranks=1, params=None):
    """Central finite differences of objective(); raises RoutingFlipError."""
    work = dict(case)
    params = grad_params(s) if params is None else params
    for name in params:
        work[name] = np.array(case[name], dtype=np.float64, copy=True)
    _, ref_key = forward(work, s, ranks)

    def f():
        o, key = forward(work, s, ranks)
        same = (key[2] == ref_key[2] and np.array_equal(key[0], ref_key[0])
                and np.array_equal(key[1], ref_key[1]))
        return objective(work, s, o), same

    grads = {}
    for name in params:
        a = work[name]
        g = np.zeros_like(a)
        fa, fg = a.reshape(-1), g.reshape(-1)
        for i in range(fa.size):
            orig = fa[i]
            fa[i] = orig + eps
            fp, okp = f()
            fa[i] = orig - eps
            fm, okm = f()
            fa[i] = orig
            if not (okp and okm):
                idx = list(map(int, np.unravel_index(i, a.shape)))
                raise RoutingFlipError(
                    f"finite-difference perturbation +-{eps} of {name}{idx} changes the "
                    "routing (top-k / slot / capacity); use another seed")
            fg[i] = (fp - fm) / (2.0 * eps)
        grads["grad." + name] = g
    return grads


def result_tensors(case, s, with_grads=True, ranks=1, dtype=np.float32, eps=1e-6):
    """The reference outputs in the format of `moerun replay-modsquad --out`."""
    out, _ = forward(case, s, ranks)
    B, L, D, N = s["B"], s["L"], s["D"], s["N"]
    BL = B * L
    res = {}
    for p in range(N):
        sl = slice(p * BL, (p + 1) * BL)
        res[f"pass{p}.gates"] = out["gates"][sl].astype(dtype)
        res[f"pass{p}.expert_index"] = out["expert_index"][sl].astype(np.int32)
        res[f"pass{p}.slot"] = out["slot"][sl].astype(np.int32)
        res[f"pass{p}.combine_weight"] = out["combine_weight"][sl].astype(dtype)
        res[f"pass{p}.y"] = out["y"][sl].reshape(B, L, D).astype(dtype)
        if s["layer"] == "attention":
            res[f"pass{p}.queries"] = out["queries"][sl].astype(dtype)
            res[f"pass{p}.head_outputs"] = out["head_outputs"][sl].astype(dtype)
    for key in ("step.gate_sums", "step.selection_counts", "step.task_selections", "step.usage"):
        res[key] = np.asarray(out[key]).astype(dtype)
    for key in ("loss.mi", "loss.aux_total"):
        res[key] = np.array([out[key]], dtype=dtype)
    if with_grads:
        for key, g in gradients(case, s, eps=eps, ranks=ranks).items():
            res[key] = g.astype(dtype)
    return res


def margins(case, s):
    """Routing margins: smallest gap between consecutive gates among a token's top k+1
    (order of the k choices and the k-th / (k+1)-th boundary), and (BPR) the smallest
    top-1-gate gap between two tokens with the same expert at the same choice rank,
    over all tokens (a superset of the pairs of any grouping / rank count)."""
    out, _ = forward(case, s)
    g = out["gates"]
    k, E = s["k"], s["E"]
    srt = -np.sort(-g, axis=1)
    m = min(k, E - 1)
    topk_gap = float(np.min(srt[:, :m] - srt[:, 1:m + 1])) if m > 0 else float("inf")
    bpr_gap = float("inf")
    if s["bpr"]:
        top1 = srt[:, 0]
        ei = out["expert_index"]
        for j in range(k):
            for e in range(E):
                v = np.sort(top1[ei[:, j] == e])
                if v.size > 1:
                    bpr_gap = min(bpr_gap, float(np.min(np.diff(v))))
    return topk_gap, bpr_gap, out


# --------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------

def _naive_forward(case, s, ranks=1):
    """Scalar-loop transcription of the doc (self-test only)."""
    E, k, T, N, L, B, D = s["E"], s["k"], s["T"], s["N"], s["L"], s["B"], s["D"]
    BL = B * L
    toks = []  # (pass, b, l, task, x list)
    for p in range(N):
        x = case[f"pass{p}.x"]
        for b in range(B):
            for l in range(L):
                toks.append((p, b, l, s["tasks_of_pass"][p], x[b, l].tolist()))
    Wr = case["router.weight"]
    gates = []
    for si, (p, b, l, t, x) in enumerate(toks):
        zz = [sum(x[d] * Wr[t, e, d] for d in range(D)) for e in range(E)]
        nz = case.get(f"pass{p}.noise")
        if nz is not None:
            zz = [zz[e] + nz[b * L + l, e] for e in range(E)]
        mx = max(zz)
        ex = [math.exp(v - mx) for v in zz]
        gates.append([v / sum(ex) + GATE_EPS for v in ex])
    choice = []
    for g in gates:
        rem, ch = list(range(E)), []
        for _ in range(k):
            best = rem[0]
            for e in rem:
                if g[e] > g[best]:
                    best = e
            ch.append(best)
            rem.remove(best)
        choice.append(ch)
    Bl = B // ranks
    streams = [[p * BL + b * L + l for p in range(N) for b in range(r * Bl, (r + 1) * Bl)
                for l in range(L)] for r in range(ranks)]
    S = s["group_size"] or len(streams[0])
    groups = [st[i:i + S] for st in streams for i in range(0, len(st), S)]
    if s["capacity"] > 0:
        cap = s["capacity"]
    elif s["capacity_factor"] > 0:
        v = S * k * s["capacity_factor"] / E
        cap = math.ceil(v) if s["ceil_or_round"] == "ceil" else round(v)
        while s["multiple_of"] and cap % s["multiple_of"]:
            cap += 1
    else:
        cap = max(sum(1 for i in grp for j in range(k) if choice[i][j] == e)
                  for grp in groups for e in range(E))
    slot = [[0] * k for _ in toks]
    for grp in groups:
        order = list(grp)
        if s["bpr"]:
            order = []
            for i in grp:
                pos = len(order)
                while pos > 0 and gates[order[pos - 1]][choice[order[pos - 1]][0]] < gates[i][choice[i][0]]:
                    pos -= 1
                order.insert(pos, i)
        cnt = [0] * E
        for j in range(k):
            for i in order:
                slot[i][j] = cnt[choice[i][j]]
                cnt[choice[i][j]] += 1
    y = np.zeros((len(toks), D))
    for i, (p, b, l, t, x) in enumerate(toks):
        for j in range(k):
            if slot[i][j] >= cap:
                continue
            e = choice[i][j]
            if s["layer"] == "mlp":
                W1, b1 = case["experts.fc1.weight"], case["experts.fc1.bias"]
                W2, b2 = case["experts.fc2.weight"], case["experts.fc2.bias"]
                hid = []
                for m in range(W1.shape[1]):
                    hv = b1[e, m] + sum(W1[e, m, d] * x[d] for d in range(D))
                    hid.append(0.5 * hv * (1.0 + math.erf(hv / math.sqrt(2.0))))
                o = [b2[e, d] + sum(W2[e, d, m] * hid[m] for m in range(len(hid))) for d in range(D)]
            else:
                Wq, Wo = case["experts.q.weight"], case["experts.o.weight"]
                Wkv, bkv = case["kv.weight"], case["kv.bias"]
                dh = Wq.shape[1]
                xs = case[f"pass{p}.x"][b]
                kvs = [[bkv[c] + sum(Wkv[c, d] * xs[m, d] for d in range(D)) for c in range(2 * dh)]
                       for m in range(L)]
                q = [sum(Wq[e, c, d] * x[d] for d in range(D)) for c in range(dh)]
                sc = [sum(q[c] * kvs[m][c] for c in range(dh)) / math.sqrt(dh) for m in range(L)]
                mx = max(sc)
                ex = [math.exp(v - mx) for v in sc]
                a = [sum(ex[m] / sum(ex) * kvs[m][dh + c] for m in range(L)) for c in range(dh)]
                o = [sum(Wo[e, d, c] * a[c] for c in range(dh)) for d in range(D)]
            for d in range(D):
                y[i, d] += gates[i][e] * o[d]
    A = [[0.0] * E for _ in range(T)]
    cnt = [0] * E
    for i, tok in enumerate(toks):
        for e in range(E):
            A[tok[3]][e] += gates[i][e]
        for j in range(k):
            cnt[choice[i][j]] += 1
    Nt = sum(cnt) / k
    P = [[A[t][e] / (Nt + MI_EPS) for e in range(E)] for t in range(T)]
    Pt = [sum(P[t]) + MI_EPS for t in range(T)]
    Pe = [sum(P[t][e] for t in range(T)) + MI_EPS for e in range(E)]
    mi = -sum(P[t][e] * math.log(P[t][e] / (Pt[t] * Pe[e]) + MI_EPS)
              for t in range(T) for e in range(E))
    return {"expert_index": np.array(choice), "slot": np.array(slot), "capacity": cap,
            "y": y, "loss.mi": mi, "gates": np.array(gates)}


def random_case(seed, layer="mlp", E=4, k=2, T=3, N=3, B=2, L=3, D=6, H=8, dh=4,
                router_scale=2.0, noise=False, usage=False, pass_tasks=None, **meta):
    """In-memory random case (float32-rounded values) and its metadata."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    c = {"router.weight": f32(rng.standard_normal((T, E, D)) * router_scale / math.sqrt(D))}
    if layer == "mlp":
        c["experts.fc1.weight"] = f32(rng.standard_normal((E, H, D)) / math.sqrt(D))
        c["experts.fc1.bias"] = f32(0.1 * rng.standard_normal((E, H)))
        c["experts.fc2.weight"] = f32(rng.standard_normal((E, D, H)) / math.sqrt(H))
        c["experts.fc2.bias"] = f32(0.1 * rng.standard_normal((E, D)))
    else:
        c["experts.q.weight"] = f32(rng.standard_normal((E, dh, D)) / math.sqrt(D))
        c["experts.o.weight"] = f32(rng.standard_normal((E, D, dh)) / math.sqrt(dh))
        c["kv.weight"] = f32(rng.standard_normal((2 * dh, D)) / math.sqrt(D))
        c["kv.bias"] = f32(0.1 * rng.standard_normal(2 * dh))
    if usage:
        c["usage"] = f32(rng.uniform(0.0, 2.0, (T, E)))
    pass_tasks = pass_tasks or [p % T for p in range(N)]
    for p in range(N):
        c[f"pass{p}.task"] = np.array([pass_tasks[p]], dtype=np.int32)
        c[f"pass{p}.x"] = f32(rng.standard_normal((B, L, D)))
        c[f"pass{p}.dy"] = f32(rng.standard_normal((B, L, D)))
        if noise:
            c[f"pass{p}.noise"] = f32(0.1 * rng.standard_normal((B * L, E)))
    m = {"layer": layer, "num_experts": str(E), "k": str(k), "tasks": str(T),
         "passes": str(N), "seq_len": str(L)}
    m.update({key: str(v) for key, v in meta.items()})
    return c, m


def selftest():
    failures = []

    def check(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            failures.append(msg)

    # MI golden value of modsquad.md
    rows = {0: [[.7, .2, .1], [.6, .3, .1]], 1: [[.1, .2, .7], [.2, .1, .7]]}
    A = np.array([np.sum(np.array(rows[t]) + GATE_EPS, axis=0) for t in (0, 1)])
    for k in (1, 2, 3):
        count = np.full(3, 4 * k / 3.0)  # any counts with sum = 4 k
        Nt = count.sum() / k
        v = mi_loss(A, Nt)
        check(Nt == 4 and abs(v - (-0.2163458508)) <= 1e-9,
              f"MI golden (k={k}): N={Nt:g} L_MI={v:.12f} (want -0.2163458508, tol 1e-9)")
    # MI through a full forward: the golden rows as softmax outputs of task routers
    c, m = random_case(0, E=3, k=2, T=2, N=2, B=1, L=2, D=3, mi_weight="0.5")
    for p, t in ((0, 0), (1, 1)):
        c[f"pass{p}.task"] = np.array([t], dtype=np.int32)
        c[f"pass{p}.x"] = np.eye(3)[None, :2, :]
        c[f"pass{p}.noise"] = np.zeros((2, 3))
    for t in (0, 1):
        c["router.weight"][t] = 0.0
        c["router.weight"][t][:, :2] = np.log(np.array(rows[t])).T
    s = settings(c, m)
    out, _ = forward(c, s)
    check(abs(out["loss.mi"] - (-0.2163458508)) <= 1e-9 and out["loss.aux_total"] == 0.0,
          f"MI golden through the layer: {out['loss.mi']:.10f}, aux_total {out['loss.aux_total']} "
          "(tasks = 2: no MI term)")

    # analytic dMI/dA vs finite differences
    rng = np.random.default_rng(5)
    A = rng.uniform(0.0, 2.0, (3, 4))
    A[2, 1] = 0.01  # a small cell too (at 0 exactly the FD truncation error is ~1e-5)
    g = mi_loss_grad_A(A, 5.0)
    fd = np.zeros_like(A)
    for i in np.ndindex(A.shape):
        Ap, Am = A.copy(), A.copy()
        Ap[i] += 1e-6
        Am[i] -= 1e-6
        fd[i] = (mi_loss(Ap, 5.0) - mi_loss(Am, 5.0)) / 2e-6
    err = float(np.max(np.abs(fd - g)))
    check(err < 1e-7, f"analytic dL_MI/dA == finite differences (max err {err:.1e})")

    # routing goldens of vmoe-routing.md via the shared helper
    p = np.array([[.4, 0, .2], [.5, .1, .4], [.3, .2, .6]])
    ei, sl, _ = vref.route_group(p, 2, 2, True)
    got = [[(int(ei[t, j]), int(sl[t, j])) for j in range(2)] for t in range(3)]
    check(got == [[(0, 1), (2, 2)], [(0, 0), (2, 1)], [(2, 0), (0, 2)]], f"BPR routing golden {got}")

    # vectorised forward == scalar-loop forward on a matrix of configs
    configs = [
        dict(layer="mlp", bpr=1),
        dict(layer="attention", bpr=1, noise=True),
        dict(layer="mlp", bpr=0, capacity_factor=0.5, multiple_of=0, noise=True, usage=True),
        dict(layer="attention", bpr=1, capacity=1, group_size=6),
        dict(layer="mlp", bpr=1, capacity_factor=0.75, ceil_or_round="round", multiple_of=0,
             group_size=3, E=3, k=3),
        dict(layer="attention", bpr=0, capacity_factor=1.0, multiple_of=0, k=1, T=2, N=4,
             pass_tasks=[1, 1, 0, 1]),
        dict(layer="mlp", bpr=1, capacity_factor=1.0, multiple_of=0, N=4, group_size=6,
             noise=True),
    ]
    for i, cfg in enumerate(configs):
        for ranks in (1, 2):
            c, m = random_case(100 + i, **cfg)
            s = settings(c, m)
            if s["group_size"] and (s["N"] * s["B"] // ranks * s["L"]) % s["group_size"]:
                continue
            a, _ = forward(c, s, ranks)
            b = _naive_forward(c, s, ranks)
            ok = (np.array_equal(a["expert_index"], b["expert_index"])
                  and np.array_equal(a["slot"], b["slot"]) and a["capacity"] == b["capacity"]
                  and np.allclose(a["y"], b["y"], rtol=1e-12, atol=1e-13)
                  and np.allclose(a["gates"], b["gates"], rtol=1e-13, atol=1e-15)
                  and abs(a["loss.mi"] - b["loss.mi"]) <= 1e-12)
            check(ok, f"vectorised == scalar loop: config {i} ({cfg['layer']}) ranks={ranks}: "
                      f"cap={a['capacity']}, kept {int(a['kept'].sum())}/{a['kept'].size}")

    # small finite-difference sanity checks against closed forms
    for layer in ("mlp", "attention"):
        c, m = random_case(7, layer=layer, capacity_factor=0.75, multiple_of=0, mi_weight=1.0)
        s = settings(c, m)
        out, _ = forward(c, s)
        BL = s["B"] * s["L"]
        dy = np.concatenate([c[f"pass{p}.dy"].reshape(BL, -1) for p in range(s["N"])])
        cw = np.where(out["kept"], out["combine_weight"], 0.0)
        t0 = time.time()
        if layer == "mlp":
            g = gradients(c, s, params=["experts.fc2.bias", "router.weight"])
            want = np.zeros_like(c["experts.fc2.bias"])
            np.add.at(want, out["expert_index"].reshape(-1),
                      (cw[..., None] * dy[:, None, :]).reshape(-1, s["D"]))
            err = float(np.max(np.abs(g["grad.experts.fc2.bias"] - want)))
            name = "experts.fc2.bias"
        else:
            g = gradients(c, s, params=["experts.o.weight", "router.weight"])
            want = np.zeros_like(c["experts.o.weight"])
            a = out["head_outputs"]  # [S, k, dh]
            for si in range(a.shape[0]):
                for j in range(s["k"]):
                    want[out["expert_index"][si, j]] += cw[si, j] * np.outer(dy[si], a[si, j])
            err = float(np.max(np.abs(g["grad.experts.o.weight"] - want)))
            name = "experts.o.weight"
        check(err < 1e-7, f"{layer}: FD grad of {name} == closed form (max err {err:.1e}, "
                          f"{time.time() - t0:.2f} s)")
        # router gradient: y part (closed form through the softmax) + MI part (analytic)
        gates = out["gates"]
        Ntok = out["step.selection_counts"].sum() / s["k"]
        task = np.repeat(s["tasks_of_pass"], BL)
        dA = s["mi_weight"] * mi_loss_grad_A(out["step.gate_sums"], Ntok)  # [T, E]
        if layer == "mlp":
            W1, b1 = c["experts.fc1.weight"], c["experts.fc1.bias"]
            W2, b2 = c["experts.fc2.weight"], c["experts.fc2.bias"]
            X = np.concatenate([c[f"pass{p}.x"].reshape(BL, -1) for p in range(s["N"])])
            ye = np.einsum("seh,edh->sed", vref.gelu_exact(np.einsum("sd,ehd->seh", X, W1) + b1), W2) + b2
        else:
            X = np.concatenate([c[f"pass{p}.x"].reshape(BL, -1) for p in range(s["N"])])
            ye = None
        dgate = dA[task]  # dL/dp[s,e] from the MI term
        for si in range(X.shape[0]):
            for j in range(s["k"]):
                if not out["kept"][si, j]:
                    continue
                e = out["expert_index"][si, j]
                if ye is not None:
                    yv = ye[si, e]
                else:
                    yv = c["experts.o.weight"][e] @ out["head_outputs"][si, j]
                dgate[si, e] += float(yv @ dy[si])
        sm = gates - GATE_EPS
        dz = sm * (dgate - np.sum(dgate * sm, axis=1, keepdims=True))
        want = np.zeros_like(c["router.weight"])
        for si in range(X.shape[0]):
            want[task[si]] += np.outer(dz[si], X[si])
        err = float(np.max(np.abs(g["grad.router.weight"] - want)))
        check(err < 1e-7, f"{layer}: FD grad of router.weight (y + MI terms) == closed form "
                          f"(max err {err:.1e})")

    # flip detection
    c, m = random_case(3, capacity_factor=0.5, multiple_of=0)
    s = settings(c, m)
    out, _ = forward(c, s)
    srt = np.sort(out["gates"], axis=1)
    si = int(np.argmin(srt[:, -2] - srt[:, -3]))  # token with the smallest top-2 margin
    e3 = int(np.argsort(-out["gates"][si], kind="stable")[2])
    p, r = divmod(si, s["B"] * s["L"])
    # make expert e3's logit sit just below the 2nd largest: a +-1e-6 step flips it
    gap = math.log(srt[si, -2] - GATE_EPS) - math.log(srt[si, -3] - GATE_EPS)
    c[f"pass{p}.noise"] = np.zeros((s["B"] * s["L"], s["E"]))
    c[f"pass{p}.noise"][r, e3] = gap - 1e-8
    try:
        gradients(c, s, params=[f"pass{p}.x"])
        check(False, "a perturbation that flips the top-k raises RoutingFlipError")
    except RoutingFlipError as exc:
        check(True, f"flip detected: {str(exc)[:70]}...")

    # timing of full FD gradients on the tiny CI cases
    for layer in ("mlp", "attention"):
        c, m = random_case(11, layer=layer, mi_weight=1.0, noise=True, usage=True)
        s = settings(c, m)
        t0 = time.time()
        g = gradients(c, s)
        n = sum(v.size for v in g.values())
        dt = time.time() - t0
        check(all(np.all(np.isfinite(v)) for v in g.values()),
              f"{layer}: full FD gradients ({n} values) finite, {dt:.2f} s")

    print("selftest:", "PASSED" if not failures else f"{len(failures)} FAILED")
    return 0 if not failures else 1


def _main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--case")
    ap.add_argument("--write-result")
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--ranks", type=int, default=1,
                    help="route with the R-rank groups of the doc (default 1)")
    ap.add_argument("--float64", action="store_true", help="write float64 instead of float32")
    ap.add_argument("--eps", type=float, default=1e-6)
    a = ap.parse_args(argv)
    if a.selftest:
        return selftest()
    if a.case and a.write_result:
        from safetensors.numpy import save_file
        t0 = time.time()
        case, meta = load_case(a.case)
        s = settings(case, meta)
        res = result_tensors(case, s, with_grads=not a.no_grads, ranks=a.ranks,
                             dtype=np.float64 if a.float64 else np.float32, eps=a.eps)
        save_file(res, a.write_result)
        print(f"wrote {a.write_result} ({len(res)} tensors, {time.time() - t0:.2f} s)")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
