"""The OpenAI-protocol client every stage uses to talk to a teacher, judge or model endpoint.

It wraps the official ``openai`` async client with what paying for every answer demands:

- a rate limit shared by all callers (:class:`RateLimiter`, or :func:`shared_rate_limiter` for every
  Ray worker of a job at once), counted in requests and in tokens per minute, that never grants more than
  the limit in any minute;
- retries of 429s, 5xx answers, time-outs and dropped connections with exponential backoff and jitter,
  honouring the server's ``Retry-After`` up to a cap (``max_retry_after_s``; a longer wait is logged
  and counted);
- clear errors for what retrying cannot fix (a wrong key, an unknown model, a server that is no OpenAI
  API at all: its 404/405/501 answers or its web pages), whose messages never contain the key;
- :class:`RawJournal`, an append-only JSON Lines file each answer is written to (flushed and fsynced)
  before anything else happens to it, so nothing paid for is lost when a process dies.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from alpaca_ray.config import UserError

OPENAI_BASE_URL = "https://api.openai.com/v1"
logger = logging.getLogger(__name__)


class LLMError(UserError):
    """A call to an OpenAI-protocol endpoint failed in a way the caller should report."""


class AuthError(LLMError):
    """The endpoint refused the key (401) or the key may not use this resource (403)."""


class ModelNotFoundError(LLMError):
    """The endpoint does not serve the requested model (404)."""


class EndpointUnreachableError(LLMError):
    """Nothing answered at the base URL (connection refused, DNS failure, time-out on the first call)."""


class QuotaExceededError(LLMError):
    """The account has no quota or credit left (429 ``insufficient_quota``): waiting will not help."""


class RetriesExhaustedError(LLMError):
    """A retryable failure (429, 5xx, time-out) kept happening until ``max_retries`` ran out."""

    #: How many of its waits asked for more than ``max_retry_after_s`` (and were cut to it).
    retry_after_capped = 0


class MalformedResponseError(LLMError):
    """The endpoint answered 200 with something that is not an OpenAI completion."""

    #: The HTTP exchange, as :func:`http_answer` words it ('' when unknown).
    answer = ""


class NotOpenAICompatibleError(LLMError):
    """Something answered at the base URL, but not as an OpenAI API does: a 404 that is no OpenAI error,
    a 405 or 501 on the API's routes (a static file server, a web app). Never retried."""

    answer = ""


class RequestRejectedError(LLMError):
    """The endpoint rejected the request itself (400, 422...); retrying the same request cannot help."""


