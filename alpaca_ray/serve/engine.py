"""Generation engines: a protocol, a transformers engine with continuous batching and streaming, and vLLM.

The transformers engine owns one background thread. Requests from every caller go into one queue; the
thread decodes the running rows together with a KV cache, each row with its own temperature, top-p, stop
strings, token budget and seed. Between decode steps new rows join (their prompts prefilled and their
cache appended, left-padded) and finished rows leave, so a short answer never waits for a long batch to
end. When more rows want to run than ``max_batch_size``, the rows are shared fairly between *requests*
(a prompt list times ``n`` is one request): see :class:`FairScheduler`. Each new piece of text goes
straight back to its caller's asyncio queue, so streaming is token by token."""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import deque
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


#: A prompt as text (tokenized by the engine with the tokenizer's special tokens, as /v1/completions takes
#: it) or as token ids, given to the model exactly as they are (a chat template's rendering, which has its
#: own BOS: tokenizing its text again would add a second one).
Prompt = str | list[int]


class GenerationEngine(Protocol):
    """What the app needs from an engine; the transformers and vLLM engines both provide it."""

    context_length: int

    def count_prompt_tokens(self, prompt: Prompt) -> int: ...

    def generate(self, prompt: Prompt, params: SamplingParams, group: object = None,
                 stream: bool = True) -> AsyncIterator[Delta]: ...

    def stats(self) -> dict: ...


def local_model_path(model: str) -> str:
    """Where this process loads ``model`` from: an object-store URI (the train stage's ``final/`` on s3://,
    gs://) is first copied to this node's disk cache, once per node and model version (see
    :func:`alpaca_ray.cluster.storage.cached_local_copy`); a local path or hub name is returned unchanged."""
    from alpaca_ray.cluster import storage

    return storage.cached_local_copy(model) if storage.is_remote(model) else model


#: vLLM's accepted ``max_lora_rank`` values (it rejects others).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_config(model_path: str) -> dict | None:
    """A PEFT adapter directory's ``adapter_config.json`` (the train stage's ``final/`` after ``--lora``);
    None for a full model."""
    import json
    import os

    path = os.path.join(model_path, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def base_model_path(model_path: str) -> str:
    """The model whose config and vocabulary ``model_path`` has: an adapter's base, else the path itself."""
    adapter = adapter_config(model_path)
    return local_model_path(adapter["base_model_name_or_path"]) if adapter else model_path


def load_causal_lm(model_path: str, dtype: torch.dtype):
    """A full model, or a PEFT adapter loaded onto its base and merged there (``merge_and_unload``):
    generation then costs what the base's does, with no per-token adapter work."""
    from transformers import AutoModelForCausalLM

    if adapter_config(model_path) is None:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model_path(model_path), dtype=dtype)
    return PeftModel.from_pretrained(base, model_path).merge_and_unload()


def stop_token_ids(tokenizer, model_config, generation_config=None) -> set[int]:
    """Every id that ends an answer (see :func:`alpaca_ray.chat.eos_token_ids`)."""
    from alpaca_ray.chat import eos_token_ids

    return set(eos_token_ids(tokenizer, model_config, generation_config))


