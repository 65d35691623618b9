#!/usr/bin/env python3
"""Benchmark ZipNN (IBM's lossless compressor) on a raw little-endian BF16 buffer: the baseline
unweight is compared against. Run it with the bench venv's python (made by scripts/bench-env):

    "$(scripts/bench-env)" scripts/zipnn_bench.py --input weights.bf16 --threads 2 [--repeats 3]

ZipNN is configured the way it handles bf16 itself: input_format="byte",
bytearray_dtype="bfloat16" (its bf16 path: sign bit moved next to the mantissa, the two bytes of
each value grouped into two streams, each compressed in 256 KiB chunks with Huffman/FSE, or
stored raw where that does not pay), method AUTO, threads=N for both compression and
decompression. Each repeat compresses a fresh copy of the input (ZipNN's compress() overwrites
the buffer it is given; the copy is not timed) and decompresses the result with a new ZipNN
object; every round trip must be byte-identical, else exit 1. Prints one JSON object:
zipnn_version, threads, input_bytes, compressed_bytes, ratio (compressed/input), compress_gbps,
decompress_gbps, where GB/s = input bytes / best-of-R seconds / 1e9.

No torch needed: the zipnn Python module imports torch and safetensors.torch at the top for its
tensor helpers only; when they are not installed an inert stand-in is registered for the import
(the bytes path never touches torch; all the work runs in ZipNN's C extension zipnn_core).
"""
import argparse
import json
import sys
import time
import types


def _install_torch_standin():
    """Let `import zipnn` succeed without torch. Returns True if a stand-in was installed."""
    try:
        import torch  # noqa: F401
        return False
    except ImportError:
        pass

    class _Sentinel:
        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return f"<torch stand-in {self.name}>"

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.name} called: torch is not installed in this venv")

    class _TorchStandin(types.ModuleType):
        def __getattr__(self, name):  # torch.float32, torch.Tensor, ...: distinct sentinels
            if name.startswith("__"):
                raise AttributeError(name)
            value = _Sentinel(f"torch.{name}")
            setattr(self, name, value)
            return value

    torch = _TorchStandin("torch")
    torch.__version__ = "0+standin"
    jit = types.ModuleType("torch.jit")
    jit.script = lambda fn=None, *a, **k: fn  # @torch.jit.script becomes a no-op
    torch.jit = jit
    st_torch = types.ModuleType("safetensors.torch")
    st_torch.safe_open = _Sentinel("safetensors.torch.safe_open")
    sys.modules.update({"torch": torch, "torch.jit": jit, "safetensors.torch": st_torch})
    if "safetensors" not in sys.modules:
        try:
            import safetensors  # noqa: F401
        except ImportError:
            st = types.ModuleType("safetensors")
            st.__path__ = []
            st.torch = st_torch
            sys.modules["safetensors"] = st
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="raw little-endian bf16 bytes")
    ap.add_argument("--threads", type=int, required=True, help="ZipNN threads (>= 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; best is reported")
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")

    _install_torch_standin()
    from importlib.metadata import version

    from zipnn import ZipNN

    with open(args.input, "rb") as f:
        original = f.read()
    n = len(original)
    if n == 0 or n % 2:
        print(f"zipnn_bench: {args.input}: {n} bytes is not a whole number of bf16 values",
              file=sys.stderr)
        return 2

    def make():
        return ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=args.threads)

    best_c = best_d = float("inf")
    compressed_bytes = None
    for r in range(args.repeats):
        buf = bytearray(original)  # compress() overwrites its input: fresh copy, not timed
        zc = make()
        t0 = time.perf_counter()
        comp = zc.compress(buf)
        t1 = time.perf_counter()
        del buf
        comp = bytes(comp)
        if compressed_bytes is not None and len(comp) != compressed_bytes:
            print(f"zipnn_bench: compressed size changed between repeats "
                  f"({compressed_bytes} -> {len(comp)})", file=sys.stderr)
            return 1
        compressed_bytes = len(comp)

        zd = make()
        t2 = time.perf_counter()
        out = zd.decompress(comp)
        t3 = time.perf_counter()
        if len(out) != n or memoryview(out) != memoryview(original):
            print(f"zipnn_bench: round trip {r} is NOT byte-identical "
                  f"({len(out)} bytes back for {n})", file=sys.stderr)
            return 1
        del out, comp
        best_c = min(best_c, t1 - t0)
        best_d = min(best_d, t3 - t2)

    print(json.dumps({
        "zipnn_version": version("zipnn"),
        "threads": args.threads,
        "input_bytes": n,
        "compressed_bytes": compressed_bytes,
        "ratio": compressed_bytes / n,
        "compress_gbps": n / best_c / 1e9,
        "decompress_gbps": n / best_d / 1e9,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
