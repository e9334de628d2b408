"""The pipeline's plain parts, without Ray: config wiring, validation, entrypoints, state and resume."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from alpaca_ray.config import ConfigError, UserError
from alpaca_ray.pipeline.config import (
    PipelineConfig,
    StageSpec,
    load_config_class,
    load_pipeline_config,
    resolve_paths,
    stage_specs,
    wire_sections,
)
from alpaca_ray.pipeline.runner import (
    OFFLINE_TEACHER_KEY,
    error_summary,
    find_repo_root,
    job_runtime_env,
    plan_stages,
    read_state,
    record_finished,
    resumes_attempt,
    served_model_id,
    stage_argv,
    stage_entrypoint,
    submit_time_values,
    write_state,
)
from tests.conftest import REPO_ROOT, run_cli
from tests.support.pipeline_replay import write_replay


def minimal(tmp_path: Path, **extra) -> dict:
    replay = write_replay(tmp_path / "replay.jsonl", ["1. Instruction: x"])
    base = tmp_path / "base-model"
    base.mkdir(exist_ok=True)
    return {"output": str(tmp_path / "run"), "teacher": {"replay": str(replay)},
            "generate": {"teacher_model": "recorded", "target": 40},
            "train": {"base_model": str(base), "epochs": 1, "num_workers": 2, "global_batch_size": 8},
            "serve": {"port": 8123}, **extra}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_sections_are_wired_through_the_output_root(tmp_path):
    config = PipelineConfig(**minimal(tmp_path))
    wired = wire_sections(config)
    root = str(tmp_path / "run")
    assert wired["generate"]["output"] == f"{root}/generate"
    assert wired["train"]["data"] == f"{root}/generate/data.json"
    assert wired["train"]["output"] == f"{root}/train"
    assert wired["serve"]["model"] == f"{root}/train/final"
    assert wired["serve"]["served_model_name"] == "run"  # the run's name
    assert wired["serve"]["blocking"] is False  # the job deploys and exits; the app stays on the cluster
    assert wired["serve"]["reports_db"] == f"{root}/serve/reports.db"
    assert "evaluate" not in wired
    assert config.stage_names == ["generate", "train", "serve"]


def test_explicit_values_win_over_wiring_and_evaluate_defaults_to_the_served_model(tmp_path):
    values = minimal(tmp_path, evaluate={"judge_model": "judge", "judge_base_url": "http://j/v1",
                                         "model_b_answers": "answers.json"})
    values["train"]["data"] = "tatsu-lab/alpaca"
    config = PipelineConfig(**values)
    wired = wire_sections(config)
    assert wired["train"]["data"] == "tatsu-lab/alpaca"
    assert wired["evaluate"]["model_a_base_url"] == "http://127.0.0.1:8123/v1"
    assert wired["evaluate"]["output"] == str(tmp_path / "run" / "evaluate")
    assert config.stage_names == ["generate", "train", "serve", "evaluate"]


def test_remote_roots_stay_uris(tmp_path):
    values = minimal(tmp_path)
    values["output"] = "s3://bucket/alpaca"
    wired = wire_sections(resolve_paths(PipelineConfig(**values)))
    assert wired["train"]["data"] == "s3://bucket/alpaca/generate/data.json"
    assert wired["serve"]["model"] == "s3://bucket/alpaca/train/final"
    assert "reports_db" not in wired["serve"]  # SQLite needs a local file: the stage's own default applies


def test_relative_paths_become_absolute_but_hub_names_do_not(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = PipelineConfig(output="runs/x", teacher={"replay": "replay.jsonl"},
                            train={"base_model": "models/tiny", "data": "tatsu-lab/alpaca"},
                            serve={"model": "meta-llama/Llama-3.1-8B"})
    resolved = resolve_paths(config, base_dir=str(tmp_path))
    assert resolved.output == str(tmp_path / "runs" / "x")
    assert resolved.train["base_model"] == str(tmp_path / "models" / "tiny")
    assert resolved.train["data"] == "tatsu-lab/alpaca"
    assert resolved.serve["model"] == "meta-llama/Llama-3.1-8B"
    assert resolved.teacher["replay"] == str(tmp_path / "replay.jsonl")


def test_top_level_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        PipelineConfig(stages=["generate", "deploy", "evaluate"], train=[1])
    message = str(info.value)
    assert "output: a root directory" in message
    assert "unknown stage(s) ['deploy']" in message
    assert "'evaluate' is listed but the config has no evaluate section" in message
    assert "train: expected a mapping" in message


def test_stage_sections_are_validated_by_their_config_classes(tmp_path):
    values = minimal(tmp_path)
    values["train"].update(epochs=0, learning_rate=1e-4)  # a bad value and a misspelt field
    values["serve"]["port"] = 0
    values["teacher"]["replay"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as info:
        stage_specs(PipelineConfig(**values))
    message = str(info.value)
    assert "teacher.replay: no such file" in message
    assert "unknown field(s) for TrainConfig: learning_rate" in message
    assert "port must be" in message


def test_teacher_section_and_an_explicit_teacher_url_conflict(tmp_path):
    values = minimal(tmp_path)
    values["generate"]["teacher_base_url"] = "https://api.openai.com/v1"
    with pytest.raises(ConfigError, match="teacher_base_url is set but so is the teacher section"):
        stage_specs(PipelineConfig(**values))


def test_entrypoint_runs_the_stage_script_and_round_trips_through_the_shell(tmp_path):
    specs = stage_specs(PipelineConfig(**minimal(tmp_path)))
    train = next(s for s in specs if s.name == "train")
    entrypoint = stage_entrypoint("train", stage_argv(train))
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/train.py"]
    assert (REPO_ROOT / "jobs" / "train.py").exists() or load_config_class("train") is None
    assert words[words.index("--data") + 1] == str(tmp_path / "run" / "generate" / "data.json")
    assert words[words.index("--epochs") + 1] == "1"
    serve = next(s for s in specs if s.name == "serve")
    assert "--no-blocking" in stage_argv(serve)
    spaced = StageSpec("generate", {"output": "/tmp/a b", "teacher_model": "it's"}, load_config_class("generate"), "f")
    assert shlex.split(stage_entrypoint("generate", stage_argv(spaced)))[2:] == [
        "--output", "/tmp/a b", "--teacher-model", "it's"]


def test_runtime_env_uploads_the_repo_without_the_run_output():
    env = job_runtime_env(REPO_ROOT, str(REPO_ROOT / "runs" / "quickstart"), {"OPENAI_API_KEY": OFFLINE_TEACHER_KEY})
    assert env["working_dir"] == str(REPO_ROOT)
    assert ".git" in env["excludes"] and "runs/quickstart/" in env["excludes"]
    assert env["env_vars"] == {"OPENAI_API_KEY": OFFLINE_TEACHER_KEY}
    assert "env_vars" not in job_runtime_env(REPO_ROOT, "/elsewhere")
    assert find_repo_root() == REPO_ROOT


def specs_of(*names: str) -> list[StageSpec]:
    return [StageSpec(name, {}, load_config_class(name), f"fp-{name}") for name in names]


def test_resume_starts_at_the_first_unfinished_stage(tmp_path):
    specs = specs_of("generate", "train", "serve")
    state = {"version": 1, "stages": {}}
    assert plan_stages(specs, state)[:2] == ([], specs)
    record_finished(state, specs[0], "job-g", 3.0)
    skipped, to_run, why = plan_stages(specs, state)
    assert skipped == ["generate"] and [s.name for s in to_run] == ["train", "serve"]
    assert why == {"stage": "train", "reason": "not finished yet"}
    # a later stage recorded as finished still runs again when an earlier one did not finish
    record_finished(state, specs[2], "job-s", 1.0)
    assert [s.name for s in plan_stages(specs, state)[1]] == ["train", "serve"]
    record_finished(state, specs[1], "job-t", 2.0)
    assert plan_stages(specs, state)[:2] == (["generate", "train", "serve"], [])


def test_a_changed_section_a_forced_stage_or_a_dead_app_reruns_from_there():
    specs = specs_of("generate", "train", "serve")
    state = {"version": 1, "stages": {}}
    for spec, job in zip(specs, ("g", "t", "s")):
        record_finished(state, spec, job, 1.0)
    changed = specs_of("generate", "train", "serve")
    changed[1].fingerprint = "fp-train-with-more-epochs"
    assert plan_stages(changed, state)[2] == {"stage": "train", "reason": "its section changed since it finished"}
    assert [s.name for s in plan_stages(specs, state, from_stage="serve")[1]] == ["serve"]
    skipped, to_run, why = plan_stages(specs, state, is_alive=lambda stage, record: stage != "serve")
    assert skipped == ["generate", "train"] and why["reason"] == "what it started is no longer running"


def test_state_file_round_trips_and_a_corrupt_one_is_a_clear_error(tmp_path):
    path = str(tmp_path / "root" / "pipeline_state.json")
    assert read_state(path) == {"version": 1, "stages": {}}
    state = record_finished(read_state(path), specs_of("generate")[0], "job-1", 12.34)
    write_state(path, state)
    again = read_state(path)
    assert again["stages"]["generate"]["job_id"] == "job-1"
    assert again["stages"]["generate"]["wall_s"] == 12.3
    assert list((tmp_path / "root").iterdir()) == [Path(path)]  # no temporary file left behind
    Path(path).write_text('{"stages": ')
    with pytest.raises(Exception, match="pipeline_state.json: not valid JSON"):
        read_state(path)


def test_error_summary_picks_the_stages_error_line():
    logs = "loading...\nerror: data.json, line 3: field 'instruction': missing\n"
    assert error_summary(logs) == "data.json, line 3: field 'instruction': missing"
    traceback = "Traceback (most recent call last):\n  File x\nValueError: bad shape\n"
    assert error_summary(traceback) == "ValueError: bad shape"
    assert error_summary("", "Job entrypoint command failed with exit code 3\nmore") == (
        "Job entrypoint command failed with exit code 3")


def test_served_model_id_follows_the_serve_stage(tmp_path):
    final = tmp_path / "myrun" / "final"
    final.mkdir(parents=True)
    assert served_model_id({"model": str(final)}, load_config_class("serve")) == "myrun"
    assert served_model_id({"model": str(final), "served_model_name": "alpaca"}, None) == "alpaca"


def test_dry_run_prints_each_jobs_entrypoint_and_submits_nothing(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", minimal(tmp_path))
    result = run_cli(["pipeline", "--config", str(path), "--dry-run"], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("generate: python jobs/generate.py") for line in lines)
    assert any(line.strip().startswith("serve: python jobs/serve.py") and "--no-blocking" in line for line in lines)
    assert not (tmp_path / "run" / "pipeline_state.json").exists()
    state_path = tmp_path / "run" / "pipeline_state.json"
    state_path.parent.mkdir(parents=True)
    specs = stage_specs(load_pipeline_config(str(path)))
    write_state(str(state_path), record_finished({"version": 1, "stages": {}}, specs[0], "job-g", 1.0))
    rerun = run_cli(["pipeline", "--config", str(path), "--dry-run"], timeout=120)
    assert "generate: finished, would be skipped" in rerun.stdout


def test_cli_reports_config_problems_without_a_traceback(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {**minimal(tmp_path), "serve": {"port": "eighty"}, "extra": 1})
    result = run_cli(["pipeline", "--config", str(path), "--dry-run"], timeout=120)
    assert result.returncode == 2
    assert "unknown field(s) for PipelineConfig: extra" in result.stderr
    assert "Traceback" not in result.stderr
    json.dumps(result.stderr)


def test_an_unfinished_attempt_of_the_same_section_is_resumed():
    train = StageSpec("train", {"epochs": 1}, load_config_class("train"), "fp-1")
    state = {"version": 1, "stages": {"train": {"status": "failed", "fingerprint": "fp-1"}}}
    assert resumes_attempt(train, state)
    assert "--resume" in stage_argv(train, {"resume": True})
    assert not resumes_attempt(StageSpec("train", {"epochs": 2}, load_config_class("train"), "fp-2"), state)  # section changed
    assert not resumes_attempt(StageSpec("train", {"resume": False}, load_config_class("train"), "fp-1"), state)  # the user decides
    assert not resumes_attempt(StageSpec("serve", {}, load_config_class("serve"), "fp-1"), {"stages": {"serve": {"status": "failed",
                                                                                          "fingerprint": "fp-1"}}})
    state["stages"]["train"]["status"] = "succeeded"
    assert not resumes_attempt(train, state)


def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    from tests.support.ray_head import free_port

    path = write_yaml(tmp_path / "p.yaml", minimal(tmp_path))
    address = f"http://127.0.0.1:{free_port()}"
    result = run_cli(["pipeline", "--config", str(path), "--address", address], timeout=120)
    assert result.returncode == 2
    assert f"error: cannot reach the Ray job API at {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "pipeline_state.json").exists()


def test_evaluate_is_pointed_at_the_model_this_run_served(tmp_path):
    values = minimal(tmp_path, evaluate={"judge_model": "judge", "judge_base_url": "http://j/v1",
                                         "model_b_answers": str(tmp_path / "answers.json")})
    specs = stage_specs(PipelineConfig(**values))
    evaluate = specs[-1]
    state = {"version": 1, "stages": {"serve": {"status": "succeeded", "url": "http://10.0.0.5:8123"}}}
    extra = submit_time_values(evaluate, specs, state, "http://10.0.0.5:8123")
    assert extra == {"model_a": "run", "model_a_base_url": "http://10.0.0.5:8123/v1"}
    argv = stage_argv(evaluate, extra)
    assert argv[argv.index("--model-a") + 1] == "run"
    # a model A the user named is left alone
    values["evaluate"].update(model_a="gpt-4o", model_a_base_url="https://api.openai.com/v1")
    specs = stage_specs(PipelineConfig(**values))
    assert submit_time_values(specs[-1], specs, state, "http://10.0.0.5:8123") == {}


# --- driving a cluster from a machine that does not see the root --------------------------------------


def test_only_what_travels_with_the_job_may_be_relative_for_a_remote_cluster(tmp_path, monkeypatch):
    from alpaca_ray.pipeline.config import PipelineConfig
    from alpaca_ray.pipeline.runner import portable_config, travels_with_job

    assert travels_with_job("alpaca_ray/data/teacher_replay.jsonl")
    assert not travels_with_job("runs/tiny-base") and not travels_with_job("../elsewhere")
    assert not travels_with_job("models/model.safetensors")
    elsewhere = tmp_path / "mine.jsonl"
    elsewhere.write_text("{}\n")
    monkeypatch.chdir(REPO_ROOT)
    config = PipelineConfig(output="/mnt/cluster_storage/run", teacher={"replay": "alpaca_ray/data/teacher_replay.jsonl"},
                            train={"base_model": "meta-llama/Llama-3.1-8B", "data": "/mnt/cluster_storage/d.json"},
                            serve={})
    portable = portable_config(config, REPO_ROOT)
    assert portable.teacher["replay"] == "alpaca_ray/data/teacher_replay.jsonl"  # travels: stays relative
    assert portable.train["base_model"] == "meta-llama/Llama-3.1-8B"  # a hub name is the cluster's to fetch
    (REPO_ROOT / "runs").mkdir(exist_ok=True)
    bad = PipelineConfig(output="runs/x", teacher={"replay": str(elsewhere)},
                         generate={"seed_tasks": "runs"}, train={}, serve={})
    with pytest.raises(UserError) as err:
        portable_config(bad, REPO_ROOT)
    message = str(err.value)
    assert "output: runs/x is relative" in message and "/mnt/cluster_storage" in message
    assert "generate.seed_tasks: runs exists only on this machine" in message


def test_apps_that_workers_call_must_not_bind_only_loopback():
    from alpaca_ray.pipeline.config import PipelineConfig, stage_specs
    from alpaca_ray.pipeline.runner import unreachable_apps

    def specs_for(host: str):
        config = PipelineConfig(output="/mnt/cluster_storage/run", generate={"teacher_model": "t", "target": 5,
                                                                              "teacher_base_url": "http://t:1/v1"},
                                train={"base_model": "/m"},
                                serve={"host": host, "allow_unauthenticated": host == "0.0.0.0"},
                                evaluate={"judge_model": "j", "model_b": "b", "model_b_base_url": "http://b:1/v1"})
        return config, [s for s in stage_specs(config)]

    config, specs = specs_for("127.0.0.1")
    problems = unreachable_apps(specs, config, specs)
    assert len(problems) == 1 and "serve.host: 127.0.0.1" in problems[0] and "0.0.0.0" in problems[0]
    config, specs = specs_for("0.0.0.0")
    assert unreachable_apps(specs, config, specs) == []


def test_the_teacher_section_is_a_replay_or_a_model_and_urls_can_name_it(tmp_path):
    from alpaca_ray.pipeline.config import TEACHER_APP, PipelineConfig, TeacherSection, stage_specs

    with pytest.raises(ConfigError, match="exactly one of replay"):
        TeacherSection(replay="a.jsonl", model="m")
    section = TeacherSection(model="/models/teacher", engine="transformers", num_replicas=2)
    values = section.serve_values({"host": "0.0.0.0", "port": 8123}, "teacher-name")
    assert values["app_name"] == TEACHER_APP and values["route_prefix"] == "/teacher"
    assert values["num_replicas"] == 2 and values["port"] == 8123 and values["blocking"] is False
    config = PipelineConfig(output=str(tmp_path), teacher={"model": "/models/teacher"},
                            generate={"teacher_model": "t", "target": 5}, train={"base_model": "/m"}, serve={},
                            evaluate={"judge_model": "t", "judge_base_url": "teacher", "model_b": "t",
                                      "model_b_base_url": "teacher"})
    specs = {s.name: s for s in stage_specs(config)}
    assert specs["evaluate"].values["judge_base_url"] == "teacher"  # filled in when deployed
    no_teacher = PipelineConfig(output=str(tmp_path), generate={"teacher_model": "t", "target": 5,
                                                                 "teacher_base_url": "http://t:1/v1"},
                                train={"base_model": "/m"}, serve={}, evaluate={"judge_model": "t", "model_b": "t",
                                                                                "model_b_answers": "/b.json",
                                                                                "judge_base_url": "teacher"})
    with pytest.raises(ConfigError, match="'teacher' names the run's teacher, but there is no teacher section"):
        stage_specs(no_teacher)


def test_from_stage_train_after_a_finished_run_moves_the_old_run_aside(tmp_path):
    """The README: "`--from-stage train` redoes training" after a finished quick start."""
    from alpaca_ray.pipeline.config import PipelineConfig, stage_specs
    from alpaca_ray.pipeline.runner import plan_stages, set_aside_earlier_run, submit_time_values

    config = PipelineConfig(output=str(tmp_path / "run"), generate={"teacher_model": "t", "target": 5,
                                                                      "teacher_base_url": "http://t:1/v1"},
                            train={"base_model": "/m"}, serve={})
    specs = stage_specs(config)
    train = next(s for s in specs if s.name == "train")
    snapshot = tmp_path / "run" / "train" / "ray_results" / "train" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("{}")
    state = {"stages": {s.name: {"status": "succeeded", "fingerprint": s.fingerprint, "job_id": "j"}
                        for s in specs}}
    _, to_run, why = plan_stages(specs, state, "train")
    assert [s.name for s in to_run] == ["train", "serve"] and why["reason"] == "asked to start here"
    extra = submit_time_values(train, specs, state, "http://x")
    assert "resume" not in extra  # a finished run is redone, not resumed
    said = []
    aside = set_aside_earlier_run(train, resuming=False, say=said.append)
    assert aside and (tmp_path / "run").joinpath(aside.rsplit("/", 1)[1], "ray_results", "train",
                                                 "checkpoint_manager_snapshot.json").exists()
    assert not (tmp_path / "run" / "train").exists() and "moved aside" in said[0] and aside in said[0]
    assert set_aside_earlier_run(train, resuming=False, say=said.append) is None  # nothing left to move
    (tmp_path / "run" / "train").mkdir()
    (tmp_path / "run" / "train" / "x").write_text("partial")
    assert set_aside_earlier_run(train, resuming=True, say=said.append) is None  # a resumed attempt keeps it
