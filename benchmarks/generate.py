"""Generate-stage benchmark: request concurrency on Ray Data, and the driver's cost at Alpaca's scale.

1. Concurrency. A stand-in teacher (a real local OpenAI-protocol server) answers each request after a
   fixed latency. The same generation runs with one request in flight (the reference: sequential calls)
   and with the Ray Data worker pool (workers x requests per worker in flight); both on the same local
   Ray cluster, in the same run. Printed: wall time of the requests and the speed-up.
2. Driver throughput. A journal of teacher answers about the size of Alpaca's run (3,500 answers,
   ~52K parsed tasks) is rebuilt with ``--reprocess`` (parse, filter, exact ROUGE-L dedup, write):
   the work the driver does live, here with no network at all.

    python benchmarks/generate.py [--latency 0.5] [--requests 32] [--responses 3500]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.generate import GenerateConfig, generate  # noqa: E402
from alpaca_ray.generate.prompt import encode_prompt  # noqa: E402
from alpaca_ray.generate.seed_tasks import read_seed_tasks  # noqa: E402
from alpaca_ray.llm_client import RawJournal  # noqa: E402
from alpaca_ray.openai_server import OpenAIServer  # noqa: E402
from tests.support.generate_teacher import SelfInstructTeacher  # noqa: E402


def timed_generation(workdir: str, name: str, base_url: str, target: int, workers: int, per_worker: int) -> tuple[float, dict]:
    config = GenerateConfig(output=os.path.join(workdir, name), target=target, teacher_model="teacher",
                            teacher_base_url=base_url, api_key_env="", num_workers=workers,
                            requests_per_worker=per_worker, requests_per_minute=0, tokens_per_minute=0,
                            expected_kept_per_request=10.0, max_requests_per_round=10_000, progress=False)
    start = time.perf_counter()
    stats = generate(config)
    return time.perf_counter() - start, stats


def concurrency(workdir: str, latency: float, requests: int, workers: int, per_worker: int) -> list[tuple]:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    target = requests * 10  # the stand-in teacher's answers keep 10 tasks each: one round of `requests`
    rows = []
    with OpenAIServer(SelfInstructTeacher(good_tasks=10, delay_s=latency), models=["teacher"]) as server:
        timed_generation(workdir, "warmup", server.base_url, 10, 1, 1)  # imports and first actors, not timed
        for label, w, p in (("sequential (reference)", 1, 1), (f"{workers} workers x {per_worker} in flight", workers,
                                                                 per_worker)):
            seconds, stats = timed_generation(workdir, label.split()[0], server.base_url, target, w, p)
            rows.append((label, stats["total"]["responses"], seconds))
    return rows


def reprocess(workdir: str, responses: int) -> tuple[int, int, float]:
    output = os.path.join(workdir, "reprocess")
    seeds = read_seed_tasks(GenerateConfig(output="x", target=1).seed_tasks)
    teacher = SelfInstructTeacher(good_tasks=12)
    journal = RawJournal(os.path.join(output, "raw", "bench.jsonl"))
    rng = random.Random(0)
    lines = []
    for number in range(responses):
        prompt = encode_prompt(rng.sample(seeds, 3))
        text = teacher.answer_text(4, random.Random(number))
        lines.append({"request_id": f"bench-{number:06d}", "time": float(number), "model": "teacher",
                      "api": "completions", "prompt": prompt, "seed_task_ids": ["a", "b", "c"], "text": text,
                      "finish_reason": "stop", "usage": {"prompt_tokens": 900, "completion_tokens": 1100}})
    os.makedirs(os.path.dirname(journal.path), exist_ok=True)
    import json

    with open(journal.path, "w", encoding="utf-8") as handle:  # written at once: the fsync per line is not measured
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    start = time.perf_counter()
    stats = generate(GenerateConfig(output=output, target=None, reprocess=True, teacher_model="gpt-4o-mini",
                                    progress=False))
    return responses, stats["total"]["candidates"], time.perf_counter() - start, stats["kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the stand-in teacher takes per answer")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests-per-worker", type=int, default=8)
    parser.add_argument("--responses", type=int, default=3500, help="journal size for the reprocess benchmark")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = concurrency(workdir, args.latency, args.requests, args.workers, args.requests_per_worker)
        print(f"\n1. Requests to a teacher answering in {args.latency:g} s (wall time of generate(), Ray Data included)")
        print(f"{'mode':<32}{'requests':>10}{'seconds':>10}{'req/s':>8}{'speed-up':>10}")
        reference = rows[0][2]
        for label, count, seconds in rows:
            print(f"{label:<32}{count:>10}{seconds:>10.1f}{count / seconds:>8.2f}{reference / seconds:>9.1f}x")
        responses, candidates, seconds, kept = reprocess(workdir, args.responses)
        print(f"\n2. --reprocess of a {responses}-answer journal (parse + filters + exact ROUGE-L dedup + write)")
        print(f"{'answers':>10}{'tasks parsed':>14}{'kept':>8}{'seconds':>10}{'answers/s':>11}")
        print(f"{responses:>10}{candidates:>14}{kept:>8}{seconds:>10.1f}{responses / seconds:>11.0f}")


if __name__ == "__main__":
    main()
