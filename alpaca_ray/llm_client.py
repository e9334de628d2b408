"""The OpenAI-protocol client every stage uses to talk to a teacher, judge or model endpoint.

It wraps the official ``openai`` async client with what paying for every answer demands:

- a rate limit shared by all callers (:class:`RateLimiter`, or :func:`shared_rate_limiter` for every
  Ray worker of a job at once), counted in requests and in tokens per minute;
- retries of 429s, 5xx answers, time-outs and dropped connections with exponential backoff and jitter,
  honouring the server's ``Retry-After``;
- clear errors for what retrying cannot fix (a wrong key, an unknown model), whose messages never
  contain the key;
- :class:`RawJournal`, an append-only JSON Lines file each answer is written to (flushed and fsynced)
  before anything else happens to it, so nothing paid for is lost when a process dies.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from alpaca_ray.config import UserError

OPENAI_BASE_URL = "https://api.openai.com/v1"


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


class MalformedResponseError(LLMError):
    """The endpoint answered 200 with something that is not an OpenAI completion."""


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
    #: Shared token budget (prompt + completion, estimated before the call); 0 means unlimited.
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


# --------------------------------------------------------------------------------------------------------
# Rate limiting


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets, spacing calls evenly rather than in bursts.

    The request bucket holds one request and the token bucket one second's worth; both may go into debt: a caller that takes
    more than is there waits until the debt is paid back. So ``rpm=120`` lets one call through every
    half second from the start, and one large request is let through at once (then the next ones wait).
    ``reserve`` is plain and non-blocking (it returns how long to wait), which is what lets one instance
    live in a Ray actor and serve every worker of a job.
    """

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0):
        self.requests_per_minute, self.tokens_per_minute = float(requests_per_minute), float(tokens_per_minute)
        # Requests: a bucket of one, so calls are evenly spaced; tokens: one second's worth.
        self._buckets = [_Bucket(self.requests_per_minute / 60.0, 1.0),
                         _Bucket(self.tokens_per_minute / 60.0, max(1.0, self.tokens_per_minute / 60.0))]
        self._lock = threading.Lock()

    def reserve(self, tokens: int = 0) -> float:
        """Take one request and ``tokens`` tokens; return the seconds to wait before sending."""
        with self._lock:
            now = time.monotonic()
            return max(self._buckets[0].take(1, now), self._buckets[1].take(tokens, now))

    def settle(self, reserved_tokens: int, used_tokens: int) -> None:
        """Give back what a call reserved but did not use (estimates are upper bounds)."""
        if reserved_tokens > used_tokens:
            with self._lock:
                self._buckets[1].give_back(reserved_tokens - used_tokens)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of ``tokens`` tokens may be sent."""
        delay = self.reserve(tokens)
        if delay > 0:
            await asyncio.sleep(delay)


class _Bucket:
    def __init__(self, rate_per_s: float, capacity: float):
        self.rate, self.capacity = rate_per_s, capacity
        self.level, self.updated = self.capacity, time.monotonic()

    def take(self, amount: float, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        self.level -= amount
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def give_back(self, amount: float) -> None:
        if self.rate > 0:
            self.level = min(self.capacity, self.level + amount)


class _RateLimiterActor:
    """The Ray actor behind :func:`shared_rate_limiter` (plain methods: each call is answered at once)."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float):
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int = 0) -> float:
        return self.limiter.reserve(tokens)

    def settle(self, reserved_tokens: int, used_tokens: int) -> None:
        self.limiter.settle(reserved_tokens, used_tokens)


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


async def _acquire(limiter: Any, tokens: int) -> None:
    if limiter is None:
        return
    if isinstance(limiter, RateLimiter):
        await limiter.acquire(tokens)
        return
    delay = await limiter.reserve.remote(tokens)  # a Ray actor handle: ObjectRefs are awaitable
    if delay > 0:
        await asyncio.sleep(delay)


