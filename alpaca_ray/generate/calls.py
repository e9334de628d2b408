"""Teacher requests: building them from sampled seed tasks, and making one (journaled before parsing).

Plain functions with no Ray in them, and :class:`TeacherWorker`, the long-lived actor ``pipeline.py`` sends
requests to (it lives here so workers import only these small modules, not the driver's).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from collections.abc import Sequence

from alpaca_ray.cluster import storage
from alpaca_ray.generate.prompt import SeedExample, encode_prompt, sample_examples
from alpaca_ray.llm_client import (
    AuthError,
    EndpointConfig,
    LLMClient,
    LLMError,
    MalformedResponseError,
    ModelNotFoundError,
    NotOpenAICompatibleError,
    QuotaExceededError,
    RawJournal,
    RequestRejectedError,
    Secret,
)

#: Failures that will not go away by asking again: the run stops at once.
FATAL_FAILURES = ("auth", "model_not_found", "quota", "not_openai_compatible")


def new_run_id() -> str:
    """A sortable, unique id for one run (journal files and request ids start with it)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def make_request(number: int, seed_examples: Sequence[SeedExample], header: str, num_examples: int, seed: int,
                 run_id: str) -> dict:
    """Request ``number``: ``num_examples`` seed tasks drawn from ``Random((seed, number))``, whatever run sends it."""
    examples = sample_examples(seed_examples, num_examples, random.Random(f"{seed}:{number}"))
    return {"request_id": f"{run_id}-{number:06d}", "request_number": number,
            "prompt": encode_prompt(examples, header), "seed_task_ids": [e.id for e in examples]}


class RequestFeed:
    """The requests of one output directory, numbered across its runs, so a resumed run sends new prompts.

    Request ``n`` always shows the seed tasks drawn by ``Random((seed, n))``. The next free number is kept
    in ``raw/requests.json`` (reserved a block ahead, so a killed run never hands its numbers out again)
    together with the seed, and is never below the journal's highest number + 1.
    """

    BLOCK = 64

    def __init__(self, raw_dir: str, seed_examples: Sequence[SeedExample], header: str, num_examples: int,
                 run_id: str, seed: int | None = None, journal_records: Sequence[dict] = ()):
        self.path = os.path.join(raw_dir, "requests.json")
        self.seed_examples, self.header, self.num_examples, self.run_id = seed_examples, header, num_examples, run_id
        state = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                state = json.load(handle)
        if seed is None:
            seed = state.get("seed")
        self.seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**32)
        numbers = [int(r["request_number"]) for r in journal_records if isinstance(r.get("request_number"), int)]
        self.next_number = max([int(state.get("next_request_number", 0)), *(n + 1 for n in numbers)])
        self._reserved_until = self.next_number

    def peek(self) -> dict:
        """The request the next call returns (nothing reserved, nothing written)."""
        return make_request(self.next_number, self.seed_examples, self.header, self.num_examples, self.seed,
                            self.run_id)

    def __call__(self) -> dict:
        """The next request."""
        if self.next_number >= self._reserved_until:
            self._reserved_until = self.next_number + self.BLOCK
            storage.write_text(self.path, json.dumps({"seed": self.seed, "next_request_number": self._reserved_until}))
        number, self.next_number = self.next_number, self.next_number + 1
        return make_request(number, self.seed_examples, self.header, self.num_examples, self.seed, self.run_id)


def sampling_args(config: object) -> dict:
    """The decoding arguments sent with every request (Alpaca's ``OpenAIDecodingArguments``)."""
    args = {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_tokens,
            "stop": list(config.stop)}
    logit_bias = dict(config.logit_bias)
    if config.ban_end_of_text:
        logit_bias.setdefault(str(config.end_of_text_id()), -100)
    if logit_bias:
        args["logit_bias"] = logit_bias
    return args


#: What an endpoint says when prompt + max_tokens exceed the model's context (OpenAI, vLLM and others).
_CONTEXT_TOO_LONG = re.compile(r"maximum context length|reduce (?:your prompt|the length)|context_length_exceeded",
                               re.IGNORECASE)
#: Alpaca's openai_completion cut max_tokens to 80% on each such error.
SHRINK_FACTOR = 0.8