def prompt_token_ids(prompt: list[int], vocab_size: int) -> list[int]:
    """A prompt given as token ids, checked: an id outside the vocabulary would fail the whole batch."""
    ids = list(prompt)
    if not ids:
        raise ValueError("the prompt has no tokens")
    if any(type(token) is not int or not 0 <= token < vocab_size for token in ids):
        raise ValueError(f"prompt token ids must be integers in 0..{vocab_size - 1}")
    return ids


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
    """One answer's state inside the engine thread; ``group`` is the request it belongs to."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Delta], None],
                 group: object = None, stream: bool = True):
        self.prompt_ids, self.params, self.emit, self.stream = prompt_ids, params, emit, stream
        self.group = group if group is not None else self  # alone: a request of its own
        # torch seeds are unsigned 64-bit: any client seed (and seed + choice index) maps into that range
        self.generator = (torch.Generator().manual_seed(params.seed % 2**64) if params.seed is not None
                          else None)
        self.tokens: list[int] = []
        self.sent = ""  # text already streamed
        self.cancelled = False

    def input_ids(self) -> list[int]:
        """What (re)admission runs through the model: the prompt and what was generated before a preemption."""
        return self.prompt_ids + self.tokens


class FairScheduler:
    """Which sequences hold the batch's rows: an equal share for every request that has work.

    Rows are dealt one at a time to each request in arrival order until the batch is full or every
    request has all it asked for, so a request with 1600 sequences and one with 1 each get what they
    need of a 16-row batch (15 and 1). A request holding more rows than its share when another waits
    gives the difference back (the sequences with the fewest tokens, which cost least to redo): they
    go back to the front of its queue and later resume where they were, their prompt and tokens so far
    prefilled again (vLLM's "recompute" preemption). Used only by the engine thread.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.waiting: dict[object, deque[_Sequence]] = {}  # per request, in arrival order

    def add(self, sequence: _Sequence, front: bool = False) -> None:
        line = self.waiting.setdefault(sequence.group, deque())
        if front:
            line.appendleft(sequence)
        else:
            line.append(sequence)

    def waiting_count(self) -> int:
        return sum(len(line) for line in self.waiting.values())

    def plan(self, running: list[_Sequence]) -> tuple[list[_Sequence], list[_Sequence]]:
        """(sequences to admit, running sequences to preempt) so that every request has its fair share.

        Called before every decode step, so it costs O(requests), not O(waiting sequences): cancelled
        sequences are dropped when they reach the front of their queue.
        """
        if not self.waiting:
            return [], []
        held: dict[object, list[_Sequence]] = {}
        for sequence in running:
            held.setdefault(sequence.group, []).append(sequence)
        if len(running) >= self.max_rows and set(self.waiting) <= set(held) and len(held) == 1:
            return [], []  # one request holds the full batch and only it waits: nothing to share
        groups = list(dict.fromkeys([*held, *self.waiting]))  # requests running first, then newcomers
        demand = {g: len(held.get(g, ())) + len(self.waiting.get(g, ())) for g in groups}
        share = dict.fromkeys(groups, 0)
        free = self.max_rows
        while free:
            hungry = [g for g in groups if share[g] < demand[g]]
            if not hungry:
                break
            for group in hungry[:free]:
                share[group] += 1
            free -= min(free, len(hungry))
        preempt: list[_Sequence] = []
        for group, rows in held.items():
            if len(rows) > share[group]:  # the newest rows, least work lost
                preempt += sorted(rows, key=lambda s: len(s.tokens))[: len(rows) - share[group]]
        admit: list[_Sequence] = []
        for group in groups:
            line = self.waiting.get(group)
            room = share[group] - len(held.get(group, ()))
            while line and room > 0:
                sequence = line.popleft()
                if not sequence.cancelled:
                    admit.append(sequence)
                    room -= 1
            if line is not None and not line:
                del self.waiting[group]
        return admit, preempt


class _Batch:
    """The rows decoding together: their sequences, KV cache, masks and the logits of their next token."""

    def __init__(self, rows: list[_Sequence], cache, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 last_tokens: torch.Tensor, logits: torch.Tensor):
        self.rows, self.cache, self.attention_mask = rows, cache, attention_mask
        self.position_ids, self.last_tokens, self.logits = position_ids, last_tokens, logits

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[row] for row in keep]
        self.attention_mask, self.position_ids = self.attention_mask[index], self.position_ids[index]
        self.last_tokens, self.logits = self.last_tokens[index], self.logits[index]
        # columns that were padding for every row left: drop them, or a batch that rows keep joining would
        # carry (and attend over) an ever longer cache
        first = int(self.attention_mask.any(dim=0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.attention_mask = self.attention_mask[:, first:]

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows; the shorter side is left-padded (masked) to the longer cache length."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, width, dim=1),
                                         _left_pad(other.attention_mask, width, dim=1)])
        self.rows = self.rows + other.rows
        self.position_ids = torch.cat([self.position_ids, other.position_ids])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.logits = torch.cat([self.logits, other.logits])


