"""The evaluate stage end to end on the session's Ray cluster, against real OpenAI-protocol stand-ins.

One judged run (module fixture) is shared: position debiasing and counts, the rerun that pays nothing,
resuming a half-written journal, and the blind rating page in headless Chromium feeding the report.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from alpaca_ray.evaluate.cli import main
from tests.support.evaluate_servers import (
    MARKER,
    UNDECIDED,
    expected_outcomes,
    logprob_judge,
    model_args,
    scripted_preference,
    start_servers,
    write_alpaca_eval_outputs,
    write_eval_set,
)

pytestmark = pytest.mark.ray
N_ITEMS, N_UNDECIDED = 10, 2
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class Run:
    def __init__(self, root: Path):
        self.rows = write_eval_set(root / "set.jsonl", N_ITEMS, undecided=N_UNDECIDED)
        self.a, self.b, self.judge = start_servers()
        self.output = root / "out"
        self.args = ["--eval-set", str(root / "set.jsonl"), "--output", str(self.output),
                     *model_args(self.a, self.b, self.judge), "--answer-api", "completions", "--num-workers", "2",
                     "--bootstrap-samples", "500", "--max-unparseable", "0.25"]  # 2 of 10 are unparseable

    def counts(self) -> tuple[int, int, int]:
        return tuple(len(s.completion_requests()) for s in (self.a, self.b, self.judge))

    def report(self) -> dict:
        return json.loads((self.output / "report.json").read_text())


@pytest.fixture(scope="module")
def judged(ray_local, tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("evaluate"))
    assert main(run.args) == 0
    yield run
    for server in (run.a, run.b, run.judge):
        server.stop()


def test_position_bias_is_removed_and_counts_are_right(judged):
    assert judged.counts() == (N_ITEMS, N_ITEMS, 2 * N_ITEMS)  # every pair judged in both orders
    report = judged.report()
    expected = expected_outcomes(judged.rows)
    assert {row["id"]: row["outcome"] for row in report["items"]} == expected
    wins = sum(o == "A" for o in expected.values())
    assert 0 < wins < N_ITEMS - N_UNDECIDED  # the stand-ins give both kinds of item
    judge = report["llm_judge"]
    # the judge always prefers the first answer unless one carries MARKER: without debiasing B would win half
    assert (judge["wins"], judge["losses"], judge["ties"]) == (wins, 0, N_ITEMS - wins)
    assert judge["unparseable"] == N_UNDECIDED and judge["inconsistent"] == N_ITEMS - wins - N_UNDECIDED
    assert judge["win_rate"] == pytest.approx((wins + 0.5 * (N_ITEMS - wins)) / N_ITEMS)
    assert judge["ci_low"] <= judge["win_rate"] <= judge["ci_high"] and judge["ci_low"] >= 0.5
    assert judge["mean_words_b"] > 3 * judge["mean_words_a"]  # B writes longer answers...
    assert judge["longer_answer_wins"]["longer_won"] == 0  # ...and never won by it
    assert sum(s["n"] for s in judge["by_category"].values()) == N_ITEMS
    undecided = [row for row in report["items"] if UNDECIDED in row["instruction"]]
    assert all(row["unparseable"] and "cannot pick" in row["judge_raw_a_first"] for row in undecided)
    for name in ("report.md", "report.png"):
        assert (judged.output / name).stat().st_size > 1000

    # The judge saw A's answer first in one request and second in the other, for every item.
    first_shown = {}
    for request in judged.judge.completion_requests():
        prompt = request.body["messages"][0]["content"]
        first = prompt.split("### Response 1:\n")[1].split("\n\n### Response 2:")[0]
        instruction = prompt.split("### Instruction:\n")[1].split("\n\n###")[0]
        first_shown.setdefault(instruction, set()).add("B" if "more detail" in first else "A")
    assert all(shown == {"A", "B"} for shown in first_shown.values()) and len(first_shown) == N_ITEMS
    # Both models were asked at the same time (one Ray Data run), with Alpaca's template.
    a_times = [r.time for r in judged.a.completion_requests()]
    b_times = [r.time for r in judged.b.completion_requests()]
    assert min(b_times) < max(a_times) and min(a_times) < max(b_times)
    assert all(r.body["prompt"].startswith("Below is an instruction") for r in judged.a.completion_requests())
    assert any(MARKER in row["answer_a"] for row in report["items"])


def test_rerun_pays_nothing_twice(judged):
    before = judged.counts()
    assert main(judged.args) == 0
    assert judged.counts() == before
    assert judged.report()["llm_judge"]["wins"] == sum(o == "A" for o in expected_outcomes(judged.rows).values())


def test_resume_asks_only_for_what_a_killed_run_lost(judged, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(judged.output, copy)
    journal = max((copy / "judgments").glob("judge-*.jsonl"), key=lambda p: p.stat().st_size)
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-3]) + lines[-3][:25])  # three answers lost, one line torn mid-write
    before = judged.counts()
    # 60 requests a minute, shared by both workers: the three requests go out about a second apart
    args = [*judged.args[:3], str(copy), *judged.args[4:], "--requests-per-minute", "60"]
    assert main(args) == 0
    assert judged.counts() == (before[0], before[1], before[2] + 3)
    # Paced by the limiter the workers share: its grants (not arrival at the server, which jitters with the
    # machine's load) are a second apart, 60 a minute
    granted = json.loads((copy / "rate_limits.json").read_text())["judge"]
    assert granted["granted_requests"] == 3
    assert granted["min_gap_s"] >= 1.0 and granted["max_requests_in_60s"] <= 60
    assert json.loads((copy / "report.json").read_text())["llm_judge"]["wins"] == judged.report()["llm_judge"]["wins"]


def start_rating_cli(args: list[str], env: dict, timeout: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    """``alpaca-ray evaluate --human ...`` in the foreground, as a person runs it.

    Returns the process, the page URL it printed, and the list its output lines keep arriving in.
    """
    process = subprocess.Popen([sys.executable, "-m", "alpaca_ray.cli", "evaluate", *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [(seen.append(line), lines.put(line)) for line in process.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if line.startswith("rating page: "):
            return process, line.split()[2], seen
    process.kill()
    raise AssertionError("the rating page did not come up:\n" + "".join(seen)[-3000:])


@pytest.mark.browser
def test_rating_page_in_chromium_feeds_the_report(judged, serve_port, ray_env):
    from playwright.sync_api import sync_playwright

    before = judged.counts()
    process, url, output = start_rating_cli([*judged.args, "--human", "--app-name", "evaluate-test", "--route-prefix",
                                     "/evaluate-test"], env=ray_env)
    try:
        assert url == f"http://127.0.0.1:{serve_port}/evaluate-test/"  # Serve was running: its proxy is used
        answers = {row["id"]: row for row in judged.report()["items"]}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.fill("#rater", "alice")
            page.click("#start")
            page.wait_for_selector("#task:not([hidden])", timeout=30_000)
            instruction = page.text_content("#instruction")
            shown = [page.text_content("#response-1"), page.text_content("#response-2")]
            (item,) = [row for row in answers.values() if row["instruction"] == instruction]
            assert sorted(shown) == sorted([item["answer_a"], item["answer_b"]])
            content = page.content()
            assert "model-a" not in content and "model-b" not in content  # blind
            a_position = shown.index(item["answer_a"]) + 1
            page.click(f"#choose-{a_position}")
            page.wait_for_function("document.getElementById('progress').textContent.includes('pair 2 of')",
                                   timeout=30_000)
            assert page.text_content("#instruction") != instruction  # the next pair is shown
            browser.close()
        # a second rater, through the same API the page uses
        response = httpx.post(url + "api/rate", json={"rater": "bob", "item_id": item["id"], "choice": "tie"},
                              timeout=30)
        assert response.status_code == 200
        assert httpx.post(url + "api/rate", json={"rater": "bob", "item_id": "nope", "choice": "1"},
                          timeout=30).status_code == 404
        progress = httpx.get(url + "api/progress", timeout=30).json()
        assert (progress["ratings"], progress["raters"]) == (2, 2)
        process.send_signal(signal.SIGINT)  # Ctrl-C: take the page down, write the report
        assert process.wait(timeout=120) == 0, "".join(output)[-3000:]
    finally:
        if process.poll() is None:
            process.kill()

    assert judged.counts() == before  # the page and the report reused every saved answer and verdict
    assert httpx.get(url, timeout=30).status_code == 404  # the app is gone
    report = judged.report()
    row = next(r for r in report["items"] if r["id"] == item["id"])
    assert {"rater": "alice", "choice": "A"} in row["human"] and {"rater": "bob", "choice": "tie"} in row["human"]
    human = report["human"]
    assert human["ratings"] == 2 and human["raters"] == ["alice", "bob"] and human["items_rated"] == 1
    assert human["inter_rater"]["pairs"] == 1 and human["inter_rater"]["agreement"] == 0.0
    assert human["agreement_with_judge"]["items"] == 1  # majority of A vs tie is a tie
    assert human["agreement_with_judge"]["agreement"] == float(row["outcome"] == "tie")
    assert "## Human raters" in (judged.output / "report.md").read_text()
    assert report["llm_judge"]["n"] == N_ITEMS  # the judge's verdicts are still in the report


def test_252_user_oriented_set_with_recorded_answers(judged, shared_data, tmp_path):
    """Alpaca's own evaluation set, model B from recorded answers (its reference outputs), A from a file."""
    source = shared_data / "self_instruct_user_oriented_252.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:6]]
    # A's recorded answers carry no id (AlpacaEval style): they are matched on instruction and input
    answers_a = [{"instruction": r["instruction"], "input": r["instances"][0]["input"], "generator": "ours",
                  "output": f"My answer. {MARKER}" if i % 2 == 0 else "My answer."} for i, r in enumerate(rows)]
    (tmp_path / "a.json").write_text(json.dumps(answers_a))
    before = judged.counts()
    assert main(["--eval-set", str(source), "--limit", "6", "--output", str(tmp_path / "out"),
                 "--model-a-answers", str(tmp_path / "a.json"), "--model-b-answers", str(source),
                 "--model-b-label", "reference", "--judge-model", "judge", "--judge-base-url", judged.judge.base_url,
                 "--bootstrap-samples", "200"]) == 0
    assert judged.counts()[:2] == before[:2] and judged.counts()[2] == before[2] + 12  # only the judge was asked
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_b"] == "reference" and report["n_items"] == 6
    assert [row["outcome"] for row in report["items"]] == ["A", "tie"] * 3
    assert report["items"][0]["category"] == "Grammarly"
    assert report["items"][0]["answer_b"] == rows[0]["instances"][0]["output"]


