#!/usr/bin/env python3
"""Independent numpy (float64) reference of one V-MoE Mixture-of-Experts layer.

Semantics: /work/shared/specs/vmoe-routing.md (router, capacity, K-major
placement, Batch Priority Routing, no back-filling, auxiliary losses).

Conventions (read these before comparing against another implementation):
  * Everything is computed in float64 (float32 case data is promoted).
  * combine_weight[t, k] is the RAW softmax probability p[t, e] of the chosen
    expert e = expert_index[t, k] (not renormalised over the K choices), and 0
    for a dropped choice (slot >= capacity). check_result.py accepts either 0
    or the raw gate for dropped choices.
  * expert_index[t, k]: k-th choice of top-k on the (noisy) softmax, ties to
    the lower expert index. It is reported for every choice, kept or dropped.
  * slot[t, k]: 0-based running count of visits to that expert in the token's
    group, in K-major order and priority order, counted INCLUDING dropped
    assignments (no back-filling). A choice is kept iff slot < capacity.
  * capacity: computed cap = ceil(S*K*c/E) (or round(), Python round = half to
    even, as the JAX reference), error if < 1, then padded to multiple_of.
    An explicit `capacity` is used as given (the reference pads only the
    computed value). capacity_factor == 0 means "dropless": the capacity is the
    largest per-expert load (all K choices counted) of any group; it is not
    padded (padding would not change any output).
  * router.weight is [E, D] (PyTorch [out, in]); z = x @ router.weight.T.
  * Expert e: h = x @ fc1.weight[e].T + fc1.bias[e]; a = gelu_exact(h);
    out = a @ fc2.weight[e].T + fc2.bias[e].  fc1.weight [E,M,D], fc2.weight [E,D,M].
  * noise [T,E] is ALREADY scaled (sigma * N(0,1), sigma = noise_std / E). It is
    used only when noise_std != 0. Without it the load loss is 0.
  * Aux losses are computed per group and averaged over groups; importance on
    the clean softmax, load only with noise, gshard on the noisy softmax (clean
    without noise). aux_total = sum of weight*loss over terms with weight > 0.
  * Finite-difference gradients (central, float64) of
    objective = sum(y * dy) + aux_total. The hard routing decisions (top-k,
    slots, the gshard argmax, the load-loss K-th expert) are piecewise
    constant, exactly as autodiff treats them; a perturbation that flips any of
    them raises RoutingFlipError.

CLI:
  python3 moe_reference.py --selftest
  python3 moe_reference.py --case case.safetensors --write-result out.safetensors
        [--no-grads] [--float64]     (writes the reference outputs in the
                                      result format that check_result.py reads)
"""

import math
import sys
import time

import numpy as np

GRAD_PARAMS = (
    "x",
    "router.weight",
    "experts.fc1.weight",
    "experts.fc1.bias",
    "experts.fc2.weight",
    "experts.fc2.bias",
)

_erf = np.frompyfunc(math.erf, 1, 1)
_erfc = np.frompyfunc(math.erfc, 1, 1)


class RoutingFlipError(RuntimeError):
    """A finite-difference perturbation changed a routing decision."""


# --------------------------------------------------------------------------
# Elementary functions
# --------------------------------------------------------------------------

def erf(a):
    a = np.asarray(a, dtype=np.float64)
    return _erf(a).astype(np.float64).reshape(a.shape)


def gelu_exact(h):
    return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))


def norm_sf(a):
    """1 - Phi(a) for the standard normal, via erfc (accurate in the tail)."""
    a = np.asarray(a, dtype=np.float64)
    return 0.5 * _erfc(a / math.sqrt(2.0)).astype(np.float64).reshape(a.shape)


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def topk_indices(gates, k):
    """Indices of the k largest entries along the last axis, descending,
    ties to the lower index."""
    return np.argsort(-np.asarray(gates), axis=-1, kind="stable")[..., :k]


# --------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------

