"""Answer collection and judging requests: prompts, cache keys, the journals, and the async worker.

Every request has a *key* (a hash of the model, the API, the prompt and the sampling settings). Each
answer is appended to a journal under ``OUTPUT/answers/`` or ``OUTPUT/judgments/`` the moment it
arrives, and a rerun sends only the requests whose key no journal holds, so nothing is paid for twice.
Each worker writes its own journal file (``answers/a-<worker>.jsonl``), so workers never share a file.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass

from alpaca_ray.evaluate.alpaca_eval import chat_messages
from alpaca_ray.evaluate.eval_sets import EvalItem
from alpaca_ray.evaluate.judge import ORDERS, judge_prompt
from alpaca_ray.llm_client import EndpointConfig, LLMClient, LLMError, RawJournal
from alpaca_ray.prompts import format_prompt

#: Journal names (relative to the output dir); each worker appends ``-<worker id>.jsonl``.
ANSWER_JOURNALS = {"a": "answers/a", "b": "answers/b"}
JUDGE_JOURNAL = "judgments/judge"


@dataclass(frozen=True)
class Request:
    """One call to make: ``endpoint`` names which ("a", "b" or "judge"); ``meta`` goes into the journal."""

    key: str
    endpoint: str
    journal: str
    prompt: str | list[dict]
    meta: dict

    def to_row(self) -> dict:
        # Chat prompts are lists of dicts; a JSON string keeps the Ray Data column one simple type.
        return {"key": self.key, "endpoint": self.endpoint, "journal": self.journal,
                "prompt_json": json.dumps(self.prompt, ensure_ascii=False), "meta_json": json.dumps(self.meta)}

    @classmethod
    def from_row(cls, row: dict) -> Request:
        return cls(row["key"], row["endpoint"], row["journal"], json.loads(row["prompt_json"]),
                   json.loads(row["meta_json"]))


def request_key(model: str, api: str, prompt: str | list[dict], sampling: dict) -> str:
    blob = json.dumps([model, api, prompt, sorted(sampling.items())], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def answer_prompt(item: EvalItem, api: str) -> str | list[dict]:
    """Alpaca's template for the completions API; the instruction (and input) as one user message for chat."""
    if api == "completions":
        return format_prompt(item.instruction, item.input)
    content = item.instruction if not item.input.strip() else f"{item.instruction}\n\n{item.input}"
    return [{"role": "user", "content": content}]


def answer_requests(items: list[EvalItem], side: str, endpoint: EndpointConfig, sampling: dict) -> list[Request]:
    requests = []
    for item in items:
        prompt = answer_prompt(item, endpoint.api)
        key = request_key(endpoint.model, endpoint.api, prompt, sampling)
        requests.append(Request(key, side, ANSWER_JOURNALS[side], prompt, {"item_id": item.id, "side": side}))
    return requests


def judge_requests(items: list[EvalItem], answers_a: dict[str, str], answers_b: dict[str, str], template: str,
                   endpoint: EndpointConfig, sampling: dict) -> dict[tuple[str, str], Request]:
    """The two judge requests per item, keyed by (item id, order): "ab" shows A first, "ba" shows B first."""
    requests = {}
    for item in items:
        for order in ORDERS:
            first, second = (answers_a, answers_b) if order == "ab" else (answers_b, answers_a)
            text = judge_prompt(template, item.instruction, item.input, first[item.id], second[item.id])
            # A template of <|im_start|>role blocks (AlpacaEval's) becomes those messages; others one user message.
            prompt: str | list[dict] = text if endpoint.api == "completions" else chat_messages(text)
            key = request_key(endpoint.model, endpoint.api, prompt, sampling)
            requests[(item.id, order)] = Request(key, "judge", JUDGE_JOURNAL, prompt,
                                                 {"item_id": item.id, "order": order})
    return requests


def read_journals(output: str, journal: str) -> dict[str, dict]:
    """Every saved answer of one journal name (all workers' files), by request key."""
    saved: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(output, journal + "-*.jsonl"))):
        for record in RawJournal(path).read():
            if "key" in record and "text" in record:
                saved.setdefault(record["key"], record)
    return saved


def pending(requests: list[Request], saved: dict[str, dict]) -> list[Request]:
    """The requests no journal answers yet, each key once."""
    seen: set[str] = set()
    out = []
    for request in requests:
        if request.key not in saved and request.key not in seen:
            seen.add(request.key)
            out.append(request)
    return out


class RequestRunner:
    """Sends requests to their endpoints and journals each answer as it arrives (one per worker process)."""

    def __init__(self, endpoints: dict[str, EndpointConfig], sampling: dict[str, dict], output: str,
                 api_keys: dict[str, str | None] | None = None, limiters: dict | None = None):
        api_keys, limiters = api_keys or {}, limiters or {}
        self.clients = {name: LLMClient(endpoint, limiter=limiters.get(name), api_key=api_keys.get(name))
                        for name, endpoint in endpoints.items()}
        self.sampling, self.output = sampling, output
        self.worker_id = uuid.uuid4().hex[:8]
        self.journals: dict[str, RawJournal] = {}

    def _journal(self, name: str) -> RawJournal:
        if name not in self.journals:
            self.journals[name] = RawJournal(os.path.join(self.output, f"{name}-{self.worker_id}.jsonl"))
        return self.journals[name]

    async def run_one(self, request: Request) -> dict:
        client = self.clients[request.endpoint]
        try:
            completion = await client.complete(request.prompt, **self.sampling.get(request.endpoint, {}))
        except LLMError as err:  # keep going; the driver reports every failure and a rerun retries them
            return {"key": request.key, "error": f"{type(err).__name__}: {err}", "journal": request.journal,
                    "journal_path": "", "record_json": ""}
        endpoint = client.endpoint
        record = {
            "key": request.key, **request.meta, "time": time.time(), "model": endpoint.model,
            "api": endpoint.api, "prompt": request.prompt, "text": completion.text,
            "finish_reason": completion.finish_reason, "retries": completion.retries,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
        }
        if completion.top_logprobs is not None:  # the logprob judge's answer is these, not the text
            record["top_logprobs"] = completion.top_logprobs
        journal = self._journal(request.journal)
        journal.append(record)
        # The record also goes back to the driver, which keeps a copy where it cannot see this worker's file
        # (a worker on another node, no shared filesystem).
        return {"key": request.key, "error": "", "journal": request.journal, "journal_path": journal.path,
                "record_json": json.dumps(record, ensure_ascii=False)}

    async def run(self, requests: list[Request]) -> list[dict]:
        return list(await asyncio.gather(*(self.run_one(r) for r in requests)))


def keep_unseen_records(results: list[dict], output: str) -> int:
    """Journal on the driver's side the answers whose worker journal it cannot see; returns how many."""
    kept = 0
    for row in results:
        if row["record_json"] and not os.path.exists(row["journal_path"]):
            RawJournal(os.path.join(output, f"{row['journal']}-driver.jsonl")).append(json.loads(row["record_json"]))
            kept += 1
    return kept
