#!/usr/bin/env python3
"""Issue #11's GPU targets, read off the summary of cluster/gpu_checks.sh: one short block
to quote (the device tool returns only the last 12,000 characters of a command's output).

  expert GEMMs >= 70% of the bf16 cuBLAS peak measured in the same run (bench moe-layer);
  the whole MoE layer >= 1.5x a PyTorch index-dispatch layer on the same GPU;
  the op table and the replays CUDA against CPU; each step's exit status.

Usage: gpu_targets.py SUMMARY. Prints the block; exits 0 (it reports, it does not judge
the run: gpu_checks.sh's own exit status does)."""
import json
import re
import sys

GEMM_TARGET = 0.70
SPEEDUP_TARGET = 1.5


def json_lines(text):
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def verdict(value, target):
    if not isinstance(value, (int, float)):
        return "n/a"
    return "ok" if value >= target else "BELOW"


def fmt(value, digits=2):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def targets(text):
    out = ["===== targets (issue #11)"]
    # nvidia-smi's answer heads the summary: its CSV header, then the GPU (or its error).
    head = text.splitlines()[:2]
    if head and head[0].startswith("name,") and len(head) > 1:
        out.append(f"gpu: {head[1]}")
    elif head and not head[0].startswith(("{", "gpu_checks:")):
        out.append(f"gpu: nvidia-smi said: {head[0]}")
    lines = list(json_lines(text))
    layer = [j for j in lines if j.get("bench") == "moe-layer" and "expert_gemm_fraction_of_peak" in j]
    if layer:
        peak = layer[0].get("cublas_bf16_peak_tflops")
        out.append(f"bench moe-layer (bf16 cuBLAS peak {fmt(peak, 0)} TFLOP/s in this run): "
                   f"GEMMs >= {GEMM_TARGET:.2f} of peak, layer >= {SPEEDUP_TARGET}x PyTorch")
        out.append("  d x m       E  routing  gemm TFLOP/s  of peak       step ms  vs torch      fused")
        for j in layer:
            frac = j.get("expert_gemm_fraction_of_peak")
            speed = j.get("speedup_vs_torch")
            routing = "bpr" if j.get("bpr") else "vanilla"
            out.append(
                f"  {j.get('d')}x{j.get('m'):<6} {j.get('e'):>3}  {routing:<7}  "
                f"{fmt(j.get('expert_gemm_tflops'), 1):>12}  {fmt(frac):>4} {verdict(frac, GEMM_TARGET):<5}  "
                f"{fmt(j.get('step_ms'), 3):>9}  "
                + (f"{fmt(speed):>4} {verdict(speed, SPEEDUP_TARGET):<5}" if speed is not None else "-         ")
                + f"  {j.get('fused_bias_gelu')}")
        for j in lines:
            if j.get("bench") == "moe-layer-torch" and "skipped" in j:
                out.append(f"  PyTorch peer skipped: {j['skipped']}")
                break
    else:
        out.append("bench moe-layer: no result line (see bench_moe_layer.log)")
    gemm = [j for j in lines if j.get("bench") == "gemm" and isinstance(j.get("tflops"), dict)]
    if gemm:
        out.append("bench gemm (dense GEMMs, TFLOP/s): pass m x n x k: fp32 / bf16 with casts / "
                   "bf16 GEMM alone / FAST_16BF")
        for j in gemm:
            t = j["tflops"]
            out.append(f"  {j.get('pass')} {j.get('m')}x{j.get('n')}x{j.get('k')}: "
                       f"{fmt(t.get('fp32'), 1)} / {fmt(t.get('bf16'), 1)} / "
                       f"{fmt(t.get('bf16_gemm'), 1)} / {fmt(t.get('fast16bf'), 1)}")
    for j in lines:
        if j.get("bench") == "train" and "mfu" in j:
            out.append(f"bench train: precision {j.get('precision', '?')}, mfu {fmt(j.get('mfu'), 3)}")
    # The tests' and the replays' totals.
    for m in re.finditer(r"^\[  (PASSED|FAILED)  \] (\d+) tests?", text, re.M):
        out.append(f"gtest: {m.group(1).lower()} {m.group(2)}")
    for m in re.finditer(r"^(\d+) passed, (\d+) failed \(devices: ([^;)]*)(?:; ([^)]*))?\)", text,
                         re.M):
        out.append(f"{m.group(4) or 'replay'} ({m.group(3)}): {m.group(1)} passed, "
                   f"{m.group(2)} failed")
    # Each step's exit status, the failed ones named.
    steps = re.findall(r"^gpu_checks: (\S+) rc=(\d+) in (\d+) s", text, re.M)
    skipped = re.findall(r"^gpu_checks: (\S+) skipped", text, re.M)
    bad = [f"{name} (rc {rc})" for name, rc, _ in steps if rc != "0"]
    out.append(f"steps: {len(steps)} ran, {len(bad)} failed"
               + (": " + ", ".join(bad) if bad else "")
               + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return "\n".join(out)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        print(targets(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