class Secret(str):
    """A string that never shows itself in ``repr`` (so a key in a config or traceback stays hidden)."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass
class EndpointConfig:
    """Where and how to call an OpenAI-compatible endpoint."""

    model: str
    base_url: str = OPENAI_BASE_URL
    #: ``chat`` (``/chat/completions``, what current models offer) or ``completions`` (``/completions``).
    api: Literal["chat", "completions"] = "chat"
    #: Name of the environment variable holding the key (the key itself is never stored).
    api_key_env: str = "OPENAI_API_KEY"
    #: Shared request budget; 0 means unlimited.
    requests_per_minute: float = 0.0
    #: Shared token budget, counted as providers count it for rate limits: the prompt (estimated from its
    #: length) + ``max_tokens``, at the call; 0 means unlimited.
    tokens_per_minute: float = 0.0
    #: Retries of one call after a 429, 5xx, time-out or dropped connection.
    max_retries: int = 6
    #: Seconds to wait for one answer before it counts as a time-out (and is retried).
    timeout_s: float = 120.0
    #: Calls one process keeps in flight at once.
    max_concurrency: int = 8
    #: First backoff delay; doubles on each retry up to ``backoff_max_s``, with jitter.
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Longest wait a server's ``Retry-After`` may impose; a longer one is cut to this, logged and counted.
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("model is empty")
        if self.api not in ("chat", "completions"):
            problems.append(f"api must be 'chat' or 'completions', got {self.api!r}")
        if not str(self.base_url).startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            problems.append("requests_per_minute and tokens_per_minute must be >= 0 (0 = unlimited)")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.max_concurrency < 1:
            problems.append("max_retries must be >= 0, timeout_s > 0 and max_concurrency >= 1")
        if self.max_retry_after_s < 0:
            problems.append(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}")
        if problems:
            raise LLMError("invalid EndpointConfig: " + "; ".join(problems))


@dataclass
class Completion:
    """One answer: its text, why it stopped, what it cost, and how many retries it took."""

    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    #: The server-reported model name (may be more specific than the requested one).
    model: str = ""
    extra: dict = field(default_factory=dict, repr=False)
    #: With ``logprobs`` requested: per output token, the most likely tokens as ``[{"token", "logprob"}]``
    #: (chat: ``choices[0].logprobs.content[i].top_logprobs``; completions: ``logprobs.top_logprobs[i]``).
    #: None when the server sent no logprobs.
    top_logprobs: list[list[dict]] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------------------
# Rate limiting

#: The window a per-minute limit is counted over.
MINUTE_S = 60.0
#: Seconds added to the window the limiter enforces: a request reaches the server a little after its grant
#: (a Ray round trip, a busy event loop), and this guard keeps that jitter from pulling the first request
#: of the next minute into this one, as the provider counts (it costs 0.8% of the rate).
WINDOW_GUARD_S = 0.5


@dataclass(frozen=True)
class Grant:
    """Permission to send one request: its number in grant order, and how long to wait before sending."""

    id: int
    wait_s: float


class RateLimiter:
    """A scheduler of send times that never lets more than the limits through in any minute, by construction.

    Each :meth:`reserve` is answered with a grant time, in order (grants never go back in time):

    - requests are spaced evenly, ``(60 s + guard) / requests_per_minute`` apart, so any 60 s window holds
      at most ``requests_per_minute`` grants and the rate is used from the first second, without bursts;
    - tokens are counted as providers count them for rate limits, at the estimate made before the call
      (prompt + ``max_tokens``; OpenAI meters the same, not what the answer used). Grants are spaced in
      proportion to their tokens (the budget is spread evenly, no burst), and a grant is also placed no
      earlier than the first time the tokens granted in the 60 s (+ guard) before it, plus its own, fit
      in ``tokens_per_minute``: that sliding-window check is what makes the limit hold in every window
      (at a cost of about one request's tokens a minute: ~98% of a 60K budget used with 1K-token requests).

    ``reserve`` is plain and non-blocking (it returns how long to wait), which is what lets one instance
    live in a Ray actor and serve every worker of a job. ``clock`` is injectable for tests; every grant is
    kept (time and tokens) so :meth:`report` can show what was used.
    """

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0,
                 clock: Any = time.monotonic, guard_s: float = WINDOW_GUARD_S):
        self.requests_per_minute, self.tokens_per_minute = float(requests_per_minute), float(tokens_per_minute)
        self.window_s = MINUTE_S + guard_s
        self._interval = self.window_s / self.requests_per_minute if self.requests_per_minute > 0 else 0.0
        self._per_token = self.window_s / self.tokens_per_minute if self.tokens_per_minute > 0 else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: list[tuple[float, float]] = []  # (time, tokens) of every grant, in time order
        self._window_start = 0  # index of the oldest grant that can still share a window with a new one
        self._window_tokens = 0.0  # tokens of the grants from _window_start on
        self._last = -math.inf
        self._next_by_tokens = -math.inf

    def reserve(self, tokens: int = 0) -> Grant:
        """Take one request and ``tokens`` tokens; return the grant (its id and the seconds to wait)."""
        with self._lock:
            now = self._clock()
            at = max(now, self._last, self._last + self._interval, self._next_by_tokens)
            weight = 0.0
            if self.tokens_per_minute > 0:
                # A request larger than the whole budget still goes, alone in its window.
                weight = float(min(max(tokens, 0), self.tokens_per_minute))
                grants = self._grants
                while self._window_start < len(grants) and (
                        grants[self._window_start][0] <= at - self.window_s
                        or self._window_tokens + weight > self.tokens_per_minute):
                    oldest_at, oldest_tokens = grants[self._window_start]
                    at = max(at, oldest_at + self.window_s)  # wait until the oldest leaves the window
                    self._window_tokens -= oldest_tokens
                    self._window_start += 1
                self._window_tokens += weight
                self._next_by_tokens = at + weight * self._per_token
            self._grants.append((at, weight))
            self._last = at
            return Grant(len(self._grants) - 1, at - now)

    async def acquire(self, tokens: int = 0) -> Grant:
        """Wait until one request of ``tokens`` tokens may be sent; return its grant."""
        grant = self.reserve(tokens)
        if grant.wait_s > 0:
            await asyncio.sleep(grant.wait_s)
        return grant

    def grant_log(self) -> list[tuple[float, float]]:
        """(time, tokens) of every grant so far, in order (times on this limiter's clock)."""
        with self._lock:
            return list(self._grants)

    def report(self) -> dict:
        """What the grants used: counts, and the most granted in any 60 s window (requests and tokens)."""
        return grant_report(self.grant_log(), self.requests_per_minute, self.tokens_per_minute)


def grant_report(grants: list[tuple[float, float]], requests_per_minute: float = 0.0,
                 tokens_per_minute: float = 0.0, window_s: float = MINUTE_S) -> dict:
    """Summary of grant (or arrival) times: how many, over what span, the busiest ``window_s`` window."""
    times = [at for at, _ in grants]
    most_requests = most_tokens = 0.0
    start, tokens = 0, 0.0
    for end, (at, weight) in enumerate(grants):  # windows [t, t + window_s) that start at a grant
        tokens += weight
        while times[start] <= at - window_s:
            tokens -= grants[start][1]
            start += 1
        most_requests, most_tokens = max(most_requests, end - start + 1), max(most_tokens, tokens)
    gaps = [b - a for a, b in zip(times, times[1:])]
    span = times[-1] - times[0] if times else 0.0
    return {"requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
            "granted_requests": len(times), "granted_tokens": round(sum(w for _, w in grants)),
            "span_s": round(span, 3),
            # From the first grant to the last: the rate the run actually used.
            "requests_per_minute_used": round((len(times) - 1) / span * 60, 2) if span > 0 else None,
            "min_gap_s": round(min(gaps), 9) if gaps else None,
            "max_requests_in_60s": int(most_requests), "max_tokens_in_60s": round(most_tokens)}


class _RateLimiterActor:
    """The Ray actor behind :func:`shared_rate_limiter` (plain methods: each call is answered at once)."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float):
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int = 0) -> Grant:
        return self.limiter.reserve(tokens)

    def report(self) -> dict:
        return self.limiter.report()


def shared_rate_limiter(name: str, requests_per_minute: float, tokens_per_minute: float,
                        namespace: str | None = None) -> Any:
    """A named Ray actor holding one :class:`RateLimiter` for every worker (created if it does not exist).

    Pass the handle as ``LLMClient(endpoint, limiter=handle)`` in each worker, or find it there with
    ``ray.get_actor(name)``. It takes no CPU, so it never waits for a free core.
    """
    import ray

    actor_class = ray.remote(num_cpus=0, max_concurrency=64)(_RateLimiterActor)
    return actor_class.options(name=name, namespace=namespace, get_if_exists=True).remote(
        requests_per_minute, tokens_per_minute)


async def _acquire(limiter: Any, tokens: int) -> Grant | None:
    if limiter is None:
        return None
    if isinstance(limiter, RateLimiter):
        return await limiter.acquire(tokens)
    grant = await limiter.reserve.remote(tokens)  # a Ray actor handle: ObjectRefs are awaitable
    if grant.wait_s > 0:
        await asyncio.sleep(grant.wait_s)
    return grant


# --------------------------------------------------------------------------------------------------------
# The client


def estimate_tokens(prompt: str | list[dict], max_tokens: int | None) -> int:
    """An upper-bound-ish token estimate for rate limiting: ~4 characters a token, plus the answer budget."""
    text = prompt if isinstance(prompt, str) else "".join(str(m.get("content", "")) for m in prompt)
    return len(text) // 4 + 1 + int(max_tokens or 0)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``Retry-After`` / ``retry-after-ms`` (numbers or an HTTP date), or None."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def capped_retry_after(retry_after: float | None, cap_s: float, base_url: str) -> tuple[float | None, bool]:
    """The server's ``Retry-After``, cut to ``cap_s`` (logged) so a server asking for an hour cannot stall
    a run silently; returns (seconds to honour, whether it was cut)."""
    if retry_after is None or retry_after <= cap_s:
        return retry_after, False
    logger.warning("%s asked to wait %.0f s before retrying (Retry-After); waiting %g s instead "
                   "(max_retry_after_s)", base_url, retry_after, cap_s)
    return cap_s, True


def backoff_seconds(retry: int, base_s: float, max_s: float, retry_after: float | None = None,
                    rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter; a server's ``Retry-After`` is a floor, never cut short."""
    rng = rng or random
    delay = min(max_s, base_s * (2 ** retry)) * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        # Jitter on top of the server's wait spreads the workers it told to come back at the same time.
        delay = retry_after + rng.uniform(0.0, min(1.0, base_s))
    return delay


class LLMClient:
    """Calls one endpoint; one instance per process (or Ray worker), safe for concurrent ``complete`` calls.

    ``limiter`` is a :class:`RateLimiter`, a :func:`shared_rate_limiter` actor handle, or None (then one
    is made from the endpoint's per-minute limits). ``api_key`` overrides the environment variable
    (used to hand the key to Ray workers without putting it in their environment or logs).
    """

    def __init__(self, endpoint: EndpointConfig, limiter: Any = None, api_key: str | None = None):
        self.endpoint = endpoint
        if limiter is None and (endpoint.requests_per_minute or endpoint.tokens_per_minute):
            limiter = RateLimiter(endpoint.requests_per_minute, endpoint.tokens_per_minute)
        self.limiter = limiter
        self._api_key = Secret(api_key) if api_key is not None else None
        self._clients: dict[int, Any] = {}  # one openai client per event loop (httpx pools are loop-bound)
        self._semaphores: dict[int, asyncio.Semaphore] = {}

    # -- the key ------------------------------------------------------------------------------------------
    def api_key(self) -> Secret:
        """The key: the override, else the environment variable; a local endpoint may need none."""
        if self._api_key is not None:
            return self._api_key
        name = self.endpoint.api_key_env
        value = os.environ.get(name, "") if name else ""
        if value:
            return Secret(value)
        if self.endpoint.base_url.rstrip("/") == OPENAI_BASE_URL:
            raise AuthError(f"the environment variable {name or '(api_key_env is empty)'} holding the API key "
                            f"for {OPENAI_BASE_URL} is not set")
        return Secret("EMPTY")  # self-hosted servers (vLLM, the offline teacher) often take no key

    def _redact(self, message: str) -> str:
        try:
            key = self.api_key()
        except AuthError:
            return message
        if len(key) >= 4 and key != "EMPTY":
            message = message.replace(key, "***")
        return message

    def _client(self) -> Any:
        import openai

        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            # max_retries=0: retries are ours, so they are counted, jittered and rate limited.
            client = openai.AsyncOpenAI(api_key=str(self.api_key()), base_url=self.endpoint.base_url,
                                        max_retries=0, timeout=self.endpoint.timeout_s)
            self._clients[loop_id] = client
            self._semaphores[loop_id] = asyncio.Semaphore(self.endpoint.max_concurrency)
        return client

    # -- calls --------------------------------------------------------------------------------------------
    async def complete(self, prompt: str | list[dict], **sampling: Any) -> Completion:
        """One completion (chat or text, as the endpoint says), retried as needed.

        ``prompt`` is a string, or a list of chat messages (chat API only). ``sampling`` goes to the API
        as is (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``logit_bias``...).
        """
        import openai

        client = self._client()
        semaphore = self._semaphores[id(asyncio.get_running_loop())]
        endpoint = self.endpoint
        reserved = estimate_tokens(prompt, sampling.get("max_tokens"))
        retries = capped = 0
        async with semaphore:
            while True:
                await _acquire(self.limiter, reserved)
                try:
                    completion = await self._call(client, prompt, sampling)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                    raise AuthError(f"{endpoint.base_url} refused the API key from ${endpoint.api_key_env} "
                                    f"(HTTP {err.status_code}); check that it is set to a valid key") from None
                except openai.NotFoundError as err:
                    if not _is_openai_error(err.response):  # a web server's "no such page", not "no such model"
                        raise _not_openai(endpoint, err.response) from None
                    raise ModelNotFoundError(
                        f"{endpoint.base_url} has no model {endpoint.model!r} (HTTP 404: "
                        f"{self._redact(_error_message(err))}); check --teacher-model / the model name") from None
                except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                        openai.ConflictError) as err:
                    status = getattr(err, "status_code", None)
                    if status == 501:  # Not Implemented: this server has no such API, however often it is asked
                        raise _not_openai(endpoint, err.response) from None
                    if isinstance(err, openai.RateLimitError) and _error_code(err) == "insufficient_quota":
                        raise QuotaExceededError(
                            f"{endpoint.base_url}: the account of the key in ${endpoint.api_key_env} has no quota "
                            "left (HTTP 429 insufficient_quota); add credit or use another key, then rerun "
                            "into the same output to continue") from None
                    if retries >= endpoint.max_retries:
                        what = f"HTTP {status}" if status else type(err).__name__
                        if isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError):
                            what = "connection failed"
                        exhausted = RetriesExhaustedError(
                            f"{endpoint.base_url}: gave up after {retries + 1} attempts ({what}: "
                            f"{self._redact(_error_message(err))})")
                        exhausted.retry_after_capped = capped
                        raise exhausted from None
                    headers = getattr(getattr(err, "response", None), "headers", None)
                    retry_after, was_capped = capped_retry_after(retry_after_seconds(headers),
                                                                 endpoint.max_retry_after_s, endpoint.base_url)
                    capped += was_capped
                    await asyncio.sleep(backoff_seconds(retries, endpoint.backoff_base_s, endpoint.backoff_max_s,
                                                        retry_after))
                    retries += 1
                    continue
                except openai.APIStatusError as err:
                    if err.status_code in (405, 501):  # the route takes no POST: no OpenAI API lives here
                        raise _not_openai(endpoint, err.response) from None
                    if err.status_code >= 500 or err.status_code == 408:  # a 5xx the client did not map; 408
                        if retries < endpoint.max_retries:
                            await asyncio.sleep(backoff_seconds(retries, endpoint.backoff_base_s,
                                                                endpoint.backoff_max_s))
                            retries += 1
                            continue
                        raise RetriesExhaustedError(f"{endpoint.base_url}: gave up after {retries + 1} "
                                                    f"attempts (HTTP {err.status_code})") from None
                    raise RequestRejectedError(f"{endpoint.base_url} rejected the request (HTTP {err.status_code}: "
                                               f"{self._redact(_error_message(err))})") from None
                except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, TypeError,
                        AttributeError, IndexError) as err:
                    raise MalformedResponseError(f"{endpoint.base_url} answered with a malformed response "
                                                 f"({type(err).__name__}: {self._redact(str(err))[:200]})") from None
                completion.retries = retries
                if capped:
                    completion.extra["retry_after_capped"] = capped
                return completion

    async def _call(self, client: Any, prompt: str | list[dict], sampling: dict) -> Completion:
        import openai

        endpoint = self.endpoint
        # The raw response first: a malformed answer is then reported with its URL, status and content type.
        if endpoint.api == "chat":
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            raw = await client.chat.completions.with_raw_response.create(model=endpoint.model, messages=messages,
                                                                         **sampling)
        else:
            if not isinstance(prompt, str):
                raise LLMError("the completions API takes a string prompt, not chat messages")
            raw = await client.completions.with_raw_response.create(model=endpoint.model, prompt=prompt, **sampling)
        response = None
        try:
            response = raw.parse()
            choice = response.choices[0]
            text = choice.message.content if endpoint.api == "chat" else choice.text
            if not isinstance(text, str):
                raise ValueError("no text in the response's first choice")
        except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            answer = http_answer(raw.http_response)
            detail = (f"the body starts {self._redact(response[:80])!r}" if isinstance(response, str)
                      else f"{type(err).__name__}: {self._redact(str(err))[:200]}")
            malformed = MalformedResponseError(f"{endpoint.base_url} answered with a malformed response: {answer}, "
                                               f"not {_expected(endpoint.api)} ({detail})")
            malformed.answer = answer
            raise malformed from None
        usage = getattr(response, "usage", None)
        return Completion(text=text, finish_reason=str(choice.finish_reason or "stop"),
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          model=str(getattr(response, "model", "") or ""),
                          top_logprobs=_top_logprobs(getattr(choice, "logprobs", None)))

    async def check(self) -> None:
        """Fail now, clearly, on an unreachable endpoint, a wrong key, an unknown model, or a server that is
        no OpenAI API (a static file server, a web app: the run would otherwise retry it for minutes).

        Lists the models (free); when the server cannot list them, or lists none, it sends one
        one-token request instead, never retried.
        """
        import openai

        endpoint = self.endpoint
        client = self._client()
        listing = ""  # what GET /models answered, when it was no model list
        listed: list[str] = []
        try:
            raw = await client.models.with_raw_response.list()
        except openai.APITimeoutError:
            raise EndpointUnreachableError(f"{endpoint.base_url} did not answer within {endpoint.timeout_s:g}s") from None
        except openai.APIConnectionError:
            raise EndpointUnreachableError(
                f"cannot reach {endpoint.base_url} (connection failed); check the base URL and that the server "
                f"is up") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise AuthError(f"{endpoint.base_url} refused the API key from ${endpoint.api_key_env} "
                            f"(HTTP {err.status_code}); check that it is set to a valid key") from None
        except openai.APIStatusError as err:  # some servers list no models: the probe below decides
            listing = http_answer(err.response)
        else:
            try:
                listed = [m.id for m in raw.parse().data]
            except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, KeyError):
                listing = f"{http_answer(raw.http_response)} with no OpenAI model list"
        if listed:
            if endpoint.model not in listed:
                shown = ", ".join(sorted(listed)[:20]) + (" ..." if len(listed) > 20 else "")
                raise ModelNotFoundError(f"{endpoint.base_url} has no model {endpoint.model!r}; it serves: {shown}")
            return
        probe = LLMClient(EndpointConfig(**{**endpoint.__dict__, "max_retries": 0}), api_key=self.api_key())
        try:
            await probe.complete("Say OK.", max_tokens=1)
        except RetriesExhaustedError as err:
            if "connection failed" in str(err):
                raise EndpointUnreachableError(f"cannot reach {endpoint.base_url}") from None
            # A 429/5xx on the probe says the server is there; the run's own retries deal with it.
        except (NotOpenAICompatibleError, MalformedResponseError) as err:
            answers = f"{listing} and {err.answer}" if listing else err.answer
            raise NotOpenAICompatibleError(
                f"{endpoint.base_url} is not an OpenAI-compatible API: {answers}, where {_expected(endpoint.api)} "
                "was expected; check the base URL (an OpenAI-compatible server's usually ends in /v1). Nothing "
                "was sent beyond this check") from None
        finally:
            await probe.aclose()  # its own HTTP pool, not closed by the caller's aclose()

    # -- sync helpers (CLIs, notebooks) --------------------------------------------------------------------
    def complete_sync(self, prompt: str | list[dict], **sampling: Any) -> Completion:
        return asyncio.run(self._closing(self.complete(prompt, **sampling)))

    def check_sync(self) -> None:
        asyncio.run(self._closing(self.check()))

    async def _closing(self, coroutine: Any) -> Any:
        try:
            return await coroutine
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP pool of the running loop's client."""
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        self._semaphores.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.close()