def _left_pad(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


class TransformersEngine:
    """Hugging Face causal LM on CPU or GPU with continuous batching across callers, fair between requests.

    Rows join the running batch between decode steps (their prompts prefilled, their KV cache appended
    to the batch's) and leave it when finished, so a newcomer waits one prefill, not for the batch to
    end; :class:`FairScheduler` decides which rows run when there are more than ``max_batch_size``.
    """

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "auto", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, logits_processors: list | None = None, metrics=None):
        from transformers import AutoTokenizer

        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = device
        model_path = local_model_path(model_path)
        self.model_path = model_path  # the local copy actually loaded
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = load_causal_lm(model_path, torch_dtype).to(device).eval()
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.eos_ids = stop_token_ids(self.tokenizer, config, getattr(self.model, "generation_config", None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids or {0})
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        # transformers 5 renamed the KV cache argument from past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.logits_processors = list(logits_processors or [])
        self.metrics = metrics
        self._queue: queue.Queue[_Sequence] = queue.Queue()
        self._scheduler = FairScheduler(max_batch_size)
        self._preemptions = 0
        self._running = 0
        self._batches: list[int] = []  # sizes of the batches decoded so far (for tests and stats)
        self._thread = threading.Thread(target=self._loop, name="alpaca-ray-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (event loop) ----
    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(prompt) if isinstance(prompt, list) else len(self.tokenizer(prompt)["input_ids"])

    async def generate(self, prompt: Prompt, params: SamplingParams, group: object = None,
                       stream: bool = True) -> AsyncIterator[Delta]:
        """Stream one answer; leaving the loop early (a client gone) cancels the sequence.

        ``prompt``: text, tokenized here with the tokenizer's special tokens, or token ids used as they are.

        ``group`` names the request the answer belongs to (answers of one request share a fair share of
        the batch); ``stream=False`` sends the whole answer as one delta at the end (no per-token wakeups
        of the event loop). Tokenizing runs on a worker thread so a long prompt never blocks the event loop.
        """
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        if isinstance(prompt, str):
            prompt_ids = (await asyncio.to_thread(self.tokenizer, prompt))["input_ids"]
        else:
            prompt_ids = prompt_token_ids(prompt, self.vocab_size)
        sequence = _Sequence(prompt_ids, params, lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta),
                             group, stream)
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
        return {"queue_depth": self._queue.qsize() + self._scheduler.waiting_count(), "running": self._running,
                "batches": list(self._batches), "preemptions": self._preemptions}

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set("queue_depth", self._queue.qsize() + self._scheduler.waiting_count())
            self.metrics.set("running_sequences", self._running)

    # ---- the engine thread ----
    def _take_arrivals(self, idle: bool) -> None:
        """Move queued sequences to the scheduler; when idle, block for one, then wait a moment for more."""
        if idle:
            self._scheduler.add(self._queue.get())
            deadline = time.monotonic() + self.batch_wait_timeout_s
            while self._queue.qsize() < self.max_batch_size and time.monotonic() < deadline:
                try:
                    self._scheduler.add(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while True:
            try:
                self._scheduler.add(self._queue.get_nowait())
            except queue.Empty:
                return

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            self._take_arrivals(idle=batch is None and not self._scheduler.waiting)
            rows = batch.rows if batch is not None else []
            admit, preempt = self._scheduler.plan(rows)
            try:
                with torch.inference_mode():
                    if preempt:
                        out = {id(s) for s in preempt}
                        batch.select([i for i, s in enumerate(batch.rows) if id(s) not in out])
                        for sequence in reversed(preempt):
                            self._scheduler.add(sequence, front=True)
                        self._preemptions += len(preempt)
                    if admit:
                        joining = self._prefill(admit)
                        if batch is None or not batch.rows:
                            batch = joining
                        else:
                            batch.merge(joining)
                        self._batches.append(len(batch.rows))
                        if self.metrics is not None:
                            self.metrics.observe("batch_size", len(batch.rows))
                    if batch is None or not batch.rows:
                        batch = None
                        continue
                    self._running = len(batch.rows)
                    self._update_gauges()
                    if not self._step(batch):
                        batch = None
            except Exception as err:  # noqa: BLE001 - never leave a caller waiting forever
                failed = (batch.rows if batch is not None else []) + [s for s in admit if batch is None
                                                                      or s not in batch.rows]
                # the details go to the replica's log, not to clients
                logger.exception("generation failed for a batch of %d sequence(s)", len(failed))
                for sequence in failed:
                    sequence.emit(Delta(f"[engine error: {type(err).__name__}]", len(sequence.tokens), "error"))
                batch = None
            if batch is None:
                self._running = 0
                self._update_gauges()

    def _prefill(self, sequences: list[_Sequence]) -> _Batch:
        """Run the prompts (left-padded) through the model: a batch of these rows, ready to sample."""
        inputs = [s.input_ids() for s in sequences]
        width = max(len(ids) for ids in inputs)
        input_ids = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):  # left padding: every row's last token is at the end
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True)
        return _Batch(list(sequences), _cache_of(output), attention_mask, position_ids[:, -1:],
                      input_ids[:, -1:], output.logits[:, -1, :].float())

    def _step(self, batch: _Batch) -> bool:
        """Sample each row's next token, stream it, drop finished rows, run one decode step; False when empty."""
        logits = batch.logits
        for processor in self.logits_processors:  # the processors (watermark) look at each row's last token
            logits = processor(batch.last_tokens, logits)
        logits = logits.cpu()
        next_tokens, keep = [], []
        for row, sequence in enumerate(batch.rows):
            token = sample_next(logits[row], sequence.params.temperature, sequence.params.top_p,
                                sequence.generator)
            if not self._advance(sequence, token):
                keep.append(row)
                next_tokens.append(token)
        if not keep:
            return False
        if len(keep) < len(batch.rows):  # drop finished rows (and their cache) from the batch
            batch.select(keep)
            self._running = len(batch.rows)
        step = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
        batch.last_tokens = step
        batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(step)], dim=1)
        batch.position_ids = batch.position_ids + 1
        output = self.model(input_ids=step, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                            use_cache=True, **{self._cache_arg: batch.cache})
        batch.cache, batch.logits = _cache_of(output), output.logits[:, -1, :].float()
        return True

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
        if finish or (new and sequence.stream):
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
        # A PEFT adapter is served as a vLLM LoRA module on its base model, applied per request.
        adapter, base = adapter_config(model_path), base_model_path(model_path)
        lora = {} if adapter is None else {
            "enable_lora": True, "max_loras": 1,
            "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= int(adapter["r"]))}
        args = AsyncEngineArgs(model=base, dtype=dtype, max_num_seqs=max_batch_size, **lora)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.lora_request = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, model_path)
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        config = AutoConfig.from_pretrained(base)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.vocab_size = int(config.vocab_size)
        try:
            generation = GenerationConfig.from_pretrained(base)
        except OSError:  # no generation_config.json
            generation = None
        # vLLM stops at the tokenizer's EOS itself; the others are passed with every request
        self.eos_ids = stop_token_ids(self.tokenizer, config, generation)
        self._count = 0

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        return len(prompt) if isinstance(prompt, list) else len(self.tokenizer(prompt)["input_ids"])

    async def generate(self, prompt: Prompt, params: SamplingParams, group: object = None,
                       stream: bool = True) -> AsyncIterator[Delta]:
        """vLLM schedules its own batch; ``group`` and ``stream`` are accepted for the protocol, not used.

        Token ids go to vLLM as a ``TokensPrompt`` (used as they are); text is tokenized by vLLM.
        """
        from vllm import SamplingParams as VLLMSamplingParams

        self._count += 1
        sampling = VLLMSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                      top_p=params.top_p, stop=params.stop or None,
                                      stop_token_ids=sorted(self.eos_ids) or None, skip_special_tokens=True,
                                      seed=None if params.seed is None else params.seed % 2**63)
        inputs = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt_token_ids(prompt, self.vocab_size)}
        sent = ""
        async for output in self.engine.generate(inputs, sampling, request_id=f"req-{id(self)}-{self._count}",
                                                 lora_request=self.lora_request):
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
