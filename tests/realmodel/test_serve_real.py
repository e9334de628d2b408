"""The serve app in-process (no Ray) on a real chat model, SmolLM2-135M-Instruct (ChatML, eos = ``<|im_end|>``):
the conversation reaches the model exactly as its chat template tokenizes it, and answers end at its EOS.

Greedy answers on CPU (about 20 tokens/s), kept short.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from alpaca_ray.serve.app import AlpacaService, LocalReports, create_api
from alpaca_ray.serve.config import ServeConfig
from alpaca_ray.serve.reports import ReportStore

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain?"},
]


@pytest.fixture(scope="module")
def service(smollm2_dir, tmp_path_factory) -> AlpacaService:
    db = tmp_path_factory.mktemp("serve-real") / "reports.db"
    config = ServeConfig(model=str(smollm2_dir), reports_db=str(db), content_filter="none")
    return AlpacaService(config, None, LocalReports(ReportStore(str(db))))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def chat(service: AlpacaService, **request):
    """The real ``openai`` client against the app over ASGI; returns (reply, prompts the engine was given)."""
    seen, generate = [], service.engine.generate

    def recording(prompt, *args, **kwargs):  # the real engine still answers
        seen.append(prompt)
        return generate(prompt, *args, **kwargs)

    async def go():
        transport = httpx.ASGITransport(app=create_api(service))
        async with httpx.AsyncClient(transport=transport, timeout=300) as http:
            client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="none", http_client=http, max_retries=0)
            return await client.chat.completions.create(model=service.model_id, temperature=0, **request)

    service.engine.generate = recording
    try:
        return asyncio.run(go()), seen
    finally:
        del service.engine.generate  # back to the class's method


def test_a_system_and_three_turn_chat_reaches_the_model_as_its_template_tokenizes_it(service, tokenizer):
    assert service.prompt_format == "chat"  # a converted GGUF: a chat template, no alpaca_ray.json
    expected = list(tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"])
    assert tokenizer.decode(expected).startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>")
    reply, seen = chat(service, messages=CONVERSATION, max_tokens=2)
    assert seen == [expected]
    assert reply.usage.prompt_tokens == len(expected)
    assert expected.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 7  # 6 messages + the answer's


def test_a_greedy_answer_is_english_and_stops_at_im_end(service, tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and 2 in service.engine.eos_ids
    reply, _ = chat(service, messages=[{"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=48)
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 40, content
    assert "Paris" in content and re.search(r"\b(the|is|of)\b", content), content
    assert "<|im_end|>" not in content and "<|im_start|>" not in content
