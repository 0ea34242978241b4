#!/usr/bin/env python3
"""Interop of runtime/safetensors with the official Python `safetensors` and `numpy` packages.

Usage: safetensors_interop.py PATH/TO/safetensors_tool

(a) `safetensors_tool write` makes a file; the official package loads it and every value,
    dtype, shape and metadata entry is checked exactly. numpy has no bfloat16, so the BF16
    tensor is checked through the official reader's slice API (dtype, shape) and by decoding
    its raw bytes at the offsets the header gives.
(b) `safetensors.numpy.save_file` writes float32 / int32 / int64 / float64 arrays (a 0-d
    scalar and an empty array among them) plus metadata; `safetensors_tool read` prints what
    it finds, and names, dtypes, shapes, sums and metadata are checked.

Exit codes: 0 all checks passed, 1 a check failed, 77 numpy or safetensors cannot be
imported (CTest's SKIP_RETURN_CODE).
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import safetensors
    import safetensors.numpy
    from safetensors import safe_open
except ImportError as e:
    print(f"safetensors_interop: skipped: {e} (install with: python3 -m pip install safetensors numpy)")
    sys.exit(77)

checks = 0
failures = []


def check(condition, what):
    global checks
    checks += 1
    if not condition:
        failures.append(what)
        print(f"FAIL: {what}")


def run_tool(tool, *args):
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"FAIL: {tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        sys.exit(1)
    return proc.stdout


def bf16_to_float32(raw):
    """Decodes little-endian bf16 bytes: each is the upper half of an IEEE float32."""
    bits = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
    return bits.view("<f4")


def check_our_file(tool, path):
    run_tool(tool, "write", path)
    with open(path, "rb") as f:
        raw = f.read()

    # The layout itself: header length, padding to 8 bytes, data section filled exactly.
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    check(n % 8 == 0, f"(a) header length {n} is a multiple of 8")
    check(raw[8 : 8 + n].rstrip(b" ").endswith(b"}"), "(a) header padded with spaces only")
    expected_entries = {
        "bf16": ("BF16", [2]),
        "f32": ("F32", [2, 3]),
        "i32": ("I32", [4]),
    }
    check(sorted(k for k in header if k != "__metadata__") == sorted(expected_entries),
          f"(a) header names: {sorted(header)}")
    for name, (dtype, shape) in expected_entries.items():
        entry = header.get(name, {})
        check(entry.get("dtype") == dtype and entry.get("shape") == shape,
              f"(a) header entry {name}: {entry}")

    # The official reader: metadata, names, and every non-bf16 tensor through numpy.
    with safe_open(path, framework="numpy") as f:
        check(f.metadata() == {"k": "2", "name": "test"}, f"(a) metadata: {f.metadata()}")
        check(sorted(f.keys()) == ["bf16", "f32", "i32"], f"(a) keys: {list(f.keys())}")
        bf16 = f.get_slice("bf16")
        check(bf16.get_dtype() == "BF16", f"(a) bf16 dtype through get_slice: {bf16.get_dtype()}")
        check(list(bf16.get_shape()) == [2], f"(a) bf16 shape through get_slice: {bf16.get_shape()}")
        numpy_tensors = {k: f.get_tensor(k) for k in ("f32", "i32")}
    try:
        # Loads everything when this numpy understands bfloat16 (it usually does not).
        loaded = safetensors.numpy.load_file(path)
        numpy_tensors = {k: v for k, v in loaded.items() if k != "bf16"}
        print("(a) safetensors.numpy.load_file loaded the whole file")
    except TypeError as e:
        print(f"(a) safetensors.numpy.load_file: {e}; the bf16 tensor is checked from raw bytes")

    f32 = numpy_tensors["f32"]
    check(f32.dtype == np.float32 and f32.shape == (2, 3), f"(a) f32 is {f32.dtype} {f32.shape}")
    check(np.array_equal(f32, np.arange(6, dtype=np.float32).reshape(2, 3)), f"(a) f32 values {f32}")
    i32 = numpy_tensors["i32"]
    check(i32.dtype == np.int32 and i32.shape == (4,), f"(a) i32 is {i32.dtype} {i32.shape}")
    check(np.array_equal(i32, np.array([10, 11, 12, 13], dtype=np.int32)), f"(a) i32 values {i32}")

    # bf16: the bytes at the header's offsets are 1.5 = 0x3fc0 and -2.0 = 0xc000.
    begin, end = header["bf16"]["data_offsets"]
    bf16_raw = raw[8 + n + begin : 8 + n + end]
    check(bf16_raw == bytes.fromhex("c03f00c0"), f"(a) bf16 bytes {bf16_raw.hex()}")
    check(list(bf16_to_float32(bf16_raw)) == [1.5, -2.0], "(a) bf16 values")
    if hasattr(safetensors, "deserialize"):  # the official parser's view of the raw bytes
        by_name = {name: t for name, t in safetensors.deserialize(raw)}
        check(bytes(by_name["bf16"]["data"]) == bf16_raw, "(a) bf16 bytes via deserialize")


def check_their_file(tool, path):
    arrays = {
        "weight": np.arange(12, dtype=np.float32).reshape(3, 4) * 0.25 - 1.0,  # sum 4.5
        "ids": np.array([-7, 0, 3, 2**31 - 1, -(2**31)], dtype=np.int32),
        "step": np.array([2**40, -3, 2**33 + 1], dtype=np.int64).reshape(3, 1),
        "scale": np.array(0.1, dtype=np.float64),  # 0-d
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    metadata = {"format": "np", "epoch": "3"}
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
    names = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64", np.dtype(np.float64): "F64"}

    lines = [json.loads(line) for line in run_tool(tool, "read", path).splitlines()]
    tensors = [l for l in lines if "tensor" in l]
    meta = {l["metadata"]: l["value"] for l in lines if "metadata" in l}
    check([t["tensor"] for t in tensors] == sorted(arrays),
          f"(b) names in order: {[t['tensor'] for t in tensors]}")
    for t in tensors:
        a = arrays.get(t["tensor"])
        if a is None:
            continue
        want_sum = float(np.sum(a, dtype=np.float64))
        check(t["dtype"] == names[a.dtype], f"(b) {t['tensor']} dtype {t['dtype']}")
        check(t["shape"] == list(a.shape), f"(b) {t['tensor']} shape {t['shape']}")
        check(t["sum"] == want_sum, f"(b) {t['tensor']} sum {t['sum']}, expected {want_sum}")
    check(meta == metadata, f"(b) metadata {meta}")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    tool = sys.argv[1]
    print(f"safetensors {safetensors.__version__}, numpy {np.__version__}, {sys.executable}")
    with tempfile.TemporaryDirectory() as tmp:
        check_our_file(tool, os.path.join(tmp, "ours.safetensors"))
        check_their_file(tool, os.path.join(tmp, "theirs.safetensors"))
    print(f"safetensors_interop: {checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
