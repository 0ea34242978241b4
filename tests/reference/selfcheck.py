#!/usr/bin/env python3
"""Self-consistency check of the reference tooling (no C++ involved).

usage: python3 selfcheck.py [--keep DIR]

1. moe_reference.py --selftest (spec golden values, scalar-loop cross-check).
2. A matrix of cases from make_case.py (vanilla/BPR, noise on/off, drops/no drops,
   K=1, K=E, capacity 1, group size 1, several groups, dropless, round, all-to-one);
   for each, the reference's own outputs are written as a float32 result file and
   check_result.py must pass.
3. Corrupted result files (wrong slot, renormalised combine weights, perturbed y,
   loss, gradient, missing tensor) must fail; harmless variants (raw gate on dropped
   choices, scalars of shape [1], int64 indices) must pass.
Exit 0 when everything behaves, 1 otherwise, 77 when numpy/safetensors are missing.
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
PY = sys.executable

CASES = {
    # name: make_case.py arguments (besides --out)
    "vanilla_nonoise_drops": "--seed 1 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 0.5",
    "bpr_noise_drops": "--seed 2 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 0.5 "
                       "--bpr 1 --noise-std 1.0 --with-noise --gshard-weight 0.01",
    "bpr_noise_nodrops": "--seed 3 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 2.0 "
                         "--bpr 1 --noise-std 1.0 --with-noise",
    "k1_vanilla_noise": "--seed 4 --tokens 16 --d 8 --m 16 --experts 4 --k 1 --capacity-factor 1.0 "
                        "--multiple-of 0 --noise-std 1.0 --with-noise",
    "k_eq_e_bpr": "--seed 5 --tokens 12 --d 6 --m 8 --experts 3 --k 3 --capacity-factor 0.5 "
                  "--multiple-of 0 --bpr 1",
    "capacity1_bpr": "--seed 6 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity 1 --bpr 1 "
                     "--noise-std 1.0 --with-noise",
    "group_size1": "--seed 7 --tokens 8 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 1.0 "
                   "--group-size 1 --bpr 1 --noise-std 1.0 --with-noise",
    "four_groups_round": "--seed 8 --tokens 24 --d 8 --m 12 --experts 4 --k 2 --capacity-factor 0.75 "
                         "--round --multiple-of 0 --group-size 6 --noise-std 1.0 --with-noise "
                         "--gshard-weight 0.02",
    "dropless": "--seed 9 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 0 "
                "--group-size 8 --noise-std 1.0 --with-noise",
    "all_to_one_vanilla": "--seed 10 --tokens 16 --d 8 --m 16 --experts 4 --k 2 --capacity-factor 1.0 "
                          "--multiple-of 0 --all-to-one",
    "all_to_one_bpr_noise": "--seed 11 --tokens 16 --d 8 --m 16 --experts 4 --k 1 --capacity-factor 1.0 "
                            "--bpr 1 --noise-std 1.0 --with-noise --all-to-one",
    "noise_std_without_with_noise": "--seed 12 --tokens 16 --d 8 --m 16 --experts 4 --k 2 "
                                    "--capacity-factor 1.0 --noise-std 1.0",
}


def run(args, expect_rc=None, show=False):
    p = subprocess.run([PY] + args, cwd=HERE, capture_output=True, text=True)
    if show or (expect_rc is not None and p.returncode != expect_rc):
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="write cases/results here and keep them")
    a = ap.parse_args()
    tmp = a.keep or tempfile.mkdtemp(prefix="moe_ref_")
    os.makedirs(tmp, exist_ok=True)
    problems = []

    def expect(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            problems.append(msg)

    p = run(["moe_reference.py", "--selftest"], expect_rc=0)
    expect(p.returncode == 0, "moe_reference.py --selftest")

    for name, args in CASES.items():
        case = os.path.join(tmp, name + ".case.safetensors")
        res = os.path.join(tmp, name + ".result.safetensors")
        p = run(["make_case.py", "--out", case] + args.split(), expect_rc=0)
        info = p.stdout.strip().split(": ", 1)[-1]
        if p.returncode != 0:
            expect(False, f"make_case {name}")
            continue
        t0 = time.time()
        p = run(["moe_reference.py", "--case", case, "--write-result", res], expect_rc=0)
        p = run(["check_result.py", "--case", case, "--result", res], expect_rc=0)
        expect(p.returncode == 0, f"{name}: {info} [{time.time() - t0:.1f} s]")

    # negative / tolerance tests on one case with drops, noise and BPR
    case = os.path.join(tmp, "bpr_noise_drops.case.safetensors")
    base = load_file(os.path.join(tmp, "bpr_noise_drops.result.safetensors"))
    sys.path.insert(0, HERE)
    import moe_reference as ref
    out = ref.forward(ref.load_case(case))
    kept = out["kept"]
    assert (~kept).any(), "the negative tests need a case with drops"

    def variant(label, mutate, want_rc, no_grads=True):
        r = {k: v.copy() for k, v in base.items()}
        mutate(r)
        path = os.path.join(tmp, "variant.result.safetensors")
        save_file(r, path)
        args = ["check_result.py", "--case", case, "--result", path]
        if no_grads:
            args.append("--no-grads")
        p = run(args)
        expect(p.returncode == want_rc, f"variant '{label}' -> exit {p.returncode} (want {want_rc})")

    t, k = map(int, np.argwhere(~kept)[0])
    gate32 = out["gate"].astype(np.float32)

    def dropped_raw(r):
        r["combine_weight"][~kept] = gate32[~kept]

    def renorm(r):
        cw = r["combine_weight"]
        r["combine_weight"] = (cw / np.maximum(cw.sum(axis=1, keepdims=True), 1e-30)).astype(np.float32)

    def slot_backfill(r):
        r["slot"][t, k] = 0

    def scal1(r):
        for n in ("loss.importance", "loss.load", "loss.gshard", "loss.aux_total"):
            r[n] = r[n].reshape(1)

    def idx64(r):
        r["expert_index"] = r["expert_index"].astype(np.int64)
        r["slot"] = r["slot"].astype(np.int64)

    def y_off(r):
        r["y"][3, 2] *= 1.001

    def loss_off(r):
        r["loss.load"] = np.array(r["loss.load"] * 1.001, dtype=np.float32)

    def grad_off(r):
        g = r["grad.router.weight"]
        g[1, 1] += 2e-3 * max(1.0, float(np.abs(g).max()))

    def missing(r):
        del r["loss.gshard"]

    def ei_swap(r):
        r["expert_index"][0] = r["expert_index"][0][::-1].copy()

    variant("reference as written", lambda r: None, 0)
    variant("dropped choices hold the raw gate", dropped_raw, 0)
    variant("loss scalars of shape [1]", scal1, 0)
    variant("int64 expert_index/slot", idx64, 0)
    variant("renormalised combine weights", renorm, 1)
    variant(f"back-filled slot at [{t},{k}]", slot_backfill, 1)
    variant("swapped choice order of token 0", ei_swap, 1)
    variant("y off by 1e-3 relative", y_off, 1)
    variant("loss.load off by 1e-3 relative", loss_off, 1)
    variant("missing loss.gshard", missing, 1)
    variant("grad.router.weight off by 2e-3", grad_off, 1, no_grads=False)

    # compare_results.py (backend against backend): equal files pass, a perturbed y, a
    # changed slot or a missing tensor fail.
    def compare(label, mutate, want_rc):
        r = {k: v.copy() for k, v in base.items()}
        mutate(r)
        path = os.path.join(tmp, "compare.result.safetensors")
        save_file(r, path)
        p = run(["compare_results.py", "--a",
                 os.path.join(tmp, "bpr_noise_drops.result.safetensors"), "--b", path])
        expect(p.returncode == want_rc, f"compare '{label}' -> exit {p.returncode} (want {want_rc})")

    def y_off_1e3(r):
        r["y"] = r["y"] * np.float32(1.001)

    compare("the same result", lambda r: None, 0)
    compare("y scaled by 1.001", y_off_1e3, 1)
    compare(f"slot changed at [{t},{k}]", slot_backfill, 1)
    compare("missing loss.gshard", missing, 1)

    # numpy-only safetensors I/O (hosts without the package): the writer gives the bytes of
    # safetensors + canonicalise_header, the reader the arrays of load_file.
    args = ["--seed", "3", "--tokens", "16", "--experts", "4", "--k", "2", "--d", "8",
            "--m", "16", "--capacity-factor", "0.75", "--bpr", "1", "--group-size", "4",
            "--noise-std", "1.0", "--with-noise"]
    paths = [os.path.join(tmp, f"io{i}.safetensors") for i in (0, 1)]
    for path, numpy_only in zip(paths, ("0", "1")):
        env = dict(os.environ, MOERUN_REF_NUMPY_ONLY=numpy_only)
        subprocess.run([PY, "make_case.py", "--quiet", "--out", path] + args, cwd=HERE,
                       env=env, check=True, capture_output=True)
    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
        expect(f0.read() == f1.read(), "numpy-only make_case.py writes the same bytes")
    # Several dtypes (a result file's F32 and I32, and F64, I64, U8): the package's layout.
    mixed = dict(load_file(os.path.join(tmp, "bpr_noise_drops.result.safetensors")))
    mixed.update({"z_f64": np.arange(3.0), "a_i64": np.arange(2, dtype=np.int64),
                  "m_u8": np.arange(5, dtype=np.uint8)})
    want_path, got_path = (os.path.join(tmp, f"mixed{i}.safetensors") for i in (0, 1))
    save_file(mixed, want_path, metadata={"k": "2", "a": "x"})
    sys.path.insert(0, HERE)
    import make_case  # noqa: E402
    make_case.canonicalise_header(want_path)
    ref.write_safetensors(mixed, got_path, metadata={"k": "2", "a": "x"})
    with open(want_path, "rb") as f0, open(got_path, "rb") as f1:
        expect(f0.read() == f1.read(), "write_safetensors == save_file + canonicalise_header "
                                       "with five dtypes and metadata")
    res = os.path.join(tmp, "bpr_noise_drops.result.safetensors")
    for path in (paths[0], res):
        want = load_file(path)
        got, _ = ref.read_safetensors(path)
        same = sorted(got) == sorted(want) and all(
            got[n].dtype == want[n].dtype and got[n].shape == want[n].shape and
            np.array_equal(got[n], want[n]) for n in want)
        expect(same, f"read_safetensors == load_file on {os.path.basename(path)}")
    with open(res, "rb") as f:
        blob = f.read()
    cut = os.path.join(tmp, "cut.safetensors")
    with open(cut, "wb") as f:
        f.write(blob[:6])
    try:
        ref.read_safetensors(cut)
        expect(False, "read_safetensors refuses a 6-byte file")
    except ValueError as exc:
        expect("too short" in str(exc), f"read_safetensors refuses a 6-byte file ({exc})")

    # exit 77 when numpy cannot be imported (python -S drops site-packages)
    p = subprocess.run([PY, "-S", "-c", "import numpy"], capture_output=True)
    if p.returncode != 0:
        p = subprocess.run([PY, "-S", "check_result.py", "--case", case, "--result", case],
                           cwd=HERE, capture_output=True, text=True)
        expect(p.returncode == 77, f"exit 77 without numpy/safetensors (got {p.returncode})")
    else:
        print("skip exit-77 test (numpy importable without site-packages)")

    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print("selfcheck:", "PASSED" if not problems else f"{len(problems)} FAILED")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
