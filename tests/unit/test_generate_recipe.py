"""Alpaca's own recipe, exactly: seed tasks and prompt header from URLs (fetched once, cached, hashed),
prompts byte-identical to Alpaca's ``encode_prompt``, its teacher behaviour (end-of-text ban, shrinking
max_tokens on context errors), and a finished run or ``--reprocess`` that needs no key (no Ray needed)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from alpaca_ray.config import ConfigError, UserError
from alpaca_ray.generate import GenerateConfig, generate
from alpaca_ray.generate.calls import ask_teacher, make_request, sampling_args
from alpaca_ray.generate.cli import main
from alpaca_ray.llm_client import EndpointConfig, LLMClient, RawJournal
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.conftest import REPO_ROOT
from tests.support.generate_teacher import SelfInstructTeacher, write_seed_tasks

# Stanford Alpaca's prompt.txt as published at the commit configs/alpaca-7b.yaml pins
# (https://github.com/tatsu-lab/stanford_alpaca, Apache-2.0; typos and the missing final newline included).
# Served to the code under test by a local HTTP server, as raw.githubusercontent.com serves it.
ALPACA_PROMPT_TXT = (
    "You are asked to come up with a set of 20 diverse task instructions. These task instructions will be given to "
    "a GPT model and we will evaluate the GPT model for completing the instructions.\n\n"
    "Here are the requirements:\n"
    "1. Try not to repeat the verb for each instruction to maximize diversity.\n"
    "2. The language used for the instruction also should be diverse. For example, you should combine questions "
    "with imperative instrucitons.\n"
    "3. The type of instructions should be diverse. The list should include diverse types of tasks like "
    "open-ended generation, classification, editing, etc.\n"
    "2. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to "
    "create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set "
    "a reminder because it cannot perform any action.\n"
    "3. The instructions should be in English.\n"
    "4. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is "
    "permitted.\n"
    "5. You should generate an appropriate input to the instruction. The input field should contain a specific "
    "example provided for the instruction. It should involve realistic data and should not contain simple "
    "placeholders. The input should provide substantial content to make the instruction challenging but should "
    "ideally not exceed 100 words.\n"
    "6. Not all instructions require input. For example, when a instruction asks about some general information, "
    "\"what is the highest peak in the world\", it is not necssary to provide a specific context. In this case, we "
    "simply put \"<noinput>\" in the input field.\n"
    "7. The output should be an appropriate response to the instruction and the input. Make sure the output is "
    "less than 100 words.\n\n"
    "List of 20 tasks:")


def alpaca_encode_prompt(prompt_instructions, prompt_txt):
    """Alpaca's ``encode_prompt``, verbatim from stanford_alpaca's generate_instruction.py (commit f134962),
    except that prompt.txt's text is passed in instead of read from ``./prompt.txt``."""
    prompt = prompt_txt + "\n"

    for idx, task_dict in enumerate(prompt_instructions):
        (instruction, input, output) = task_dict["instruction"], task_dict["input"], task_dict["output"]  # noqa: A001
        instruction = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        input = "<noinput>" if input.lower() == "" else input  # noqa: A001
        prompt += "###\n"
        prompt += f"{idx + 1}. Instruction: {instruction}\n"
        prompt += f"{idx + 1}. Input:\n{input}\n"
        prompt += f"{idx + 1}. Output:\n{output}\n"
    prompt += "###\n"
    prompt += f"{idx + 2}. Instruction:"
    return prompt


@pytest.fixture
def web(tmp_path):
    """A local HTTP server over a folder, standing in for raw.githubusercontent.com; counts the GETs."""
    root = tmp_path / "web"
    root.mkdir()
    gets = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            gets.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", gets
    server.shutdown()
    server.server_close()