def capacity(group_size, num_experts, k, capacity_factor=None, capacity=None,
             multiple_of=4, ceil_or_round="ceil", expert_index=None):
    """Per-expert, per-group capacity.

    capacity_factor == 0 -> dropless: needs `expert_index` ([..., S, K] int,
    the choices of ALL groups) and returns the largest per-expert load of any
    group.
    """
    if (capacity is None) == (capacity_factor is None):
        raise ValueError("give exactly one of capacity_factor and capacity "
                         f"(capacity={capacity!r}, capacity_factor={capacity_factor!r})")
    if capacity is not None:
        cap = int(capacity)
        if cap != capacity:
            raise ValueError(f"capacity must be an integer, got {capacity!r}")
        if cap < 1:
            raise ValueError(f"capacity = {cap} must be >= 1")
        return cap
    if capacity_factor == 0:
        if expert_index is None:
            raise ValueError("dropless capacity (capacity_factor == 0) needs expert_index")
        ei = np.asarray(expert_index)
        ei = ei.reshape(-1, ei.shape[-2] * ei.shape[-1])  # [G, S*K]
        loads = np.stack([np.bincount(row, minlength=num_experts) for row in ei])
        return int(loads.max())
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor must be >= 0, got {capacity_factor}")
    val = group_size * k * capacity_factor / num_experts
    if ceil_or_round == "ceil":
        cap = int(math.ceil(val))
    elif ceil_or_round == "round":
        cap = int(round(val))  # Python round: half to even, as the reference
    else:
        raise ValueError(f"unsupported ceil_or_round={ceil_or_round!r}")
    if cap < 1:
        raise ValueError(f"group_size={group_size}, num_experts={num_experts}, k={k}, "
                         f"capacity_factor={capacity_factor} give capacity {cap} < 1")
    if multiple_of and multiple_of > 0:
        cap += (-cap) % multiple_of
    return cap


# --------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------

def route_group(gates, k, cap, bpr):
    """Route one group. gates: [S, E] (noisy) softmax probabilities.

    Returns (expert_index [S,K] int64, slot [S,K] int64, kept [S,K] bool).
    """
    gates = np.asarray(gates, dtype=np.float64)
    S, E = gates.shape
    if not 1 <= k <= E:
        raise ValueError(f"need 1 <= k <= E, got k={k}, E={E}")
    ei = topk_indices(gates, k)  # [S, K]
    if bpr:
        top1 = gates[np.arange(S), ei[:, 0]]
        perm = np.argsort(-top1, kind="stable")
    else:
        perm = np.arange(S)
    flat = ei[perm].T.ravel()  # K-major: all 1st choices, then all 2nd, ...
    onehot = (flat[:, None] == np.arange(E)[None, :]).astype(np.int64)
    running = np.cumsum(onehot, axis=0)
    slot_flat = running[np.arange(flat.size), flat] - 1
    slot = np.empty((S, k), dtype=np.int64)
    slot[perm] = slot_flat.reshape(k, S).T
    return ei.astype(np.int64), slot, slot < cap


# --------------------------------------------------------------------------
# Auxiliary losses (one group: [S, E]; a leading group axis gives per-group values)
# --------------------------------------------------------------------------

def _cv2(v):
    # (population std / mean)^2 along the last axis
    return np.var(v, axis=-1) / np.mean(v, axis=-1) ** 2


def importance_loss(p):
    p = np.asarray(p, dtype=np.float64)
    return _cv2(np.sum(p, axis=-2))


def load_loss(clean_logits, noisy_logits, sigma, k):
    z = np.asarray(clean_logits, dtype=np.float64)
    zn = np.asarray(noisy_logits, dtype=np.float64)
    tau = -np.sort(-zn, axis=-1)[..., k - 1]  # K-th ranked noisy logit
    P = norm_sf((tau[..., None] - z) / sigma)  # 1 - Phi(...)
    return _cv2(np.mean(P, axis=-2))


def gshard_loss(p):
    p = np.asarray(p, dtype=np.float64)
    E = p.shape[-1]
    top1 = np.argmax(p, axis=-1)  # first maximum = lower index on ties
    onehot = (top1[..., None] == np.arange(E)).astype(np.float64)
    return E ** 2 * np.mean(np.mean(onehot, axis=-2) * np.mean(p, axis=-2), axis=-1)


