"""Train stage CLI: flags and config files, and bad input refused before any Ray worker starts."""

from __future__ import annotations

import json
import os

import pytest

from alpaca_ray.train.cli import main
from tests.conftest import run_cli
from tests.support.ray_head import free_port


def run(argv, capsys):
    status = main(argv)
    return status, capsys.readouterr().err


def test_batch_size_that_does_not_divide_is_refused(tmp_path, capsys):
    status, err = run(["--base-model", "m", "--data", "d.json", "--output", str(tmp_path / "o"),
                       "--global-batch-size", "10", "--micro-batch-size", "4", "--num-workers", "2"], capsys)
    assert status == 2 and "global_batch_size 10 is not divisible by micro_batch_size 4 x num_workers 2" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    ("[]", "the dataset is empty"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c"}]', "line 2: field 'output': is missing"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": ', "invalid JSON"),
], ids=["empty", "missing-field", "malformed"])
def test_bad_datasets_are_refused_with_the_place_named(tiny_model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data.json"
    data.write_text(content)
    status, err = run(["--base-model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o")],
                      capsys)
    assert status == 2 and message in err and str(data) in err


def test_missing_base_model_is_a_clear_error(tmp_path, capsys):
    status, err = run(["--base-model", str(tmp_path / "nope"), "--data", "d.json", "--output", str(tmp_path)],
                      capsys)
    assert status == 2 and f"no such model directory: {tmp_path / 'nope'}" in err


@pytest.mark.parametrize("base, offline, message", [
    ("/nonexistent/models/base", True, "--base-model: no such model directory: /nonexistent/models/base"),
    ("./runs-that-are-not-here/base", True, "no such model directory: ./runs-that-are-not-here/base"),
    ("tests/no-such-model", True, "no such model directory: tests/no-such-model"),  # its parent exists: a path
    ("someorg/no-such-model", True, "--base-model someorg/no-such-model: not found locally and the hub is "
                                    "unreachable (HF_HUB_OFFLINE is set)"),
    ("someorg/no-such-model", False, "--base-model someorg/no-such-model: not found locally and the hub is "
                                     "unreachable (http://127.0.0.1:"),
], ids=["absolute", "dot-slash", "existing-parent", "hub-offline", "hub-refuses-connections"])
def test_a_base_model_that_is_nowhere_is_one_line(tmp_path, base, offline, message):
    """The real CLI: a path is reported as a missing directory, a hub name the cache lacks as unreachable
    (offline mode, or a hub that refuses connections); both before Ray starts, without the hub client's retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: nothing is local
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a", "output": "b"}]')
    result = run_cli(["train", "--base-model", base, "--data", str(data), "--output", str(tmp_path / "o")],
                     env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "o").exists()


def test_config_file_sets_fields_and_flags_override_it(tmp_path):
    from alpaca_ray.config import config_from_args, make_parser
    from alpaca_ray.train.config import TrainConfig

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"train": {"base_model": "m", "data": "d", "output": "o", "epochs": 5,
                                          "packing": False, "lr": 1e-4}}))
    parser = make_parser("t", "", TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args(["--config", str(path), "--epochs", "2", "--max-steps", "7"]),
                           section="train")
    assert (cfg.epochs, cfg.packing, cfg.lr, cfg.max_steps) == (2, False, 1e-4, 7)
