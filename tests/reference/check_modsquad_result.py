#!/usr/bin/env python3
"""Compares a `moerun replay-modsquad --out` result file against the float64 reference.

usage: python3 check_modsquad_result.py --case case.safetensors --result result.safetensors
           [--grad-tol 1e-3] [--no-grads] [--ranks R] [--skip-rank-grouped] [--eps 1e-6]
       python3 check_modsquad_result.py --selfcheck [--keep DIR]

Formats: docs/modsquad_case_format.md. Reference: modsquad_reference.py.

Checks (per pass p unless noted):
  pass{p}.expert_index, pass{p}.slot        exactly (every choice, kept or dropped)
  pass{p}.gates, pass{p}.y                  |got-ref| <= 1e-6 + 1e-4*|ref| elementwise
  pass{p}.combine_weight                    kept choices: as above; dropped: 0 or the raw gate
  pass{p}.queries, pass{p}.head_outputs     (attention) as above, kept choices only
  step.gate_sums, step.selection_counts, step.task_selections, step.usage, loss.mi,
  loss.aux_total                            as above (scalars of shape [] or [1])
  grad.pass{p}.x, grad.<every weight>       max|got-ref| / max(1, max|ref|) <= --grad-tol
                                            (reference: central finite differences, float64)
  Tensors in the result that are not listed above are reported and ignored.

Several ranks (--ranks R, the number of ranks the result was computed on):
  * mi_per_rank = 1 and R > 1: loss.mi, step.gate_sums and step.selection_counts are
    per-rank estimates (rank 0's / the mean over ranks) that the single-rank reference
    does not model: they are skipped with a note. loss.aux_total and all gradients (which
    contain the MI gradient) are skipped too, unless the MI term is not in the objective
    (tasks <= 2 or mi_weight == 0: then aux_total = 0 and the gradients are comparable).
  * Routing groups: with R ranks, rank r holds images [r*B/R, (r+1)*B/R) of every pass and
    routes groups of consecutive tokens of its own stream (group_size 0: all its tokens).
    Unless each group lies inside one rank's share of one pass (group_size > 0 dividing
    (B/R)*L), the groups differ from the single-rank ones, and so do the slots and, with a
    capacity, the drops and everything downstream. By default the reference then routes
    with the doc's R-rank groups (a note is printed) and everything is compared.
    --skip-rank-grouped instead skips such cases that have a capacity (capacity_factor > 0
    or capacity > 0; the group_size-0 case of the original brief, and also a group_size
    that does not divide (B/R)*L) with a note and exit 0; a dropless one then skips only
    the slot comparison.
  Everything else must match at any R.

--selfcheck: generates a matrix of cases (mlp / attention, dropless / capacity / drops,
BPR on / off, noise, usage, groups, repeated tasks, ranks), writes the reference's own
float32 result for each and checks that it passes; corrupted results must fail and harmless
variants (raw gate on dropped choices, int64 indices, [] scalars) must pass.

Exit status: 0 all ok (or skipped), 1 any failure or unusable case, 77 numpy/safetensors
missing.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

try:
    import numpy as np
    from safetensors.numpy import load_file, save_file
except Exception as exc:  # pragma: no cover
    print(f"SKIP: numpy/safetensors not importable ({exc})")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import modsquad_reference as ref  # noqa: E402

RTOL = 1e-4
ATOL = 1e-6


def fmt_idx(shape, flat_i):
    if not len(shape):
        return "[]"
    return "[" + ",".join(str(int(i)) for i in np.unravel_index(int(flat_i), shape)) + "]"


class Checker:
    def __init__(self, result):
        self.result = result
        self.used = set()
        self.failed = 0
        self.lines = 0

    def line(self, ok, name, msg):
        print(f"{'ok  ' if ok else 'FAIL'} {name:26s} {msg}")
        self.lines += 1
        if not ok:
            self.failed += 1

    def get(self, name, shape):
        """The result tensor, reshaped to the reference shape; the shape must be the
        doc's (scalars: [] or [1])."""
        self.used.add(name)
        if name not in self.result:
            self.line(False, name, "missing from result")
            return None
        a = np.asarray(self.result[name])
        shape = tuple(shape)
        scalar = len(shape) == 0 or shape == (1,)
        if not (a.shape == shape or (scalar and a.size == 1 and a.ndim <= 1)):
            self.line(False, name, f"shape {list(a.shape)} != expected {list(shape)}")
            return None
        return a.reshape(shape)

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
            extra = f"; {int(np.sum((got != want) & kept))} of them on kept choices"
        self.line(False, name, f"{len(bad)} mismatches, first at {list(map(int, first))}: "
                               f"got {got[first]} want {want[first]}{extra}")

    def close(self, name, want, mask=None, alt=None):
        """|got-want| <= ATOL + RTOL*|want| where mask (default everywhere); where mask is
        False: one of the arrays in alt (or anything when alt is None)."""
        want = np.asarray(want, dtype=np.float64)
        got = self.get(name, want.shape)
        if got is None:
            return
        got = got.astype(np.float64)
        err = np.abs(got - want)
        bad = ~(err <= ATOL + RTOL * np.abs(want))  # NaN counts as bad
        if mask is not None:
            mask = np.broadcast_to(mask, want.shape)
            bad_alt = np.zeros_like(bad)
            if alt is not None:
                ok_alt = np.zeros_like(bad)
                for a in alt:
                    ok_alt |= np.abs(got - a) <= ATOL + RTOL * np.abs(a)
                bad_alt = ~mask & ~ok_alt
            bad = (bad & mask) | bad_alt
            err = np.where(mask, err, 0.0)
        max_err = float(np.max(err)) if err.size else 0.0
        if not bad.any():
            extra = ""
            if mask is not None and (~mask).any():
                extra = (f"; {int((~mask).sum())} dropped entries hold 0 or the raw gate"
                         if alt is not None else f"; {int((~mask).sum())} dropped entries not compared")
            self.line(True, name, f"max abs err {max_err:.3e}{extra}")
        else:
            i = int(np.argmax(bad.reshape(-1)))
            self.line(False, name, f"{int(bad.sum())} elements out of tolerance, first at "
                                   f"{fmt_idx(want.shape, i)}: got {got.reshape(-1)[i]:.9g} "
                                   f"want {want.reshape(-1)[i]:.9g}; max abs err {max_err:.3e}")

    def grad(self, name, want, tol):
        got = self.get(name, want.shape)
        if got is None:
            return
        got = got.astype(np.float64)
        if not np.all(np.isfinite(got)):
            self.line(False, name, "non-finite values")
            return
        diff = np.abs(got - want)
        i = int(np.argmax(diff.reshape(-1)))
        err = float(diff.reshape(-1)[i]) / max(1.0, float(np.max(np.abs(want))))
        self.line(err <= tol, name, f"rel err {err:.3e} (tol {tol:g}); worst {fmt_idx(want.shape, i)}: "
                                    f"got {got.reshape(-1)[i]:.9g} want {want.reshape(-1)[i]:.9g}")