# --------------------------------------------------------------------------
# Case settings
# --------------------------------------------------------------------------

def _get(case, name, default=None, conv=str):
    v = case.get(name, None)
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return default
    if isinstance(v, np.ndarray):
        v = v.reshape(-1)[0].item()
    if conv is bool:
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return bool(v)
    if conv is int:
        return int(float(v)) if isinstance(v, str) else int(v)
    return conv(v)


def settings(case):
    """Parsed layer settings of a case (metadata may be strings)."""
    x = case["x"]
    T = x.shape[0]
    E = case["router.weight"].shape[0]
    s = {
        "num_experts": _get(case, "num_experts", E, int),
        "k": _get(case, "k", 1, int),
        "capacity_factor": _get(case, "capacity_factor", None, float),
        "capacity": _get(case, "capacity", None, int),
        "multiple_of": _get(case, "multiple_of", 4, int),
        "ceil_or_round": _get(case, "ceil_or_round", "ceil", str),
        "bpr": _get(case, "bpr", False, bool),
        "group_size": _get(case, "group_size", 0, int),
        "noise_std": _get(case, "noise_std", 0.0, float),
        "importance_weight": _get(case, "importance_weight", 0.005, float),
        "load_weight": _get(case, "load_weight", 0.005, float),
        "gshard_weight": _get(case, "gshard_weight", 0.0, float),
    }
    if s["num_experts"] != E:
        raise ValueError(f"num_experts={s['num_experts']} but router.weight has {E} rows")
    if s["group_size"] <= 0:
        s["group_size"] = T
    if T % s["group_size"] != 0:
        raise ValueError(f"group_size {s['group_size']} does not divide T={T}")
    if s["capacity"] is None and s["capacity_factor"] is None:
        raise ValueError("case gives neither capacity_factor nor capacity")
    s["use_noise"] = ("noise" in case and case["noise"] is not None
                      and s["noise_std"] != 0.0)
    return s


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------

def _forward(case):
    """Full forward; returns (outputs dict, routing tuple for flip detection)."""
    s = settings(case)
    x = np.asarray(case["x"], dtype=np.float64)
    Wr = np.asarray(case["router.weight"], dtype=np.float64)
    W1 = np.asarray(case["experts.fc1.weight"], dtype=np.float64)
    b1 = np.asarray(case["experts.fc1.bias"], dtype=np.float64)
    W2 = np.asarray(case["experts.fc2.weight"], dtype=np.float64)
    b2 = np.asarray(case["experts.fc2.bias"], dtype=np.float64)
    T, D = x.shape
    E = Wr.shape[0]
    K = s["k"]
    S = s["group_size"]
    G = T // S
    if not 1 <= K <= E:
        raise ValueError(f"need 1 <= k <= E, got k={K}, E={E}")

    z = x @ Wr.T  # [T, E] clean logits
    if s["use_noise"]:
        zn = z + np.asarray(case["noise"], dtype=np.float64)
    else:
        zn = z
    p_clean = softmax(z)
    p = softmax(zn) if s["use_noise"] else p_clean

    # capacity
    if s["capacity"] is None and s["capacity_factor"] == 0:
        cap = capacity(S, E, K, capacity_factor=0.0,
                       expert_index=topk_indices(p, K).reshape(G, S, K))
    else:
        cap = capacity(S, E, K, capacity_factor=s["capacity_factor"],
                       capacity=s["capacity"], multiple_of=s["multiple_of"],
                       ceil_or_round=s["ceil_or_round"])

    # routing per group
    pg = p.reshape(G, S, E)
    ei = np.empty((G, S, K), dtype=np.int64)
    slot = np.empty((G, S, K), dtype=np.int64)
    for g in range(G):
        ei[g], slot[g], _ = route_group(pg[g], K, cap, s["bpr"])
    ei = ei.reshape(T, K)
    slot = slot.reshape(T, K)
    kept = slot < cap
    gate = p[np.arange(T)[:, None], ei]  # [T, K] raw gate of each choice
    combine = np.where(kept, gate, 0.0)

    # experts (only on kept (token, expert) pairs)
    y = np.zeros((T, D), dtype=np.float64)
    for e in range(E):
        tk = np.nonzero(kept & (ei == e))
        if tk[0].size == 0:
            continue
        xt = x[tk[0]]
        h = xt @ W1[e].T + b1[e]
        out = gelu_exact(h) @ W2[e].T + b2[e]
        np.add.at(y, tk[0], combine[tk][:, None] * out)

    # aux losses: per group, then mean over groups
    imp = float(np.mean(importance_loss(p_clean.reshape(G, S, E))))
    if s["use_noise"]:
        sigma = s["noise_std"] / E
        load = float(np.mean(load_loss(z.reshape(G, S, E), zn.reshape(G, S, E), sigma, K)))
    else:
        load = 0.0
    gs = float(np.mean(gshard_loss(pg)))
    aux = 0.0
    if s["importance_weight"] > 0:
        aux += s["importance_weight"] * imp
    if s["load_weight"] > 0 and s["use_noise"]:
        aux += s["load_weight"] * load
    if s["gshard_weight"] > 0:
        aux += s["gshard_weight"] * gs

    out = {
        "y": y,
        "expert_index": ei.astype(np.int32),
        "slot": slot.astype(np.int32),
        "combine_weight": combine,
        "gate": gate,  # raw gate of every choice (kept or not), for diagnostics
        "kept": kept,
        "capacity": cap,
        "loss.importance": imp,
        "loss.load": load,
        "loss.gshard": gs,
        "loss.aux_total": aux,
    }
    # the load-loss K-th expert and the gshard argmax are the K-th / 1st entries
    # of expert_index (softmax is monotone), so (ei, slot, cap) covers all hard
    # decisions.
    return out, (ei, slot, cap)