def _top_logprobs(logprobs: Any) -> list[list[dict]] | None:
    """The per-token top logprobs of a choice, in one shape for both APIs (None when there are none)."""
    if logprobs is None:
        return None
    content = getattr(logprobs, "content", None)
    if content is not None:  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        return [[{"token": t.token, "logprob": float(t.logprob)} for t in (position.top_logprobs or [])]
                for position in content]
    top = getattr(logprobs, "top_logprobs", None)
    if top is not None:  # completions: [{token: logprob}]
        return [[{"token": token, "logprob": float(lp)} for token, lp in (position or {}).items()] for position in top]
    return None


def http_answer(response: Any) -> str:
    """One HTTP exchange in words, for error messages: ``POST URL answered HTTP 404 (text/html)``."""
    request = response.request
    kind = (response.headers.get("content-type") or "no content type").split(";")[0].strip()
    return f"{request.method} {request.url} answered HTTP {response.status_code} ({kind})"


def _expected(api: str) -> str:
    return ("an OpenAI chat completion (JSON with 'choices')" if api == "chat"
            else "an OpenAI text completion (JSON with 'choices')")


def _is_openai_error(response: Any) -> bool:
    """Whether an error answer is an OpenAI-style error (``{"error": {...}}``, or vLLM's older
    ``{"object": "error", "message": ...}``), rather than some web server's page."""
    try:
        body = response.json()
    except Exception:  # noqa: BLE001 - HTML, plain text, nothing: not an API's error
        return False
    return isinstance(body, dict) and ("error" in body or body.get("object") == "error")


