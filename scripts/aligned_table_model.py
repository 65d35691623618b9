#!/usr/bin/env python3
"""What an L1-sized decoding table would cost format v2: a model, not a codec.

Usage: "$(scripts/bench-env)" scripts/aligned_table_model.py [--mib N] [--prob-bits 15]

Format v2 decodes a symbol by gathering one u64 per lane from a table of 2^15 slots (256 KiB,
L2). A *coarse* table of 2^prob_bits / B entries (B slots per entry) fits L1, but only blocks of
B slots that one symbol covers whole can be answered from it; a lane whose slot falls in a mixed
block needs the full table. The encoder can make every block pure except in a tail region: give
the R most probable symbols frequencies in multiples of B (their cumulative starts are then
multiples of B too, since ranks are coded in decreasing order) and the rest any frequency, in a
tail of T slots. This script finds, for each B, the split (R, T) with the least coded size, and
prints what it costs against the unconstrained quantisation (`dratio`, in units of the BF16
size, 5 raw bits per weight included) and how often a decoding step of 32 lanes would need the
full table (`step_hit`: some lane draws a tail symbol), for the largest R whose cost stays small.

The quantiser is a greedy one like the codec's (src/codec/freq.rs): every present symbol gets at
least one unit, then units go where they save the most bits. docs/format.md §5.1 has the
numbers and the conclusion (the tail is too heavy for the coarse table to pay).
"""
import argparse
import heapq
import math

import numpy as np


def quant(counts, total):
    """Frequencies >= 1 summing to `total` that minimise the coded size, greedily."""
    n = len(counts)
    if total < n:
        return None
    f = np.maximum(1, np.floor(counts / counts.sum() * total)).astype(np.int64)
    d = int(total - f.sum())
    heap = [(-(counts[i] * math.log2((f[i] + 1) / f[i])), i) for i in range(n)]
    heapq.heapify(heap)
    while d > 0:
        _, i = heapq.heappop(heap)
        f[i] += 1
        d -= 1
        heapq.heappush(heap, (-(counts[i] * math.log2((f[i] + 1) / f[i])), i))
    while d < 0:
        loss, i = min((counts[i] * math.log2(f[i] / (f[i] - 1)), i) for i in range(n) if f[i] > 1)
        f[i] -= 1
        d += 1
    return f


def coded_bits(counts, f, pb):
    return float((counts * (pb - np.log2(f))).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=32, help="MiB of N(0, 0.02) BF16")
    ap.add_argument("--prob-bits", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(a.mib << 19) * 0.02).astype(np.float32).view(np.uint32)
    bf16 = ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint32)  # round to nearest even
    keys = (bf16 >> 4) & 0x7FF  # exponent and 3 leading mantissa bits: v2's symbol
    h = np.bincount(keys, minlength=2048).astype(np.float64)
    c = np.sort(h[h > 0])[::-1]  # ranks, by decreasing count
    n, pb = c.sum(), a.prob_bits
    slots = 1 << pb
    base = coded_bits(c, quant(c, slots), pb) / n
    print(f"{a.mib} MiB of N(0, 0.02): {len(c)} symbols, {pb}-bit probabilities, "
          f"unconstrained {base:.5f} bits per symbol, ratio {(base + 5) / 16:.5f}")
    for b in (16, 32, 64, 128):
        ideal = c / n * slots
        rows = []
        for r in range(1, len(c)):
            if ideal[r - 1] < b:
                break
            head, tail = c[:r], c[r:]
            t0 = int(ideal[r:].sum() / b) * b
            best = None
            for t in range(max(b, t0 - 2 * b), t0 + 3 * b, b):
                fh, ft = quant(head, (slots - t) // b), quant(tail, t)
                if fh is None or ft is None:
                    continue
                bits = coded_bits(head, fh * b, pb) + coded_bits(tail, ft, pb)
                if best is None or bits < best[0]:
                    best = (bits, t)
            if best:
                p = tail.sum() / n
                rows.append((r, best[1], p, (best[0] / n - base) / 16))
        for r, t, p, dr in rows[-4:]:
            print(f"B={b:3d} (coarse table {slots // b} entries) head ranks {r:3d} tail {t:5d} slots: "
                  f"tail mass {p:.3%}, step_hit {1 - (1 - p) ** 32:.1%}, dratio {dr:+.6f}")


if __name__ == "__main__":
    main()
