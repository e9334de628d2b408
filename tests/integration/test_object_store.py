"""A storage root on an object store, end to end: the train CLI writes everything to a real S3 server
(moto), resumes from it, and the exported model loads from it through the node cache and serve's engine.

Two short runs on 2 CPU workers share one ``s3://`` output: 2 steps, then ``--resume`` to 4.
"""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace

import pytest

from alpaca_ray.cluster import storage
from tests.conftest import REPO_ROOT, run_cli
from tests.support.object_store import BUCKET, object_store  # noqa: F401 - the fixture
from tests.support.train_data import write_dataset
from tests.support.train_runs import tiny_recipe

pytestmark = pytest.mark.ray
RUN_FILES = {"metrics.jsonl", "loss.png", "summary.json", "train_config.json", "final/config.json",
             "final/model.safetensors", "final/tokenizer.json", "final/alpaca_ray.json",
             "ray_results/train/checkpoint_manager_snapshot.json"}


def _cwd() -> str:
    return os.getcwd()


def _metrics(uri: str) -> tuple[list[int], list[int]]:
    records = [json.loads(line) for line in storage.read_text(storage.join(uri, "metrics.jsonl")).splitlines()]
    return [r["step"] for r in records if "loss" in r], [r["step"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def s3_run(ray_env, object_store, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A run to an ``s3://`` output stopped after 2 steps, then resumed from the bucket to step 4; with
    length-grouped padded batches (no packing: what models that cannot take packed rows train with)."""
    data = write_dataset(tmp_path_factory.mktemp("s3-train-data") / "data.json", count=48)
    output = object_store.fresh_uri("train")
    cwd = tmp_path_factory.mktemp("s3-train-cwd")  # where a bug writing to a local "s3:" folder would show
    env = {**ray_env, **object_store.env}

    def train(steps: int, *extra: str):
        flags = tiny_recipe(tiny_model_dir, data, output, packing=False,
                            **{"max-steps": steps, "checkpoint-every": 2, "micro-batch-size": 2})
        return run_cli(["train", *flags, *extra], env=env, cwd=cwd, timeout=400, check=True)

    first = train(2)
    after_first = SimpleNamespace(files=object_store.files(output), metrics=_metrics(output))
    second = train(4, "--resume")
    return SimpleNamespace(output=output, cwd=cwd, first=first, after_first=after_first, second=second,
                           files=object_store.files(output))


def test_train_writes_every_file_to_the_bucket_and_resumes_from_it(s3_run, ray_local):
    import ray

    assert RUN_FILES <= s3_run.after_first.files, RUN_FILES - s3_run.after_first.files
    assert s3_run.after_first.metrics == ([1, 2], [0, 2])  # a baseline eval, and max_steps ends with one
    assert "resumed from checkpoint at step" not in s3_run.first.stdout + s3_run.first.stderr

    assert "resumed from checkpoint at step 2/" in s3_run.second.stdout + s3_run.second.stderr
    assert _metrics(s3_run.output) == ([1, 2, 3, 4], [0, 2, 4])  # each step once, none redone
    summary = json.loads(storage.read_text(storage.join(s3_run.output, "summary.json")))
    assert summary["resumed"] is True and summary["steps"] == 4 and 0 < summary["real_token_share"] <= 1
    assert summary["final"] == storage.join(s3_run.output, "final")
    meta = json.loads(storage.read_text(storage.join(s3_run.output, "final", "alpaca_ray.json")))
    assert meta["steps"] == 4 and meta["packing"] is False
    records = [json.loads(line) for line in storage.read_text(storage.join(s3_run.output, "metrics.jsonl")).splitlines()]
    steps = [r for r in records if "loss" in r]
    # padded rows: some computed tokens are padding, and the summary says so
    assert all(r["real_token_share"] < 1 and r["computed_tokens"] > r["real_tokens"] for r in steps)
    assert summary["real_token_share"] < 1
    assert storage.read_bytes(storage.join(s3_run.output, "loss.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert RUN_FILES <= s3_run.files

    # Nothing went to a local folder "s3:/BUCKET" (what open() makes of a URI) where the driver, the test
    # or the Ray workers run.
    worker_cwd = ray.get(ray.remote(num_cpus=0)(_cwd).remote())
    for place in {str(s3_run.cwd), str(REPO_ROOT), worker_cwd}:
        assert not os.path.exists(os.path.join(place, "s3:", BUCKET)), place


def test_exported_model_loads_from_the_bucket_through_the_cache_and_serve_engine(s3_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_ray.config import UserError
    from alpaca_ray.prompts import format_prompt
    from alpaca_ray.serve.config import ServeConfig, resolve_config
    from alpaca_ray.serve.engine import SamplingParams, TransformersEngine

    final = storage.join(s3_run.output, "final")
    cache = tmp_path / "cache"
    local = storage.cached_local_copy(final, cache)
    assert local.startswith(str(cache))
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    prompt = tokenizer(format_prompt("Repeat the word three times.", "cat"), return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] > prompt["input_ids"].shape[1]

    # What a replica does: the config names the URI, the engine loads this node's cached copy.
    config = resolve_config(ServeConfig(model=final))
    assert config.model == final and config.model_id == storage.basename(s3_run.output)  # the run's name
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(cache))
    engine = TransformersEngine(config.model, max_batch_size=2)
    assert engine.model_path == local  # the same content version: not downloaded again

    async def answer() -> tuple[str, int]:
        text, tokens = "", 0
        async for delta in engine.generate(format_prompt("Name a color.", ""), SamplingParams(4, temperature=0.0)):
            text, tokens = text + delta.text, delta.completion_tokens
        return text, tokens

    assert asyncio.run(answer())[1] >= 1

    with pytest.raises(UserError, match="no s3://.*/nothing-here/config.json"):
        resolve_config(ServeConfig(model=storage.join(s3_run.output, "nothing-here")))
