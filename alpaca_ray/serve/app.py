"""The Ray Serve application: an OpenAI-compatible API, the demo page, reports, filter and watermark.

``build_app(args)`` is the typed builder: it turns a :class:`ServeConfig` (or the mapping a Serve config
file passes as ``args``) into the bound application, so ``serve run``/``serve deploy`` of
``alpaca_ray.serve.app:build_app`` and ``alpaca-ray serve`` deploy the same thing. ``deploy(config)``
runs it on the cluster (reusing a running Serve instance) and waits until it answers ``/healthz``.

Two deployments: ``AlpacaServer`` (the model and the HTTP API, ``num_replicas`` of them, spread over the
nodes) and ``ReportsWriter``, the single replica that owns the reports database. The API replicas hand
every report to the writer through a DeploymentHandle, so ``GET /v1/reports`` and
``alpaca-ray reports export`` see all reports whichever replica, on whichever node, took them. The
writer runs on the head node: a ``reports_db`` on a local disk lives on the head (where
``reports export`` runs), and a restarted writer finds the same file rather than starting a new one.
"""

# no `from __future__ import annotations`: FastAPI must see real types through Serve's class-based views
import asyncio
import hmac
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from html import escape as html_escape
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from alpaca_ray.chat import ChatFormatError, demo_user_message, render_prompt, resolve_prompt_format
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.cluster.services import serve_app_url
from alpaca_ray.config import UserError, config_from_dict, config_to_dict
from alpaca_ray.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from alpaca_ray.serve.config import (
    ServeConfig,
    api_key_hash,
    check_port_free,
    hash_key,
    resolve_config,
)
from alpaca_ray.serve.content_filter import REFUSAL, make_filter
from alpaca_ray.serve.engine import (
    Delta,
    Prompt,
    SamplingParams,
    TransformersEngine,
    VLLMEngine,
    local_model_path,
    vllm_available,
)
from alpaca_ray.serve.metrics import Metrics
from alpaca_ray.serve.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetectRequest,
    ReportRequest,
    chat_body,
    completion_body,
    new_id,
    sse,
    stream_chunk,
    usage,
    validation_error,
)
from alpaca_ray.serve.reports import REPORT_REASONS, ReportStore
from alpaca_ray.serve.watermark import WatermarkDetector, WatermarkLogitsProcessor, watermark_vocab_size

DEMO_PAGE = Path(__file__).with_name("demo.html")
#: Ray's resource that only the head node has; a tiny amount of it pins an actor there.
HEAD_NODE_RESOURCE = "node:__internal_head__"
logger = logging.getLogger(__name__)

class ReportsClient(Protocol):
    """Where the app's reports go: the ReportsWriter deployment (through its handle) or a local store."""

    async def add(self, report: dict) -> int: ...

    async def page(self, limit: int, offset: int, after: int | None) -> dict: ...


