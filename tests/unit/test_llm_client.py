"""The shared OpenAI-protocol client against a real local HTTP server (no Ray)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time

import pytest

from alpaca_ray.llm_client import (
    AuthError,
    Completion,
    EndpointConfig,
    EndpointUnreachableError,
    LLMClient,
    LLMError,
    MalformedResponseError,
    ModelNotFoundError,
    NotOpenAICompatibleError,
    QuotaExceededError,
    RateLimiter,
    RawJournal,
    RetriesExhaustedError,
    backoff_seconds,
    retry_after_seconds,
)
from alpaca_ray.openai_server import OpenAIServer, Reply, error_body
from tests.support.ray_head import free_port

KEY = "sk-test-llmclient-0123456789abcdef"


class Script:
    """A responder answering from a list of replies in turn (the last one repeats)."""

    def __init__(self, *replies: Reply):
        self.replies, self.calls = list(replies), 0
        self.lock = threading.Lock()

    def __call__(self, kind: str, body: dict) -> Reply:
        with self.lock:
            reply = self.replies[min(self.calls, len(self.replies) - 1)]
            self.calls += 1
        return reply


def endpoint(server: OpenAIServer, **kwargs) -> EndpointConfig:
    values = dict(model="teacher", base_url=server.base_url, api_key_env="LLM_CLIENT_TEST_KEY",
                  backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5)
    values.update(kwargs)
    return EndpointConfig(**values)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("LLM_CLIENT_TEST_KEY", KEY)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_complete_sends_sampling_and_key_and_reads_usage(api, key_env):
    with OpenAIServer(Script(Reply("one two three", finish_reason="length")), models=["teacher"],
                      api_key=KEY) as server:
        client = LLMClient(endpoint(server, api=api))
        result = client.complete_sync("hello there", temperature=1.0, max_tokens=7, stop=["\n20"])
    assert isinstance(result, Completion)
    assert (result.text, result.finish_reason, result.retries) == ("one two three", "length", 0)
    assert (result.prompt_tokens, result.completion_tokens) == (2, 3)
    (seen,) = server.requests
    assert seen.path.endswith("/chat/completions" if api == "chat" else "/v1/completions")
    assert seen.authorization == f"Bearer {KEY}"
    assert seen.body["max_tokens"] == 7 and seen.body["stop"] == ["\n20"] and seen.body["temperature"] == 1.0
    if api == "chat":
        assert seen.body["messages"] == [{"role": "user", "content": "hello there"}]
    else:
        assert seen.body["prompt"] == "hello there"


def test_429_honours_retry_after(key_env):
    script = Script(Reply(status=429, headers={"Retry-After": "1"}), Reply("ok"))
    with OpenAIServer(script, models=["teacher"]) as server:
        result = LLMClient(endpoint(server)).complete_sync("hi")
    assert result.text == "ok" and result.retries == 1
    first, second = server.requests
    assert second.time - first.time >= 0.95  # the server said 1 s; backoff alone would be ~0.01 s


def test_5xx_408_and_timeouts_are_retried_and_counted(key_env):
    script = Script(Reply(status=500), Reply(status=408), Reply("slow", delay_s=1.5), Reply("fast"))
    with OpenAIServer(script, models=["teacher"]) as server:
        result = LLMClient(endpoint(server, timeout_s=0.5)).complete_sync("hi")
    assert result.text == "fast" and result.retries == 3
    assert len(server.requests) == 4


def test_retries_exhausted(key_env):
    with OpenAIServer(Script(Reply(status=500)), models=["teacher"]) as server:
        with pytest.raises(RetriesExhaustedError, match="after 3 attempts"):
            LLMClient(endpoint(server, max_retries=2)).complete_sync("hi")
        assert len(server.requests) == 3


def test_what_asking_again_cannot_fix_is_never_retried(key_env):
    statuses = [400, 401, 403, 404, 405, 422, 501]
    with OpenAIServer(Script(*(Reply(status=status) for status in statuses)), models=["teacher"]) as server:
        for count, status in enumerate(statuses, 1):  # one server, one answer each: a retry would shift them
            with pytest.raises(LLMError, match=f"HTTP {status}"):
                LLMClient(endpoint(server, max_retries=3)).complete_sync("hi")
            assert len(server.requests) == count


def test_a_404_page_that_is_no_openai_error_says_so(key_env):
    page = Reply(status=404, raw_body=b"<html>Not Found</html>")  # no {"error": ...}: no model is unknown
    with OpenAIServer(Script(page), models=["teacher"]) as server:
        with pytest.raises(NotOpenAICompatibleError, match="chat/completions answered HTTP 404"):
            LLMClient(endpoint(server, max_retries=3)).complete_sync("hi")
        assert len(server.requests) == 1


def test_429_out_of_quota_stops_at_once_without_retrying(key_env):
    body = json.dumps(error_body("You exceeded your current quota.", "insufficient_quota", "insufficient_quota"))
    with OpenAIServer(Script(Reply(status=429, raw_body=body.encode())), models=["teacher"]) as server:
        with pytest.raises(QuotaExceededError, match="no quota left") as err:
            LLMClient(endpoint(server, max_retries=5)).complete_sync("hi")
        assert len(server.requests) == 1 and KEY not in str(err.value)


def test_wrong_key_is_auth_error_without_the_key(monkeypatch):
    monkeypatch.setenv("LLM_CLIENT_TEST_KEY", KEY)
    with OpenAIServer(Script(Reply("never")), models=["teacher"], api_key="the-right-key") as server:
        client = LLMClient(endpoint(server))
        with pytest.raises(AuthError) as info:
            client.complete_sync("hi")
        assert len(server.requests) == 1  # a 401 is never retried
        with pytest.raises(AuthError):
            client.check_sync()
    assert KEY not in str(info.value) and "LLM_CLIENT_TEST_KEY" in str(info.value)
    assert isinstance(info.value, LLMError)


def test_unknown_model(key_env):
    with OpenAIServer(Script(Reply("x")), models=["teacher"]) as server:
        client = LLMClient(endpoint(server, model="no-such-model"))
        with pytest.raises(ModelNotFoundError, match="no-such-model"):
            client.complete_sync("hi")
        with pytest.raises(ModelNotFoundError, match="it serves: teacher"):
            client.check_sync()
        LLMClient(endpoint(server)).check_sync()  # a known model passes


def test_check_probes_when_models_are_not_listed(key_env):
    with OpenAIServer(Script(Reply("OK")), models=[]) as server:
        LLMClient(endpoint(server)).check_sync()
        assert [r.body.get("max_tokens") for r in server.completion_requests()] == [1]


def test_unreachable_endpoint():
    config = EndpointConfig("m", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key_env="", timeout_s=2)
    with pytest.raises(EndpointUnreachableError, match="cannot reach"):
        LLMClient(config).check_sync()


def test_malformed_response(key_env):
    with OpenAIServer(Script(Reply(raw_body=b"<html>oops</html>")), models=["teacher"]) as server:
        with pytest.raises(MalformedResponseError):
            LLMClient(endpoint(server)).complete_sync("hi")


def test_missing_key_for_openai_is_clear(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    client = LLMClient(EndpointConfig("gpt-4o-mini", api_key_env="NO_SUCH_KEY_VAR"))
    with pytest.raises(AuthError, match="NO_SUCH_KEY_VAR"):
        client.api_key()


def test_invalid_endpoint_config():
    with pytest.raises(LLMError, match="api must be"):
        EndpointConfig("m", api="edits")


def test_secret_key_override_never_reprs():
    client = LLMClient(EndpointConfig("m", base_url="http://127.0.0.1:1/v1"), api_key=KEY)
    assert client.api_key() == KEY and KEY not in repr(client.api_key())


def test_rate_limiter_spaces_requests_evenly():
    # More cases, on an injected clock, in tests/unit/test_generate_limits.py.
    limiter = RateLimiter(requests_per_minute=120)
    delays = [limiter.reserve().wait_s for _ in range(5)]
    assert delays[0] == 0
    assert delays[1:] == pytest.approx([0.504, 1.008, 1.513, 2.017], abs=0.05)  # (60 s + guard) / 120 apart
    assert RateLimiter().reserve(10**9).wait_s == 0  # no limits


def test_rate_limit_seen_by_the_server(key_env):
    with OpenAIServer(Script(Reply("ok")), models=["teacher"]) as server:
        client = LLMClient(endpoint(server, requests_per_minute=120))

        async def burst():
            try:
                return await asyncio.gather(*(client.complete("hi") for _ in range(6)))
            finally:
                await client.aclose()

        assert len(asyncio.run(burst())) == 6
    # Every request the server saw went through the limiter, and its grants (what the pacing is kept by;
    # arrival at the server jitters with the machine's load) are at least 60 s / 120 apart
    granted = client.limiter.report()
    assert granted["granted_requests"] == len(server.requests) == 6
    assert granted["min_gap_s"] >= 0.5 and granted["max_requests_in_60s"] <= 120


def test_retry_after_and_backoff():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_seconds({"retry-after": future}) <= 30
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None
    for retry in range(6):
        delay = backoff_seconds(retry, 1.0, 8.0)
        assert 0.5 * min(8.0, 2**retry) <= delay <= min(8.0, 2**retry)
    assert 5.0 <= backoff_seconds(0, 1.0, 8.0, retry_after=5.0) <= 6.0


def test_raw_journal_survives_a_torn_line(tmp_path):
    journal = RawJournal(tmp_path / "raw" / "a.jsonl")
    journal.append({"text": "one"})
    journal.append({"text": "two ünïcode"})
    with open(journal.path, "ab") as handle:  # what a SIGKILL mid-write leaves
        handle.write(b'{"text": "thr')
    again = RawJournal(journal.path)
    assert [r["text"] for r in again.read()] == ["one", "two ünïcode"] and again.skipped_lines == 1
    again.append({"text": "four"})
    assert [r["text"] for r in RawJournal(journal.path).read()] == ["one", "two ünïcode", "four"]
    assert all(json.loads(line) for line in open(journal.path) if line.startswith('{"text": "f'))
    assert RawJournal(tmp_path / "missing.jsonl").read() == []
