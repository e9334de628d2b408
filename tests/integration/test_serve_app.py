"""The serve app on the session's Ray Serve proxy, driven by the real ``openai`` client, HTTP and Chromium."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from alpaca_ray.prompts import format_prompt
from tests.conftest import run_cli
from tests.support.serve_app import CHROMIUM, CHROMIUM_ARGS, app_config, batches_larger_than_one, metrics_of

pytestmark = pytest.mark.ray
KEY_ENV = "ALPACA_RAY_SERVE_TEST_KEY"
KEY = "sk-test-serve-0123456789"


@pytest.fixture(scope="module")
def app(serve_port, tiny_model_dir, tmp_path_factory):
    """One watermarked app with an API key and an extra filter term, shared by this module's tests."""
    from ray import serve

    from alpaca_ray.serve.app import deploy

    db = tmp_path_factory.mktemp("serve-app") / "reports.db"
    config = app_config(tiny_model_dir, serve_port, "test-serve-app", "/serve-app", db, api_key_env=KEY_ENV,
                         watermark=True, filter_terms=[r"\bforbidden\b"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, KEY)
        url = deploy(config)
    yield SimpleNamespace(url=url, db=db, model=config.model_id, model_dir=tiny_model_dir)
    serve.delete(config.app_name)


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_models_health_docs(app, client):
    assert [m.id for m in client.models.list().data] == [app.model]
    assert httpx.get(app.url + "healthz").json()["status"] == "ok"
    assert "swagger" in httpx.get(app.url + "docs").text.lower()
    paths = httpx.get(app.url + "openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/reports"} <= set(paths)


def test_completions_usage_seed_and_n(app, client, tokenizer):
    prompt = "Give three tips for staying healthy."
    first = client.completions.create(model=app.model, prompt=prompt, max_tokens=8, seed=11)
    again = client.completions.create(model=app.model, prompt=prompt, max_tokens=8, seed=11)
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    if first.choices[0].finish_reason == "length":
        assert first.usage.completion_tokens == 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    several = client.completions.create(model=app.model, prompt=[prompt, "Name a color."], max_tokens=4, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_chat_uses_the_alpaca_prompt_with_the_system_message_as_input(app, client, tokenizer):
    """The tiny model has no chat template: Alpaca's rule (alpaca_ray.chat), the system message kept."""
    reply = client.chat.completions.create(model=app.model, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    prompt = format_prompt("Name a color.", "System: Be brief.")
    assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    same = client.completions.create(model=app.model, prompt=prompt, max_tokens=6, temperature=0)
    assert same.choices[0].text == reply.choices[0].message.content


def test_streaming_matches_the_whole_answer(app, client):
    whole = client.chat.completions.create(model=app.model, max_tokens=20, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me a joke."}])
    chunks = list(client.chat.completions.create(model=app.model, max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Tell me a joke."}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    completion_chunks = list(client.completions.create(model=app.model, prompt="Once", max_tokens=5, stream=True))
    assert completion_chunks[-1].choices[0].finish_reason in ("stop", "length")
    raw = httpx.post(app.url + "v1/completions", headers=_auth(), timeout=60,
                     json={"model": app.model, "prompt": "Once", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])


@pytest.mark.parametrize("name, request_kwargs, status, code, param", [
    ("malformed json", {"content": b'{"model": "x", "prompt": '}, 400, "invalid_json", None),
    ("unknown model", {"json": {"model": "gpt-nope", "prompt": "hi"}}, 404, "model_not_found", "model"),
    ("prompt too long", {"json": {"model": "MODEL", "prompt": "word " * 1200}}, 400, "context_length_exceeded",
     "prompt"),
    ("max_tokens zero", {"json": {"model": "MODEL", "prompt": "hi", "max_tokens": 0}}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens huge", {"json": {"model": "MODEL", "prompt": "hi", "max_tokens": 10**6}}, 400, "invalid_value",
     "max_tokens"),
    ("wrong type", {"json": {"model": "MODEL", "prompt": "hi", "temperature": "hot"}}, 400, "invalid_type",
     "temperature"),
    ("missing field", {"json": {"model": "MODEL"}}, 400, "missing_required_parameter", "prompt"),
    ("out of range", {"json": {"model": "MODEL", "prompt": "hi", "top_p": 0}}, 400, "invalid_value", "top_p"),
])
def test_bad_input_gets_an_openai_error(app, name, request_kwargs, status, code, param):
    if "json" in request_kwargs:
        request_kwargs = {"json": {k: app.model if v == "MODEL" else v for k, v in request_kwargs["json"].items()}}
    response = httpx.post(app.url + "v1/completions", headers={**_auth(), "Content-Type": "application/json"},
                          timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param)


def test_openai_client_raises_typed_errors(app, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=app.model, messages=[{"role": "user", "content": "word " * 1200}])


def test_api_key_protects_v1_routes(app):
    for bad in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("GET", "v1/models"), ("GET", "v1/reports"), ("POST", "v1/completions")):
            response = httpx.request(method, app.url + path, headers=bad, json={"model": app.model, "prompt": "x"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert KEY not in response.text
    wrong = openai.OpenAI(base_url=app.url + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(app.url + "healthz").status_code == 200  # not an API route


def test_content_filter_refuses_and_counts(app, client):
    before = metrics_of(app.url).get('alpaca_ray_serve_flagged_total{where="prompt"}', 0)
    reply = client.chat.completions.create(model=app.model, max_tokens=5,
                                           messages=[{"role": "user", "content": "Tell me the forbidden thing."}])
    assert reply.choices[0].finish_reason == "content_filter"
    assert "flagged by the content filter" in reply.choices[0].message.content
    streamed = list(client.completions.create(model=app.model, prompt="How do I build a bomb?", max_tokens=5,
                                              stream=True))
    assert streamed[-1].choices[0].finish_reason == "content_filter"
    assert metrics_of(app.url)['alpaca_ray_serve_flagged_total{where="prompt"}'] == before + 2


def test_fifty_parallel_requests_are_all_answered_in_batches(app):
    before = batches_larger_than_one(metrics_of(app.url))

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=app.url + "v1", api_key=KEY, max_retries=0, timeout=180) as aclient:
            return await asyncio.gather(*(aclient.completions.create(model=app.model, prompt=f"Question {i}:",
                                                                     max_tokens=16, seed=i) for i in range(50)))

    started = time.monotonic()
    replies = asyncio.run(ask_all())
    elapsed = time.monotonic() - started
    assert len(replies) == 50 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    metrics = metrics_of(app.url)
    assert batches_larger_than_one(metrics) > before, "no batch held more than one request"
    assert metrics["alpaca_ray_serve_max_batch_size_observed"] > 1
    assert metrics["alpaca_ray_serve_request_latency_seconds_count"] >= 50
    print(f"50 parallel requests in {elapsed:.1f}s, largest batch {metrics['alpaca_ray_serve_max_batch_size_observed']:g}")


def test_twenty_concurrent_reports_are_all_stored(app, tmp_path):
    def report(i: int) -> int:
        response = httpx.post(app.url + "v1/reports", headers=_auth(), timeout=60, json={
            "instruction": f"instruction {i}", "response": f"bad answer {i}", "reason": "incorrect",
            "details": "concurrency-test"})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(report, range(20)))
    assert len(set(ids)) == 20
    with sqlite3.connect(app.db) as db:
        rows = db.execute("SELECT response, prompt, model FROM reports WHERE details = 'concurrency-test'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(f"bad answer {i}" for i in range(20))
    assert rows[0][1].startswith("Below is an instruction") and rows[0][2] == app.model
    listed = httpx.get(app.url + "v1/reports", headers=_auth(), params={"limit": 1000}).json()["data"]
    assert {r["id"] for r in listed} >= set(ids)
    bad = httpx.post(app.url + "v1/reports", headers=_auth(), json={"response": "x", "reason": "meh"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reason"
    out = tmp_path / "reports.jsonl"
    run_cli(["reports", "export", "--db", str(app.db), "--format", "jsonl", "--output", str(out)], check=True)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in exported} >= set(ids)


def test_watermark_detect_route(app, client, tiny_model_dir):
    """The app watermarks; 200 sampled tokens are detected (z > 4), unwatermarked text from the same model is not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    replies = [client.completions.create(model=app.model, prompt=f"Story {i}:", max_tokens=200, temperature=1.0,
                                         seed=i) for i in range(3)]
    full = [r.choices[0].text for r in replies if r.choices[0].finish_reason == "length"]
    assert full, "every sample ended early"
    for text in full:
        verdict = httpx.post(app.url + "v1/watermark/detect", headers=_auth(), json={"text": text}).json()
        assert verdict["watermarked"] and verdict["z_score"] > 4, verdict
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    ids = tokenizer("Story 0:", return_tensors="pt")["input_ids"]
    plain = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=200, min_new_tokens=200,
                           pad_token_id=tokenizer.eos_token_id)
    plain_text = tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    verdict = httpx.post(app.url + "v1/watermark/detect", headers=_auth(), json={"text": plain_text}).json()
    assert not verdict["watermarked"] and verdict["z_score"] < 4 and verdict["num_tokens_scored"] > 100


@pytest.mark.browser
def test_demo_page_answers_and_reports_in_chromium(app):
    from playwright.sync_api import sync_playwright

    instruction = "Give three tips for staying healthy."
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(app.url)
            assert page.locator("#key-row").is_visible()  # the server asks for its API key
            page.fill("#instruction", instruction)
            page.fill("#input", "for an office worker")
            page.fill("#api-key", KEY)
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
            answer = page.text_content("#answer")
            assert answer
            page.select_option("#reason", "incorrect")
            page.fill("#details", "browser-test")
            page.click("#report-button")
            page.wait_for_function("document.getElementById('report-status').textContent.includes('saved')",
                                   timeout=60_000)
        finally:
            browser.close()
    with sqlite3.connect(app.db) as db:
        row = db.execute("SELECT instruction, input, prompt, response, reason, model FROM reports "
                         "WHERE details = 'browser-test'").fetchone()
    assert row[0] == instruction and row[1] == "for an office worker"
    assert row[2] == format_prompt(instruction, "for an office worker")
    assert row[3] == answer and row[4] == "incorrect" and row[5] == app.model


def test_api_key_is_in_no_ray_process_environment(app, client):
    """Only the key's SHA-256 travels: no Ray process on this machine (replicas, proxy, controller, raylet,
    GCS) has the key in its environment, read from /proc/PID/environ."""
    import os
    from pathlib import Path

    assert client.models.list().data  # the key works
    checked = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if cmdline.startswith(("ray::", "ServeReplica")) or "gcs_server" in cmdline or "raylet" in cmdline:
            checked.append(cmdline)
            assert KEY.encode() not in environ, cmdline[:100]
    assert any("test-serve-app" in line and "AlpacaServer" in line for line in checked), checked[:20]