def groups_match_single_rank(s, ranks):
    """True when the R-rank routing groups are the single-rank groups (same tokens, same
    order)."""
    if ranks == 1:
        return True
    o1, n1 = ref.routing_order(s, 1)
    oR, nR = ref.routing_order(s, ranks)
    g1, gR = s["group_size"] or n1, s["group_size"] or nR
    if n1 % g1 or nR % gR:
        return False
    a = sorted(tuple(o1[i:i + g1]) for i in range(0, o1.size, g1))
    b = sorted(tuple(oR[i:i + gR]) for i in range(0, oR.size, gR))
    return a == b


def check(a):
    try:
        case, meta = ref.load_case(a.case)
        s = ref.settings(case, meta)
        result = load_file(a.result)
    except Exception as exc:
        print(f"FAIL cannot load case/result: {exc}")
        return 1
    R = a.ranks
    if R < 1 or s["B"] % R:
        print(f"FAIL --ranks {R}: B={s['B']} is not divisible by it")
        return 1
    has_cap = s["capacity"] > 0 or s["capacity_factor"] > 0
    same_groups = groups_match_single_rank(s, R)
    skip_slots = False
    if not same_groups:
        if a.skip_rank_grouped and has_cap:
            print(f"note: ranks={R} with a capacity and group_size {s['group_size']}: the routing "
                  "groups (and so capacity, slots and drops) depend on the rank count; not "
                  "comparable to the single-rank reference: SKIPPED")
            return 0
        if a.skip_rank_grouped:
            print(f"note: ranks={R}, dropless, group_size {s['group_size']}: the slot numbers depend "
                  "on the rank count's groups; pass{p}.slot is not compared")
            skip_slots = True
            R_route = 1
        else:
            print(f"note: ranks={R}, group_size {s['group_size']}: the routing groups differ from the "
                  f"single-rank ones; the reference routes with the doc's {R}-rank groups")
            R_route = R
    else:
        R_route = 1
    mi_in_obj = s["T"] > 2 and s["mi_weight"] != 0.0
    skip_mi = R > 1 and s["mi_per_rank"] == 1
    if skip_mi:
        print(f"note: mi_per_rank=1 on {R} ranks: loss.mi, step.gate_sums, step.selection_counts"
              + (", loss.aux_total and all gradients" if mi_in_obj else "")
              + " are per-rank estimates, not compared"
              + ("" if mi_in_obj else " (the MI term is not in the objective: aux_total and "
                 "gradients are compared)"))
    try:
        out, _ = ref.forward(case, s, R_route)
    except Exception as exc:
        print(f"FAIL reference forward: {exc}")
        return 1
    kept = out["kept"]
    print(f"case {a.case}: layer={s['layer']} E={s['E']} k={s['k']} T={s['T']} N={s['N']} "
          f"tasks {s['tasks_of_pass']} B={s['B']} L={s['L']} D={s['D']} group_size={s['group_size']} "
          f"capacity={out['capacity']} bpr={s['bpr']} mi_per_rank={s['mi_per_rank']} ranks={R}; "
          f"kept {int(kept.sum())}/{kept.size} choices")
    print(f"tolerances: values |got-ref| <= {ATOL:g} + {RTOL:g}*|ref|; indices exact; "
          f"grads max|diff|/max(1,max|ref|) <= {a.grad_tol:g}")

    c = Checker(result)
    B, L, D = s["B"], s["L"], s["D"]
    BL = B * L
    for p in range(s["N"]):
        sl = slice(p * BL, (p + 1) * BL)
        kp = kept[sl]
        c.close(f"pass{p}.gates", out["gates"][sl])
        c.exact(f"pass{p}.expert_index", out["expert_index"][sl])
        if not skip_slots:
            c.exact(f"pass{p}.slot", out["slot"][sl], kept=kp)
        else:
            c.used.add(f"pass{p}.slot")
        cw = out["combine_weight"][sl]
        c.close(f"pass{p}.combine_weight", cw, mask=kp, alt=(np.zeros_like(cw), cw))
        c.close(f"pass{p}.y", out["y"][sl].reshape(B, L, D))
        if s["layer"] == "attention":
            for nm in ("queries", "head_outputs"):
                c.close(f"pass{p}.{nm}", out[nm][sl], mask=kp[..., None])
    for nm in ("step.gate_sums", "step.selection_counts"):
        if skip_mi:
            c.used.add(nm)
        else:
            c.close(nm, out[nm])
    c.close("step.task_selections", out["step.task_selections"])
    c.close("step.usage", out["step.usage"])
    if skip_mi:
        c.used.add("loss.mi")
    else:
        c.close("loss.mi", np.array(out["loss.mi"]))
    skip_grads = skip_mi and mi_in_obj
    if skip_grads:
        c.used.add("loss.aux_total")
    else:
        c.close("loss.aux_total", np.array(out["loss.aux_total"]))

    if a.no_grads or skip_grads:
        c.used |= {k for k in result if k.startswith("grad.")}
    else:
        try:
            t0 = time.time()
            grads = ref.gradients(case, s, eps=a.eps, ranks=R_route)
            dt = time.time() - t0
        except ref.RoutingFlipError as exc:
            print(f"FAIL finite differences unusable for this case: {exc}")
            return 1
        for name in ref.grad_params(s):
            c.grad("grad." + name, grads["grad." + name], a.grad_tol)
        print(f"(finite-difference gradients: {dt:.2f} s)")
    extra = sorted(set(result) - c.used)
    if extra:
        print(f"note: result tensors not checked: {extra}")
    print(f"{'PASSED' if c.failed == 0 else 'FAILED'}: {c.lines - c.failed}/{c.lines} ok")
    return 0 if c.failed == 0 else 1