def forward(case):
    """Reference forward of one MoE layer. See the module docstring."""
    return _forward(case)[0]


def objective(case):
    out = forward(case)
    dy = np.asarray(case["dy"], dtype=np.float64)
    return float(np.sum(out["y"] * dy) + out["loss.aux_total"])


def gradients(case, eps=1e-6, params=GRAD_PARAMS):
    """Central finite differences of objective() w.r.t. the listed tensors.

    Raises RoutingFlipError when a perturbation changes a routing decision.
    """
    work = dict(case)
    for name in params:
        work[name] = np.array(case[name], dtype=np.float64, copy=True)
    work["dy"] = np.asarray(case["dy"], dtype=np.float64)
    dy = work["dy"]
    _, ref_route = _forward(work)

    def obj_and_route():
        o, r = _forward(work)
        return float(np.sum(o["y"] * dy) + o["loss.aux_total"]), r

    def same(r):
        return (r[2] == ref_route[2] and np.array_equal(r[0], ref_route[0])
                and np.array_equal(r[1], ref_route[1]))

    grads = {}
    for name in params:
        a = work[name]
        g = np.zeros_like(a)
        flat_a = a.reshape(-1)
        flat_g = g.reshape(-1)
        for i in range(flat_a.size):
            orig = flat_a[i]
            flat_a[i] = orig + eps
            fp, rp = obj_and_route()
            flat_a[i] = orig - eps
            fm, rm = obj_and_route()
            flat_a[i] = orig
            if not (same(rp) and same(rm)):
                idx = np.unravel_index(i, a.shape)
                raise RoutingFlipError(
                    f"finite-difference perturbation +-{eps} of {name}{list(map(int, idx))} "
                    "flips a routing decision (top-k / slot / capacity); choose another seed")
            flat_g[i] = (fp - fm) / (2.0 * eps)
        grads["grad." + name] = g
    return grads


