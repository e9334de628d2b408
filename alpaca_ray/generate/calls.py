"""Teacher requests: building them from sampled seed tasks, and making one (journaled before parsing).

Plain functions with no Ray in them, and :class:`TeacherWorker`, the Ray Data actor ``pipeline.py`` maps
requests with (it lives here so workers import only these small modules, not the driver's).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Sequence

from alpaca_ray.generate.prompt import SeedExample, encode_prompt, sample_examples
from alpaca_ray.llm_client import (
    AuthError,
    EndpointConfig,
    LLMClient,
    LLMError,
    MalformedResponseError,
    ModelNotFoundError,
    QuotaExceededError,
    RawJournal,
    Secret,
)

#: Failures that will not go away by asking again: the run stops at once.
FATAL_FAILURES = ("auth", "model_not_found", "quota")


def new_run_id() -> str:
    """A sortable, unique id for one run (journal files and request ids start with it)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def make_requests(count: int, seed_examples: Sequence[SeedExample], header: str, num_examples: int,
                  rng: random.Random, run_id: str, first_number: int = 0) -> list[dict]:
    """``count`` requests, each showing ``num_examples`` seed tasks drawn at random."""
    requests = []
    for number in range(first_number, first_number + count):
        examples = sample_examples(seed_examples, num_examples, rng)
        requests.append({"request_id": f"{run_id}-{number:06d}", "prompt": encode_prompt(examples, header),
                         "seed_task_ids": [e.id for e in examples]})
    return requests


def sampling_args(config: object) -> dict:
    """The decoding arguments sent with every request (Alpaca's ``OpenAIDecodingArguments``)."""
    args = {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_tokens,
            "stop": list(config.stop)}
    if config.logit_bias:
        args["logit_bias"] = dict(config.logit_bias)
    return args


async def ask_teacher(client: LLMClient, journal: RawJournal, request: dict, sampling: dict,
                      system_prompt: str = "") -> dict:
    """Send one request; journal the answer (fsynced) before returning it, so a crash cannot lose it.

    Returns the journal record, or ``{"request_id", "failure", "message"}`` for a request that got no
    answer (retries ran out, the key was refused...): nothing to journal, nothing paid for.
    """
    endpoint = client.endpoint
    prompt = request["prompt"]
    if system_prompt and endpoint.api == "chat":
        prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    record = {"request_id": request["request_id"], "time": 0.0, "model": endpoint.model, "api": endpoint.api,
              "prompt": request["prompt"], "seed_task_ids": list(request["seed_task_ids"])}
    try:
        completion = await client.complete(prompt, **sampling)
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
    except LLMError as err:
        return {"request_id": request["request_id"], "failure": type(err).__name__, "message": str(err)}
    record.update(time=time.time(), text=completion.text, finish_reason=completion.finish_reason,
                  usage={"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
                  retries=completion.retries)
    if system_prompt and endpoint.api == "chat":
        record["system_prompt"] = system_prompt
    journal.append(record)
    return record


class TeacherWorker:
    """A Ray Data actor: calls the teacher for each request row, journaling each answer first."""

    def __init__(self, endpoint: dict, sampling: dict, raw_dir: str, run_id: str, limiter_name: str | None,
                 api_key: Secret, system_prompt: str = "", node_check=None):
        import ray

        if node_check is not None:  # a node the autoscaler started after the preflight: check it first
            node_check.verify()
        limiter = ray.get_actor(limiter_name) if limiter_name else None
        self.client = LLMClient(EndpointConfig(**endpoint), limiter=limiter, api_key=api_key)
        # One file per worker: appends never interleave between processes.
        self.journal = RawJournal(os.path.join(raw_dir, f"{run_id}-{uuid.uuid4().hex[:8]}.jsonl"))
        self.sampling, self.system_prompt = sampling, system_prompt

    async def __call__(self, batch: dict) -> dict:
        out = []
        for request in batch["request"]:
            record = await ask_teacher(self.client, self.journal, json.loads(request), self.sampling,
                                       self.system_prompt)
            out.append(json.dumps(record, ensure_ascii=False))
        return {"record": out}