# --------------------------------------------------------------------------
# --selfcheck
# --------------------------------------------------------------------------

CASES = {
    # name: (make_modsquad_case.py arguments, ranks used for the reference result)
    "mlp_dropless": ("--seed 1 --layer mlp --with-noise --with-usage", 1),
    "attn_dropless": ("--seed 2 --layer attention --with-noise --with-usage", 1),
    "mlp_drops_bpr": ("--seed 3 --layer mlp --capacity-factor 0.5 --multiple-of 0", 1),
    "attn_drops_vanilla": ("--seed 4 --layer attention --capacity-factor 0.5 --multiple-of 0 --bpr 0 "
                           "--with-noise", 1),
    "mlp_cap1_groups": ("--seed 5 --layer mlp --capacity 1 --group-size 3 --with-usage", 1),
    "attn_round_groups_k1": ("--seed 6 --layer attention --k 1 --capacity-factor 0.75 --round "
                             "--multiple-of 0 --group-size 6", 1),
    "mlp_two_tasks_repeat": ("--seed 7 --layer mlp --tasks 2 --passes 3 --pass-tasks 1,1,0 "
                             "--capacity-factor 1.0", 1),
    "mlp_absent_task_k_eq_e": ("--seed 8 --layer mlp --experts 3 --k 3 --tasks 4 --passes 2 "
                               "--capacity-factor 0.75 --multiple-of 0 --with-usage", 1),
    "attn_ranks2_cap": ("--seed 9 --layer attention --capacity-factor 0.5 --multiple-of 0 "
                        "--with-noise", 2),
    "mlp_ranks2_mi_per_rank": ("--seed 10 --layer mlp --mi-per-rank 1 --capacity-factor 1.0 "
                               "--multiple-of 0", 2),
}


