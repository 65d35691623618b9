#!/usr/bin/env python3
"""Stream tokens from the unweight_llama model over Triton's gRPC API and print them as they come.

    pip install "tritonclient[grpc]"
    python3 examples/stream_client.py "What is the capital of France?" --max-tokens 64

A sketch: it follows the request/response contract of docs/triton.md and was run here only
against a mock of Triton's gRPC service, never against a live tritonserver with this backend.

Every tensor carries the batch dimension of 1 that `max_batch_size: 1` asks for ([[x]]). Each
streamed response holds the new text (`text_output`, possibly empty while a character or a
possible stop word is incomplete); the last one is flagged final and carries `finish_reason`.
"""

import argparse
import queue
import sys
import time
from functools import partial

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def scalar(name, value, dtype, triton_type):
    t = grpcclient.InferInput(name, [1, 1], triton_type)
    t.set_data_from_numpy(np.array([[value]], dtype=dtype))
    return t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint")
    p.add_argument("--model", default="unweight_llama")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a response")
    args = p.parse_args()

    inputs = [
        scalar("text_input", args.prompt.encode("utf-8"), np.object_, "BYTES"),
        scalar("max_tokens", args.max_tokens, np.int32, "INT32"),
        scalar("stream", True, np.bool_, "BOOL"),
        scalar("temperature", args.temperature, np.float32, "FP32"),
    ]
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "finish_reason")]

    responses = queue.Queue()  # (result, error) from the client's stream thread
    client = grpcclient.InferenceServerClient(url=args.url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), responses))
    start = time.monotonic()
    first = None
    count = 0
    finish_reason = None
    try:
        client.async_stream_infer(
            args.model, inputs, outputs=outputs, enable_empty_final_response=True
        )
        while True:
            result, error = responses.get(timeout=args.timeout)
            if error is not None:
                raise error
            text = result.as_numpy("text_output")
            if text is not None and text.size:
                first = first or time.monotonic()
                count += 1
                sys.stdout.write(b"".join(text.flatten()).decode("utf-8"))
                sys.stdout.flush()
            reason = result.as_numpy("finish_reason")
            if reason is not None and reason.size and reason.flatten()[0]:
                finish_reason = reason.flatten()[0].decode("utf-8")
            params = result.get_response().parameters
            if params["triton_final_response"].bool_param:
                break
    except InferenceServerException as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except queue.Empty:
        print(f"\nerror: no response within {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        client.stop_stream()
        client.close()

    elapsed = time.monotonic() - start
    ttft = f"{first - start:.3f} s" if first else "-"
    print(f"\n[{count} responses in {elapsed:.2f} s, first after {ttft}, finish: {finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
