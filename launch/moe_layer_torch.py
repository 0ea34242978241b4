#!/usr/bin/env python3
"""PyTorch peer for `moerun bench moe-layer --device cuda`: the same MoE layer (top-k
router gates given, fixed capacity, index dispatch, expert MLPs in bf16 autocast, weighted
combine), forward + backward, timed with CUDA events on the same GPU. Prints one JSON line;
without PyTorch or without CUDA it prints a line saying why it was skipped."""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--m", type=int, required=True)
    ap.add_argument("--e", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--capacity", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print(json.dumps({"bench": "moe-layer-torch", "skipped": "PyTorch is not installed"}))
        return 0
    except Exception as exc:  # installed but broken (a library it needs, a driver)
        print(json.dumps({"bench": "moe-layer-torch",
                          "skipped": f"PyTorch did not import: {type(exc).__name__}: {exc}"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "moe-layer-torch", "skipped": "PyTorch sees no CUDA device"}))
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t, d, m, e, k, cap = a.tokens, a.d, a.m, a.e, a.k, a.capacity
    gates = torch.rand(t, e, device=dev) / e
    x = torch.randn(t, d, device=dev, requires_grad=True)
    w1 = (torch.randn(e, d, m, device=dev) / d ** 0.5).requires_grad_()
    b1 = torch.zeros(e, 1, m, device=dev, requires_grad=True)
    w2 = (torch.randn(e, m, d, device=dev) / m ** 0.5).requires_grad_()
    b2 = torch.zeros(e, 1, d, device=dev, requires_grad=True)
    # The layer's output gradient: random, as moerun's side takes it (a constant one, as from
    # y.sum(), would make the weight-gradient GEMMs run on a low-entropy operand).
    dy = torch.randn(t, d, device=dev) * 0.01

    def layer():
        weight, expert = torch.topk(gates, k, dim=1)  # [t, k]
        flat = expert.reshape(-1)  # choice order: token-major (vanilla priority)
        onehot = torch.nn.functional.one_hot(flat, e)
        pos = (torch.cumsum(onehot, 0) - 1).gather(1, flat[:, None])[:, 0]
        keep = pos < cap
        dest = flat * cap + pos
        src_tok = torch.arange(t, device=dev).repeat_interleave(k)
        buf = torch.zeros(e * cap, d, device=dev, dtype=x.dtype)
        buf = buf.index_copy(0, dest[keep], x[src_tok[keep]])
        # baddbmm (bias + product) is on autocast's bf16 list, so the hidden activations stay
        # bf16; a bmm + fp32 bias would promote them to fp32 (extra passes over [e, cap, m]).
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = torch.nn.functional.gelu(torch.baddbmm(b1, buf.view(e, cap, d), w1),
                                         approximate="tanh")
            o = torch.baddbmm(b2, h, w2).float().view(e * cap, d)
        y = torch.zeros(t, d, device=dev)
        y = y.index_add(0, src_tok[keep], o[dest[keep]] * weight.reshape(-1)[keep, None])
        return y

    # Warm-up: at least 3 steps and 200 ms of work, so the GPU's clocks are up (as for
    # moerun's side of the comparison).
    import time
    t0 = time.perf_counter()
    for i in range(1000):
        layer().backward(dy)
        if i >= 2:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 >= 0.2:
                break
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(a.steps):
        layer().backward(dy)
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / a.steps
    print(json.dumps({"bench": "moe-layer-torch", "torch": torch.__version__, "d": d, "m": m,
                      "e": e, "k": k, "capacity": cap, "tokens_per_rank": t, "step_ms": ms,
                      "tokens_per_s": t / (ms * 1e-3),
                      "device": torch.cuda.get_device_name()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
