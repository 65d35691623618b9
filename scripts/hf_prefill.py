#!/usr/bin/env python3
"""Prefill speed of Hugging Face transformers on the CPU, the reference `unweight bench decode
--prefill` is compared against. Run it with the reference venv's python (scripts/reference-env):

    "$(scripts/reference-env)" scripts/hf_prefill.py --model DIR --lengths 128,512,2048 --threads 2

For each dtype (float32, then bfloat16) and each prompt length, one forward pass over the prompt
with the KV cache on and logits for the last position only (`logits_to_keep=1`, what prefill
needs), after one untimed warm-up pass; best of --repeats. The prompt is the same pseudo-random
token sequence `unweight bench decode --prefill` uses: token i = (i * 2654435761 + 17) % vocab.
Prints one JSON object: torch_version, transformers_version, threads, and per dtype a map from
prompt length to prefill tokens/s.
"""
import argparse
import json
import time


def prompt(length, vocab):
    return [(i * 2654435761 + 17) % vocab for i in range(length)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", required=True, help="comma-separated prompt lengths")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    result = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": args.threads,
    }
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model.eval()
        vocab = model.config.vocab_size
        speeds = {}
        with torch.inference_mode():
            model(torch.tensor([prompt(16, vocab)]), use_cache=True, logits_to_keep=1)
            for length in lengths:
                ids = torch.tensor([prompt(length, vocab)])
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    model(ids, use_cache=True, logits_to_keep=1)
                    best = min(best, time.perf_counter() - t)
                speeds[str(length)] = length / best
        result[name] = speeds
        del model
    print(json.dumps(result))


if __name__ == "__main__":
    main()
