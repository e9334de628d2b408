"""Train stage end to end on the shared local Ray cluster: 2 CPU workers, FSDP2 over gloo, a tiny model.

Ray Train runs cost tens of seconds here, so each run checks several things: (1) a full run (loss falls,
metrics, plot, export that loads and generates), (2) the same run killed with SIGKILL after a checkpoint
and (3) resumed, which must end where (1) ended. Length-grouped (unpacked) batches are trained in
test_object_store.py, and the stage runs as a Ray job in the pipeline tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_cli
from tests.support.train_data import write_dataset
from tests.support.train_runs import alive_train_actors, read_metrics, tiny_recipe, wait_until

pytestmark = pytest.mark.ray
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "real_token_share"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("train-data") / "data.json", count=48)


@pytest.fixture(scope="module")
def reference_run(ray_env, tiny_model_dir, dataset, tmp_path_factory):
    """One uninterrupted run through the real CLI (packing on)."""
    output = tmp_path_factory.mktemp("train-reference")
    run_cli(["train", *tiny_recipe(tiny_model_dir, dataset, output)], env=ray_env, timeout=400, check=True)
    return output


def test_run_lowers_loss_and_exports_a_model_that_loads_and_generates(reference_run, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_ray.prompts import format_prompt

    steps, evals = read_metrics(reference_run)
    meta = json.loads((reference_run / "final" / "alpaca_ray.json").read_text())
    total = meta["total_steps"]  # packed rows of 47 examples, 4 rows a step, 2 epochs
    assert total >= 10 and meta["steps"] == total
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert all(METRIC_KEYS <= set(r) for r in steps)
    assert all(0 < r["real_token_share"] <= 1 and r["tokens_per_s"] > 0 for r in steps)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    # one before the first step (the baseline), one at each epoch's end
    assert [r["step"] for r in evals] == [0, total // 2, total] and evals[0]["epoch"] == 0
    assert evals[2]["eval_loss"] < evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert steps[0]["lr"] < steps[1]["lr"] or steps[0]["lr"] == pytest.approx(1e-3)  # warmup then cosine
    assert steps[-1]["lr"] < 1e-4
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["steps"] == total and 0.9 < summary["real_token_share"] <= 1  # packed rows: little padding
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    final = reference_run / "final"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "alpaca_ray.json"} <= {p.name for p in final.iterdir()}
    assert meta["prompt_template"] == "alpaca" and meta["base_model"] == str(tiny_model_dir)
    assert meta["train_config"]["epochs"] == 2 and meta["packing"] is True
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.dtype == base.dtype and tokenizer.pad_token == "[PAD]"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # grown for the pad token
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    prompt = tokenizer(format_prompt("Repeat the word three times.", "cat"), return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_killed_run_resumes_to_the_same_loss(reference_run, ray_env, tiny_model_dir, dataset, tmp_path):
    output = tmp_path / "killed"
    argv = [sys.executable, "-m", "alpaca_ray.cli", "train", *tiny_recipe(tiny_model_dir, dataset, output)]
    snapshot = output / "ray_results" / "train" / "checkpoint_manager_snapshot.json"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(argv, env=ray_env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: snapshot.exists() or process.poll() is not None, 300, "a first checkpoint")
            assert process.poll() is None, "the run ended before it could be killed"
            assert not (output / "final").exists()
            process.send_signal(signal.SIGKILL)  # no cleanup: the driver and its trainer die mid-run
        finally:
            process.kill()
            process.wait()
    total = json.loads((reference_run / "final" / "alpaca_ray.json").read_text())["total_steps"]
    killed_at = max(r["step"] for r in read_metrics(output)[0])
    assert killed_at < total
    wait_until(lambda: alive_train_actors() == 0, 120, "the killed run's workers to exit", interval=0.5)

    refused = run_cli(["train", *tiny_recipe(tiny_model_dir, dataset, output)], env=ray_env)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr  # never silently overwritten

    resumed = run_cli(["train", *tiny_recipe(tiny_model_dir, dataset, output), "--resume"], env=ray_env,
                      timeout=400, check=True)
    assert "resumed from checkpoint at step" in resumed.stdout + resumed.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed"] is True
    steps, evals = read_metrics(output)
    assert [r["step"] for r in steps] == list(range(1, total + 1))  # each step once, none lost or repeated
    reference_steps, reference_evals = read_metrics(reference_run)
    for mine, theirs in zip(steps, reference_steps):  # same data order, LR and optimizer state
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-9)
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4), mine["step"]
    assert evals[-1]["eval_loss"] == pytest.approx(reference_evals[-1]["eval_loss"], abs=1e-4)
