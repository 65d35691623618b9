#!/usr/bin/env python3
"""Order-0 entropy floors of BF16 weights and the gain of each modelling choice for format v2.

Usage: python scripts/bf16_model_analysis.py [--synth-mib N] [--model path/model.safetensors]
Needs numpy (the bench venv has it: "$(scripts/bench-env)" scripts/bf16_model_analysis.py).

For each data set it prints, as a fraction of the BF16 size (bits / 16), summed per tensor (every
tensor gets its own table, as the codec does):
  exp-only      (8 + H(e)) / 16            the v1 model: exponent coded, sign+mantissa raw
  sign+exp      (7 + H(s,e)) / 16          sign coded with the exponent
  exp+mK        (8 - K + H(e, m_top_K))/16 the K leading mantissa bits coded jointly with (so
                                           conditioned on) the exponent, K = 1, 2, 3
  sign+exp+mK   (7 - K + H(s, e, m_top_K))/16
  whole         H(bits) / 16               the order-0 floor of the whole 16-bit value
and the number of distinct coded symbols (the largest over tensors) for each choice.
"""
import argparse, json, struct
import numpy as np


def ent(counts):
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def choices(v):
    v = v.astype(np.uint32)
    s, e, m = v >> 15, (v >> 7) & 0xFF, v & 0x7F
    out = {}
    out["exp-only"] = (8 + ent(np.bincount(e, minlength=256)), 256)
    h = np.bincount(s << 8 | e, minlength=512)
    out["sign+exp"] = (7 + ent(h), int((h > 0).sum()))
    for k in (1, 2, 3):
        sym = e << k | (m >> (7 - k))
        h = np.bincount(sym)
        out[f"exp+m{k}"] = (8 - k + ent(h), int((h > 0).sum()))
        h = np.bincount(s << (8 + k) | sym)
        out[f"sign+exp+m{k}"] = (7 - k + ent(h), int((h > 0).sum()))
    h = np.bincount(v, minlength=65536)
    out["whole"] = (ent(h), int((h > 0).sum()))
    return out


def report(name, tensors):
    tot = {}
    n_all = 0
    for v in tensors:
        n = len(v)
        n_all += n
        for k, (bits, syms) in choices(v).items():
            b, sy = tot.get(k, (0.0, 0))
            tot[k] = (b + bits * n, max(sy, syms))
    print(f"## {name}: {len(tensors)} tensors, {n_all} weights")
    for k, (b, sy) in tot.items():
        print(f"  {k:14s} ratio {b / n_all / 16:.5f}  bits/w {b / n_all:.4f}  max symbols {sy}")
    return {k: b / n_all / 16 for k, (b, _) in tot.items()}


def f32_to_bf16(x):
    b = x.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def safetensors_bf16(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        base = 8 + n
        out = []
        for name, t in hdr.items():
            if name == "__metadata__" or t["dtype"] != "BF16" or len(t["shape"]) < 2:
                continue
            a, b = t["data_offsets"]
            f.seek(base + a)
            out.append(np.frombuffer(f.read(b - a), dtype="<u2"))
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth-mib", type=int, default=64)
    ap.add_argument("--model", default=".cache/smollm2/model.safetensors")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.02, a.synth_mib << 19).astype(np.float32)
    report(f"N(0, 0.02) bf16, {a.synth_mib} MiB", [f32_to_bf16(x)])
    report(f"{a.model} (BF16 matrices)", safetensors_bf16(a.model))
