"""The shared basics: prompt templates (golden), record files, config machinery, the CLI table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal

import pytest

from alpaca_ray import prompts
from alpaca_ray.cli import COMMANDS
from alpaca_ray.config import ConfigError, add_config_args, config_from_args, config_to_argv, option, validate
from alpaca_ray.records import AlpacaRecord, RecordError, read_records, write_records
from tests.conftest import run_cli


def test_templates_are_stanford_alpacas_to_the_character():
    assert prompts.format_prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:"
    )
    assert prompts.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:"
    )
    assert prompts.format_prompt("Say hi.", "   ") == prompts.format_prompt("Say hi.")
    assert prompts.format_example("Say hi.", "", "Hi.", "</s>")[1] == "Hi.</s>"


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_records_round_trip(tmp_path, suffix):
    records = [AlpacaRecord("Name a colour.", "", "Blue."), AlpacaRecord("Translate.", "Hola", "Hello", {"id": 7})]
    path = tmp_path / f"data{suffix}"
    write_records(records, path)
    assert read_records(path) == records


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    records = [AlpacaRecord("Join the lines.", "a\u2028b\u0085c", "abc")]
    path = tmp_path / "data.jsonl"
    write_records(records, path)
    assert read_records(path) == records


def test_record_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c", "input": 3,'
                    ' "output": "d"}\n]\n')
    with pytest.raises(RecordError) as err:
        read_records(path)
    assert (err.value.line, err.value.field) == (3, "input")
    assert str(path) in str(err.value) and "line 3" in str(err.value)

    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(RecordError, match="line 2: invalid JSON"):
        read_records(path)
    path.write_text('{"instruction": "a", "input": ""}\n')
    with pytest.raises(RecordError, match="line 1: field 'output': is missing"):
        read_records(path)
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "data.csv").write_text("instruction,input,output\n")
    with pytest.raises(RecordError, match="unknown format"):
        read_records(tmp_path / "data.csv")


@dataclasses.dataclass
class DemoConfig:
    name: str = option("x", "a name")
    steps: int = option(3, "how many steps")
    rate: float = option(0.5, "a rate")
    packing: bool = option(True, "pack examples")
    api: Literal["chat", "completions"] = option("chat", "which API")
    tags: list[str] = option(default_factory=list, help="tags")

    def __post_init__(self):
        validate(self, [(self.steps > 0, f"steps must be > 0, got {self.steps}"),
                        (0 < self.rate <= 1, f"rate must be in (0, 1], got {self.rate}")])


def test_config_file_then_flags_override(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("demo:\n  steps: 7\n  rate: 0.25\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_args(parser, DemoConfig)
    args = parser.parse_args(["--config", str(config_file), "--rate", "0.75", "--no-packing", "--api", "completions"])
    config = config_from_args(DemoConfig, args, section="demo")
    assert (config.steps, config.rate, config.packing, config.api) == (7, 0.75, False, "completions")
    assert config_to_argv(config)[:4] == ["--name", "x", "--steps", "7"]
    assert "--no-packing" in config_to_argv(config)


def test_config_collects_every_problem_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        DemoConfig(steps=0, rate=2.0)
    assert "steps must be > 0" in str(err.value) and "rate must be in (0, 1]" in str(err.value)
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"stepz": 1}))
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_args(parser, DemoConfig)
    with pytest.raises(ConfigError, match="unknown field.*stepz"):
        config_from_args(DemoConfig, parser.parse_args(["--config", str(config_file)]))


def test_cli_lists_every_verb_and_rejects_unknown_ones():
    result = run_cli(["--help"])
    assert result.returncode == 0
    for verb in COMMANDS:
        assert verb in result.stdout
    result = run_cli(["frobnicate"])
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_tiny_model_loads_with_from_pretrained_and_has_no_pad_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token is None and tokenizer.eos_token == "</s>"
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer)
    text = "Give three tips for staying healthy."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
