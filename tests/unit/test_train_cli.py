"""Train stage CLI: flags and config files, and bad input refused before any Ray worker starts."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.train.cli import main


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
    assert status == 2 and "cannot load base model" in err


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