async def _settle(limiter: Any, reserved: int, used: int) -> None:
    if limiter is None or reserved <= used:
        return
    if isinstance(limiter, RateLimiter):
        limiter.settle(reserved, used)
    else:
        limiter.settle.remote(reserved, used)  # fire and forget: a refund needs no answer


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
        retries = 0
        async with semaphore:
            while True:
                await _acquire(self.limiter, reserved)
                try:
                    completion = await self._call(client, prompt, sampling)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                    raise AuthError(f"{endpoint.base_url} refused the API key from ${endpoint.api_key_env} "
                                    f"(HTTP {err.status_code}); check that it is set to a valid key") from None
                except openai.NotFoundError as err:
                    raise ModelNotFoundError(
                        f"{endpoint.base_url} has no model {endpoint.model!r} (HTTP 404: "
                        f"{self._redact(_error_message(err))}); check --teacher-model / the model name") from None
                except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                        openai.ConflictError) as err:
                    status = getattr(err, "status_code", None)
                    if isinstance(err, openai.RateLimitError) and _error_code(err) == "insufficient_quota":
                        raise QuotaExceededError(
                            f"{endpoint.base_url}: the account of the key in ${endpoint.api_key_env} has no quota "
                            "left (HTTP 429 insufficient_quota); add credit or use another key, then rerun "
                            "into the same output to continue") from None
                    if retries >= endpoint.max_retries:
                        what = f"HTTP {status}" if status else type(err).__name__
                        if isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError):
                            what = "connection failed"
                        raise RetriesExhaustedError(
                            f"{endpoint.base_url}: gave up after {retries + 1} attempts ({what}: "
                            f"{self._redact(_error_message(err))})") from None
                    headers = getattr(getattr(err, "response", None), "headers", None)
                    await asyncio.sleep(backoff_seconds(retries, endpoint.backoff_base_s, endpoint.backoff_max_s,
                                                        retry_after_seconds(headers)))
                    retries += 1
                    continue
                except openai.APIStatusError as err:
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
                await _settle(self.limiter, reserved, completion.prompt_tokens + completion.completion_tokens)
                return completion

    async def _call(self, client: Any, prompt: str | list[dict], sampling: dict) -> Completion:
        endpoint = self.endpoint
        if endpoint.api == "chat":
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            response = await client.chat.completions.create(model=endpoint.model, messages=messages, **sampling)
            choice = response.choices[0]
            text = choice.message.content
        else:
            if not isinstance(prompt, str):
                raise LLMError("the completions API takes a string prompt, not chat messages")
            response = await client.completions.create(model=endpoint.model, prompt=prompt, **sampling)
            choice = response.choices[0]
            text = choice.text
        if isinstance(response, str) or not isinstance(text, str):
            raise ValueError("no text in the response's first choice")
        usage = getattr(response, "usage", None)
        return Completion(text=text, finish_reason=str(choice.finish_reason or "stop"),
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          model=str(getattr(response, "model", "") or ""))

    async def check(self) -> None:
        """Fail now, clearly, on an unreachable endpoint, a wrong key or an unknown model.

        Lists the models (free); when the server cannot list them, or lists none, it sends one
        one-token request instead.
        """
        import openai

        endpoint = self.endpoint
        client = self._client()
        try:
            page = await client.models.list()
            listed = [m.id for m in page.data]
        except openai.APITimeoutError:
            raise EndpointUnreachableError(f"{endpoint.base_url} did not answer within {endpoint.timeout_s:g}s") from None
        except openai.APIConnectionError:
            raise EndpointUnreachableError(
                f"cannot reach {endpoint.base_url} (connection failed); check the base URL and that the server "
                f"is up") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise AuthError(f"{endpoint.base_url} refused the API key from ${endpoint.api_key_env} "
                            f"(HTTP {err.status_code}); check that it is set to a valid key") from None
        except (openai.APIStatusError, openai.APIResponseValidationError, ValueError, TypeError, AttributeError):
            listed = []
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