# --------------------------------------------------------------------------
# I/O helpers (safetensors)
# --------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file with numpy alone: the format is an 8-byte
    little-endian header length, a JSON header (name -> dtype, shape, data_offsets) and the
    data. For hosts without the `safetensors` package (the GPU checks); BF16 is widened
    to float32."""
    import json
    import struct
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    n = struct.unpack("<Q", blob[:8])[0]
    if n > len(blob) - 8:
        raise ValueError(f"{path}: header length {n} past the end of the file")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + n:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            t = bits.view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            t = np.frombuffer(raw, dtype=_ST_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {info['dtype']} not supported")
        tensors[name] = t.reshape(shape).copy()
    return tensors, meta


def write_safetensors(tensors, path, metadata=None):
    """Writes name -> numpy array (float64/float32/int64/int32/uint8) as safetensors with
    numpy alone, laid out as the safetensors package lays it out (data by dtype, widest
    first in its order, then by name; header keys sorted, padded to 8 bytes), so the file
    has the bytes of save_file + canonicalise_header."""
    import json
    import struct
    names = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("u1"): "U8"}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    # The package's Dtype declaration order (for the types written here); data goes in
    # descending dtype, then name.
    rank = {"U8": 0, "I32": 1, "F32": 2, "F64": 3, "I64": 4}

    def key(name):
        return (-rank[names[np.dtype(tensors[name].dtype).newbyteorder("<")]], name)

    for name in tensors:
        if np.dtype(tensors[name].dtype).newbyteorder("<") not in names:
            raise ValueError(f"{name}: dtype {tensors[name].dtype} not supported")
    entries = {}
    for name in sorted(tensors, key=key):
        t = np.asarray(tensors[name])  # 0-d stays 0-d (ascontiguousarray makes it 1-d)
        raw = t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        entries[name] = {"dtype": names[t.dtype.newbyteorder("<")], "shape": list(t.shape),
                         "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header.update(sorted(entries.items()))  # the header's keys by name
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def _numpy_only():
    """True when the `safetensors` package is missing, or MOERUN_REF_NUMPY_ONLY=1 (tests)."""
    import os
    if os.environ.get("MOERUN_REF_NUMPY_ONLY") == "1":
        return True
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return True
    return False


def load_tensors(path):
    """The tensors of a safetensors file (name -> numpy array), through the `safetensors`
    package when it is installed, else read_safetensors."""
    if _numpy_only():
        return read_safetensors(path)[0]
    from safetensors.numpy import load_file
    return load_file(path)


def load_case(path):
    """Loads a case file: tensors promoted to float64, metadata strings kept."""
    case = {}
    if _numpy_only():
        tensors, meta = read_safetensors(path)
    else:
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, t in tensors.items():
        case[key] = t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t
    for key, val in meta.items():
        if key not in case:
            case[key] = val
    return case


def result_tensors(case, with_grads=True, dtype=np.float32, eps=1e-6):
    """Reference outputs in the result-file format read by check_result.py."""
    out = forward(case)
    res = {
        "y": out["y"].astype(dtype),
        "expert_index": out["expert_index"].astype(np.int32),
        "slot": out["slot"].astype(np.int32),
        "combine_weight": out["combine_weight"].astype(dtype),
    }
    for key in ("loss.importance", "loss.load", "loss.gshard", "loss.aux_total"):
        res[key] = np.array(out[key], dtype=dtype)
    if with_grads:
        for key, g in gradients(case, eps=eps).items():
            res[key] = g.astype(dtype)
    return res


# --------------------------------------------------------------------------
# Self-test (golden values of the spec)
# --------------------------------------------------------------------------

def selftest():
    failures = []

    def check(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            failures.append(msg)

    # routing golden table
    p = np.array([[.4, 0, .2], [.5, .1, .4], [.3, .2, .6]])
    want = {
        False: [[(0, 0), (2, 1)], [(0, 1), (2, 2)], [(2, 0), (0, 2)]],
        True: [[(0, 1), (2, 2)], [(0, 0), (2, 1)], [(2, 0), (0, 2)]],
    }
    for bpr in (False, True):
        ei, sl, kept = route_group(p, 2, 2, bpr)
        got = [[(int(ei[t, k]), int(sl[t, k])) for k in range(2)] for t in range(3)]
        check(got == want[bpr] and np.array_equal(kept, sl < 2),
              f"routing golden ({'BPR' if bpr else 'vanilla'}): {got}")

    # ties go to the lower expert index; BPR sort is stable
    ei, sl, _ = route_group(np.array([[.25, .25, .25, .25], [.25, .25, .25, .25]]), 2, 4, True)
    check(ei.tolist() == [[0, 1], [0, 1]] and sl.tolist() == [[0, 0], [1, 1]],
          f"tie-breaking (lower index, stable BPR): ei={ei.tolist()} slot={sl.tolist()}")

    # capacity examples
    c1 = capacity(32, 32, 2, capacity_factor=1.0)
    check(c1 == 4, f"capacity S=32 E=32 K=2 c=1.0 -> {c1} (want 4)")
    c2 = capacity(1576, 32, 2, capacity_factor=1.05)
    check(c2 == 104, f"capacity S=1576 E=32 K=2 c=1.05 -> {c2} (want 104)")
    c3 = capacity(3, 3, 2, capacity=2)
    check(c3 == 2, f"explicit capacity 2 -> {c3} (not padded)")
    c4 = capacity(20, 8, 1, capacity_factor=1.0, multiple_of=0, ceil_or_round="round")
    check(c4 == 2, f"round(2.5) -> {c4} (Python round, half to even)")
    try:
        capacity(4, 32, 1, capacity_factor=1.0, ceil_or_round="round")
        check(False, "capacity < 1 raises")
    except ValueError:
        check(True, "capacity < 1 raises")
    c5 = capacity(3, 3, 2, capacity_factor=0.0, expert_index=np.array([[[0, 2], [0, 2], [2, 0]]]))
    check(c5 == 3, f"dropless capacity -> {c5} (want 3)")

    # losses
    pimp = np.array([[.5, .4, .1], [.3, .3, .4], [.1, .2, .7], [.8, .2, 0]])
    li = float(importance_loss(pimp))
    check(abs(li - 0.03874999) < 1e-7, f"importance loss {li:.10f} (want 0.03874999)")
    z = np.array([[.9, .06, .04], [.7, .18, .12], [.85, .05, .1]])
    nz = np.array([[-.037, .026, -.018], [-.074, .045, -.015], [-.067, -.059, .073]])
    ll = float(load_loss(z, z + nz, 0.1, 2))
    check(abs(ll - 0.48573864536) < 1e-6, f"load loss {ll:.11f} (want 0.48573864536)")
    lg = float(gshard_loss(pimp))
    check(abs(lg - 1.0875) < 1e-12, f"gshard loss {lg:.10f} (want 1.0875)")

    # a small full forward + gradients (timing, flip-free)
    case = make_random_case(seed=1, T=16, D=8, M=16, E=4, K=2, capacity_factor=1.0,
                            bpr=True, noise_std=1.0)
    out = forward(case)
    check(out["y"].shape == (16, 8) and out["slot"].shape == (16, 2), "forward shapes")
    t0 = time.time()
    g = gradients(case)
    dt = time.time() - t0
    check(all(np.all(np.isfinite(v)) for v in g.values()),
          f"FD gradients T=16 D=8 M=16 E=4 K=2 finite ({dt:.2f} s)")
    # FD gradient of fc2.bias vs its closed form sum_{kept (t,k): e} combine[t,k] * dy[t]
    want = np.zeros_like(case["experts.fc2.bias"])
    for t_ in range(16):
        for k_ in range(2):
            want[out["expert_index"][t_, k_]] += out["combine_weight"][t_, k_] * case["dy"][t_]
    err = float(np.max(np.abs(want - g["grad.experts.fc2.bias"])))
    check(err < 1e-8, f"FD grad of fc2.bias == closed form (max err {err:.1e})")

    # vectorised forward vs a literal scalar-loop transcription of the spec
    configs = [
        dict(T=12, D=5, M=7, E=4, K=2, capacity_factor=1.0, bpr=False, noise_std=0.0),
        dict(T=12, D=5, M=7, E=4, K=2, capacity_factor=0.5, bpr=True, noise_std=1.0),
        dict(T=12, D=5, M=7, E=3, K=3, capacity_factor=0.5, bpr=True, noise_std=1.0,
             group_size=4, multiple_of=0),
        dict(T=12, D=5, M=7, E=4, K=2, capacity_factor=0.75, bpr=False, noise_std=1.0,
             group_size=6, multiple_of=0, ceil_or_round="round"),
        dict(T=10, D=4, M=6, E=5, K=1, capacity_factor=0.0, bpr=False, noise_std=1.0,
             group_size=5),
        dict(T=9, D=4, M=6, E=3, K=2, capacity_factor=1.0, bpr=True, noise_std=0.0,
             group_size=1),
    ]
    for i, cfg in enumerate(configs):
        cs = make_random_case(seed=100 + i, **cfg)
        if i == 1:
            cs["capacity_factor"] = None
            cs["capacity"] = "1"
        a, b = forward(cs), _naive_forward(cs)
        ok = (np.array_equal(a["expert_index"], b["expert_index"])
              and np.array_equal(a["slot"], b["slot"])
              and np.allclose(a["combine_weight"], b["combine_weight"], rtol=1e-12, atol=1e-14)
              and np.allclose(a["y"], b["y"], rtol=1e-12, atol=1e-14)
              and all(abs(a[n] - b[n]) <= 1e-12 * max(1.0, abs(b[n]))
                      for n in ("loss.importance", "loss.load", "loss.gshard", "loss.aux_total")))
        check(ok, f"vectorised forward == scalar-loop forward, config {i}: "
                  f"cap={a['capacity']} kept {int(a['kept'].sum())}/{a['kept'].size}")

    print("selftest:", "PASSED" if not failures else f"{len(failures)} FAILED")
    return 0 if not failures else 1


def _naive_forward(case):
    """Scalar-loop transcription of the spec, for the self-test only."""
    s = settings(case)
    x = case["x"].tolist()
    Wr = case["router.weight"].tolist()
    W1, b1 = case["experts.fc1.weight"], case["experts.fc1.bias"]
    W2, b2 = case["experts.fc2.weight"], case["experts.fc2.bias"]
    T, D = len(x), len(x[0])
    E, K, S = len(Wr), s["k"], s["group_size"]
    M = W1.shape[1]
    noise = case["noise"].tolist() if s["use_noise"] else [[0.0] * E for _ in range(T)]
    z = [[sum(x[t][d] * Wr[e][d] for d in range(D)) for e in range(E)] for t in range(T)]
    zn = [[z[t][e] + noise[t][e] for e in range(E)] for t in range(T)]

    def sm(row):
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        tot = sum(ex)
        return [v / tot for v in ex]

    pc = [sm(r) for r in z]
    p = [sm(r) for r in zn]
    choice = []
    for t in range(T):  # selection sort: largest first, lower index on ties
        rem, ch = list(range(E)), []
        for _ in range(K):
            best = rem[0]
            for e in rem:
                if p[t][e] > p[t][best]:
                    best = e
            ch.append(best)
            rem.remove(best)
        choice.append(ch)
    G = T // S
    if s["capacity"] is not None:
        cap = s["capacity"]
    elif s["capacity_factor"] == 0:
        cap = max(sum(1 for t in range(g * S, g * S + S) for k in range(K) if choice[t][k] == e)
                  for g in range(G) for e in range(E))
    else:
        v = S * K * s["capacity_factor"] / E
        cap = math.ceil(v) if s["ceil_or_round"] == "ceil" else round(v)
        if s["multiple_of"] > 0:
            while cap % s["multiple_of"]:
                cap += 1
    slot = [[None] * K for _ in range(T)]
    for g in range(G):
        toks = list(range(g * S, g * S + S))
        if s["bpr"]:  # insertion sort by descending top-1 gate, stable
            order = []
            for t in toks:
                i = len(order)
                while i > 0 and p[order[i - 1]][choice[order[i - 1]][0]] < p[t][choice[t][0]]:
                    i -= 1
                order.insert(i, t)
        else:
            order = toks
        count = [0] * E
        for k in range(K):
            for t in order:
                e = choice[t][k]
                slot[t][k] = count[e]
                count[e] += 1
    y = np.zeros((T, D))
    cw = np.zeros((T, K))
    for t in range(T):
        for k in range(K):
            if slot[t][k] >= cap:
                continue
            e = choice[t][k]
            cw[t, k] = p[t][e]
            a = []
            for m in range(M):
                h = b1[e, m] + sum(W1[e, m, d] * x[t][d] for d in range(D))
                a.append(0.5 * h * (1.0 + math.erf(h / math.sqrt(2.0))))
            for d in range(D):
                o = b2[e, d] + sum(W2[e, d, m] * a[m] for m in range(M))
                y[t, d] += p[t][e] * o

    def cv2(v):
        mu = sum(v) / len(v)
        return (sum((u - mu) ** 2 for u in v) / len(v)) / mu ** 2

    imp = load = gs = 0.0
    for g in range(G):
        toks = range(g * S, g * S + S)
        imp += cv2([sum(pc[t][e] for t in toks) for e in range(E)]) / G
        if s["use_noise"]:
            sigma = s["noise_std"] / E
            Pm = [0.0] * E
            for t in toks:
                tau = sorted(zn[t], reverse=True)[K - 1]
                for e in range(E):
                    Pm[e] += (1.0 - 0.5 * (1.0 + math.erf((tau - z[t][e]) / sigma / math.sqrt(2.0)))) / S
            load += cv2(Pm) / G
        frac = [sum(1 for t in toks if choice[t][0] == e) / S for e in range(E)]
        mp = [sum(p[t][e] for t in toks) / S for e in range(E)]
        gs += E * E * sum(frac[e] * mp[e] for e in range(E)) / E / G
    aux = ((s["importance_weight"] * imp if s["importance_weight"] > 0 else 0.0)
           + (s["load_weight"] * load if s["load_weight"] > 0 else 0.0)
           + (s["gshard_weight"] * gs if s["gshard_weight"] > 0 else 0.0))
    return {"expert_index": np.array(choice, dtype=np.int32),
            "slot": np.array(slot, dtype=np.int32), "combine_weight": cw, "y": y,
            "loss.importance": imp, "loss.load": load, "loss.gshard": gs,
            "loss.aux_total": aux}


def make_random_case(seed, T, D, M, E, K, capacity_factor=1.0, bpr=False, noise_std=0.0,
                     group_size=0, importance_weight=0.005, load_weight=0.005,
                     gshard_weight=0.01, multiple_of=4, ceil_or_round="ceil"):
    """A small in-memory case (float32-rounded like a case file) for tests."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)
    case = {
        "x": f32(rng.standard_normal((T, D))),
        "dy": f32(rng.standard_normal((T, D))),
        "router.weight": f32(rng.standard_normal((E, D)) / math.sqrt(D)),
        "experts.fc1.weight": f32(rng.standard_normal((E, M, D)) / math.sqrt(D)),
        "experts.fc1.bias": f32(0.1 * rng.standard_normal((E, M))),
        "experts.fc2.weight": f32(rng.standard_normal((E, D, M)) / math.sqrt(M)),
        "experts.fc2.bias": f32(0.1 * rng.standard_normal((E, D))),
        "num_experts": str(E), "k": str(K), "capacity_factor": repr(float(capacity_factor)),
        "multiple_of": str(multiple_of), "ceil_or_round": ceil_or_round, "bpr": "1" if bpr else "0",
        "group_size": str(group_size or T), "noise_std": repr(float(noise_std)),
        "importance_weight": repr(importance_weight), "load_weight": repr(load_weight),
        "gshard_weight": repr(gshard_weight),
    }
    if noise_std:
        case["noise"] = f32(noise_std / E * rng.standard_normal((T, E)))
    return case


def _main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--case")
    ap.add_argument("--write-result")
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--float64", action="store_true", help="write float64 instead of float32")
    ap.add_argument("--eps", type=float, default=1e-6)
    a = ap.parse_args(argv)
    if a.selftest:
        return selftest()
    if a.case and a.write_result:
        if _numpy_only():
            save_file = write_safetensors
        else:
            from safetensors.numpy import save_file
        case = load_case(a.case)
        t0 = time.time()
        res = result_tensors(case, with_grads=not a.no_grads,
                             dtype=np.float64 if a.float64 else np.float32, eps=a.eps)
        save_file(res, a.write_result)
        print(f"wrote {a.write_result} ({len(res)} tensors, {time.time() - t0:.2f} s)")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
