"""Serve throughput and latency: the deployed app under 1, 8 and 32 concurrent clients vs one-at-a-time generate().

    python benchmarks/serve.py                      # tiny model on CPU, through Ray Serve over HTTP
    python benchmarks/serve.py --target engine      # the batching engine in-process (no Ray, no HTTP)
    python benchmarks/serve.py --model PATH --use-gpu [--engine vllm]   # a ~1B model on a GPU
    python benchmarks/serve.py --target fairness    # a small request's latency while a huge one runs

The reference (``generate()`` one request at a time, the way a naive server answers) runs in the same
process and run, with the same prompts, sampling and token budget. Output tokens/s counts generated tokens
over wall time; latency is per request, from sending to the last token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["Give three tips for staying healthy.", "Describe the water cycle.", "Write a haiku about autumn.",
           "Explain what a neural network is.", "List five fruits.", "Summarize the plot of a heist movie."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def row(name: str, clients: int, tokens: int, wall: float, latencies: list[float]) -> dict:
    return {"name": name, "clients": clients, "requests": len(latencies), "tokens": tokens,
            "tok_s": tokens / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def reference_generate(model_path: str, device: str, requests: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_ray.prompts import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    latencies, tokens = [], 0
    warm = tokenizer("warm up", return_tensors="pt").to(device)
    model.generate(**warm, max_new_tokens=4, pad_token_id=tokenizer.eos_token_id)  # first-call costs not timed
    started = time.perf_counter()
    for i in range(requests):
        begin = time.perf_counter()
        ids = tokenizer(format_prompt(PROMPTS[i % len(PROMPTS)]), return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, temperature=1.0, max_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        latencies.append(time.perf_counter() - begin)
    return row("generate(), one at a time", 1, tokens, time.perf_counter() - started, latencies)


async def load(send, clients: int, requests: int) -> tuple[int, float, list[float]]:
    """``requests`` calls of ``send(i) -> tokens`` with ``clients`` in flight at once."""
    semaphore = asyncio.Semaphore(clients)
    latencies: list[float] = []

    async def one(i: int) -> int:
        async with semaphore:
            begin = time.perf_counter()
            count = await send(i)
            latencies.append(time.perf_counter() - begin)
            return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(counts), time.perf_counter() - started, latencies


def bench_engine(args, levels: list[int]) -> list[dict]:
    from alpaca_ray.prompts import format_prompt
    from alpaca_ray.serve.engine import SamplingParams, TransformersEngine

    engine = TransformersEngine(args.model, device="cuda" if args.use_gpu else "cpu", max_batch_size=args.max_batch_size)

    async def send(i: int) -> int:
        tokens = 0
        async for delta in engine.generate(format_prompt(PROMPTS[i % len(PROMPTS)]),
                                           SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i)):
            tokens = delta.completion_tokens
        return tokens

    asyncio.run(load(send, 1, 1))  # warm-up, not timed
    results = []
    for clients in levels:
        tokens, wall, latencies = asyncio.run(load(send, clients, max(args.requests, 2 * clients)))
        results.append(row("engine (in-process)", clients, tokens, wall, latencies))
    return results


def bench_serve(args, levels: list[int]) -> list[dict]:
    import openai
    import ray
    from ray import serve

    from alpaca_ray.serve.app import deploy
    from alpaca_ray.serve.config import ServeConfig
    from tests.support.ray_head import free_port

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = ServeConfig(model=args.model, port=free_port(), app_name="bench", use_gpu=args.use_gpu,
                         engine=args.engine, max_batch_size=args.max_batch_size, content_filter="none",
                         reports_db=os.path.join(tempfile.mkdtemp(), "r.db"), max_ongoing_requests=256)
    url = deploy(config)
    results = []
    try:
        for clients in [0, *levels]:  # 0: a warm-up round, not reported
            async def run(clients=clients):
                async with openai.AsyncOpenAI(base_url=url + "v1", api_key="x", max_retries=0, timeout=600) as client:
                    async def send(i: int) -> int:
                        reply = await client.chat.completions.create(
                            model=config.model_id, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                            max_tokens=args.max_tokens, temperature=1.0, seed=i)
                        return reply.usage.completion_tokens
                    return await load(send, max(clients, 1), max(args.requests, 2 * clients) if clients else 2)

            tokens, wall, latencies = asyncio.run(run())
            if clients:
                results.append(row(f"Ray Serve app ({config.engine}, HTTP)", clients, tokens, wall, latencies))
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def bench_fairness(args) -> None:
    """A 4-token request alone, then while one request of 100 prompts x n=16 x 64 tokens runs (HTTP)."""
    import statistics

    import httpx
    import ray
    from ray import serve

    from alpaca_ray.serve.app import deploy
    from alpaca_ray.serve.config import ServeConfig
    from tests.support.ray_head import free_port

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = ServeConfig(model=args.model, port=free_port(), app_name="bench-fair", content_filter="none",
                         max_batch_size=args.max_batch_size, max_sequences_per_request=1600,
                         reports_db=os.path.join(tempfile.mkdtemp(), "r.db"))
    url = deploy(config)
    small = {"model": config.model_id, "prompt": "Name a color.", "max_tokens": 4, "temperature": 0.0}
    big = {"model": config.model_id, "prompt": [f"Story {i}:" for i in range(100)], "n": 16, "max_tokens": 64,
           "temperature": 1.0, "seed": 1}

    async def timed(client) -> float:
        begin = time.perf_counter()
        response = await client.post(url + "v1/completions", json=small)
        response.raise_for_status()
        return time.perf_counter() - begin

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            for _ in range(3):
                await timed(client)  # warm-up
            alone = [await timed(client) for _ in range(args.fair_samples)]
            begin = time.perf_counter()
            task = asyncio.create_task(client.post(url + "v1/completions", json=big))
            await asyncio.sleep(2.0)  # the big request is decoding by now
            loaded = []
            while not task.done() and len(loaded) < args.fair_samples:
                loaded.append(await timed(client))
            response = await task
            return alone, loaded, time.perf_counter() - begin, response.status_code

    try:
        alone, loaded, big_wall, status = asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    ratio = statistics.median(loaded) / statistics.median(alone)
    print(f"\nmodel: {args.model} | max_batch_size {args.max_batch_size} | load average {os.getloadavg()[0]:.1f} "
          f"(1 min) on {os.cpu_count()} CPUs\n")
    print("| small request (4 tokens) | samples | median latency (s) | max (s) |")
    print("|---|---:|---:|---:|")
    print(f"| alone | {len(alone)} | {statistics.median(alone):.3f} | {max(alone):.3f} |")
    print(f"| while 100 prompts x n=16 x 64 tokens run | {len(loaded)} | {statistics.median(loaded):.3f} | "
          f"{max(loaded):.3f} |")
    print(f"\nloaded / alone (median): {ratio:.2f}x (target: <= 2x); the big request took {big_wall:.1f}s "
          f"(HTTP {status})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir or hub name (default: a tiny model made in a temp dir)")
    parser.add_argument("--target", choices=("serve", "engine", "fairness"), default="serve")
    parser.add_argument("--fair-samples", type=int, default=10, help="small requests timed per phase (fairness)")
    parser.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="transformers")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least 2x clients)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    if not args.model:
        from alpaca_ray.tiny import make_tiny_model

        args.model = make_tiny_model(tempfile.mkdtemp())
    if args.target == "fairness":
        bench_fairness(args)
        return
    reference = reference_generate(args.model, "cuda" if args.use_gpu else "cpu", args.requests, args.max_tokens)
    results = bench_serve(args, args.levels) if args.target == "serve" else bench_engine(args, args.levels)
    print(f"\nmodel: {args.model} | device: {'GPU' if args.use_gpu else 'CPU'} | max_tokens {args.max_tokens}, "
          f"temperature 1.0 | CPU count {os.cpu_count()}\n")
    print("| setup | clients | requests | output tokens | tokens/s | p50 latency (s) | p99 latency (s) | vs reference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in [reference, *results]:
        print(f"| {r['name']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.0f} | "
              f"{r['p50']:.3f} | {r['p99']:.3f} | {r['tok_s'] / reference['tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
