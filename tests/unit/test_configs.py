"""Every shipped pipeline config loads and validates, each stage section with its own config class."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alpaca_ray.config import config_from_args, make_parser
from alpaca_ray.pipeline.config import STAGES, load_config_class, load_pipeline_config, stage_specs
from alpaca_ray.pipeline.runner import stage_argv
from tests.conftest import REPO_ROOT
from tests.support.pipeline_replay import BUNDLED_REPLAY

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def specs_of(path: Path) -> dict:
    if "teacher" in yaml.safe_load(path.read_text()) and not BUNDLED_REPLAY.exists():
        pytest.skip("the bundled teacher_replay.jsonl is not written yet")
    # relative paths resolve against the repository root, where the README runs these from
    return {s.name: s for s in stage_specs(load_pipeline_config(str(path), base_dir=str(REPO_ROOT)))}


def test_the_three_recipes_are_shipped():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "alpaca-7b.yaml", "modern-8b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_every_section_validates_with_its_stage_class(path):
    specs = specs_of(path)
    assert list(specs)[:3] == ["generate", "train", "serve"]
    for stage, spec in specs.items():
        cls = load_config_class(stage)
        assert spec.config_class is cls
        if cls is not None:
            extra = {"model_a": "served-model"} if stage == "evaluate" and "model_a" not in spec.values else {}
            if stage == "generate" and "teacher_base_url" not in spec.values:
                extra["teacher_base_url"] = "http://127.0.0.1:1/v1"  # the offline teacher's, set at run time
            # The flags the job receives rebuild exactly the config the section describes.
            args = make_parser(stage, "", cls).parse_args(stage_argv(spec, extra))
            assert config_from_args(cls, args) == cls(**{**spec.values, **extra})
    assert "sk-" not in path.read_text()  # keys are named by env var, never written


def test_every_stage_config_class_exists():
    assert [stage for stage in STAGES if load_config_class(stage) is None] == []


def test_quickstart_is_offline_tiny_and_on_cpu():
    specs = specs_of(REPO_ROOT / "configs" / "quickstart.yaml")
    raw = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    assert (REPO_ROOT / raw["teacher"]["replay"]) == BUNDLED_REPLAY
    assert "teacher_base_url" not in specs["generate"].values  # the offline teacher's URL is set at run time
    assert specs["generate"].values["target"] <= 200
    assert specs["train"].values["use_gpu"] is False and specs["serve"].values.get("use_gpu") in (None, False)
    assert specs["train"].values["base_model"].endswith("runs/tiny-base")  # made by init-model first
    assert "evaluate" not in specs


def test_real_model_quickstart_is_offline_on_cpu_and_matches_the_readme():
    path = REPO_ROOT / "configs" / "quickstart-smollm2.yaml"
    specs = specs_of(path)
    raw = yaml.safe_load(path.read_text())
    assert (REPO_ROOT / raw["teacher"]["replay"]) == BUNDLED_REPLAY and "teacher_base_url" not in specs["generate"].values
    train = specs["train"].values
    assert train["use_gpu"] is False and train["base_model"].endswith("runs/smollm2")
    assert train["lr"] <= 2e-5 and train.get("prompt_format", "auto") == "auto"  # its own chat template
    # the README runs exactly the init-model command the config's header names
    readme = (REPO_ROOT / "README.md").read_text()
    init = next(line for line in path.read_text().splitlines() if "init-model --from-gguf" in line)
    assert init.lstrip("# ").strip() in readme and "--config configs/quickstart-smollm2.yaml" in readme


def test_alpaca_7b_is_alpacas_exact_recipe():
    specs = specs_of(REPO_ROOT / "configs" / "alpaca-7b.yaml")
    generate, train = specs["generate"].values, specs["train"].values
    assert generate["api"] == "completions" and generate["teacher_base_url"] == "https://api.openai.com/v1"
    assert generate["target"] >= 52000 and generate.get("num_prompt_instructions", 3) == 3
    assert "llama-7b" in train["base_model"].lower()
    assert (train["epochs"], train["lr"], train["global_batch_size"], train["max_length"]) == (3, 2e-5, 128, 512)
    assert train["num_workers"] == 8 and train["use_gpu"] is True
    assert train.get("warmup_ratio", 0.03) == 0.03 and train.get("weight_decay", 0.0) == 0.0
    if specs["train"].config_class is not None:
        config = specs["train"].config_class(**train)
        assert config.derived_micro_batch_size * config.grad_accumulation * config.num_workers == 128


def test_modern_8b_uses_open_models_only():
    from alpaca_ray.pipeline.config import TEACHER_URL, TeacherSection, load_pipeline_config

    path = REPO_ROOT / "configs" / "modern-8b.yaml"
    specs = specs_of(path)
    generate, train = specs["generate"].values, specs["train"].values
    # The teacher is deployed by the pipeline on the cluster: no hand-run server, no made-up host name.
    teacher = TeacherSection(**load_pipeline_config(str(path)).teacher)
    assert teacher.model.startswith("Qwen/") and teacher.engine == "vllm" and teacher.use_gpu
    assert "teacher_base_url" not in generate and generate["teacher_model"] == teacher.model
    assert train["base_model"] == "meta-llama/Llama-3.1-8B"
    assert specs["evaluate"].values["model_b_base_url"] == TEACHER_URL == specs["evaluate"].values["judge_base_url"]
    assert specs["evaluate"].values["model_b"] == teacher.model
    assert "openai.com" not in str(specs["evaluate"].values)


def test_alpaca_lora_7b_is_alpaca_loras_recipe():
    specs = specs_of(REPO_ROOT / "configs" / "alpaca-lora-7b.yaml")
    train = specs["train"].config_class(**specs["train"].values)
    # tloen/alpaca-lora finetune.py: r 8, alpha 16, dropout 0.05 on q/v, lr 3e-4, batch 128 of 4, cutoff 256
    assert (train.lora, train.qlora, train.lora_rank, train.lora_alpha, train.lora_dropout) == (True, False, 8, 16, 0.05)
    assert train.lora_target_modules == ["q_proj", "v_proj"]
    assert (train.lr, train.epochs, train.global_batch_size, train.micro_batch_size, train.max_length) == \
        (3e-4, 3, 128, 4, 256)
    assert train.num_workers == 1 and train.use_gpu and train.eval_max_examples == 2000
    assert specs["serve"].values["model"].endswith("train/final")  # the adapter directory
