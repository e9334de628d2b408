"""The preflight's plain parts: what a node finds, what the driver confirms, the error, what stages need."""

from __future__ import annotations

from pathlib import Path

import pytest

from alpaca_ray.cluster import preflight
from alpaca_ray.cluster.preflight import (
    PROBE_DIR,
    EnvNeed,
    NodeCheck,
    NodeReport,
    PreflightError,
    driver_confirm,
    driver_write_token,
    failure_message,
    looks_like_hub_name,
    probe_this_node,
    stage_needs,
)


def test_a_node_that_sees_the_drivers_file_passes_and_leaves_its_own(tmp_path):
    driver_write_token(str(tmp_path), "tok")
    report = probe_this_node(str(tmp_path), "tok", [])
    assert report.problems == [] and report.missing_env == []
    assert (tmp_path / PROBE_DIR / f"tok.{report.node_id}").read_text() == f"tok:{report.node_id}\n"
    driver_confirm(str(tmp_path), "tok", [report])
    assert report.problems == []


def test_a_node_local_directory_is_caught_from_the_nodes_side(tmp_path):
    # The same path on two "nodes": the driver wrote into one directory, the node looks into another.
    driver_write_token(str(tmp_path / "head-disk"), "tok")
    report = probe_this_node(str(tmp_path / "worker-disk"), "tok", [])
    assert len(report.problems) == 1
    assert "does not see" in report.problems[0] and "not shared" in report.problems[0]
    assert str(tmp_path / "worker-disk") in report.problems[0]
    assert not (tmp_path / "worker-disk" / PROBE_DIR).exists()  # nothing written where it does not belong


def test_a_probe_the_driver_cannot_see_is_caught_from_the_drivers_side(tmp_path):
    driver_write_token(str(tmp_path), "tok")
    report = NodeReport("abc123", "10.0.0.7", "worker-7")  # claims success but wrote nothing here
    driver_confirm(str(tmp_path), "tok", [report])
    assert report.problems and "driver does not see it" in report.problems[0]


def test_missing_variables_are_named_never_their_values(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESENT_KEY", "sk-secret-value")
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    driver_write_token(str(tmp_path), "tok")
    report = probe_this_node(str(tmp_path), "tok", ["PRESENT_KEY", "ABSENT_KEY"])
    assert report.missing_env == ["ABSENT_KEY"]
    message = failure_message(str(tmp_path), [report], [EnvNeed("ABSENT_KEY", "generate: the teacher's key")])
    assert "ABSENT_KEY is not set (generate: the teacher's key)" in message
    assert report.ip in message and "before `ray start`" in message
    assert "sk-secret-value" not in message


def test_the_failure_names_node_path_and_fix_and_passing_nodes_give_none(tmp_path):
    bad = NodeReport("f00d" * 8, "10.1.2.3", "gpu-node", problems=["does not see /mnt/x/.probe"])
    good = NodeReport("beef" * 8, "10.1.2.4", "cpu-node")
    message = failure_message("/mnt/x", [good, bad], [])
    assert "node 10.1.2.3 (gpu-node, id f00df00df00d)" in message
    assert "/mnt/x" in message and "shared filesystem" in message and "s3://" in message
    assert "10.1.2.4" not in message
    assert failure_message("/mnt/x", [good], []) is None


def test_workers_on_a_late_node_verify_the_same_token(tmp_path, monkeypatch):
    root = str(tmp_path / "shared")
    driver_write_token(root, "late")
    NodeCheck(root, "late", ()).verify()  # sees it: passes
    with pytest.raises(PreflightError, match="cannot run this stage's workers.*not shared"):
        NodeCheck(str(tmp_path / "elsewhere"), "late", ()).verify()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PreflightError, match="HF_TOKEN is not set"):
        NodeCheck(root, "late", ("HF_TOKEN",)).verify()
    preflight.finish(NodeCheck(root, "late"))
    assert not Path(root, PROBE_DIR).exists()


def test_hub_names_are_told_from_paths(tmp_path):
    assert looks_like_hub_name("meta-llama/Llama-3.1-8B")
    for path in ("/mnt/models/x", "./runs/tiny", "s3://bucket/final", "gpt2", str(tmp_path)):
        assert not looks_like_hub_name(path), path


def test_each_stage_needs_its_secrets_where_they_are_read(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert stage_needs("generate", {"api_key_env": "TEACHER_KEY"}) == [
        EnvNeed("TEACHER_KEY", "generate: the teacher's API key", "driver")]
    assert stage_needs("generate", {"api_key_env": "TEACHER_KEY"}, teacher_keys=["TEACHER_KEY"]) == []
    train = stage_needs("train", {"base_model": "meta-llama/Llama-3.1-8B"})
    assert [(n.name, n.where) for n in train] == [("HF_TOKEN", "workers")]
    assert stage_needs("train", {"base_model": "/mnt/cluster_storage/base"}) == []
    serve = stage_needs("serve", {"model": "/mnt/x/final", "content_filter": "openai",
                                  "moderation_api_key_env": "MOD_KEY"})
    assert [(n.name, n.where) for n in serve] == [("MOD_KEY", "workers")]
    assert stage_needs("serve", {"model": "/mnt/x/final", "content_filter": "terms"}) == []
    evaluate = stage_needs("evaluate", {"judge_model": "gpt-4", "judge_api_key_env": "JUDGE_KEY",
                                        "model_b_api_key_env": "B_KEY"})
    assert [(n.name, n.where) for n in evaluate] == [("JUDGE_KEY", "driver"), ("B_KEY", "driver")]
    monkeypatch.delenv("HF_TOKEN")
    assert stage_needs("train", {"base_model": "meta-llama/Llama-3.1-8B"}) == []  # a public model


def test_a_stage_outside_a_cluster_job_runs_no_preflight(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert preflight.preflight_stage("train", str(tmp_path), {}) is None
    assert list(tmp_path.iterdir()) == []  # nothing written
