"""The chat endpoint in the model's prompt format, in-process (FastAPI over ASGI, no Ray), on the tiny model.

A copy of the tiny model with a ChatML-like chat template is served in the ``chat`` format; the tiny
model itself (no template) in ``alpaca``. The prompt a request really reached the engine with is recorded
by wrapping the real engine's ``generate`` (it still generates).
"""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from alpaca_ray.chat import alpaca_prompt, normalize_messages
from alpaca_ray.config import UserError
from alpaca_ray.prompts import format_prompt
from alpaca_ray.serve.app import AlpacaService, LocalReports, create_api
from alpaca_ray.serve.config import ServeConfig, resolve_config
from alpaca_ray.serve.reports import ReportStore
from tests.support.serve_app import CHROMIUM, CHROMIUM_ARGS, InProcessServer, make_chat_model

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": "Name another one."},
    {"role": "assistant", "content": "Pear."},
    {"role": "user", "content": "Name a color."},
]


def make_service(model_dir, tmp_path_factory, **overrides) -> AlpacaService:
    db = tmp_path_factory.mktemp("serve-chat") / "reports.db"
    config = ServeConfig(model=str(model_dir), reports_db=str(db), default_max_tokens=8, **overrides)
    return AlpacaService(config, None, LocalReports(ReportStore(str(db))))


def record_prompts(service: AlpacaService) -> list:
    """Every prompt the app hands the engine, in order; the real engine still answers each."""
    seen, generate = [], service.engine.generate

    def recording(prompt, *args, **kwargs):
        seen.append(prompt)
        return generate(prompt, *args, **kwargs)

    service.engine.generate = recording
    return seen


def post(service: AlpacaService, path: str, body: dict | None = None) -> httpx.Response:
    """POST ``body`` (GET without one) to the service's app over ASGI."""
    async def go():
        transport = httpx.ASGITransport(app=create_api(service), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=120) as client:
            return await (client.get(path) if body is None else client.post(path, json=body))
    return asyncio.run(go())


