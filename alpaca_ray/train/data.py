"""Tokenization, the per-epoch data plan (packing or length grouping) and collation: pure functions.

Every worker computes the same plan from the same tokenized examples and seed, then takes its own
micro-batches from it. The order therefore depends only on (seed, epoch, step): a resumed run sees the
same batches as an uninterrupted one, whatever order Ray Data streamed the rows in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from alpaca_ray.prompts import format_example

IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross_entropy default ignore_index)
DEFAULT_PAD_TOKEN = "[PAD]"  # what Stanford Alpaca's train.py adds to LLaMA's tokenizer


@dataclass(frozen=True)
class Example:
    """One tokenized example: the loss is taken on ``input_ids[prompt_len:]`` (Alpaca: one response after
    the prompt), or where ``loss_mask`` is 1 when it is given (a conversation: every assistant turn)."""

    id: int
    input_ids: tuple[int, ...]
    prompt_len: int
    loss_mask: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else len(self.input_ids) - self.prompt_len


def add_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token when it has none (as Alpaca does); True when one was added."""
    if tokenizer.pad_token is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    return True


def reuse_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token from its own vocabulary when it has none: UNK, else EOS.

    For adapter training: a new token would need a new embedding row, which a frozen base cannot learn
    and an adapter would have to carry. Pad positions are masked (attention mask, -100 labels), so any
    token does; Alpaca-LoRA pads with UNK (id 0) so that padding never reads as an end of text.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


def tokenize_record(tokenizer, instruction: str, input: str, output: str, max_length: int) -> dict:  # noqa: A002
    """Tokenize one record as Alpaca does: ``prompt + output`` together, EOS appended, prompt masked.

    Returns ``input_ids``, ``prompt_len`` (tokens of the prompt alone, BOS included: their labels are
    -100), ``truncated`` (the example was longer than ``max_length`` and was cut) and ``num_labels``
    (response tokens left; 0 when the prompt alone fills ``max_length``, so the example teaches nothing).
    """
    prompt, target = format_example(instruction, input, output)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + target)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(full_ids) > max_length
    input_ids = full_ids[:max_length]
    prompt_len = min(len(prompt_ids), len(input_ids))
    return {"input_ids": input_ids, "prompt_len": prompt_len, "truncated": truncated,
            "num_labels": len(input_ids) - prompt_len,
            "loss_mask": [0] * prompt_len + [1] * (len(input_ids) - prompt_len)}


def labels_for(example: Example) -> list[int]:
    """Labels of one example: -100 on the prompt, the token itself on the response (the model shifts)."""
    if example.loss_mask is not None:
        return [t if m else IGNORE_INDEX for t, m in zip(example.input_ids, example.loss_mask)]
    return [IGNORE_INDEX] * example.prompt_len + list(example.input_ids[example.prompt_len:])


class ChatTemplateError(ValueError):
    """A chat template this stage cannot train with (it renders a conversation's start differently from the
    conversation's prefix, so no token can be told to belong to an assistant turn)."""


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_strings(tokenizer, eos_ids: Sequence[int]) -> list[str]:
    """The texts of the EOS tokens, longest first (what ends an assistant turn in a rendered chat)."""
    texts = {tokenizer.convert_ids_to_tokens(int(i)) for i in eos_ids} | {tokenizer.eos_token}
    return sorted((t for t in texts if t), key=len, reverse=True)


def assistant_spans(tokenizer, messages: Sequence[dict], eos_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans of its assistant turns), each span ending just after the
    turn's end-of-turn (EOS) token: what the model must learn to write, stopping included, and nothing of
    the template's text that follows it (ChatML's newline) or comes before it (``<|im_start|>assistant``).

    A turn's span starts where the rendering of the conversation up to it, with the generation prompt,
    ends: that is exactly the prompt serve renders before the model answers.
    """
    full = render_chat(tokenizer, messages)
    ends = end_of_turn_strings(tokenizer, eos_ids)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:index + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError("the chat template renders the start of a conversation differently from the "
                                    f"whole (at message {index}), so assistant turns cannot be located")
        turn = through[len(before):]
        stops = [turn.rfind(end) + len(end) for end in ends if end in turn]
        spans.append((len(before), len(before) + (max(stops) if stops else len(turn))))
    return full, spans


def tokenize_chat(tokenizer, messages: Sequence[dict], max_length: int, eos_ids: Sequence[int]) -> dict:
    """Tokenize a conversation in the tokenizer's chat template, with the loss on assistant turns only.

    The rendered text is tokenized once (as ``apply_chat_template(tokenize=True)`` does: no special tokens
    added, the template has them), and a token is labelled when it starts inside an assistant span.
    Returns ``input_ids``, ``loss_mask``, ``prompt_len`` (tokens before the first label), ``truncated`` and
    ``num_labels``.
    """
    text, spans = assistant_spans(tokenizer, messages, eos_ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in offsets]
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    prompt_len = mask.index(1) if 1 in mask else len(ids)
    return {"input_ids": ids, "loss_mask": mask, "prompt_len": prompt_len, "truncated": truncated,
            "num_labels": sum(mask)}


def split_train_eval(num_examples: int, eval_fraction: float, eval_max: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of ids ``0..n-1``; at least one train example is always kept."""
    eval_count = min(int(round(num_examples * eval_fraction)), eval_max, num_examples - 1)
    if eval_fraction > 0 and num_examples >= 2:
        eval_count = max(eval_count, 1)
    eval_ids = sorted(random.Random(seed).sample(range(num_examples), max(eval_count, 0)))
    held = set(eval_ids)
    return [i for i in range(num_examples) if i not in held], eval_ids


