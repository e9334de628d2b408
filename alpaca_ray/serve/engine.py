"""Generation engines: a protocol, a transformers engine with dynamic batching and streaming, and vLLM.

The transformers engine owns one background thread. Requests from every caller go into one queue; the
thread takes as many as are waiting (up to ``max_batch_size``, waiting ``batch_wait_timeout_s`` for more),
left-pads them into one batch and decodes them together with a KV cache, each row with its own
temperature, top-p, stop strings, token budget and seed. Each new piece of text goes straight back to its
caller's asyncio queue, so streaming is token by token; finished rows leave the batch (the cache rows
are dropped) so a long answer does not make short ones wait.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    """A piece of one sequence's answer; the last one has ``finish_reason`` ("stop" or "length")."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


class GenerationEngine(Protocol):
    """What the app needs from an engine; the transformers and vLLM engines both provide it."""

    context_length: int

    def count_prompt_tokens(self, prompt: str) -> int: ...

    def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Delta]: ...

    def stats(self) -> dict: ...


def local_model_path(model: str) -> str:
    """Where this process loads ``model`` from: an object-store URI (the train stage's ``final/`` on s3://,
    gs://) is first copied to this node's disk cache, once per node and model version (see
    :func:`alpaca_ray.cluster.storage.cached_local_copy`); a local path or hub name is returned unchanged."""
    from alpaca_ray.cluster import storage

    return storage.cached_local_copy(model) if storage.is_remote(model) else model


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token from one row of logits: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def held_back_suffix(text: str, stops: list[str]) -> int:
    """Length of the end of ``text`` that might be the start of a stop string (not streamed yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class _Sequence:
    """One request's state inside the engine thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Delta], None]):
        self.prompt_ids, self.params, self.emit = prompt_ids, params, emit
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.tokens: list[int] = []
        self.sent = ""  # text already streamed
        self.cancelled = False


class TransformersEngine:
    """Hugging Face causal LM on CPU or GPU with dynamic batching across callers."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "auto", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, logits_processors: list | None = None, metrics=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = device
        model_path = local_model_path(model_path)
        self.model_path = model_path  # the local copy actually loaded
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids or {0})
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        # transformers 5 renamed the KV cache argument from past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.logits_processors = list(logits_processors or [])
        self.metrics = metrics
        self._queue: queue.Queue[_Sequence] = queue.Queue()
        self._running = 0
        self._batches: list[int] = []  # sizes of the batches decoded so far (for tests and stats)
        self._thread = threading.Thread(target=self._loop, name="alpaca-ray-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (event loop) ----
    def count_prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream one answer; leaving the loop early (a client gone) cancels the sequence."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        sequence = _Sequence(self.tokenizer(prompt)["input_ids"], params,
                             lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta))
        self._queue.put(sequence)
        self._update_gauges()
        try:
            while True:
                delta = await deltas.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            sequence.cancelled = True

    def stats(self) -> dict:
        return {"queue_depth": self._queue.qsize(), "running": self._running, "batches": list(self._batches)}

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set("queue_depth", self._queue.qsize())
            self.metrics.set("running_sequences", self._running)

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.batch_wait_timeout_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            batch = [s for s in batch if not s.cancelled]
            if not batch:
                continue
            self._running = len(batch)
            self._batches.append(len(batch))
            if self.metrics is not None:
                self.metrics.observe("batch_size", len(batch))
            self._update_gauges()
            try:
                with torch.inference_mode():
                    self._decode(batch)
            except Exception as err:  # noqa: BLE001 - never leave a caller waiting forever
                # the details go to the replica's log, not to clients
                logger.exception("generation failed for a batch of %d sequence(s)", len(batch))
                for sequence in batch:
                    sequence.emit(Delta(f"[engine error: {type(err).__name__}]", len(sequence.tokens), "error"))
            self._running = 0
            self._update_gauges()

    def _decode(self, batch: list[_Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):  # left padding: every row's last token is at the end
            input_ids[row, width - len(sequence.prompt_ids):] = torch.tensor(sequence.prompt_ids)
            attention_mask[row, width - len(sequence.prompt_ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        active = list(batch)
        history = input_ids  # the processors (watermark) look at each row's previous token
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True)
        cache = _cache_of(output)
        while True:
            logits = output.logits[:, -1, :].float()
            for processor in self.logits_processors:
                logits = processor(history, logits)
            logits = logits.cpu()
            next_tokens, keep = [], []
            for row, sequence in enumerate(active):
                token = sample_next(logits[row], sequence.params.temperature, sequence.params.top_p,
                                    sequence.generator)
                next_tokens.append(token)
                if not self._advance(sequence, token):
                    keep.append(row)
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows (and their cache) from the batch
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention_mask, position_ids, history = attention_mask[index], position_ids[index], history[index]
                active = [active[row] for row in keep]
                next_tokens = [next_tokens[row] for row in keep]
                self._running = len(active)
            step = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            history = torch.cat([history[:, -1:], step], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(step)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            output = self.model(input_ids=step, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{self._cache_arg: cache})
            cache = _cache_of(output)

    def _advance(self, sequence: _Sequence, token: int) -> bool:
        """Add a token to a sequence and stream what is new; True when the sequence is finished."""
        if sequence.cancelled:
            return True
        params = sequence.params
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            sequence.tokens.append(token)
        count = len(sequence.tokens) + (finish is not None)
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut != -1:
                text, finish = text[:cut], "stop"
        if finish is None and count >= params.max_tokens:
            finish = "length"
        if finish is None:
            # hold back a half-decoded character or what may become a stop string
            safe = len(text) - (1 if text.endswith("\ufffd") else held_back_suffix(text, params.stop))
            text = text[:safe]
        new = text[len(sequence.sent):] if text.startswith(sequence.sent) else ""
        if new or finish:
            sequence.sent += new
            sequence.emit(Delta(new, count, finish))
        if self.metrics is not None:
            self.metrics.inc("completion_tokens_total")
        return finish is not None


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class VLLMEngine:
    """vLLM's async engine behind the same protocol (GPU clusters with the ``vllm`` extra installed).

    vLLM batches continuously by itself. Not exercised by the CPU test suite (vLLM needs CUDA here).
    """

    def __init__(self, model_path: str, dtype: str = "auto", max_batch_size: int = 256):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        model_path = local_model_path(model_path)
        self.model_path = model_path
        args = AsyncEngineArgs(model=model_path, dtype=dtype, max_num_seqs=max_batch_size)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        config = AutoConfig.from_pretrained(model_path)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self._count = 0

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VLLMSamplingParams

        self._count += 1
        sampling = VLLMSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                      top_p=params.top_p, stop=params.stop or None, seed=params.seed)
        sent = ""
        async for output in self.engine.generate(prompt, sampling, request_id=f"req-{id(self)}-{self._count}"):
            completion = output.outputs[0]
            new = completion.text[len(sent):]
            sent = completion.text
            finish = completion.finish_reason if output.finished else None
            if new or finish:
                yield Delta(new, len(completion.token_ids), finish)

    def stats(self) -> dict:
        return {}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
