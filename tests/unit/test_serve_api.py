"""The serve app's HTTP API in-process (FastAPI over ASGI, no Ray): the real tiny model, real SQLite.

Hostile and careless input: lone surrogates, huge seeds and bodies, unknown routes, missing keys, a
broken database, and a property-based run of the app against its own OpenAPI schema (Schemathesis).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from alpaca_ray.serve.app import AlpacaService, LocalReports, create_api
from alpaca_ray.serve.config import ServeConfig, hash_key
from alpaca_ray.serve.content_filter import make_filter
from alpaca_ray.serve.reports import ReportStore, export_reports

KEY = "sk-in-process-123"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory) -> AlpacaService:
    db = tmp_path_factory.mktemp("serve-api") / "reports.db"
    config = ServeConfig(model=str(tiny_model_dir), reports_db=str(db), max_body_bytes=8_000_000,
                         max_sequences_per_request=8, max_report_field_chars=1000, max_tokens_limit=64,
                         default_max_tokens=8)
    return AlpacaService(config, hash_key(KEY), LocalReports(ReportStore(str(db))))


def call(service: AlpacaService, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_api(service), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=120) as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def raw_json(text: str) -> bytes:
    """A JSON body written by hand: ``\\ud800`` stays an escape, as a careless client sends it."""
    return text.encode()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "MODEL", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "MODEL", "prompt": ["ok", "a\\udfffb"]}', "prompt"),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"model": "x\\ud800", "prompt": "hi"}', "model"),
    ("/v1/reports", '{"reason": "other", "response": "a\\ud800b"}', "response"),
    ("/v1/watermark/detect", '{"text": "a\\ud800b"}', "text"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "hi", "logprobs": 2}', "logprobs"),
    ("/v1/chat/completions", '{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}',
     "logprobs"),
    ("/v1/completions", '{"model": "MODEL", "prompt": "hi", "echo": true}', "echo"),
    ("/v1/completions", '{"model": "MODEL", "prompt": ["a", "b", "c"], "n": 3}', "n"),  # 9 answers > 8
])
def test_bad_text_seeds_and_options_are_openai_400s(service, path, body, param):
    response = call(service, "POST", path, content=raw_json(body.replace("MODEL", service.model_id)), headers=AUTH)
    assert_openai_error(response, 400, param)


def test_the_largest_seed_still_answers(service):
    for seed in (2**63 - 1, -(2**63)):
        response = call(service, "POST", "/v1/completions", headers=AUTH,
                        json={"model": service.model_id, "prompt": "hi", "max_tokens": 2, "seed": seed, "n": 2})
        assert response.status_code == 200, response.text


def test_key_is_checked_before_the_body_and_routes_answer_openai_errors(service):
    assert_openai_error(call(service, "POST", "/v1/completions", content=b'{"model": ', headers={}), 401,
                        code="invalid_api_key")
    assert_openai_error(call(service, "GET", "/no/such/route"), 404, code="not_found")
    assert_openai_error(call(service, "DELETE", "/v1/models", headers=AUTH), 405, code="method_not_allowed")
    assert_openai_error(call(service, "POST", "/v1/completions", content=b'{"model": "\xff\xfe"}', headers=AUTH),
                        400)
    assert_openai_error(call(service, "POST", "/v1/completions", content=b'{"model": ', headers=AUTH), 400,
                        code="invalid_json")
    assert call(service, "GET", "/healthz").status_code == 200  # not an API route: no key


def test_bodies_over_the_limit_get_413_declared_or_streamed(service):
    big = b'{"model": "m", "prompt": "' + b"x" * 8_000_001 + b'"}'
    assert_openai_error(call(service, "POST", "/v1/completions", content=big, headers=AUTH), 413,
                        code="request_too_large")

    async def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "m", "prompt": "'
        for _ in range(9):
            yield b"x" * 1_000_000

    assert_openai_error(call(service, "POST", "/v1/completions", content=chunks(), headers=AUTH), 413)


def test_a_huge_prompt_does_not_stall_the_event_loop(service):
    """A 1 MB prompt is tokenized off the loop: /healthz answers while it is being counted."""
    prompt = "word " * 200_000

    async def go():
        transport = httpx.ASGITransport(app=create_api(service), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=300) as client:
            big = asyncio.create_task(client.post("/v1/completions", headers=AUTH,
                                                  json={"model": service.model_id, "prompt": prompt}))
            await asyncio.sleep(0)  # let it start
            health = await client.get("/healthz")
            finished_first = big.done()
            return health, finished_first, await big

    health, big_finished_first, big = asyncio.run(go())
    assert health.status_code == 200 and not big_finished_first
    assert_openai_error(big, 400, "prompt", "context_length_exceeded")


def test_reports_are_capped_paginated_and_csv_export_is_formula_safe(service, tmp_path):
    too_long = call(service, "POST", "/v1/reports", headers=AUTH, json={"reason": "other", "response": "x" * 1001})
    assert_openai_error(too_long, 400, "response")
    ids = [call(service, "POST", "/v1/reports", headers=AUTH,
                json={"reason": "other", "response": text, "details": "page-test"}).json()["id"]
           for text in ("=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "plain")]
    first = call(service, "GET", "/v1/reports", headers=AUTH, params={"limit": 2, "after": ids[0] - 1}).json()
    assert [r["id"] for r in first["data"]] == ids[:2] and first["has_more"] and first["last_id"] == ids[1]
    rest = call(service, "GET", "/v1/reports", headers=AUTH, params={"limit": 1000, "after": first["last_id"]}).json()
    assert [r["id"] for r in rest["data"]][:3] == ids[2:] and not rest["has_more"]
    assert_openai_error(call(service, "GET", "/v1/reports", headers=AUTH, params={"limit": 10000}), 400, "limit")
    assert_openai_error(call(service, "GET", "/v1/reports", headers=AUTH, params={"offset": 2**70}), 400)
    rows = list(csv.DictReader(io.StringIO(export_reports(service.config.reports_db, "csv"))))
    exported = {r["response"] for r in rows if r["details"] == "page-test"}
    assert exported == {"'=HYPERLINK(\"http://x\")", "'+1", "'-2", "'@SUM(A1)", "plain"}
    jsonl = [json.loads(line) for line in export_reports(service.config.reports_db, "jsonl").splitlines()]
    assert "+1" in {r["response"] for r in jsonl}  # JSONL keeps the text as it was


def test_a_database_error_is_an_openai_503_and_logged(tiny_model_dir, tmp_path, caplog):
    db = tmp_path / "broken.db"
    store = ReportStore(str(db))
    service = AlpacaService(ServeConfig(model=str(tiny_model_dir), reports_db=str(db)), None, LocalReports(store))
    with sqlite3.connect(db) as connection:
        connection.execute("DROP TABLE reports")  # a real SQLite failure on the next write
    response = call(service, "POST", "/v1/reports", json={"reason": "other", "response": "r"})
    assert_openai_error(response, 503, code="database_unavailable")
    assert "reports database failed" in caplog.text and "no such table" in caplog.text
    assert "no such table" not in response.text  # details stay in the log


def test_streaming_filter_never_sends_part_of_a_flagged_piece(service):
    """The term is a piece from the middle of the answer; what is streamed stops before its first character."""
    body = {"model": service.model_id, "prompt": "Tell me a story.", "max_tokens": 40, "seed": 3, "temperature": 1.0}
    answer = call(service, "POST", "/v1/completions", headers=AUTH, json=body).json()["choices"][0]["text"]
    start = next(i for i in range(10, len(answer) - 8) if answer[i:i + 6].isprintable() and answer[i:i + 6].strip())
    term = answer[start:start + 6]
    original = service.filter
    service.filter = make_filter("terms", terms=[__import__("re").escape(term)])
    try:
        streamed = call(service, "POST", "/v1/completions", headers=AUTH, json={**body, "stream": True})
    finally:
        service.filter = original
    chunks = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    sent = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    first = answer.find(term)
    assert answer.startswith(sent) and len(sent) <= first, (sent, term)



def test_property_based_api_against_its_own_openapi_schema(service):
    """Schemathesis draws requests for each route from the app's OpenAPI schema (valid and invalid bodies,
    with and without the key): no 5xx, every error OpenAI-shaped, each answer within 30 s, and the app
    still healthy after each.

    Driven through Hypothesis directly rather than schemathesis' pytest plugin, whose lazy fixture reads
    pytest internals (``Function._nodeid``, gone in pytest 9.2).
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(service))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}

    calls = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            started = time.monotonic()
            response = case.call(headers={"Authorization": f"Bearer {KEY}"} if case.body is None or
                                 hash(json.dumps(case.body, default=str)) % 4 else {})
            elapsed = time.monotonic() - started
            calls.append(case.path)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            assert elapsed < 30, f"{case.method} {case.path} took {elapsed:.1f}s"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text
            assert call(service, "GET", "/healthz").json()["status"] == "ok"

        check()
    assert set(calls) == {op.path for op in operations}  # every route was called