def pack_examples(order: Sequence[int], lengths: dict[int, int], max_length: int) -> list[tuple[int, ...]]:
    """Best-fit packing of example ids (taken in ``order``) into rows of at most ``max_length`` tokens.

    Each example goes to the open row with the least room that still fits it, so rows stay full and the
    order stays close to the shuffled one. Buckets by free space keep this O(examples x max_length).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    rows_by_room: list[list[int]] = [[] for _ in range(max_length + 1)]
    for example_id in order:
        length = lengths[example_id]
        target = next((r for r in range(length, max_length + 1) if rows_by_room[r]), None)
        if target is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        else:
            row = rows_by_room[target].pop()
        rows[row].append(example_id)
        room[row] -= length
        rows_by_room[room[row]].append(row)
    return [tuple(row) for row in rows]


def epoch_units(example_ids: Sequence[int], lengths: dict[int, int], epoch: int, seed: int, max_length: int,
                packing: bool) -> list[tuple[int, ...]]:
    """The sequences of one epoch, in training order: packed rows, or one example per sequence."""
    order = sorted(example_ids)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if packing:
        return pack_examples(order, lengths, max_length)
    return [(example_id,) for example_id in order]


def split_global_batch(units: Sequence[tuple[int, ...]], lengths: dict[int, int], workers: int, micro: int,
                       accumulation: int) -> list[list[list[tuple[int, ...]]]]:
    """Deal one global batch out as ``[accumulation step][worker] -> micro-batch`` (lists of units).

    Units are sorted by length first (length-grouped batching: a micro-batch is padded to its longest,
    so similar lengths waste least), and consecutive micro-batches go to the workers of one accumulation
    step, which keeps their step times balanced. A short last batch leaves some micro-batches empty; the
    collator turns those into one all-padding row so every rank runs the same number of passes (FSDP's
    collectives need that).
    """
    ranked = sorted(units, key=lambda unit: -sum(lengths[i] for i in unit))
    chunks = [ranked[k * micro:(k + 1) * micro] for k in range(workers * accumulation)]
    return [[chunks[step * workers + w] for w in range(workers)] for step in range(accumulation)]


def collate(examples: Sequence[Sequence[Example]], pad_id: int, packed: bool) -> dict:
    """Tensors for one micro-batch; ``examples[row]`` lists the examples of that row (one when unpacked).

    Unpacked rows are right-padded to the longest row with a 2-D ``attention_mask`` (Alpaca's collator).
    Packed rows carry ``position_ids`` that restart at 0 for every example and no attention mask:
    transformers then builds a block-diagonal causal mask from them (SDPA/eager) or runs flash-attention's
    varlen kernel, so no example attends to another. The padding tail restarts at 0 too, so it is a
    segment of its own. ``num_real`` / ``num_computed`` give the real-token share; ``num_labels`` the
    tokens the loss is taken on.
    """
    import torch

    if not examples:
        examples = [[]]
    width = max(1, max(sum(len(e) for e in row) for row in examples))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    num_real = 0
    for r, row in enumerate(examples):
        offset = 0
        for example in row:
            n = len(example)
            input_ids[r, offset:offset + n] = torch.tensor(example.input_ids)
            labels[r, offset:offset + n] = torch.tensor(labels_for(example))
            position_ids[r, offset:offset + n] = torch.arange(n)
            offset += n
        attention_mask[r, :offset] = 1
        position_ids[r, offset:] = torch.arange(width - offset)
        num_real += offset
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention_mask
    batch["num_real"] = num_real
    batch["num_computed"] = input_ids.numel()
    batch["num_labels"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return batch


@dataclass
class DataPlan:
    """Every epoch's sequences and the step count; identical on every rank."""

    epochs: list[list[tuple[int, ...]]]
    global_batch_size: int

    @property
    def steps_per_epoch(self) -> list[int]:
        return [-(-len(units) // self.global_batch_size) for units in self.epochs]

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch)

    def batch(self, step: int) -> tuple[int, list[tuple[int, ...]]]:
        """(epoch, units of the global batch) of a 0-based global step."""
        for epoch, steps in enumerate(self.steps_per_epoch):
            if step < steps:
                units = self.epochs[epoch]
                return epoch, units[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            step -= steps
        raise IndexError(f"step {step} is past the end of the plan")


def make_plan(example_ids: Sequence[int], lengths: dict[int, int], epochs: int, seed: int, max_length: int,
              packing: bool, global_batch_size: int) -> DataPlan:
    return DataPlan([epoch_units(example_ids, lengths, e, seed, max_length, packing) for e in range(epochs)],
                    global_batch_size)


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_ratio: float) -> float:
    """LR of a 0-based step: linear warmup over ``ceil(warmup_ratio x total)`` steps, then cosine to 0.

    Hugging Face's ``get_cosine_schedule_with_warmup`` (what Alpaca used), shifted by one step so the
    first step already learns (HF's step 0 has LR 0).
    """
    import math

    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
