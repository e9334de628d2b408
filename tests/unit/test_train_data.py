"""Train stage, pure parts: tokenization and prompt masking, packing, the data plan, schedule, config."""

from __future__ import annotations

import pytest

from alpaca_ray.config import ConfigError
from alpaca_ray.prompts import format_prompt
from alpaca_ray.train.config import TrainConfig
from alpaca_ray.train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    cosine_lr,
    make_plan,
    pack_examples,
    split_global_batch,
    split_train_eval,
    tokenize_record,
)

WITH_INPUT = ("Translate the sentence to English.", "Bonjour le monde", "Hello world.")
NO_INPUT = ("Name a primary color.", "", "Blue.")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from alpaca_ray.train.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def example(tokenizer, record, id_=0, max_length=256) -> Example:
    row = tokenize_record(tokenizer, *record, max_length)
    return Example(id_, tuple(row["input_ids"]), row["prompt_len"])


def test_pad_token_is_added_only_when_missing(tiny_model_dir, tokenizer):
    from transformers import AutoTokenizer

    from alpaca_ray.train.data import add_pad_token

    raw = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert raw.pad_token is None
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == len(raw)
    assert add_pad_token(tokenizer) is False  # already has one: unchanged
    assert len(tokenizer) == len(raw) + 1


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["with-input", "no-input"])
def test_prompt_tokens_are_masked_and_response_tokens_are_not(tokenizer, record):
    instruction, input_, output = record
    prompt_ids = tokenizer(format_prompt(instruction, input_))["input_ids"]
    ex = example(tokenizer, record)
    assert ex.prompt_len == len(prompt_ids)
    assert list(ex.input_ids[:ex.prompt_len]) == prompt_ids  # the prompt, BOS first, exactly
    assert ex.input_ids[-1] == tokenizer.eos_token_id  # EOS appended
    assert tokenizer.decode(ex.input_ids[ex.prompt_len:]) == output + tokenizer.eos_token

    batch = collate([[ex], [example(tokenizer, NO_INPUT)]], tokenizer.pad_token_id, packed=False)
    labels = batch["labels"][0].tolist()
    n = len(ex)
    assert labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    assert labels[ex.prompt_len:n] == list(ex.input_ids[ex.prompt_len:])
    assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)  # padding is never a target
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(labels) - n)


