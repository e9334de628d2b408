"""A small, real HTTP server speaking the OpenAI completions and chat protocols.

What answers is a *responder*: a function from the request to a :class:`Reply`. The offline teacher
(``alpaca-ray teacher --replay``) is one responder; the test suites plug in others that inject 429s
with ``Retry-After``, 500s, slow answers, truncated ``length`` finishes and malformed text. It runs in a
background thread on loopback, so the real ``openai`` client can talk to it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server sends back for one request."""

    text: str = ""
    finish_reason: str = "stop"
    #: An HTTP error status (429, 500, 401...) answered with an OpenAI-style error body instead of text.
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering (slow answers and client time-outs).
    delay_s: float = 0.0
    #: Send these bytes as the body verbatim (malformed JSON and the like).
    raw_body: bytes | None = None
    error_message: str = ""


@dataclass
class SeenRequest:
    """A request as the server saw it, for tests that measure rates and count calls."""

    time: float
    path: str
    body: dict
    authorization: str | None


Responder = Callable[[str, dict], Reply]


def count_tokens(text: str) -> int:
    """A rough token count (whitespace words); real servers count with their tokenizer."""
    return len(text.split())


def prompt_text(kind: str, body: dict) -> str:
    """The prompt of a request: the ``prompt`` field, or the chat messages' contents joined."""
    if kind == "chat":
        return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))


def completion_body(kind: str, model: str, body: dict, reply: Reply) -> dict:
    """The OpenAI JSON response for a successful reply."""
    prompt_tokens, completion_tokens = count_tokens(prompt_text(kind, body)), count_tokens(reply.text)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                  "finish_reason": reply.finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": obj, "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIServer:
    """``with OpenAIServer(responder, models=["teacher"]) as server: server.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, responder: Responder, models: list[str] | None = None, api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        self.responder, self.models, self.api_key = responder, list(models or []), api_key
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="openai-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def completion_requests(self) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("completions")]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict | bytes, headers: dict[str, str] | None = None) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out tests)
                    pass

            def _authorized(self) -> bool:
                if server.api_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self._send(401, error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
                return False

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "alpaca-ray"} for m in server.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, error_body(f"no route {self.path}", "invalid_request_error"))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    self._send(400, error_body("request body is not JSON", "invalid_request_error"))
                    return
                with server._lock:
                    server.requests.append(SeenRequest(time.monotonic(), self.path, body,
                                                       self.headers.get("Authorization")))
                if not self._authorized():
                    return
                if self.path.endswith("/chat/completions"):
                    kind = "chat"
                elif self.path.endswith("/completions"):
                    kind = "completions"
                else:
                    self._send(404, error_body(f"no route {self.path}", "invalid_request_error"))
                    return
                model = body.get("model", "")
                if server.models and model not in server.models:
                    self._send(404, error_body(f"The model `{model}` does not exist.", "invalid_request_error",
                                               "model_not_found"))
                    return
                reply = server.responder(kind, body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.raw_body is not None:
                    self._send(reply.status, reply.raw_body, reply.headers)
                elif reply.status != 200:
                    message = reply.error_message or f"injected error {reply.status}"
                    self._send(reply.status, error_body(message, "server_error"), reply.headers)
                else:
                    self._send(200, completion_body(kind, model, body, reply), reply.headers)

        return Handler
