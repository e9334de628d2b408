"""Using the whole rate limit and never more: the limiter on an injected clock, Retry-After's cap, the stop
rule of the stream, and the request numbering that lets a resumed run send new prompts (no Ray needed)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from alpaca_ray.generate.calls import RequestFeed
from alpaca_ray.generate.config import BUNDLED_SEED_TASKS
from alpaca_ray.generate.pipeline import should_send_more
from alpaca_ray.generate.seed_tasks import read_seed_tasks
from alpaca_ray.llm_client import (
    WINDOW_GUARD_S,
    EndpointConfig,
    LLMClient,
    RateLimiter,
    RetriesExhaustedError,
    capped_retry_after,
    grant_report,
)
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.support.generate_teacher import SelfInstructTeacher

KEY = "sk-limits-unit-secret-77c1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(limiter: RateLimiter, clock: FakeClock, callers: int, seconds: float, rng: random.Random,
             tokens=lambda rng: 0) -> list[tuple[float, float]]:
    """``callers`` always-busy senders: each reserves, waits its grant, 'sends', is answered 1.5-4.5 s later
    and reserves again. Returns the limiter's grant log."""
    events = [(clock.now + rng.uniform(0, 0.1), n) for n in range(callers)]  # (when the caller asks, caller)
    end = clock.now + seconds
    while events:
        events.sort()
        at, caller = events.pop(0)
        if at > end:
            continue
        clock.now = at
        grant = limiter.reserve(tokens(rng))
        events.append((at + grant.wait_s + rng.uniform(1.5, 4.5), caller))
    return limiter.grant_log()


def test_requests_are_evenly_spaced_and_never_exceed_the_minute():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=120, clock=clock)
    waits = [limiter.reserve().wait_s for _ in range(4)]  # a burst at one instant is spread out
    spacing = (60 + WINDOW_GUARD_S) / 120
    assert waits == pytest.approx([0, spacing, 2 * spacing, 3 * spacing])

    clock, rng = FakeClock(), random.Random(0)
    limiter = RateLimiter(requests_per_minute=120, clock=clock)
    grants = simulate(limiter, clock, callers=16, seconds=300, rng=rng)  # 16 in flight could do ~320/min
    report = grant_report(grants, 120)
    assert report["max_requests_in_60s"] <= 120
    assert report["min_gap_s"] >= spacing - 1e-9
    assert report["requests_per_minute_used"] >= 0.99 * 120  # the whole limit, from the first second


def test_tokens_fill_but_never_overfill_any_minute():
    clock, rng = FakeClock(), random.Random(1)
    limiter = RateLimiter(tokens_per_minute=60_000, clock=clock)
    grants = simulate(limiter, clock, callers=16, seconds=300, rng=rng, tokens=lambda r: r.randint(800, 1200))
    report = grant_report(grants, 0, 60_000)
    assert report["max_tokens_in_60s"] <= 60_000
    # Spread evenly (no burst of a whole minute's budget at once), and (nearly) all of it used: what a
    # strict window costs is about one request's tokens a minute, plus the guard.
    assert grant_report(grants, 0, 60_000, window_s=10)["max_tokens_in_60s"] <= 60_000 / 6 * 1.15
    assert sum(t for _, t in grants[1:]) / (report["span_s"] / 60) >= 0.97 * 60_000


def test_a_burst_or_an_oversized_request_cannot_overfill_a_window():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=10, tokens_per_minute=1000, clock=clock)
    grants = [limiter.reserve(400) for _ in range(50)]  # all at one instant
    log = limiter.grant_log()
    assert grant_report(log, 10, 1000)["max_tokens_in_60s"] <= 1000
    assert grant_report(log, 10, 1000)["max_requests_in_60s"] <= 10
    assert [g.id for g in grants] == list(range(50))
    big = RateLimiter(tokens_per_minute=1000, clock=clock)
    first, second = big.reserve(5000), big.reserve(1)
    assert first.wait_s == 0 and second.wait_s == pytest.approx(60 + WINDOW_GUARD_S)  # alone in its window
    assert RateLimiter(clock=clock).reserve(10**9).wait_s == 0  # no limits