def selfcheck(a):
    PY = sys.executable
    tmp = a.keep or tempfile.mkdtemp(prefix="modsquad_ref_")
    os.makedirs(tmp, exist_ok=True)
    problems = []

    def run(args):
        return subprocess.run([PY] + args, cwd=HERE, capture_output=True, text=True)

    def expect(cond, msg, p=None):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            problems.append(msg)
            if p is not None:
                sys.stdout.write(p.stdout[-3000:])
                sys.stdout.write(p.stderr[-3000:])

    me = os.path.abspath(__file__)
    for name, (args, ranks) in CASES.items():
        case = os.path.join(tmp, name + ".case.safetensors")
        res = os.path.join(tmp, name + ".result.safetensors")
        t0 = time.time()
        p = run(["make_modsquad_case.py", "--out", case] + args.split())
        if p.returncode != 0:
            expect(False, f"make_modsquad_case {name}", p)
            continue
        info = p.stdout.strip().split(": ", 1)[-1]
        p = run(["modsquad_reference.py", "--case", case, "--write-result", res,
                 "--ranks", str(ranks)])
        if p.returncode != 0:
            expect(False, f"modsquad_reference {name}", p)
            continue
        t1 = time.time()
        p = run([me, "--case", case, "--result", res, "--ranks", str(ranks)])
        expect(p.returncode == 0 and "FAIL" not in p.stdout,
               f"{name} (ranks {ranks}): {info} [reference {t1 - t0:.1f} s, check "
               f"{time.time() - t1:.1f} s]", p)
        if ranks > 1:
            notes = [ln for ln in p.stdout.splitlines() if ln.startswith("note")]
            for ln in notes:
                print("       " + ln[:150])

    # the rank-grouped case: a single-rank result must not pass a 2-rank check (the groups
    # and so the slots / drops differ) unless --skip-rank-grouped
    case = os.path.join(tmp, "attn_ranks2_cap.case.safetensors")
    res1 = os.path.join(tmp, "attn_ranks2_cap.r1.result.safetensors")
    run(["modsquad_reference.py", "--case", case, "--write-result", res1, "--no-grads"])
    p = run([me, "--case", case, "--result", res1, "--ranks", "2", "--no-grads"])
    expect(p.returncode == 1, f"1-rank routing checked as 2 ranks fails (exit {p.returncode})")
    p = run([me, "--case", case, "--result", res1, "--ranks", "2", "--no-grads", "--skip-rank-grouped"])
    expect(p.returncode == 0 and "SKIPPED" in p.stdout,
           f"... and is skipped with --skip-rank-grouped (exit {p.returncode})", p)
    p = run([me, "--case", case, "--result", res1, "--no-grads"])
    expect(p.returncode == 0, f"... and passes as 1 rank (exit {p.returncode})", p)

    # corrupted / harmless variants on a case with drops (mlp) and one attention case
    def variants(cname, tests):
        case = os.path.join(tmp, cname + ".case.safetensors")
        base = load_file(os.path.join(tmp, cname + ".result.safetensors"))
        cs, meta = ref.load_case(case)
        s = ref.settings(cs, meta)
        out, _ = ref.forward(cs, s)
        BL = s["B"] * s["L"]
        kept = out["kept"]
        for label, mutate, want_rc, grads in tests:
            r = {k: v.copy() for k, v in base.items()}
            mutate(r, out, kept, BL)
            path = os.path.join(tmp, "variant.result.safetensors")
            save_file(r, path)
            args = [me, "--case", case, "--result", path] + ([] if grads else ["--no-grads"])
            p = run(args)
            expect(p.returncode == want_rc,
                   f"{cname}: variant '{label}' -> exit {p.returncode} (want {want_rc})",
                   p if p.returncode != want_rc else None)

    def first_dropped(kept, BL):
        s_, j = map(int, np.argwhere(~kept)[0])
        return s_ // BL, s_ % BL, j

    def first_kept(kept, BL):
        s_, j = map(int, np.argwhere(kept)[0])
        return s_ // BL, s_ % BL, j

    def dropped_raw(r, out, kept, BL):
        p, i, j = first_dropped(kept, BL)
        r[f"pass{p}.combine_weight"][i, j] = np.float32(out["combine_weight"][p * BL + i, j])

    def dropped_zero(r, out, kept, BL):
        for p in range(len([k for k in r if k.endswith(".combine_weight")])):
            km = kept[p * BL:(p + 1) * BL]
            r[f"pass{p}.combine_weight"][~km] = 0.0

    def dropped_other(r, out, kept, BL):
        p, i, j = first_dropped(kept, BL)
        r[f"pass{p}.combine_weight"][i, j] = 0.5 * np.float32(out["combine_weight"][p * BL + i, j])

    def scalars0(r, out, kept, BL):
        for n in ("loss.mi", "loss.aux_total"):
            r[n] = r[n].reshape(())

    def idx64(r, out, kept, BL):
        for k in list(r):
            if k.endswith(".expert_index") or k.endswith(".slot"):
                r[k] = r[k].astype(np.int64)

    def renorm(r, out, kept, BL):
        cw = r["pass0.combine_weight"]
        r["pass0.combine_weight"] = (cw / cw.sum(axis=1, keepdims=True)).astype(np.float32)

    def backfill(r, out, kept, BL):
        p, i, j = first_dropped(kept, BL)
        r[f"pass{p}.slot"][i, j] = 0

    def swap_choices(r, out, kept, BL):
        r["pass1.expert_index"][0] = r["pass1.expert_index"][0][::-1].copy()

    def y_off(r, out, kept, BL):
        r["pass2.y"][1, 2, 3] *= 1.001

    def gates_no_eps(r, out, kept, BL):
        r["pass0.gates"] = (r["pass0.gates"] - np.float32(1e-4)).astype(np.float32)

    def mi_off(r, out, kept, BL):
        r["loss.mi"] = r["loss.mi"] * np.float32(1.001)

    def aux_off(r, out, kept, BL):
        r["loss.aux_total"] = r["loss.aux_total"] * np.float32(1.001)

    def gate_sums_off(r, out, kept, BL):
        r["step.gate_sums"][1, 2] += 1e-3

    def counts_kept_only(r, out, kept, BL):
        c = np.zeros_like(r["step.selection_counts"])
        np.add.at(c, out["expert_index"][kept], 1.0)
        r["step.selection_counts"] = c

    def usage_no_decay(r, out, kept, BL):
        r["step.usage"] = (r["step.usage"] + np.float32(0.01)).astype(np.float32)

    def missing(r, out, kept, BL):
        del r["step.task_selections"]

    def grad_off(r, out, kept, BL):
        g = r["grad.router.weight"]
        g[1, 1, 1] += 2e-3 * max(1.0, float(np.abs(g).max()))

    def grad_x_off(r, out, kept, BL):
        g = r["grad.pass1.x"]
        g[0, 1, 2] += 2e-3 * max(1.0, float(np.abs(g).max()))

    def q_off(r, out, kept, BL):
        p, i, j = first_kept(kept, BL)
        r[f"pass{p}.queries"][i, j, 0] += 0.01

    def ho_dropped_junk(r, out, kept, BL):
        p, i, j = first_dropped(kept, BL)
        r[f"pass{p}.head_outputs"][i, j] = 7.0

    def ho_off(r, out, kept, BL):
        p, i, j = first_kept(kept, BL)
        r[f"pass{p}.head_outputs"][i, j, 1] *= 1.01

    variants("mlp_drops_bpr", [
        ("reference as written", lambda *x: None, 0, False),
        ("dropped choice holds the raw gate", dropped_raw, 0, False),
        ("dropped choices hold 0", dropped_zero, 0, False),
        ("loss scalars of shape []", scalars0, 0, False),
        ("int64 expert_index/slot", idx64, 0, False),
        ("dropped choice holds half the gate", dropped_other, 1, False),
        ("renormalised combine weights", renorm, 1, False),
        ("back-filled slot", backfill, 1, False),
        ("swapped choice order", swap_choices, 1, False),
        ("y off by 1e-3 relative", y_off, 1, False),
        ("gates without the +1e-4", gates_no_eps, 1, False),
        ("loss.mi off by 1e-3 relative", mi_off, 1, False),
        ("loss.aux_total off by 1e-3 relative", aux_off, 1, False),
        ("step.gate_sums off by 1e-3", gate_sums_off, 1, False),
        ("selection counts of kept choices only", counts_kept_only, 1, False),
        ("step.usage off", usage_no_decay, 1, False),
        ("missing step.task_selections", missing, 1, False),
        ("grad.router.weight off by 2e-3", grad_off, 1, True),
    ])
    variants("attn_drops_vanilla", [
        ("reference as written (with grads)", lambda *x: None, 0, True),
        ("junk head_outputs on a dropped choice", ho_dropped_junk, 0, False),
        ("queries off on a kept choice", q_off, 1, False),
        ("head_outputs off by 1e-2 on a kept choice", ho_off, 1, False),
        ("grad.pass1.x off by 2e-3", grad_x_off, 1, True),
    ])

    # exit 77 when numpy cannot be imported (python -S drops site-packages)
    p = subprocess.run([PY, "-S", "-c", "import numpy"], capture_output=True)
    if p.returncode != 0:
        p = subprocess.run([PY, "-S", me, "--case", "x", "--result", "y"], capture_output=True, text=True)
        expect(p.returncode == 77, f"exit 77 without numpy/safetensors (got {p.returncode})")
    else:
        print("skip exit-77 test (numpy importable without site-packages)")

    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print("selfcheck:", "PASSED" if not problems else f"{len(problems)} FAILED")
    return 0 if not problems else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check a Mod-Squad layer result against the reference.")
    ap.add_argument("--case")
    ap.add_argument("--result")
    ap.add_argument("--grad-tol", type=float, default=1e-3)
    ap.add_argument("--no-grads", action="store_true")
    ap.add_argument("--ranks", type=int, default=1, help="ranks the result was computed on")
    ap.add_argument("--skip-rank-grouped", action="store_true",
                    help="skip (exit 0) R>1 cases whose routing groups depend on R, instead of "
                         "routing the reference with the R-rank groups")
    ap.add_argument("--eps", type=float, default=1e-6, help="finite-difference step")
    ap.add_argument("--selfcheck", action="store_true")
    ap.add_argument("--keep", help="--selfcheck: keep cases/results in this folder")
    a = ap.parse_args(argv)
    if a.selfcheck:
        return selfcheck(a)
    if not (a.case and a.result):
        ap.error("--case and --result are required (or --selfcheck)")
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