async def ask_teacher(client: LLMClient, journal: RawJournal, request: dict, sampling: dict,
                      system_prompt: str = "", shrink_max_tokens: bool = False) -> dict:
    """Send one request; journal the answer (fsynced) before returning it, so a crash cannot lose it.

    Returns the journal record, or ``{"request_id", "failure", "message"}`` for a request that got no
    answer (retries ran out, the key was refused...): nothing to journal, nothing paid for. With
    ``shrink_max_tokens``, a request rejected as too long for the model's context is sent again with
    ``max_tokens`` cut to 80% until it fits (Alpaca's ``openai_completion``).
    """
    endpoint = client.endpoint
    prompt = request["prompt"]
    if system_prompt and endpoint.api == "chat":
        prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    record = {"request_id": request["request_id"], "time": 0.0, "model": endpoint.model, "api": endpoint.api,
              "prompt": request["prompt"], "seed_task_ids": list(request["seed_task_ids"])}
    if "request_number" in request:
        record["request_number"] = request["request_number"]
    try:
        while True:
            try:
                completion = await client.complete(prompt, **sampling)
                break
            except RequestRejectedError as err:
                smaller = int(sampling.get("max_tokens") or 0) * SHRINK_FACTOR
                if not (shrink_max_tokens and _CONTEXT_TOO_LONG.search(str(err)) and int(smaller) >= 1):
                    raise
                sampling = {**sampling, "max_tokens": int(smaller)}
                record["max_tokens"] = int(smaller)  # journaled: what the answer was asked for
    except MalformedResponseError as err:
        # Answered (and likely billed) but unreadable: journaled with the error, counted as malformed. The
        # line keeps the journal's shape (empty text, a standard finish reason), so it can still be replayed.
        record.update(time=time.time(), text="", finish_reason="stop",
                      usage={"prompt_tokens": 0, "completion_tokens": 0}, error=str(err))
        journal.append(record)
        return record
    except AuthError as err:
        return {"request_id": request["request_id"], "failure": "auth", "message": str(err)}
    except ModelNotFoundError as err:
        return {"request_id": request["request_id"], "failure": "model_not_found", "message": str(err)}
    except QuotaExceededError as err:
        return {"request_id": request["request_id"], "failure": "quota", "message": str(err)}
    except NotOpenAICompatibleError as err:
        return {"request_id": request["request_id"], "failure": "not_openai_compatible", "message": str(err)}
    except LLMError as err:
        return {"request_id": request["request_id"], "failure": type(err).__name__, "message": str(err),
                "retry_after_capped": int(getattr(err, "retry_after_capped", 0))}
    record.update(time=time.time(), text=completion.text, finish_reason=completion.finish_reason,
                  usage={"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
                  retries=completion.retries)
    if completion.extra.get("retry_after_capped"):
        record["retry_after_capped"] = int(completion.extra["retry_after_capped"])
    if system_prompt and endpoint.api == "chat":
        record["system_prompt"] = system_prompt
    journal.append(record)
    return record


class TeacherWorker:
    """A long-lived Ray actor calling the teacher: ``ask`` one request at a time, several in flight at once
    (an async actor), each answer journaled before it is returned."""

    def __init__(self, endpoint: dict, sampling: dict, raw_dir: str, run_id: str, limiter_name: str | None,
                 api_key: Secret, system_prompt: str = "", node_check=None, shrink_max_tokens: bool = False):
        import ray

        if node_check is not None:  # a node the autoscaler started after the preflight: check it first
            node_check.verify()
        limiter = ray.get_actor(limiter_name) if limiter_name else None
        self.client = LLMClient(EndpointConfig(**endpoint), limiter=limiter, api_key=api_key)
        # One file per worker: appends never interleave between processes.
        self.journal = RawJournal(os.path.join(raw_dir, f"{run_id}-{uuid.uuid4().hex[:8]}.jsonl"))
        self.sampling, self.system_prompt, self.shrink_max_tokens = sampling, system_prompt, shrink_max_tokens

    async def ask(self, request: dict) -> dict:
        return await ask_teacher(self.client, self.journal, request, self.sampling, self.system_prompt,
                                 self.shrink_max_tokens)