def test_retry_after_is_honoured_up_to_a_cap_logged_and_counted(caplog):
    assert capped_retry_after(3.0, 60.0, "http://x") == (3.0, False)
    assert capped_retry_after(None, 60.0, "http://x") == (None, False)
    replies = iter([Reply(status=429, headers={"Retry-After": "3600"}), Reply("ok")])
    with OpenAIServer(lambda kind, body: next(replies), models=["m"], api_key=KEY) as server:
        client = LLMClient(EndpointConfig("m", base_url=server.base_url, max_retry_after_s=0.05,
                                          backoff_base_s=0.01), api_key=KEY)
        with caplog.at_level(logging.WARNING, logger="alpaca_ray.llm_client"):
            completion = client.complete_sync("hi")  # an hour asked for; the run waits 0.05 s
    assert completion.text == "ok" and completion.retries == 1
    assert completion.extra["retry_after_capped"] == 1
    assert "asked to wait 3600 s" in caplog.text and KEY not in caplog.text

    always = Reply(status=429, headers={"Retry-After": "3600"})
    with OpenAIServer(lambda kind, body: always, models=["m"]) as server:
        client = LLMClient(EndpointConfig("m", base_url=server.base_url, max_retry_after_s=0.01, max_retries=2,
                                          backoff_base_s=0.01))
        with pytest.raises(RetriesExhaustedError) as failed:
            client.complete_sync("hi")
    assert failed.value.retry_after_capped == 2


def test_the_stream_stops_asking_once_answers_in_flight_should_fill_the_target():
    assert should_send_more(missing=100, in_flight=0, kept_per_request=8)
    assert should_send_more(missing=100, in_flight=12, kept_per_request=8)  # 96 expected: one more
    assert not should_send_more(missing=100, in_flight=13, kept_per_request=8)
    assert not should_send_more(missing=0, in_flight=0, kept_per_request=8)


def test_a_resumed_run_sends_new_prompts_not_the_first_runs(tmp_path):
    seeds = read_seed_tasks(BUNDLED_SEED_TASKS)  # 175 tasks: two draws of 3 hardly ever coincide
    raw = tmp_path / "raw"
    first = RequestFeed(str(raw), seeds, "H\n", 3, "run1", seed=7)
    sent = [first() for _ in range(5)]
    assert [r["request_number"] for r in sent] == [0, 1, 2, 3, 4]
    # The run is killed; the next one (same --seed) continues the numbering instead of restarting it.
    resumed = RequestFeed(str(raw), seeds, "H\n", 3, "run2", seed=7, journal_records=sent[:3])
    again = [resumed() for _ in range(5)]
    assert again[0]["request_number"] == RequestFeed.BLOCK  # past every number the first run may have used
    assert not {r["prompt"] for r in again} & {r["prompt"] for r in sent}
    # Same (seed, number), same prompt: a fresh directory with the same seed reproduces the first run.
    fresh = RequestFeed(str(tmp_path / "other"), seeds, "H\n", 3, "run3", seed=7)
    assert [fresh()["prompt"] for _ in range(5)] == [r["prompt"] for r in sent]
    # Without --seed, the seed drawn by the first run is kept and continued; the journal is a floor too.
    unseeded = RequestFeed(str(tmp_path / "u"), seeds, "H\n", 3, "a")
    unseeded()
    later = RequestFeed(str(tmp_path / "u"), seeds, "H\n", 3, "b", journal_records=[{"request_number": 500}])
    assert later.seed == unseeded.seed and later()["request_number"] == 501


def test_rate_limited_client_calls_stay_within_the_limit_on_a_real_clock():
    limiter = RateLimiter(requests_per_minute=600)
    with OpenAIServer(SelfInstructTeacher(), models=["m"]) as server:
        client = LLMClient(EndpointConfig("m", base_url=server.base_url, api="completions"), limiter=limiter)

        async def burst():
            try:
                return await asyncio.gather(*(client.complete("4. Instruction:", max_tokens=5) for _ in range(5)))
            finally:
                await client.aclose()

        assert len(asyncio.run(burst())) == 5
    report = limiter.report()
    assert report["granted_requests"] == 5 and report["min_gap_s"] >= (60 + WINDOW_GUARD_S) / 600 - 1e-9
