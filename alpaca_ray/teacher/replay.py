"""Read recorded teacher responses and answer OpenAI requests with them, in order, cycling.

Order is deterministic: the i-th request the server receives gets response ``i mod N``, whatever the
endpoint (chat or completions) and whatever the prompt, so a run against the offline teacher is
reproducible. The files are generate's raw-journal format; only ``text`` is required.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass

from alpaca_ray.config import UserError
from alpaca_ray.openai_server import OpenAIServer, Reply

#: Finish reasons the OpenAI API returns; anything else in a recording is a mistake worth reporting.
FINISH_REASONS = ("stop", "length", "content_filter")


class ReplayError(UserError):
    """A replay file that cannot be served, naming the file, line and field."""


@dataclass(frozen=True)
class RecordedResponse:
    """One recorded teacher answer."""

    text: str
    finish_reason: str = "stop"


def replay_files(path: str | os.PathLike) -> list[str]:
    """The JSONL files behind ``path``: the file itself, or a directory's ``*.jsonl`` in name order."""
    path = str(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".jsonl"))
        if not files:
            raise ReplayError(f"{path}: directory has no *.jsonl replay files")
        return files
    if not os.path.exists(path):
        raise ReplayError(f"{path}: no such replay file (give a JSONL file of recorded responses, e.g. the "
                          "bundled alpaca_ray/data/teacher_replay.jsonl or a generate run's OUTPUT/raw/)")
    return [path]


def _parse_line(path: str, number: int, line: str) -> RecordedResponse:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ReplayError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ReplayError(f"{path}, line {number}: expected a JSON object with a 'text' field, "
                          f"got {type(obj).__name__}")
    if "text" not in obj:
        raise ReplayError(f"{path}, line {number}: field 'text' is missing (each line needs the teacher's "
                          "response text)")
    if not isinstance(obj["text"], str):
        raise ReplayError(f"{path}, line {number}: field 'text' must be a string, got {type(obj['text']).__name__}")
    finish_reason = obj.get("finish_reason") or "stop"
    if finish_reason not in FINISH_REASONS:
        raise ReplayError(f"{path}, line {number}: field 'finish_reason' must be one of "
                          f"{', '.join(FINISH_REASONS)}, got {finish_reason!r}")
    return RecordedResponse(obj["text"], finish_reason)


def read_replay(path: str | os.PathLike) -> list[RecordedResponse]:
    """All recorded responses behind ``path``, in file and line order.

    A last line cut short without its newline (a run killed mid-write; the raw journal tolerates it
    too) is skipped with a warning; any other bad line is an error naming the file, line and field.
    """
    responses: list[RecordedResponse] = []
    for file in replay_files(path):
        with open(file, encoding="utf-8") as handle:
            content = handle.read()
        lines = content.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            torn = number == len(lines) and not content.endswith("\n")
            try:
                responses.append(_parse_line(file, number, line))
            except ReplayError as err:
                if not torn or "not valid JSON" not in str(err):
                    raise
                print(f"warning: {file}, line {number}: skipping a torn last line", file=sys.stderr)
    if not responses:
        raise ReplayError(f"{path}: empty: no recorded responses to replay")
    return responses


class ReplayResponder:
    """An :class:`~alpaca_ray.openai_server.OpenAIServer` responder serving recordings in order, cycling."""

    def __init__(self, responses: list[RecordedResponse]):
        if not responses:
            raise ValueError("ReplayResponder needs at least one recorded response")
        self.responses = list(responses)
        self.served = 0
        self._lock = threading.Lock()  # the server answers each request on its own thread

    def __call__(self, kind: str, body: dict) -> Reply:
        with self._lock:
            response = self.responses[self.served % len(self.responses)]
            self.served += 1
        return Reply(text=response.text, finish_reason=response.finish_reason)


def start_teacher(replay: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                  models: list[str] | None = None) -> OpenAIServer:
    """Read ``replay`` and start serving it in a background thread; call ``.stop()`` when done."""
    responder = ReplayResponder(read_replay(replay))
    try:
        server = OpenAIServer(responder, models=models, host=host, port=port)
    except OSError as err:
        raise UserError(f"cannot bind the offline teacher to {host}:{port}: {err.strerror}") from None
    return server.start()