def openai_chat(service: AlpacaService, **request):
    """``client.chat.completions.create(**request)`` with the real ``openai`` client, over ASGI."""
    async def go():
        transport = httpx.ASGITransport(app=create_api(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://app/v1", timeout=120) as http:
            client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="none", http_client=http, max_retries=0)
            reply = await client.chat.completions.create(model=service.model_id, **request)
            if request.get("stream"):
                return [chunk async for chunk in reply]
            return reply
    return asyncio.run(go())


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    return make_chat_model(tiny_model_dir, tmp_path_factory.mktemp("serve-chat-model") / "model")


@pytest.fixture(scope="module")
def chat_service(chat_model_dir, tmp_path_factory) -> AlpacaService:
    return make_service(chat_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def alpaca_service(tiny_model_dir, tmp_path_factory) -> AlpacaService:
    return make_service(tiny_model_dir, tmp_path_factory)


def test_a_chat_model_sees_the_whole_conversation_as_its_template_tokenizes_it(chat_service, chat_model_dir):
    assert chat_service.prompt_format == "chat"  # a template and no alpaca_ray.json: its own format
    assert post(chat_service, "/healthz").json()["prompt_format"] == "chat"
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    expected = list(tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"])
    seen = record_prompts(chat_service)
    reply = openai_chat(chat_service, messages=CONVERSATION, max_tokens=4, temperature=0)
    assert seen == [expected]  # token ids, one BOS: not the text tokenized again
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].finish_reason in ("stop", "length")
    # developer is system: the same prompt
    as_developer = [{**CONVERSATION[0], "role": "developer"}, *CONVERSATION[1:]]
    same = openai_chat(chat_service, messages=as_developer, max_tokens=4, temperature=0)
    assert seen[-1] == expected and same.choices[0].message.content == reply.choices[0].message.content


def test_a_chat_model_streams_and_continues_a_final_assistant_message(chat_service, chat_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    messages = [*CONVERSATION, {"role": "assistant", "content": "The color"}]
    seen = record_prompts(chat_service)
    chunks = openai_chat(chat_service, messages=messages, max_tokens=6, temperature=0, stream=True,
                         stream_options={"include_usage": True})
    expected = tokenizer.apply_chat_template(messages, continue_final_message=True)["input_ids"]
    assert seen == [list(expected)] and tokenizer.decode(expected).endswith("<|assistant|>\nThe color")
    assert chunks[-1].usage.prompt_tokens == len(expected)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = openai_chat(chat_service, messages=messages, max_tokens=6, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_an_alpaca_model_gets_system_and_history_as_alpacas_input(alpaca_service, tiny_model_dir):
    assert alpaca_service.prompt_format == "alpaca"  # the tiny model has no chat template
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = alpaca_prompt(normalize_messages(CONVERSATION))
    assert "### Input:\nSystem: You answer briefly.\nUser: Name a fruit.\nAssistant: Apple.\n" in prompt
    seen = record_prompts(alpaca_service)
    reply = post(alpaca_service, "/v1/chat/completions", {"model": alpaca_service.model_id, "messages": CONVERSATION,
                                                          "max_tokens": 6, "temperature": 0}).json()
    assert seen == [tokenizer(prompt)["input_ids"]]
    assert reply["usage"]["prompt_tokens"] == len(seen[0])
    # the model really saw that prompt: /v1/completions with its text answers the same
    same = post(alpaca_service, "/v1/completions", {"model": alpaca_service.model_id, "prompt": prompt,
                                                    "max_tokens": 6, "temperature": 0}).json()
    assert same["choices"][0]["text"] == reply["choices"][0]["message"]["content"]
    one = post(alpaca_service, "/v1/chat/completions", {"model": alpaca_service.model_id, "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "Name a color."}]})
    assert one.json()["usage"]["prompt_tokens"] == len(tokenizer(format_prompt("Name a color."))["input_ids"])
    no_user = post(alpaca_service, "/v1/chat/completions", {"model": alpaca_service.model_id,
                                                            "messages": [{"role": "system", "content": "x"}]})
    assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "messages"


def test_prompt_format_option_and_recorded_metadata(chat_model_dir, tiny_model_dir, tmp_path, tmp_path_factory):
    forced = make_service(chat_model_dir, tmp_path_factory, prompt_format="alpaca")
    assert forced.prompt_format == "alpaca"
    trained = make_chat_model(tiny_model_dir, tmp_path / "final", prompt_template="alpaca")
    assert make_service(trained, tmp_path_factory).prompt_format == "alpaca"  # what training recorded
    assert post(forced, "/v1/chat/completions", {"model": forced.model_id, "max_tokens": 1,
                                                 "messages": CONVERSATION}).status_code == 200
    with pytest.raises(UserError, match="no chat template"):  # at deploy time, before a replica starts
        resolve_config(ServeConfig(model=str(tiny_model_dir), prompt_format="chat"))
    with pytest.raises(UserError, match="no chat template"):  # and in a replica (hub names, object stores)
        make_service(tiny_model_dir, tmp_path_factory, prompt_format="chat")


def test_a_report_of_a_chat_answer_keeps_the_prompt_the_model_saw(chat_service, chat_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    body = {"reason": "incorrect", "response": "r", "instruction": "Summarize.", "input": "A text.",
            "details": "chat-report"}
    assert post(chat_service, "/v1/reports", body).status_code == 200
    with sqlite3.connect(chat_service.config.reports_db) as db:
        stored = db.execute("SELECT prompt FROM reports WHERE details = 'chat-report'").fetchone()[0]
    assert stored == tokenizer.apply_chat_template([{"role": "user", "content": "Summarize.\n\nA text."}],
                                                   add_generation_prompt=True, tokenize=False)


@pytest.mark.browser
def test_demo_page_of_a_chat_model_uses_the_chat_endpoint_in_chromium(chat_service, chat_model_dir):
    from playwright.sync_api import sync_playwright

    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    with InProcessServer(chat_service) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            routes = []
            page.on("request", lambda request: routes.append(request.url))
            page.goto(server.url)
            page.fill("#instruction", "Give three tips for staying healthy.")
            page.fill("#input", "for an office worker")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=120_000)
            answer = page.text_content("#answer")
            page.fill("#details", "chat-browser-test")
            page.click("#report-button")
            page.wait_for_function("document.getElementById('report-status').textContent.includes('saved')",
                                   timeout=60_000)
        finally:
            browser.close()
    assert server.url + "v1/chat/completions" in routes and server.url + "v1/completions" not in routes
    assert answer and "undefined" not in answer
    with sqlite3.connect(chat_service.config.reports_db) as db:
        row = db.execute("SELECT instruction, input, prompt, response FROM reports "
                         "WHERE details = 'chat-browser-test'").fetchone()
    message = "Give three tips for staying healthy.\n\nfor an office worker"
    assert row[:2] == ("Give three tips for staying healthy.", "for an office worker") and row[3] == answer
    assert row[2] == tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                   add_generation_prompt=True, tokenize=False)