class HandleReports:
    """The :class:`ReportsWriter` deployment, through a Serve DeploymentHandle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def add(self, report: dict) -> int:
        return await self.handle.add.remote(report)

    async def page(self, limit: int, offset: int, after: int | None) -> dict:
        return await self.handle.page.remote(limit, offset, after)


class LocalReports:
    """A :class:`ReportStore` in this process (the app without Ray: tests, one-process use)."""

    def __init__(self, store: ReportStore):
        self.store = store

    async def add(self, report: dict) -> int:
        return await asyncio.to_thread(lambda: self.store.add(**report))

    async def page(self, limit: int, offset: int, after: int | None) -> dict:
        return await asyncio.to_thread(self.store.page, limit, offset, after)


@serve.deployment(
    num_replicas=1,  # exactly one: two writers on two nodes would each keep a database of their own
    # No CPU: it only waits on SQLite, and a head started with --num-cpus=0 must still be able to host it.
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    max_ongoing_requests=256,  # callers queue here rather than in every API replica's router
)
class ReportsWriter:
    """The one process that opens the reports database: the API replicas call it for add/list/count."""

    def __init__(self, db_path: str):
        self.store = ReportStore(db_path)

    # Plain methods: Serve runs them on its thread pool, each call its own SQLite transaction.
    def add(self, report: dict) -> int:
        return self.store.add(**report)

    def list(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        return self.store.list(limit, offset)

    def page(self, limit: int, offset: int = 0, after: int | None = None) -> dict:
        return self.store.page(limit, offset, after)

    def count(self) -> int:
        return self.store.count()


#: The API routes and the name each is counted under in ``alpaca_ray_serve_requests_total``.
API_ROUTES = {"/v1/models": "models", "/v1/completions": "completions", "/v1/chat/completions": "chat",
              "/v1/reports": "reports", "/v1/watermark/detect": "watermark"}
#: Texts longer than this are filtered on a worker thread, not on the event loop.
LONG_TEXT_CHARS = 10_000


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class AlpacaService:
    """The app's state and behaviour without Ray: the engine, filter, watermark detector, metrics, key hash.

    :func:`create_api` puts it behind FastAPI; the :class:`AlpacaServer` deployment builds one per replica.
    """

    def __init__(self, config: dict | ServeConfig, api_key_sha256: str | None, reports: ReportsClient):
        self.reports = reports
        self.config = config if isinstance(config, ServeConfig) else config_from_dict(ServeConfig, config,
                                                                                     source="serve app config")
        self.api_key_sha256 = api_key_sha256  # only the key's hash travels to replicas
        self.metrics = Metrics()
        self.model_id = self.config.model_id
        device = "cuda" if self.config.use_gpu else "cpu"
        # auto picks vLLM on GPUs where it is installed, unless the watermark (a transformers logits
        # processor here) is wanted
        use_vllm = self.config.engine == "vllm" or (self.config.engine == "auto" and self.config.use_gpu
                                                      and not self.config.watermark and vllm_available())
        model_path = local_model_path(self.config.model)  # s3:// / gs://: this node's cached copy
        vocab_size = watermark_vocab_size(model_path)  # the detector must use what the generator used
        if use_vllm:
            self.engine = VLLMEngine(model_path, max_batch_size=self.config.max_batch_size)
        else:
            processors = []
            if self.config.watermark:
                processors.append(WatermarkLogitsProcessor(vocab_size, self.config.watermark_gamma,
                                                           self.config.watermark_delta, self.config.watermark_key))
            self.engine = TransformersEngine(model_path, device=device, dtype=self.config.dtype,
                                             max_batch_size=self.config.max_batch_size,
                                             batch_wait_timeout_s=self.config.batch_wait_timeout_s,
                                             logits_processors=processors, metrics=self.metrics)
        # how /v1/chat/completions prompts this model (alpaca_ray.chat); "chat" without a template fails here
        self.prompt_format = resolve_prompt_format(model_path, self.engine.tokenizer, self.config.prompt_format)
        logger.info("serving %s with the %s prompt format", self.model_id, self.prompt_format)
        self.detector = WatermarkDetector(self.engine.tokenizer, vocab_size, self.config.watermark_gamma,
                                          self.config.watermark_key, self.config.watermark_z_threshold)
        self.filter = make_filter(self.config.content_filter, self.config.filter_terms,
                                  self.config.filter_terms_file, self.config.moderation_base_url,
                                  self.config.moderation_model, self.config.moderation_api_key_env)

    # ---- helpers ----
    def authorized(self, headers: Headers) -> bool:
        if self.api_key_sha256 is None:
            return True
        header = headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return bool(given) and hmac.compare_digest(hash_key(given), self.api_key_sha256)

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    def _check_size(self, body, prompts: list[str], param: str) -> None:
        body.refuse_unsupported()
        total = len(prompts) * body.n
        if total > self.config.max_sequences_per_request:
            raise APIError(400, f"this request asks for {total} answers ({len(prompts)} prompt(s) x n={body.n}); "
                                f"this server allows at most {self.config.max_sequences_per_request} per request",
                           param="n" if body.n > 1 else param, code="too_many_sequences")

    async def _sampling(self, body, max_tokens: int | None, prompts: list[str],
                        param: str) -> tuple[SamplingParams, int]:
        # token counting is CPU work proportional to the prompt: on a thread, never on the event loop
        counts = await asyncio.to_thread(lambda: [self.engine.count_prompt_tokens(p) for p in prompts])
        if max_tokens is None:  # unasked: the default, shortened to what the context leaves (at least 1)
            max_tokens = max(1, min(self.config.default_max_tokens, self.engine.context_length - max(counts)))
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {self.config.max_tokens_limit}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        for count in counts:
            if count == 0:
                raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
            if count + max_tokens > self.engine.context_length:
                raise APIError(400, f"This model's maximum context length is {self.engine.context_length} tokens. "
                                    f"However, you requested {count + max_tokens} tokens ({count} in the prompt, "
                                    f"{max_tokens} for the completion). Please shorten the prompt or max_tokens.",
                               param=param, code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stop_list(), seed=body.seed)
        return params, sum(counts)

    def _choice_params(self, params: SamplingParams, index: int) -> SamplingParams:
        seed = None if params.seed is None else params.seed + index
        return SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop, seed)

    def _refusal(self, reason: str, where: str) -> str:
        self.metrics.inc("flagged_total", where=where)
        return REFUSAL.format(reason=reason)

    async def _check(self, text: str):
        if self.filter.cheap and len(text) < LONG_TEXT_CHARS:
            return self.filter.check(text)
        return await asyncio.to_thread(self.filter.check, text)

    async def _generate_text(self, prompt: Prompt, params: SamplingParams, group: object) -> tuple[str, str, int]:
        """A whole answer (non-streaming): (text, finish_reason, completion_tokens)."""
        text, finish, tokens = [], "stop", 0
        async for delta in self.engine.generate(prompt, params, group, stream=False):
            text.append(delta.text)
            finish, tokens = delta.finish_reason or finish, delta.completion_tokens
        if finish == "error":  # not an answer: a 200 would let clients (the evaluate stage) keep it as one
            raise APIError(500, "the model failed to generate a response (see the replica's log)",
                           type="server_error")
        answer = "".join(text)
        verdict = await self._check(answer)
        if verdict.flagged:
            return self._refusal(verdict.reason, "response"), "content_filter", tokens
        return answer, finish, tokens

    async def _run(self, kind: str, prompts: list[Prompt], body, params: SamplingParams, prompt_tokens: int,
                   started: float, texts: list[str] | None = None):
        """Answer ``prompts`` (text or token ids) ``n`` times each; ``texts``: the prompts as text, for the
        content filter (default: the prompts themselves)."""
        request_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        jobs = [(prompt, self._choice_params(params, i)) for prompt in prompts for i in range(body.n)]
        verdicts = [await self._check(text) for text in (texts if texts is not None else prompts)]
        flagged = [verdicts[j // body.n] for j in range(len(jobs))]
        self.metrics.inc("prompt_tokens_total", prompt_tokens)
        if body.stream:
            events = self._stream(kind, request_id, body, jobs, flagged, prompt_tokens, started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def one(job, verdict):
            if verdict.flagged:
                return self._refusal(verdict.reason, "prompt"), "content_filter", 0
            return await self._generate_text(*job, request_id)  # the request's answers share its fair share

        results = await asyncio.gather(*(one(job, verdict) for job, verdict in zip(jobs, flagged)))
        completion_tokens = sum(r[2] for r in results)
        build = chat_body if kind == "chat" else completion_body
        self._done(kind, 200, started)
        return build(request_id, self.model_id, [(r[0], r[1]) for r in results], prompt_tokens, completion_tokens)

    async def _filtered_stream(self, prompt: Prompt, params: SamplingParams, group: object,
                               count: Callable[[int], None]) -> AsyncIterator[Delta]:
        """The engine's deltas through the term filter: characters that may be the start of a flagged piece
        wait until what follows them is known, so no part of a flagged piece is ever sent."""
        sent, held = "", ""
        async for delta in self.engine.generate(prompt, params, group):
            count(delta.completion_tokens)
            pending = held + delta.text
            verdict = await self._check(sent + pending)
            if verdict.flagged:
                yield Delta("\n\n" + self._refusal(verdict.reason, "response"), delta.completion_tokens,
                            "content_filter")
                return
            if delta.finish_reason is None:
                cut = max(0, len(pending) - self.filter.held_back(sent + pending))
                out, held = pending[:cut], pending[cut:]
                if out:
                    sent += out
                    yield Delta(out, delta.completion_tokens)
            else:
                yield Delta(pending, delta.completion_tokens, delta.finish_reason)
                return

    async def _stream(self, kind: str, request_id: str, body, jobs, flagged, prompt_tokens: int,
                      started: float) -> AsyncIterator[str]:
        created = int(time.time())
        merged: asyncio.Queue = asyncio.Queue()
        tokens = [0] * len(jobs)

        async def run_choice(index: int, prompt: Prompt, params: SamplingParams, verdict) -> None:
            try:
                if verdict.flagged:
                    await merged.put((index, Delta(self._refusal(verdict.reason, "prompt"), 0, "content_filter")))
                elif not self.filter.cheap:
                    # a network filter sees the whole answer before any of it is sent
                    text, finish, count = await self._generate_text(prompt, params, request_id)
                    tokens[index] = count
                    await merged.put((index, Delta(text, count, finish)))
                else:
                    async for delta in self._filtered_stream(prompt, params, request_id,
                                                             lambda n: tokens.__setitem__(index, n)):
                        await merged.put((index, delta))
            except Exception as err:  # noqa: BLE001 - end this choice, keep the stream well-formed
                logger.exception("a streamed choice failed")
                await merged.put((index, Delta(f"[error: {type(err).__name__}]", tokens[index], "error")))

        tasks = [asyncio.create_task(run_choice(i, prompt, params, verdict))
                 for i, ((prompt, params), verdict) in enumerate(zip(jobs, flagged))]
        try:
            first = [True] * len(jobs)
            if kind == "chat":  # the role comes first, as OpenAI sends it
                for index in range(len(jobs)):
                    yield sse(stream_chunk(kind, request_id, self.model_id, created, index, "", None, first=True))
                    first[index] = False
            remaining = len(jobs)
            while remaining:
                index, delta = await merged.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                yield sse(stream_chunk(kind, request_id, self.model_id, created, index, delta.text,
                                       delta.finish_reason, first=first[index]))
            if body.include_usage():
                yield sse({"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": self.model_id, "choices": [],
                           "usage": usage(prompt_tokens, sum(tokens))})
            yield sse("[DONE]")
            self._done(kind, 200, started)
        finally:
            for task in tasks:
                task.cancel()

    def _done(self, route: str, status: int, started: float) -> None:
        self.metrics.inc("requests_total", route=route, status=str(status))
        self.metrics.observe("request_latency_seconds", time.monotonic() - started)

    async def _guarded(self, route: str, work):
        """Run a /v1 handler, counting errors as requests too."""
        started = time.monotonic()
        try:
            return await work(started)
        except APIError as error:
            self.metrics.inc("requests_total", route=route, status=str(error.status))
            raise

    async def _reports_call(self, call):
        """A call to the reports database; its failure is a 503 for the client and a traceback in the log."""
        try:
            return await call
        except Exception:  # noqa: BLE001 - SQLite errors arrive wrapped in Ray's; all mean the same here
            logger.exception("the reports database failed")
            raise APIError(503, "the reports database is unavailable; try again later", type="server_error",
                           code="database_unavailable") from None

    async def _demo_prompt(self, instruction: str, input: str) -> str:  # noqa: A002 - Alpaca's field name
        """The prompt the model saw for the demo page's instruction and input, for a report that does not
        give it: the page sends a chat model one user message (``demo_user_message``), an Alpaca model
        Alpaca's prompt."""
        if self.prompt_format != "chat":
            return format_prompt(instruction, input)
        message = [{"role": "user", "content": demo_user_message(instruction, input)}]
        try:
            return (await asyncio.to_thread(render_prompt, message, self.engine.tokenizer, "chat")).text
        except ChatFormatError:  # a template that refuses a lone user message: keep what the page asked
            return demo_user_message(instruction, input)

    # ---- routes (put behind FastAPI by create_api) ----
    def demo_page(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        html = DEMO_PAGE.read_text(encoding="utf-8")
        html = html.replace("{{ROOT}}", root).replace("{{MODEL}}", html_escape(self.model_id))
        html = html.replace("{{NEEDS_KEY}}", "true" if self.api_key_sha256 else "false")
        html = html.replace("{{PROMPT_FORMAT}}", json.dumps(self.prompt_format))
        templates = json.dumps({"with_input": PROMPT_WITH_INPUT, "no_input": PROMPT_NO_INPUT})
        html = html.replace("{{TEMPLATES}}", templates.replace("</", "<\\/"))
        html = html.replace("{{REASONS}}", "".join(f'<option value="{r}">{r}</option>' for r in REPORT_REASONS))
        return HTMLResponse(html)

    def metrics_page(self) -> PlainTextResponse:
        stats = self.engine.stats()
        self.metrics.set("queue_depth", stats.get("queue_depth", 0))
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict:
        async def work(started):
            self._done("models", 200, started)
            return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                                "owned_by": "alpaca-ray"}]}
        return await self._guarded("models", work)

    async def completions(self, body: CompletionRequest):
        async def work(started):
            self._check_model(body.model)
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts:
                raise APIError(400, "prompt must not be an empty list", param="prompt")
            self._check_size(body, prompts, "prompt")
            params, prompt_tokens = await self._sampling(body, body.max_tokens, prompts, "prompt")
            return await self._run("completions", prompts, body, params, prompt_tokens, started)
        return await self._guarded("completions", work)

    async def chat_completions(self, body: ChatRequest):
        async def work(started):
            self._check_model(body.model)
            try:
                conversation = body.conversation()
                self._check_size(body, [conversation], "messages")
                # the whole conversation in the model's prompt format, as token ids (alpaca_ray.chat);
                # templating and tokenizing are CPU work: on a thread, never on the event loop
                rendered = await asyncio.to_thread(render_prompt, conversation, self.engine.tokenizer,
                                                   self.prompt_format)
            except ChatFormatError as err:
                raise APIError(400, str(err), param="messages", code="invalid_value") from None
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            params, prompt_tokens = await self._sampling(body, max_tokens, [rendered.ids], "messages")
            return await self._run("chat", [rendered.ids], body, params, prompt_tokens, started,
                                   texts=[rendered.text])
        return await self._guarded("chat", work)

    async def add_report(self, body: ReportRequest) -> dict:
        async def work(started):
            if body.reason not in REPORT_REASONS:
                raise APIError(400, f"reason must be one of {', '.join(REPORT_REASONS)}", param="reason",
                               code="invalid_value")
            cap = self.config.max_report_field_chars
            for name, text in body.texts().items():
                if len(text) > cap:
                    raise APIError(400, f"{name} is {len(text)} characters long; reports keep at most {cap} per field",
                                   param=name, code="invalid_value")
            prompt = body.prompt or (await self._demo_prompt(body.instruction, body.input) if body.instruction
                                     else "")
            report_id = await self._reports_call(self.reports.add(dict(
                model=body.model or self.model_id, response=body.response, reason=body.reason,
                instruction=body.instruction, input=body.input, prompt=prompt, details=body.details)))
            self.metrics.inc("reports_total")
            self._done("reports", 200, started)
            return {"id": report_id, "object": "report"}
        return await self._guarded("reports", work)

    async def list_reports(self, limit: int, offset: int, after: int | None) -> dict:
        async def work(started):
            if not 1 <= limit <= MAX_REPORTS_PAGE:
                raise APIError(400, f"limit must be in 1..{MAX_REPORTS_PAGE}, got {limit}", param="limit",
                               code="invalid_value")
            if not 0 <= offset <= 2**62:
                raise APIError(400, f"offset must be in 0..{2**62}", param="offset", code="invalid_value")
            if after is not None and not 0 <= after <= 2**62:
                raise APIError(400, "after must be a report id", param="after", code="invalid_value")
            page = await self._reports_call(self.reports.page(limit, offset, after))
            self._done("reports", 200, started)
            return page
        return await self._guarded("reports", work)

    async def detect_watermark(self, body: DetectRequest) -> dict:
        async def work(started):
            detection = await asyncio.to_thread(self.detector.detect, body.text)
            self._done("watermark", 200, started)
            return {"object": "watermark.detection", **detection.to_dict()}
        return await self._guarded("watermark", work)