def _not_openai(endpoint: EndpointConfig, response: Any) -> NotOpenAICompatibleError:
    answer = http_answer(response)
    err = NotOpenAICompatibleError(f"{endpoint.base_url} is not an OpenAI-compatible API: {answer}, where "
                                   f"{_expected(endpoint.api)} was expected; check the base URL")
    err.answer = answer
    return err


def _error_code(err: Exception) -> str | None:
    """The ``code`` of an OpenAI error body (``insufficient_quota``, ``model_not_found``...), if any."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("code"), str):
            return inner["code"]
    return None


def _error_message(err: Exception) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(err, "message", "") or err)[:300]


# --------------------------------------------------------------------------------------------------------
# The raw journal


class RawJournal:
    """An append-only JSON Lines file: one object a line, each flushed and fsynced before ``append`` returns.

    A process killed mid-write leaves at most a torn last line; ``read`` skips it, and the next
    ``append`` starts on a fresh line so the torn bytes never glue onto a good record.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._lock = threading.Lock()
        self._checked_tail = False
        #: Lines ``read`` could not parse (torn writes), for the caller to report.
        self.skipped_lines = 0

    def append(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(self.path, "a+b") as handle:
                if not self._checked_tail:
                    self._checked_tail = True
                    handle.seek(0, os.SEEK_END)
                    if handle.tell() > 0:
                        handle.seek(-1, os.SEEK_END)
                        if handle.read(1) != b"\n":
                            handle.write(b"\n")
                handle.write(line.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        """Every complete record, in file order (an absent file reads as empty)."""
        self.skipped_lines = 0
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as handle:
            data = handle.read()
        records = []
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.skipped_lines += 1  # a torn write from a killed process
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                self.skipped_lines += 1
        return records
