#!/usr/bin/env python3
"""Prefill timing of Hugging Face transformers on the CPU, the reference `unweight bench decode
--prefill --hf-python PY` is compared against. The bench starts it with the reference venv's
python (scripts/reference-env) and talks to it over stdin/stdout, so that its runs and ours
alternate in the same minutes (a change in the machine's load hits both alike):

    "$(scripts/reference-env)" scripts/hf_prefill.py --model DIR --threads 2

It loads the model in float32 and in bfloat16, runs one untimed warm-up pass of each, and prints
one JSON line: {"ready": true, "torch_version", "transformers_version", "threads"}. Then, for every
line `DTYPE LENGTH` it reads (DTYPE float32 or bfloat16), it runs one forward pass over that
prompt with the KV cache on and logits for the last position only (`logits_to_keep=1`, what
prefill needs) and prints {"seconds": S}; a line it cannot serve gets {"error": "..."}. It exits
at the end of its input. The prompt is the same pseudo-random token sequence `unweight bench
decode --prefill` uses: token i = (i * 2654435761 + 17) % vocab.
"""
import argparse
import json
import sys
import time


def prompt(length, vocab):
    return [(i * 2654435761 + 17) % vocab for i in range(length)]


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    models = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model.eval()
        with torch.inference_mode():
            model(torch.tensor([prompt(16, model.config.vocab_size)]), use_cache=True,
                  logits_to_keep=1)
        models[name] = model
    reply({
        "ready": True,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": args.threads,
    })
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] not in models or not parts[1].isdigit() or int(parts[1]) < 1:
            reply({"error": f"expected `float32|bfloat16 LENGTH`, got {line.strip()!r}"})
            continue
        model = models[parts[0]]
        ids = torch.tensor([prompt(int(parts[1]), model.config.vocab_size)])
        with torch.inference_mode():
            t = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - t
        reply({"seconds": seconds})


if __name__ == "__main__":
    main()
