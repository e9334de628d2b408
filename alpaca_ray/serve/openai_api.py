"""The OpenAI wire format: request models (pydantic, strict types), response bodies, SSE chunks, errors."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alpaca_ray.chat import message_text, normalize_messages


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` holds a lone UTF-16 surrogate (JSON's ``"\\ud800"``): not
    text, so the tokenizer and SQLite cannot take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogate(v) for v in value)
    return False


class WireModel(BaseModel):
    """A request body: strict types ("5" is not an int, "yes" not a bool) and valid Unicode text only.

    Unknown fields (OpenAI's ``user``, ``logit_bias``...) are ignored.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        if has_lone_surrogate(value):
            raise ValueError("contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode text")
        return value


#: Seeds as OpenAI takes them (a signed 64-bit integer).
SEED_RANGE = (-(2**63), 2**63 - 1)


class _Request(WireModel):
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream_options: dict | None = None
    # not supported: accepted only to refuse them clearly (ignoring them would hand back answers without them)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool = False

    def refuse_unsupported(self) -> None:
        """A 400 naming the first OpenAI option this server does not implement, if the request asks for one."""
        asked = [("logprobs", self.logprobs not in (None, False)), ("top_logprobs", self.top_logprobs is not None),
                 ("echo", self.echo)]
        for name, given in asked:
            if given:
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop may hold at most 4 sequences", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    # /v1/completions in OpenAI's API defaults to 16 tokens; we use the deployment's default instead


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content's text (of content parts, the text ones)."""
        return message_text(self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as plain ``{"role", "content"}`` text dicts (developer -> system), ready for
        :func:`alpaca_ray.chat.render_prompt`."""
        return normalize_messages({"role": m.role, "content": m.content} for m in self.messages)


class ReportRequest(WireModel):
    """``POST /v1/reports``: each text field is capped (``max_report_field_chars``) by the app."""

    reason: str
    response: str
    instruction: str = ""
    input: str = ""
    prompt: str = ""
    details: str = Field("", max_length=5000)
    model: str | None = None

    def texts(self) -> dict[str, str]:
        return {"response": self.response, "instruction": self.instruction, "input": self.input,
                "prompt": self.prompt, "details": self.details, "model": self.model or ""}


class DetectRequest(WireModel):
    text: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                        for i, (text, finish) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(request_id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
              completion_tokens: int) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None} for i, (text, finish) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(kind: str, request_id: str, model: str, created: int, index: int, text: str,
                 finish_reason: str | None, first: bool = False) -> dict:
    """One SSE chunk body in the shape the ``openai`` client parses for each API."""
    if kind == "chat":
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def sse(data: dict | str) -> str:
    """A server-sent event line as OpenAI sends them: ``data: {...}`` then a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def validation_error(errors: list[dict]) -> APIError:
    """Turn FastAPI/pydantic validation errors into one OpenAI-style 400 naming the field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")),
                        code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic names union members (e.g. "str"); the field path is what helps a user
    location = [part for part in location if part not in ("str", "int", "float", "bool", "list[str]",
                                                          "list[dict[str,any]]", "function-after[...]")]
    param = ".".join(location) or None
    messages = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        messages.append(f"{where}: {error.get('msg', 'invalid value')}")
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_type"
    if first.get("type", "").endswith(("greater_than", "less_than", "greater_than_equal", "less_than_equal",
                                       "too_short", "too_long", "value_error")):
        code = "invalid_value"
    return APIError(400, "invalid request: " + "; ".join(messages), param=param, code=code)
