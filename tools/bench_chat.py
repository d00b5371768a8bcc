"""Generation speed of the embedded model, and the server's throughput under 16 concurrent requests.

    python tools/bench_chat.py [--tokens 128] [--requests 16]

Part 1: tokens/s of greedy generation (one conversation, the `tuner chat` path) with the
weights in fp32, in bf16, and in 4-bit NF4 (bitsandbytes); the reply is forced to run its
full length so each dtype generates the same number of tokens.
Part 2: the OpenAI-compatible server on loopback, driven by the `openai` client:
`--requests` different prompts sent one after another, then all at once; prints the
total completion tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tuner.config import EMBEDDED_MODEL
from tuner.generation.generate import GenerationSettings, Generator
from tuner.generation.load import load_chat_model

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def generation_speed(torch_dtype: str, bits: int | None, tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(tokens/s, seconds to the first token), median of `repeats` runs after a warm-up."""
    model, tokenizer, compute = load_chat_model(EMBEDDED_MODEL, torch_dtype=torch_dtype, bits=bits)
    # No stop words: every run generates exactly `tokens` tokens.
    generator = Generator(model, tokenizer, compute_dtype=compute)
    generator.stop_words = ()
    prompt = generator.prompt_ids(PROMPT)
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
    speeds, firsts = [], []
    for run in range(repeats + 1):
        started, first = time.perf_counter(), []
        reply = generator.generate([prompt], settings, on_text=[lambda _: first or first.append(time.perf_counter())])[0]
        elapsed = time.perf_counter() - started
        if run:  # the first run warms up kernels and caches
            speeds.append(reply.completion_tokens / elapsed)
            firsts.append((first[0] if first else time.perf_counter()) - started)
    return statistics.median(speeds), statistics.median(firsts)


def server_throughput(requests: int, tokens: int) -> tuple[float, float, list[int]]:
    import openai

    from tuner.serve.api import Api, make_server

    model, tokenizer, compute = load_chat_model(EMBEDDED_MODEL, torch_dtype="auto")
    api = Api(Generator(model, tokenizer, compute_dtype=compute), "m", None, max_new_tokens=tokens)
    server = make_server(api, "127.0.0.1", 0, page=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
    prompts = [f"Write a short story about the number {i}." for i in range(requests)]

    def ask(prompt: str) -> int:
        response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=tokens)
        return response.usage.completion_tokens

    ask(prompts[0])  # warm-up
    started = time.perf_counter()
    sequential = sum(ask(p) for p in prompts) / (time.perf_counter() - started)
    before = len(api.engine.batches)
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        concurrent = sum(pool.map(ask, prompts)) / (time.perf_counter() - started)
    server.shutdown()
    return sequential, concurrent, api.engine.batches[before:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {EMBEDDED_MODEL}\n")
    print(f"Generation, 1 conversation, {args.tokens} new tokens, greedy:")
    print(f"{'weights':<10} {'tokens/s':>9} {'first token':>12}")
    for label, dtype, bits in (("fp32", "fp32", None), ("bf16", "bf16", None), ("4-bit NF4", "auto", 4)):
        speed, first = generation_speed(dtype, bits, args.tokens)
        print(f"{label:<10} {speed:>9.1f} {first * 1000:>10.0f}ms", flush=True)
    sequential, concurrent, batches = server_throughput(args.requests, 64)
    print(f"\nServer, {args.requests} chat requests of up to 64 tokens (bf16 autocast where the CPU has it):")
    print(f"  one after another: {sequential:.1f} completion tokens/s")
    print(f"  all at once:       {concurrent:.1f} completion tokens/s  (batches: {batches})")
    print(f"  ratio:             {concurrent / sequential:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