def test_packed_rows_mask_each_prompt_and_restart_positions(tokenizer):
    first, second = example(tokenizer, WITH_INPUT, 0), example(tokenizer, NO_INPUT, 1)
    short = example(tokenizer, ("Say hi.", "", "Hi."), 2)
    batch = collate([[first, second], [short]], tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in batch  # boundaries come from position_ids
    labels, positions = batch["labels"].tolist(), batch["position_ids"].tolist()
    a, b = len(first), len(second)
    expected = ([IGNORE_INDEX] * first.prompt_len + list(first.input_ids[first.prompt_len:])
                + [IGNORE_INDEX] * second.prompt_len + list(second.input_ids[second.prompt_len:]))
    assert labels[0] == expected
    assert positions[0] == list(range(a)) + list(range(b))
    width = a + b
    assert positions[1] == list(range(len(short))) + list(range(width - len(short)))  # padding: its own segment
    assert labels[1][len(short):] == [IGNORE_INDEX] * (width - len(short))
    assert batch["num_real"] == a + b + len(short) and batch["num_computed"] == 2 * width
    assert batch["num_labels"] == sum(len(e) - e.prompt_len for e in (first, second, short))


def test_long_examples_are_truncated_and_flagged(tokenizer):
    long = tokenize_record(tokenizer, "Write a story.", "", "once upon a time " * 80, max_length=64)
    assert long["truncated"] and len(long["input_ids"]) == 64 and long["num_labels"] == 64 - long["prompt_len"]
    no_room = tokenize_record(tokenizer, "Summarise: " + "words " * 100, "", "Short.", max_length=32)
    assert no_room["truncated"] and no_room["num_labels"] == 0  # counted as dropped by the pipeline
    fits = tokenize_record(tokenizer, *NO_INPUT, max_length=512)
    assert not fits["truncated"]


def test_packing_gives_each_example_the_loss_it_has_alone(tiny_model_dir, tokenizer):
    """Per-example losses of a packed row equal those of the examples run one by one (fp32, one process)."""
    import torch
    import torch.nn.functional as F

    from alpaca_ray.train.model import load_model

    model = load_model(str(tiny_model_dir), tokenizer, "sdpa").eval()
    exs = [example(tokenizer, r, i) for i, r in enumerate([WITH_INPUT, NO_INPUT, ("Say hi.", "", "Hi there.")])]

    def token_losses(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                               ignore_index=IGNORE_INDEX)

    with torch.no_grad():
        alone = token_losses(collate([[e] for e in exs], tokenizer.pad_token_id, packed=False))
        packed = token_losses(collate([exs], tokenizer.pad_token_id, packed=True))[0]
    offset = 0
    for row, ex in enumerate(exs):
        n = len(ex)
        # Token t's loss sits at index t-1 after the shift; the first token of each example is a prompt token.
        torch.testing.assert_close(packed[offset:offset + n - 1], alone[row, :n - 1], atol=1e-5, rtol=1e-5)
        offset += n
    assert float(alone.sum()) > 0


def test_best_fit_packing_keeps_every_example_once_within_max_length():
    lengths = {i: n for i, n in enumerate([60, 30, 50, 20, 70, 10, 40, 64, 1, 99])}
    rows = pack_examples(list(lengths), lengths, max_length=100)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == sorted(lengths)
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    # Best fit: the 10-token example fills row 0 exactly (10 free) rather than a row with 30 free.
    assert rows == [(0, 1, 5), (2, 3), (4, 8), (6,), (7,), (9,)]


def test_plan_is_deterministic_and_deals_every_unit_once():
    lengths = {i: 5 + (i * 7) % 23 for i in range(37)}
    plan = make_plan(list(lengths), lengths, epochs=2, seed=3, max_length=64, packing=False, global_batch_size=8)
    again = make_plan(list(reversed(list(lengths))), lengths, 2, 3, 64, False, 8)  # arrival order is irrelevant
    assert plan.epochs == again.epochs
    assert plan.epochs[0] != plan.epochs[1]  # reshuffled each epoch
    assert plan.steps_per_epoch == [5, 5] and plan.total_steps == 10
    seen = []
    for step in range(5):
        epoch, units = plan.batch(step)
        dealt = split_global_batch(units, lengths, workers=2, micro=2, accumulation=2)
        assert epoch == 0 and len(dealt) == 2 and all(len(per_worker) == 2 for per_worker in dealt)
        seen += [u for per_worker in dealt for micro in per_worker for u in micro]
    assert sorted(seen) == sorted((i,) for i in lengths)  # the short last batch is dealt too
    dealt = split_global_batch(plan.batch(0)[1], lengths, 2, 2, 2)
    first_micro = [lengths[u[0]] for u in dealt[0][0]]
    assert first_micro == sorted(first_micro, reverse=True)  # length-grouped


def test_eval_split_is_deterministic_and_disjoint():
    train, held = split_train_eval(100, 0.05, 500, seed=1)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 100
    assert split_train_eval(100, 0.05, 500, seed=1) == (train, held)
    assert split_train_eval(3, 0.02, 500, 1)[1] and split_train_eval(3, 0.0, 500, 1)[1] == []


def test_cosine_schedule_warms_up_then_decays_to_zero():
    total, peak = 200, 2e-5
    lrs = [cosine_lr(s, total, peak, 0.03) for s in range(total)]
    warmup = 6  # ceil(3% of 200)
    assert lrs[:warmup] == sorted(lrs[:warmup]) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak) and lrs[-1] < peak * 0.01
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_config_derives_micro_batch_and_rejects_sizes_that_do_not_divide():
    cfg = TrainConfig(base_model="m", data="d", output="o", num_workers=4)
    assert (cfg.global_batch_size, cfg.lr, cfg.epochs, cfg.max_length, cfg.weight_decay) == (128, 2e-5, 3, 512, 0.0)
    assert cfg.derived_micro_batch_size * cfg.grad_accumulation * cfg.num_workers == 128
    assert cfg.derived_micro_batch_size == 4 and cfg.grad_accumulation == 8  # Alpaca's 4 x 8 x 4
    assert TrainConfig(base_model="m", data="d", output="o", num_workers=2, global_batch_size=6).derived_micro_batch_size == 3
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size 3 x num_workers 2"):
        TrainConfig(base_model="m", data="d", output="o", num_workers=2, global_batch_size=8, micro_batch_size=3)
    with pytest.raises(ConfigError) as err:
        TrainConfig(num_workers=3, global_batch_size=8)
    assert "base_model is required" in str(err.value) and "not divisible by num_workers 3" in str(err.value)