#: Most reports one ``GET /v1/reports`` returns; page on with ``after`` (the previous page's ``last_id``).
MAX_REPORTS_PAGE = 1000


class RequestGate:
    """ASGI middleware in front of every route: the API key, then the body size, before any body is parsed.

    So a request without the key gets 401 whatever its body, and a body over ``max_body_bytes`` gets 413
    without being read whole (a declared Content-Length is refused at once, a chunked one once it passes).
    """

    def __init__(self, app, service: AlpacaService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path.startswith("/v1/") and not self.service.authorized(Headers(scope=scope)):
            self.service.metrics.inc("requests_total", route=API_ROUTES.get(path, "other"), status="401")
            error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
            return await error_response(error)(scope, receive, send)
        limit = self.service.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_response(too_large)(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here (bounded), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await error_response(too_large)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_api(service: AlpacaService) -> FastAPI:
    """The FastAPI app of one replica: every route, OpenAI-shaped errors, the key and body-size gate."""
    api = FastAPI(title="alpaca-ray",
                  description="An Alpaca-style instruction model behind an OpenAI-compatible API.")

    @api.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with its own shape; OpenAI clients expect 400 and {"error": {...}}
        return error_response(validation_error(list(error.errors())))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # 404 (no such route), 405 (wrong method), 400 (a body that is not UTF-8 JSON): OpenAI's shape too
        codes = {404: "not_found", 405: "method_not_allowed", 400: "invalid_body"}
        return JSONResponse(APIError(error.status_code, str(error.detail), code=codes.get(error.status_code)).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal error (see the replica's log)", type="server_error"))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page(request: Request) -> HTMLResponse:
        return service.demo_page(request)

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": service.model_id, "prompt_format": service.prompt_format}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics_page() -> PlainTextResponse:
        return service.metrics_page()

    @api.get("/v1/models")
    async def models() -> dict:
        return await service.models()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await service.completions(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await service.chat_completions(body)

    @api.post("/v1/reports")
    async def add_report(body: ReportRequest) -> dict:
        return await service.add_report(body)

    @api.get("/v1/reports")
    async def list_reports(limit: int = 100, offset: int = 0, after: int | None = None) -> dict:
        return await service.list_reports(limit, offset, after)

    @api.post("/v1/watermark/detect")
    async def detect_watermark(body: DetectRequest) -> dict:
        return await service.detect_watermark(body)

    api.add_middleware(RequestGate, service=service)
    return api


@serve.deployment
@serve.ingress()
class AlpacaServer:
    """One replica: an :class:`AlpacaService` behind :func:`create_api`; reports go to the :class:`ReportsWriter`."""

    def __init__(self, config: dict, api_key_sha256: str | None = None, reports: DeploymentHandle | None = None):
        if reports is None:  # bound by build_app; a replica must never open the database itself
            raise ValueError("AlpacaServer needs the ReportsWriter's handle: build the app with build_app()")
        self.service = AlpacaService(config, api_key_sha256, HandleReports(reports))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service)


def build_app(args: dict | ServeConfig, api_key_sha256: str | None = None) -> Application:
    """The typed builder: a :class:`ServeConfig` (or its fields as a mapping) -> the bound Serve app.

    ``api_key_sha256``: the key's hash when the caller already took the key (``alpaca-ray serve``); else
    the key is read from ``api_key_env`` here (``serve deploy`` of a config file).
    """
    config = args if isinstance(args, ServeConfig) else config_from_dict(ServeConfig, dict(args), "serve app args")
    config = resolve_config(config)
    options: dict = {
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": 1 if config.use_gpu else 0},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if config.autoscaling:
        options["autoscaling_config"] = config.autoscaling
    else:
        options["num_replicas"] = config.num_replicas
    if config.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = config.max_replicas_per_node
    if api_key_sha256 is None:
        api_key_sha256 = api_key_hash(config)
    writer = ReportsWriter.bind(config.reports_db)  # Serve hands the replicas a DeploymentHandle to it
    return AlpacaServer.options(**options).bind(config_to_dict(config), api_key_sha256, writer)


def check_moderation(config: ServeConfig) -> None:
    """With ``--content-filter openai``: the key is set and the endpoint answers, or a clear error now,
    rather than every request refused later."""
    if config.content_filter != "openai":
        return
    from alpaca_ray.serve.content_filter import OpenAIModerationFilter

    OpenAIModerationFilter(config.moderation_base_url, config.moderation_model, config.moderation_api_key_env,
                           timeout_s=15.0, max_retries=0).probe()


def app_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}/"


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``URL/healthz`` through the proxy until it answers 200 (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError as err:
            last_error = str(err)
        time.sleep(0.25)
    raise UserError(f"the app did not answer {url}healthz within {timeout_s:.0f}s ({last_error}); if Serve "
                    "already runs on this cluster with another HTTP port, pass that port as --port")


def serve_is_running() -> bool:
    """Whether Serve's controller runs on the cluster this process joined (then its proxy is up already)."""
    from ray.serve.context import _get_global_client  # a private accessor of Ray 2.60, as in serve_app_url

    try:
        return _get_global_client(raise_if_no_controller_running=False) is not None
    except Exception:  # noqa: BLE001 - a controller that is going away: Serve will be started anew
        return False


def _proxy_differs(config: ServeConfig, url: str) -> bool:
    """Whether the app's real URL shows a proxy bound otherwise than ``config`` asks."""
    actual = urlparse(url)
    if actual.port != config.port:
        return True
    if config.host in ("0.0.0.0", "::"):  # every interface asked for: only a loopback-bound proxy differs
        return actual.hostname in ("127.0.0.1", "localhost", "::1")
    return actual.hostname != config.host


def deploy(config: ServeConfig, api_key_sha256: str | None = None) -> str:
    """Deploy the app on the current Ray cluster (starting Serve if needed); return its base URL when healthy.

    ``api_key_sha256``: see :func:`build_app`.
    """
    app = build_app(config, api_key_sha256)  # before anything starts, so a bad config fails without side effects
    check_moderation(config)
    ensure_ray()
    serve_was_running = serve_is_running()
    if not serve_was_running:  # a running Serve keeps its proxy and port (reused, see the note below)
        check_port_free(config.host, config.port)
    try:
        serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    except RuntimeError as err:  # a proxy failed to bind after all (taken since the check, on another node...)
        if "Failed to bind" not in str(err):
            raise
        if not serve_was_running:
            serve.shutdown()  # else the controller restarts the failing proxy for as long as the cluster lives
        raise UserError(f"Serve's HTTP proxy failed to bind {config.host}:{config.port} on a node of the cluster "
                        "(another program holds the port there, or the address is not that node's): pass a free "
                        "--port, or another --host") from None
    try:
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    except RuntimeError as err:  # a replica failed to start (e.g. the model would not load): say why, briefly
        raise UserError(f"deploying app {config.app_name!r} failed:\n{str(err)[-2000:]}") from None
    # The controller knows the real URL: Serve may already have been running with other HTTP options (one
    # proxy configuration per cluster), and a wildcard bind is shown as an address of a node with a proxy.
    running = serve_app_url(config.app_name)
    url = running + "/" if running else app_url(config)
    if running and _proxy_differs(config, url):
        print(f"note: Serve already runs on this cluster with other HTTP options; the app is at {url} "
              f"(--host/--port {config.host}:{config.port} are not applied)", flush=True)
    wait_healthy(url, config.ready_timeout_s)
    return url
