"""LoRA end to end on the shared Ray cluster: 2 CPU workers, FSDP2 over gloo, the quick start's tiny model.

One run does it all, since each Ray Train run costs tens of seconds here: it is SIGKILLed after a
checkpoint and a step past it, resumed (the redone steps must match the killed run's exactly), and must
have learnt a toy task (name a colour by its number); its adapter and merged exports must load with
the usual ``from_pretrained`` calls and answer alike, and the serve stage must answer from the adapter.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_cli
from tests.support.serve_app import app_config
from tests.support.train_data import COLORS, write_colour_dataset
from tests.support.train_runs import alive_train_actors, read_metrics, tiny_recipe, wait_until

pytestmark = pytest.mark.ray


def steps_so_far(output) -> dict[int, dict]:
    """Step records written so far (a line being written is skipped)."""
    path = output / "metrics.jsonl"
    records = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            records[record["step"]] = record
    return records


def greedy(model, tokenizer, prompt: str, tokens: int = 8) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_run_learns_resumes_exactly_exports_adapter_and_merged_and_is_served(
        ray_env, serve_port, tiny_model_dir, tmp_path):
    data = write_colour_dataset(tmp_path / "colours.json", count=24)
    output = tmp_path / "lora"
    # lm_head too: the tiny random model's head is too weak to name anything confidently unless adapted
    targets = ["q_proj", "v_proj", "lm_head"]
    flags = tiny_recipe(tiny_model_dir, data, output, lora=True, merge=True, lr=5e-3, epochs=2,
                        **{"global-batch-size": 2, "lora-dropout": 0.1, "lora-target-modules": targets})
    run_dir = output / "ray_results" / "train"

    def past_a_checkpoint() -> bool:
        saved = [int(p.name.rsplit("_", 1)[1]) for p in run_dir.glob("checkpoint_step_*")]
        done = steps_so_far(output)
        return bool(saved) and (run_dir / "checkpoint_manager_snapshot.json").exists() and \
            max(done, default=0) > max(saved)

    argv = [sys.executable, "-m", "alpaca_ray.cli", "train", *flags]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(argv, env=ray_env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: past_a_checkpoint() or process.poll() is not None, 300, "a step past a checkpoint")
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    wait_until(lambda: alive_train_actors() == 0, 120, "the killed run's workers to exit", interval=0.5)
    killed = steps_so_far(output)
    assert not (output / "final").exists()

    # Checkpoints only at epoch ends from here: the kill above needed an early one, the rest cost time.
    resumed = run_cli(["train", *flags, "--resume", "--checkpoint-every", "100"], env=ray_env, timeout=400,
                      check=True)
    resumed_at = int(re.search(r"resumed from checkpoint at step (\d+)", resumed.stdout + resumed.stderr)[1])
    steps, evals = read_metrics(output)
    meta = json.loads((output / "final" / "alpaca_ray.json").read_text())
    total = meta["total_steps"]
    assert [r["step"] for r in steps] == list(range(1, total + 1))  # each step once
    redone = [s for s in killed if s > resumed_at]
    assert redone, f"killed at step {max(killed)}, resumed from {resumed_at}: no step was redone"
    for s in redone:  # same adapters, optimizer state, data order, LR and dropout masks
        assert steps[s - 1]["loss"] == pytest.approx(killed[s]["loss"], rel=1e-6, abs=1e-6), s
        assert steps[s - 1]["grad_norm"] == pytest.approx(killed[s]["grad_norm"], rel=1e-5), s

    # It learnt: the loss on the responses fell by far, on the held-out example too.
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.5, (first, last)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert meta["finetuning"] == "lora" and meta["prompt_template"] == "alpaca"
    assert meta["train_config"]["lora_rank"] == 8 and meta["adapter"] is True

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_ray.prompts import format_prompt

    final, merged_dir = output / "final", output / "merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert "model.safetensors" not in {p.name for p in final.iterdir()}  # adapters only, not the base
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 16)
    assert set(adapter_config["target_modules"]) == set(targets)

    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    auto = AutoModelForCausalLM.from_pretrained(final).eval()  # transformers finds the base itself
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == base.dtype and not hasattr(merged, "peft_config")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    prompts = [format_prompt(f"Name colour number {n}.") for n in range(len(COLORS))]
    answers = [greedy(merged, tokenizer, p) for p in prompts]
    assert answers == [greedy(on_base, tokenizer, p) for p in prompts] == [greedy(auto, tokenizer, p) for p in prompts]
    assert answers != [greedy(base, tokenizer, p) for p in prompts]  # the adapter changed what it says

    # The serve stage loads the adapter directory (onto its base) and answers as the merged model does.
    import openai
    from ray import serve

    from alpaca_ray.serve.app import deploy

    config = app_config(final, serve_port, "test-lora-adapter", "/lora-adapter", tmp_path / "reports.db")
    url = deploy(config)
    try:
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.completions.create(model=config.model_id, prompt=prompts[3], max_tokens=8,
                                               temperature=0)
        assert completion.choices[0].text == answers[3]
    finally:
        serve.delete(config.app_name)
