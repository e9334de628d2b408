"""The Ray fan-out of the dedup stage decides exactly as the in-process path, and the CLI / job run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from alpaca_ray.dedup import dedup_instructions
from alpaca_ray.dedup.exact import TokenCorpus
from alpaca_ray.dedup.pipeline import dedup_on_ray, kept_similarity_reports
from tests.conftest import run_cli
from tests.support.dedup_data import make_instructions, mixed_workload

pytestmark = pytest.mark.ray

SEEDS = make_instructions(40, seed=11, duplicate_rate=0)


def test_ray_shards_give_the_in_process_result(ray_local):
    texts = mixed_workload(4000, seed=12)
    expected = dedup_instructions(texts, against=SEEDS)
    assert 0 < expected.count(False) < len(texts)
    # Small blocks and an odd worker count exercise the rounds and the round-robin of kept instructions.
    assert dedup_on_ray(texts, SEEDS, num_workers=3, block_size=700) == expected
    assert dedup_on_ray(texts[:500], (), num_workers=1, block_size=10_000) == dedup_instructions(texts[:500])


def test_ray_similarity_reports_equal_in_process(ray_local):
    texts = mixed_workload(400, seed=13, long_count=2)
    corpus = TokenCorpus()
    kept = dedup_on_ray(texts, SEEDS, num_workers=2, corpus=corpus)
    pool_ids = np.concatenate([np.arange(len(SEEDS)), len(SEEDS) + np.flatnonzero(kept)]).astype(np.int64)
    pool_texts = SEEDS + [t for t, k in zip(texts, kept) if k]
    on_ray = kept_similarity_reports(corpus, pool_ids, len(SEEDS), pool_texts, num_workers=2)
    in_process = kept_similarity_reports(corpus, pool_ids, len(SEEDS), pool_texts, num_workers=0)
    assert len(on_ray) == sum(kept) and on_ray == in_process


def _write_file(tmp_path, count):
    rows = [{"instruction": t, "input": "", "output": "o"} for t in make_instructions(count, seed=14)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows, path


def test_cli_on_the_cluster_end_to_end(ray_env, tmp_path):
    rows, path = _write_file(tmp_path, 1500)
    result = run_cli(["dedup", "--input", str(path), "--output", str(tmp_path / "kept.json"), "--num-workers", "2",
                      "--block-size", "500"], env=ray_env, check=True)
    kept = json.loads((tmp_path / "kept.json").read_text())
    expected = dedup_instructions([r["instruction"] for r in rows])
    assert [r["instruction"] for r in kept] == [r["instruction"] for r, k in zip(rows, expected) if k]
    assert f"kept {len(kept)} of {len(rows)}" in result.stdout
    assert "dedup: 100%" in result.stderr  # the progress bar


def test_job_entry_point_runs_from_the_repo_root(repo_root, tmp_path):
    rows, path = _write_file(tmp_path, 200)
    result = subprocess.run([sys.executable, "jobs/dedup.py", "--input", str(path), "--output",
                             str(tmp_path / "kept.jsonl"), "--no-progress"], cwd=repo_root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept" in result.stdout and (tmp_path / "kept.jsonl").read_text().count("\n") > 100
    bad = subprocess.run([sys.executable, "jobs/dedup.py", "--input", str(tmp_path / "missing.json"), "--output",
                          str(tmp_path / "x.json")], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.json: no such file" in bad.stderr


@pytest.mark.job
def test_ray_job_submit_spreads_dedup_over_the_cluster(ray_head, tmp_path):
    rows, path = _write_file(tmp_path, 600)
    result = ray_head.submit(["python", "jobs/dedup.py", "--input", str(path), "--output", str(tmp_path / "kept.json"),
                              "--num-workers", "2", "--block-size", "200", "--no-progress"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    kept = json.loads((tmp_path / "kept.json").read_text())
    expected = dedup_instructions([r["instruction"] for r in rows])
    assert [r["instruction"] for r in kept] == [r["instruction"] for r, k in zip(rows, expected) if k]
    assert f"kept {len(kept)} of 600" in result.stdout
