"""Generate-stage benchmark: how much of the teacher's rate limit a run uses, and the driver's cost at Alpaca's scale.

1. Rate use. A stand-in teacher (a real local OpenAI-protocol server) answers each request after 1.5 to
   4.5 s (uniform, seeded). ``generate()`` runs on a local Ray cluster with 2 workers x 8 requests in
   flight (16 in flight could sustain ~320 requests/min at that latency), once with
   ``--requests-per-minute`` binding and once with ``--tokens-per-minute`` binding. Printed, as the
   server saw the requests arrive: the share of the limit used between the first and the last request
   (target >= 95%), and the most requests (tokens) in any 60 s sliding window (must be <= the limit);
   also the shared limiter's own count of its grants.
2. Driver throughput. A journal of teacher answers about the size of Alpaca's run (3,500 answers,
   ~52K parsed tasks) is rebuilt with ``--reprocess`` (parse, filter, exact ROUGE-L dedup, write):
   the work the driver does live, here with no network at all.

    python benchmarks/generate.py [--minutes 2.5] [--requests-per-minute 120] [--tokens-per-minute 60000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.generate import GenerateConfig, generate  # noqa: E402
from alpaca_ray.generate.prompt import encode_prompt  # noqa: E402
from alpaca_ray.generate.seed_tasks import read_seed_tasks  # noqa: E402
from alpaca_ray.llm_client import RawJournal, grant_report  # noqa: E402
from alpaca_ray.openai_server import OpenAIServer, prompt_text  # noqa: E402
from tests.support.generate_teacher import SelfInstructTeacher  # noqa: E402

LATENCY_S = (1.5, 4.5)


class MeteredTeacher:
    """The stand-in teacher, noting each request's arrival time and the tokens a provider's rate limit counts
    for it: the prompt estimated from its length + max_tokens, at arrival (as OpenAI meters TPM)."""

    def __init__(self) -> None:
        self.teacher = SelfInstructTeacher(good_tasks=10, delay_s=LATENCY_S)
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, float]] = []  # (arrival, rate-limit tokens)

    def __call__(self, kind: str, body: dict):
        arrived = time.monotonic()
        with self.lock:
            self.arrivals.append((arrived, len(prompt_text(kind, body)) // 4 + 1 + int(body.get("max_tokens") or 0)))
        return self.teacher(kind, body)


def rate_use(workdir: str, name: str, minutes: float, requests_per_minute: float, tokens_per_minute: float,
             max_tokens: int) -> dict:
    metered = MeteredTeacher()
    with OpenAIServer(metered, models=["teacher"]) as server:
        # Sized so the limit, not the target, sets the pace for about `minutes` minutes.
        per_minute = requests_per_minute or tokens_per_minute / (max_tokens + 400)
        target = int(per_minute * minutes * 9)  # ~9 instructions kept per answer
        config = GenerateConfig(output=os.path.join(workdir, name), target=target, teacher_model="teacher",
                                teacher_base_url=server.base_url, api="completions", api_key_env="",
                                num_workers=2, requests_per_worker=8, requests_per_minute=requests_per_minute,
                                tokens_per_minute=tokens_per_minute, max_tokens=max_tokens, seed=0,
                                expected_kept_per_request=9.0, progress=False)
        started = time.perf_counter()
        stats = generate(config)
        wall = time.perf_counter() - started
    arrivals = sorted(metered.arrivals)
    seen = grant_report(arrivals, requests_per_minute, tokens_per_minute)
    span_min = seen["span_s"] / 60
    return {"name": name, "wall_s": wall, "requests": len(arrivals), "span_s": seen["span_s"],
            "requests_per_min": (len(arrivals) - 1) / span_min, "tokens_per_min": sum(t for _, t in arrivals[1:]) / span_min,
            "max_requests_60s": seen["max_requests_in_60s"], "max_tokens_60s": seen["max_tokens_in_60s"],
            "limiter": stats["this_run"]["rate_limit"], "kept": stats["kept"], "target": target,
            "surplus": stats["total"]["surplus"]}


def reprocess(workdir: str, responses: int) -> tuple[int, int, float, int]:
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
    with open(journal.path, "w", encoding="utf-8") as handle:  # written at once: the fsync per line is not measured
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    start = time.perf_counter()
    stats = generate(GenerateConfig(output=output, target=None, reprocess=True, teacher_model="gpt-4o-mini",
                                    progress=False))
    return responses, stats["total"]["candidates"], time.perf_counter() - start, stats["kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.5, help="about how long each rate-use run lasts")
    parser.add_argument("--requests-per-minute", type=float, default=120)
    parser.add_argument("--tokens-per-minute", type=float, default=60_000)
    parser.add_argument("--responses", type=int, default=3500, help="journal size for the reprocess benchmark")
    parser.add_argument("--skip-reprocess", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [rate_use(workdir, "requests bind", args.minutes, args.requests_per_minute, 0, 3072),
                # max_tokens 600: each request counts ~1,000 tokens (prompt/4 + max_tokens), ~60 a minute.
                rate_use(workdir, "tokens bind", args.minutes, 0, args.tokens_per_minute, 600)]
        load = os.getloadavg()
        print(f"\n1. Rate use against a teacher answering in {LATENCY_S[0]:g}-{LATENCY_S[1]:g} s, 2 workers x 8 in "
              f"flight (load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores)")
        print(f"{'limit':<28}{'requests':>9}{'span s':>8}{'used':>9}{'max in any 60 s':>17}{'limiter max 60 s':>18}"
              f"{'wall s':>8}")
        for row in rows:
            tokens = row["name"] == "tokens bind"
            limit = args.tokens_per_minute if tokens else args.requests_per_minute
            used = (row["tokens_per_min"] if tokens else row["requests_per_min"]) / limit
            most = row["max_tokens_60s"] if tokens else row["max_requests_60s"]
            limiter_most = row["limiter"]["max_tokens_in_60s" if tokens else "max_requests_in_60s"]
            label = f"{limit:g} {'tokens' if tokens else 'requests'}/min"
            print(f"{label:<28}{row['requests']:>9}{row['span_s']:>8.1f}{used:>9.1%}{most:>17,}{limiter_most:>18,}"
                  f"{row['wall_s']:>8.1f}")
        for row in rows:
            print(f"  {row['name']}: kept {row['kept']} of {row['target']} (+{row['surplus']} surplus from the "
                  f"answers in flight at the end, journaled)")
        if not args.skip_reprocess:
            responses, candidates, seconds, kept = reprocess(workdir, args.responses)
            print(f"\n2. --reprocess of a {responses}-answer journal (parse + filters + exact ROUGE-L dedup + write)")
            print(f"{'answers':>10}{'tasks parsed':>14}{'kept':>8}{'seconds':>10}{'answers/s':>11}")
            print(f"{responses:>10}{candidates:>14}{kept:>8}{seconds:>10.1f}{responses / seconds:>11.0f}")


if __name__ == "__main__":
    main()