def test_alpacas_files_from_urls_give_alpacas_prompts_byte_for_byte(web, tmp_path, shared_data, capsys):
    root, url, gets = web
    shutil.copy(shared_data / "self_instruct_seed_tasks.jsonl", root / "seed_tasks.jsonl")
    (root / "prompt.txt").write_text(ALPACA_PROMPT_TXT)
    output = tmp_path / "out"
    args = ["--output", str(output), "--target", "10", "--seed-tasks", f"{url}/seed_tasks.jsonl",
            "--prompt-template", f"{url}/prompt.txt", "--seed", "3", "--dry-run"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    seed_sha = hashlib.sha256((root / "seed_tasks.jsonl").read_bytes()).hexdigest()
    prompt_sha = hashlib.sha256(ALPACA_PROMPT_TXT.encode()).hexdigest()
    assert f"{url}/seed_tasks.jsonl" in shown and seed_sha in shown and prompt_sha in shown
    assert sorted(gets) == ["/prompt.txt", "/seed_tasks.jsonl"]
    assert main(args) == 0 and len(gets) == 2  # fetched once: the second run reads OUTPUT/sources/
    assert len(list((output / "sources").iterdir())) == 2

    tasks = {}
    for line in (root / "seed_tasks.jsonl").read_text().splitlines():  # as Alpaca reads them
        t = json.loads(line)
        tasks[t["id"]] = {"instruction": t["instruction"], "input": t["instances"][0]["input"],
                          "output": t["instances"][0]["output"]}
    from alpaca_ray.generate.pipeline import read_inputs

    config = GenerateConfig(output=str(output), target=10, seed_tasks=f"{url}/seed_tasks.jsonl",
                            prompt_template=f"{url}/prompt.txt")
    seeds, header, inputs = read_inputs(config)
    assert inputs["seed_tasks"]["sha256"] == seed_sha and inputs["prompt_template"]["sha256"] == prompt_sha
    for number in range(40):
        request = make_request(number, seeds, header, 3, 0, "run")
        expected = alpaca_encode_prompt([tasks[i] for i in request["seed_task_ids"]], ALPACA_PROMPT_TXT)
        assert request["prompt"] == expected

    missing = GenerateConfig(output=str(tmp_path / "o2"), target=1, seed_tasks=f"{url}/no-such.jsonl")
    with pytest.raises(UserError, match=f"{url}/no-such.jsonl: HTTP 404"):
        read_inputs(missing)


def test_alpaca_teacher_behaviour_end_of_text_ban_and_shrinking_max_tokens(tmp_path):
    def davinci_args(model, **extra):
        return sampling_args(GenerateConfig(output="o", target=1, teacher_model=model, ban_end_of_text=True, **extra))

    assert davinci_args("text-davinci-003")["logit_bias"] == {"50256": -100}  # Alpaca's exact argument
    assert davinci_args("gpt-3.5-turbo-instruct")["logit_bias"] == {"100257": -100}
    assert davinci_args("gpt-4o-mini")["logit_bias"] == {"199999": -100}
    assert davinci_args("my-llama", end_of_text_token_id=128001)["logit_bias"] == {"128001": -100}
    with pytest.raises(ConfigError, match="end-of-text-token-id"):
        davinci_args("my-llama")

    seen = []

    def teacher(kind, body):  # a 4,096-token model: a long prompt leaves room for ~2,500 tokens only
        seen.append(body["max_tokens"])
        if body["max_tokens"] > 2500:
            return Reply(status=400, error_message="This model's maximum context length is 4097 tokens, however you "
                                                   "requested 4700 tokens. Please reduce your prompt; or completion "
                                                   "length.")
        return Reply(SelfInstructTeacher().answer_text(4, __import__("random").Random(0)))

    request = {"request_id": "r", "request_number": 0, "prompt": "p\n4. Instruction:", "seed_task_ids": []}
    with OpenAIServer(teacher, models=["m"]) as server:
        client = LLMClient(EndpointConfig("m", base_url=server.base_url, api="completions"))

        async def ask(shrink):
            try:
                return await ask_teacher(client, RawJournal(tmp_path / "j.jsonl"), request, {"max_tokens": 3072},
                                         shrink_max_tokens=shrink)
            finally:
                await client.aclose()

        failed = asyncio.run(ask(False))
        answered = asyncio.run(ask(True))
    assert failed["failure"] == "RequestRejectedError"
    assert seen == [3072, 3072, 2457] and answered["max_tokens"] == 2457 and answered["text"]


def test_a_finished_run_and_reprocess_need_no_key_and_no_endpoint(tmp_path, monkeypatch):
    seeds = tmp_path / "seeds.jsonl"
    write_seed_tasks(seeds)
    journal = RawJournal(tmp_path / "out" / "raw" / "earlier.jsonl")
    teacher = SelfInstructTeacher(good_tasks=10)
    for n in range(3):
        journal.append({"request_id": f"r{n}", "request_number": n, "time": float(n), "model": "gpt-4o-mini",
                        "api": "chat", "prompt": "p", "seed_task_ids": ["a", "b", "c"],
                        "text": teacher.answer_text(4, __import__("random").Random(n)), "finish_reason": "stop",
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    monkeypatch.delenv("NO_KEY_HERE", raising=False)
    # The OpenAI endpoint with no key set: any call, even the free model check, would fail.
    config = GenerateConfig(output=str(tmp_path / "out"), target=20, seed_tasks=str(seeds), api_key_env="NO_KEY_HERE",
                            progress=False)
    stats = generate(config)
    assert stats["complete"] and stats["kept"] == 20 and stats["this_run"]["requests"] == 0
    assert stats["sources"]["seed_tasks"]["sha256"] == hashlib.sha256(seeds.read_bytes()).hexdigest()
    reprocessed = generate(GenerateConfig(output=str(tmp_path / "out"), target=None, reprocess=True,
                                          seed_tasks=str(seeds), api_key_env="NO_KEY_HERE", progress=False))
    assert reprocessed["kept"] == 30 and reprocessed["this_run"]["reprocess"]


def test_the_alpaca_recipe_names_stanfords_files_at_a_pinned_commit(capsys):
    recipe = yaml.safe_load((REPO_ROOT / "configs" / "alpaca-7b.yaml").read_text())
    generate_section, train = recipe["generate"], recipe["train"]
    pinned = r"https://raw\.githubusercontent\.com/tatsu-lab/stanford_alpaca/[0-9a-f]{40}/"
    assert re.fullmatch(pinned + "seed_tasks.jsonl", generate_section["seed_tasks"])
    assert re.fullmatch(pinned + "prompt.txt", generate_section["prompt_template"])
    assert generate_section["ban_end_of_text"] and generate_section["shrink_max_tokens"]
    assert train["eval_fraction"] == 0  # Alpaca trained on all 52K
    config = GenerateConfig(output="o", **generate_section)
    assert sampling_args(config)["logit_bias"] == {"100257": -100}  # gpt-3.5-turbo-instruct's <|endoftext|>

    from alpaca_ray.pipeline.cli import main as pipeline_main

    assert pipeline_main(["--config", str(REPO_ROOT / "configs" / "alpaca-7b.yaml"), "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert generate_section["seed_tasks"] in shown and generate_section["prompt_template"] in shown
