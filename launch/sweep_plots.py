#!/usr/bin/env python3
"""Plots of a `moerun sweep` directory (called by the sweep; also usable alone).

Usage: python3 launch/sweep_plots.py DIR

Reads DIR/sweep.json (the axes), DIR/sweep.csv and DIR/eval_capacity.csv and writes:
  throughput.png      images/s vs ranks, one line per setting of the other axes
  step_time.png       per-step time split (router, all-to-all, experts, combine, dense,
                      gradient reduce, optimizer, data) per point, stacked
  drop_rate.png       dropped fraction of token choices vs training capacity factor
  accuracy_vs_eval_capacity.png
                      test accuracy vs inference capacity factor, vanilla vs Batch Priority
                      Routing (the V-MoE paper's figure, on this sweep's models)
A plot whose axes the sweep does not have is left out (and said so).
"""
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CF = "model.moe.capacity_factor"
BPR = "model.moe.bpr"
PARTS = [
    ("router_ms", "router + routing"),
    ("dispatch_a2a_ms", "all-to-all"),
    ("experts_ms", "expert MLPs"),
    ("combine_ms", "pack / combine"),
    ("dense_ms", "dense (attention, MLP, head)"),
    ("grad_reduce_ms", "gradient all-reduce"),
    ("optimizer_ms", "AdamW"),
    ("data_ms", "data"),
]


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


ABBREV = {"capacity_factor": "C", "bpr": "BPR", "num_experts": "E", "group_images": "group"}


def short(key):
    last = key.split(".")[-1]
    return ABBREV.get(last, last)


def label_of(row, keys):
    return ", ".join(f"{short(k)}={row[k]}" for k in keys) if keys else "all"


def sort_value(v):
    x = num(v)
    return (0, x, "") if x is not None else (1, 0, v)


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = sys.argv[1]
    with open(os.path.join(d, "sweep.json")) as f:
        spec = json.load(f)
    axes = [a["key"] for a in spec["axes"]]
    others = [k for k in axes if k != "ranks"]
    rows = [r for r in read_csv(os.path.join(d, "sweep.csv")) if r["status"] == "ok"]
    evals = read_csv(os.path.join(d, "eval_capacity.csv"))
    if not rows:
        print("sweep_plots: no finished points yet", file=sys.stderr)
        return 1
    model = os.path.basename(spec["config"]).replace(".pbtxt", "")
    written = []

    # Throughput vs ranks.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    for key in sorted(groups, key=lambda t: [sort_value(v) for v in t]):
        g = sorted(groups[key], key=lambda r: int(r["ranks"]))
        ax.plot([int(r["ranks"]) for r in g], [num(r["images_per_s"]) for r in g], marker="o",
                label=label_of(g[0], others))
    ax.set_xlabel("ranks (processes)")
    ax.set_ylabel("training throughput (images/s)")
    ax.set_xticks(sorted({int(r["ranks"]) for r in rows}))
    ax.set_title(f"{model}: throughput vs ranks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "throughput.png"), dpi=120)
    plt.close(fig)
    written.append("throughput.png")

    # Step time split, stacked, per point (sorted by ranks, then the other axes).
    pts = sorted(rows, key=lambda r: (int(r["ranks"]), [sort_value(r[k]) for k in others]))
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(pts) + 3), 5))
    bottom = [0.0] * len(pts)
    x = list(range(len(pts)))
    for col, name in PARTS:
        vals = [max(0.0, num(r[col]) or 0.0) for r in pts]
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(x)
    ax.set_xticklabels([f"P={r['ranks']}\n" + "\n".join(f"{short(k)}={r[k]}" for k in others)
                        for r in pts], fontsize=7)
    ax.set_ylabel("time per training step (ms, mean over ranks)")
    ax.set_title(f"{model}: where a training step's time goes")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "step_time.png"), dpi=120)
    plt.close(fig)
    written.append("step_time.png")

    # Drop rate vs training capacity factor.
    if CF in axes:
        rest = [k for k in axes if k != CF]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = {}
        for r in rows:
            groups.setdefault(tuple(r[k] if k != "ranks" else r["ranks"] for k in rest),
                              []).append(r)
        for key in sorted(groups, key=lambda t: [sort_value(v) for v in t]):
            g = sorted(groups[key], key=lambda r: num(r[CF]))
            lab = ", ".join(f"{short(k) if k != 'ranks' else 'P'}={v}" for k, v in zip(rest, key))
            ax.plot([num(r[CF]) for r in g], [100 * num(r["dropped_fraction"]) for r in g],
                    marker="o", label=lab or "all")
        ax.set_xlabel("training capacity factor C")
        ax.set_ylabel("dropped token choices (% of k x tokens, training)")
        ax.set_title(f"{model}: drop rate vs capacity factor")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "drop_rate.png"), dpi=120)
        plt.close(fig)
        written.append("drop_rate.png")
    else:
        print(f"sweep_plots: no {CF} axis: no drop_rate.png", file=sys.stderr)

    # Test accuracy vs inference capacity factor, vanilla vs BPR (smallest rank count: the
    # rank count does not change the results).
    if evals:
        p_min = min(int(r["ranks"]) for r in evals)
        ev = [r for r in evals if int(r["ranks"]) == p_min]
        rest = [k for k in others if k != BPR]
        fig, ax = plt.subplots(figsize=(7.5, 5))
        groups = {}
        for r in ev:
            groups.setdefault((r.get(BPR, ""),) + tuple(r[k] for k in rest), []).append(r)
        styles = ["-", "--", ":", "-."]
        rest_values = sorted({tuple(k[1:]) for k in groups}, key=lambda t: [sort_value(v) for v in t])
        for key in sorted(groups, key=lambda t: [sort_value(v) for v in t]):
            g = sorted(groups[key], key=lambda r: num(r["eval_capacity_factor"]))
            bpr = key[0]
            name = {"true": "BPR", "false": "vanilla"}.get(bpr, f"bpr={bpr}" if bpr else "")
            lab = name + "".join(f", trained {short(k)}={v}" for k, v in zip(rest, key[1:]))
            ax.plot([num(r["eval_capacity_factor"]) for r in g],
                    [100 * num(r["test_accuracy"]) for r in g], marker="o",
                    color="tab:red" if bpr == "true" else "tab:blue",
                    linestyle=styles[rest_values.index(tuple(key[1:])) % len(styles)], label=lab)
        ax.set_xlabel("inference capacity factor C (evaluation)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: accuracy vs inference capacity (P={p_min})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "accuracy_vs_eval_capacity.png"), dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_eval_capacity.png")
    else:
        print("sweep_plots: no evaluations (--eval-capacities): no accuracy plot", file=sys.stderr)
    print("sweep_plots: wrote " + ", ".join(os.path.join(d, w) for w in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
