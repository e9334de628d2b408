"""The train stage on real weights: SmolLM2-135M-Instruct fine-tuned on conversations with FSDP2 on 2 CPU
workers through the real CLI, stopped after one step and resumed for a second; both exports keep the tied
embeddings, the chat template and every EOS id. Plus the loss mask against the real ChatML rendering.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.train_runs import read_metrics

pytestmark = pytest.mark.ray

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                  {"role": "user", "content": "And doubled again?"},
                  {"role": "assistant", "content": f"That is {4 * i}."}]} for i in range(8)
] + [
    {"conversations": [{"from": "human", "value": f"Name color number {i}."},
                       {"from": "gpt", "value": ["Red.", "Blue.", "Green.", "Yellow."][i % 4]}]} for i in range(4)
]


def recipe(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--base-model", str(model), "--data", str(data), "--output", str(output), "--num-workers", "2",
            "--epochs", "1", "--lr", "1e-5", "--global-batch-size", "4", "--micro-batch-size", "1",
            "--max-length", "128", "--max-failures", "0", *extra]


@pytest.fixture(scope="module")
def chat_run(smollm2_dir, ray_env, tmp_path_factory):
    """(output dir, copy of final/ after step 1, the two runs' output): one step, then resumed to two."""
    root = tmp_path_factory.mktemp("smollm2-train")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
    output = root / "out"
    first = run_cli(recipe(smollm2_dir, data, output, "--max-steps", "1"), env=ray_env, timeout=600, check=True)
    after_first = root / "final-after-step-1"
    shutil.copytree(output / "final", after_first)
    second = run_cli(recipe(smollm2_dir, data, output, "--max-steps", "2", "--resume"), env=ray_env, timeout=600,
                     check=True)
    return output, after_first, first.stdout + first.stderr, second.stdout + second.stderr


def assert_tied_export(final: Path, base: Path) -> None:
    """A standard HF directory whose output layer is the input embedding (one tensor saved, shared on load)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (final / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    eos = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    assert 2 in (eos if isinstance(eos, list) else [eos])  # <|im_end|>, the end of an assistant turn


def test_fsdp2_fine_tunes_real_weights_on_conversations_and_resumes(chat_run, smollm2_dir):
    import torch
    from safetensors.torch import load_file

    output, after_first, first_log, second_log = chat_run
    assert "prompt format: chat" in first_log and "loss on assistant turns" in first_log
    assert "resumed from checkpoint at step 1" in second_log
    # the log: one line per step (rank 0 only, printed once), none of Ray Data's execution lines
    assert first_log.count("step 1/1 (epoch 0): loss ") == 1 and second_log.count("step 2/2 (epoch 0): loss ") == 1
    assert "execution finished" not in first_log + second_log and "Reporting training result" not in first_log
    steps, evals = read_metrics(output)
    assert [r["step"] for r in steps] == [1, 2]  # each step once: the resumed run did not redo step 1
    assert [r["step"] for r in evals] == [0, 1, 2]  # the baseline before any update, then each run's end
    assert all(0 < r["loss"] < 10 for r in steps) and evals[0]["eval_loss"] < 10  # a real model, not random
    meta = json.loads((output / "final" / "alpaca_ray.json").read_text())
    assert meta["prompt_template"] == "chat" and meta["steps"] == 2

    assert_tied_export(after_first, smollm2_dir)
    assert_tied_export(output / "final", smollm2_dir)
    base = load_file(str(smollm2_dir / "model.safetensors"))
    one, two = load_file(str(after_first / "model.safetensors")), load_file(str(output / "final" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(one[name], base[name]) and not torch.equal(two[name], one[name])  # each step learned


def test_loss_mask_matches_the_chatml_rendering(smollm2_dir):
    """Labels on the real tokenizer: every assistant turn's text and its <|im_end|>, nothing else."""
    from alpaca_ray.train.data import tokenize_chat
    from alpaca_ray.train.model import eos_token_ids, load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    messages = CONVERSATIONS[3]["messages"]
    row = tokenize_chat(tokenizer, messages, 512, eos_token_ids(str(smollm2_dir), tokenizer))
    assert row["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    labelled = [tokenizer.decode([t]) for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert "".join(labelled) == "3 plus 3 is 6.<|im_end|>That is 12.<|im_end|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    # what is masked is the rest of the rendering: system, user turns, role headers, the newlines after turns
    masked = "".join(tokenizer.decode([t]) for t, m in zip(row["input_ids"], row["loss_mask"]) if not m)
    assert len(masked) + len("".join(labelled)) == len(rendered) and "<|im_start|>assistant\n" in masked