def test_logprob_judge_gives_its_scripted_preferences(ray_local, tmp_path, capsys):
    """AlpacaEval 2's protocol against a stand-in answering like the real API (choices[0].logprobs.content[0].
    top_logprobs, a position bias included): the report's numbers are the scripted preferences', its
    annotations.json reads back to the same numbers, and labels come from the files' generator."""
    from alpaca_ray.evaluate import alpaca_eval
    from alpaca_ray.openai_server import OpenAIServer

    n, no_verdict = 8, 1
    answers_a, answers_b, instructions = write_alpaca_eval_outputs(tmp_path, n, no_verdict)
    with OpenAIServer(logprob_judge, models=["judge"]) as judge_server:
        args = ["--eval-set", str(answers_a), "--model-a-answers", str(answers_a), "--model-b-answers",
                str(answers_b), "--judge-model", "judge", "--judge-base-url", judge_server.base_url,
                "--judge-mode", "logprobs", "--output", str(tmp_path / "out"), "--bootstrap-samples", "200",
                "--lc-bootstrap-samples", "10", "--num-workers", "1"]
        assert main(args) == 2  # 1 of 8 unparseable is past the default --max-unparseable 0.1
        assert "1 of 8 pairs (12%) got a judge answer that names no winner" in capsys.readouterr().err
        assert main([*args, "--max-unparseable", "0.2"]) == 0  # the verdicts are saved: nothing is asked again
        requests = judge_server.completion_requests()
    assert len(requests) == 2 * n + 1  # both orders of every pair, and one one-token probe (the rerun asked nothing)
    assert all(r.body["max_tokens"] == 1 and r.body["top_logprobs"] == 5 for r in requests)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = [0.5] * no_verdict + [scripted_preference(text) for text in instructions[no_verdict:]]
    assert [row["score"] for row in report["items"]] == pytest.approx(expected, abs=1e-9)
    judge = report["llm_judge"]
    assert judge["win_rate"] == pytest.approx(np.mean(expected))
    assert judge["standard_error"] == pytest.approx(np.std(expected, ddof=1) / np.sqrt(n))
    assert judge["unparseable"] == no_verdict and report["judge_mode"] == "logprobs"
    assert (report["model_a"], report["model_b"]) == ("model-a-gen", "model-b-gen")
    published = alpaca_eval.head2head([1 + s for s in expected])
    assert judge["alpaca_eval"]["win_rate"] == pytest.approx(published["win_rate"])
    assert judge["alpaca_eval"]["discrete_win_rate"] == pytest.approx(published["discrete_win_rate"])

    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert annotations[1]["generator_2"] == "model-a-gen" and annotations[1]["output_2"].startswith("Answer A")
    outputs = json.loads((tmp_path / "out" / "model_outputs.json").read_text())
    assert outputs[0]["generator"] == "model-a-gen" and len(outputs) == n
    # AlpacaEval's file back in: the same numbers, no judge asked
    assert main(["--annotations", str(tmp_path / "out" / "annotations.json"), "--output", str(tmp_path / "again"),
                 "--lc-bootstrap-samples", "0", "--bootstrap-samples", "100"]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["llm_judge"]
    assert again["alpaca_eval"]["win_rate"] == pytest.approx(judge["alpaca_eval"]["win_rate"])
    assert again["alpaca_eval"]["standard_error"] == pytest.approx(judge["alpaca_eval"]["standard_error"])
