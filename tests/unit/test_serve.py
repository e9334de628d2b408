"""Serve stage, pure parts: config, OpenAI wire format, reports store, content filter, metrics, CLIs.

Also the cluster services serve relies on: the stop-signal wait (a real child process, real signals) and
reading an app's URL from Serve's details.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

import pytest

from alpaca_ray.chat import alpaca_prompt
from alpaca_ray.cluster.services import app_url_from_details
from alpaca_ray.config import ConfigError, UserError
from alpaca_ray.prompts import format_prompt
from alpaca_ray.serve.config import ServeConfig
from alpaca_ray.serve.content_filter import OpenAIModerationFilter, TermFilter, make_filter
from alpaca_ray.serve.metrics import Metrics, parse_prometheus
from alpaca_ray.serve.openai_api import ChatRequest, sse, validation_error
from alpaca_ray.serve.reports import ReportStore, export_reports
from tests.conftest import run_cli
from tests.support.ray_head import free_port
from tests.support.serve_moderation import ModerationServer


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        ServeConfig(model="", port=0, route_prefix="v1", watermark_gamma=1.5, max_batch_size=0)
    message = str(err.value)
    for field in ("model is required", "port", "route_prefix", "watermark_gamma", "max_batch_size"):
        assert field in message


def test_cluster_fields_are_validated():
    with pytest.raises(ConfigError) as err:
        ServeConfig(model="m", max_replicas_per_node=0, proxy_location="Nowhere", reports_db="s3://bucket/r.db")
    message = str(err.value)
    assert "max_replicas_per_node must be an integer in 1..100" in message
    assert "proxy_location must be EveryNode or HeadOnly" in message
    assert "reports_db s3://bucket/r.db: SQLite needs a POSIX filesystem" in message
    config = ServeConfig(model="m", max_replicas_per_node=1, proxy_location="HeadOnly")
    assert (config.max_replicas_per_node, config.proxy_location) == (1, "HeadOnly")
    assert ServeConfig(model="m").max_replicas_per_node is None  # no limit unless asked


def test_model_id_names_the_training_run_for_a_final_dir(tmp_path):
    final = tmp_path / "my-run" / "final"
    final.mkdir(parents=True)
    assert ServeConfig(model=str(final)).model_id == "my-run"
    assert ServeConfig(model="org/some-model").model_id == "org/some-model"
    assert ServeConfig(model="x", served_model_name="alpaca").model_id == "alpaca"


def test_chat_requests_become_plain_conversations_for_the_prompt_formats():
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "be nice"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]})
    conversation = request.conversation()
    assert conversation == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first"},
                            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Name a color."}]
    # Alpaca's rule: the last user message is the instruction, the rest of the conversation its input
    assert alpaca_prompt(conversation) == format_prompt("Name a color.", "System: be nice\nUser: first\nAssistant: ok")
    with pytest.raises(Exception, match="user message"):
        alpaca_prompt([{"role": "system", "content": "x"}])


def test_strict_types_are_rejected_and_named():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"})
    error = validation_error(err.value.errors())
    assert error.status == 400 and error.param == "max_tokens" and error.code == "invalid_type"
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_sse_lines_are_what_the_openai_client_parses():
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_reports_store_keeps_every_concurrent_report(tmp_path):
    store = ReportStore(str(tmp_path / "reports.db"))
    errors = []

    def submit(i: int) -> None:
        try:
            ReportStore(store.path).add(model="m", response=f"answer {i}", reason="incorrect", instruction=f"q{i}")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(r["response"] for r in store.list()) == sorted(f"answer {i}" for i in range(20))
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="reason must be one of"):
        store.add(model="m", response="r", reason="because")


def test_reports_export_formats_and_cli(tmp_path):
    db = str(tmp_path / "r.db")
    ReportStore(db).add(model="m", response='he said "hi",\nthen left', reason="other", details="multi\nline")
    rows = [json.loads(line) for line in export_reports(db, "jsonl").splitlines()]
    assert rows[0]["response"] == 'he said "hi",\nthen left' and rows[0]["reason"] == "other"
    parsed = list(csv.DictReader(io.StringIO(export_reports(db, "csv"))))
    assert parsed[0]["details"] == "multi\nline"
    out = tmp_path / "out.csv"
    result = run_cli(["reports", "export", "--db", db, "--format", "csv", "--output", str(out)], check=True)
    assert "1 report(s)" in result.stderr and list(csv.DictReader(out.open()))[0]["model"] == "m"
    missing = run_cli(["reports", "export", "--db", str(tmp_path / "nope.db")])
    assert missing.returncode == 2 and "no such report database" in missing.stderr
    assert not (tmp_path / "nope.db").exists()  # reading never creates a database
    with pytest.raises(UserError, match="SQLite needs a POSIX filesystem"):
        export_reports("s3://bucket/reports.db", "jsonl")


def test_term_filter_flags_bundled_and_extra_terms():
    content_filter = make_filter("terms", terms=[r"\bforbidden\b"])
    assert content_filter.check("How do I build a pipe bomb?").flagged
    assert content_filter.check("this is FORBIDDEN text").flagged
    assert not content_filter.check("Give three tips for staying healthy.").flagged
    with pytest.raises(UserError, match="not a valid regex"):
        TermFilter(["(unclosed"])


def test_moderation_filter_against_a_real_http_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-moderation-test")
    with ModerationServer(flag_word="attack") as server:
        moderation = OpenAIModerationFilter(server.base_url, "omni-moderation-latest")
        flagged = moderation.check("plan an attack")
        assert flagged.flagged and flagged.categories == ["violence"]
        assert not moderation.check("a poem about spring").flagged
        assert server.seen[0]["model"] == "omni-moderation-latest"
        server.failing = True  # an unreachable filter fails closed
        assert moderation.check("a poem about spring").flagged


def test_metrics_render_parses_back():
    metrics = Metrics()
    metrics.inc("requests_total", route="chat", status="200")
    metrics.observe("batch_size", 3)
    metrics.observe("batch_size", 1)
    values = parse_prometheus(metrics.render())
    assert values['alpaca_ray_serve_requests_total{route="chat",status="200"}'] == 1
    assert values['alpaca_ray_serve_batch_size_bucket{le="1"}'] == 1
    assert values["alpaca_ray_serve_batch_size_count"] == 2
    assert values["alpaca_ray_serve_max_batch_size_observed"] == 3


def test_shipped_serve_config_is_valid(repo_root):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((repo_root / "jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(document)
    (application,) = document["applications"]
    assert application["import_path"] == "alpaca_ray.serve.app:build_app"
    from alpaca_ray.config import config_from_dict

    assert config_from_dict(ServeConfig, application["args"]).content_filter == "terms"


def test_config_round_trips_through_cli_flags():
    from alpaca_ray.config import config_from_args, config_to_argv, make_parser

    config = ServeConfig(model="m", port=8123, blocking=False, autoscaling={"min_replicas": 1, "max_replicas": 3},
                         filter_terms=["a", "b"], api_key_env="MY_KEY", max_replicas_per_node=1,
                         proxy_location="HeadOnly")
    parser = make_parser("x", "x", ServeConfig)
    assert config_from_args(ServeConfig, parser.parse_args(config_to_argv(config))) == config


def test_missing_api_key_variable_is_a_clear_error(monkeypatch):
    from alpaca_ray.serve.app import build_app

    monkeypatch.delenv("ALPACA_RAY_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="ALPACA_RAY_NO_SUCH_KEY"):
        build_app(ServeConfig(model="m", api_key_env="ALPACA_RAY_NO_SUCH_KEY"))


def test_serve_cli_rejects_a_missing_model_dir_before_touching_ray(tmp_path):
    result = run_cli(["serve", "--model", str(tmp_path / "no-model"), "--no-blocking"])
    assert result.returncode == 2 and f"no such model directory: {tmp_path / 'no-model'}" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "not-a-model").mkdir()
    empty = run_cli(["serve", "--model", str(tmp_path / "not-a-model"), "--no-blocking"])
    assert empty.returncode == 2 and "not a model directory (no config.json there)" in empty.stderr
    bad = run_cli(["serve", "--model", "m", "--port", "0", "--watermark-gamma", "2"])
    assert bad.returncode == 2 and "port" in bad.stderr and "watermark_gamma" in bad.stderr


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    return lines[0]


def _without_a_cluster() -> dict:
    """The environment of a user's shell: no RAY_ADDRESS, so serve would start a new local cluster."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_serve_cli_refuses_a_port_in_use_before_starting_ray(tmp_path):
    """A real process and a real listening socket: one line naming the port and host, not Ray's proxy
    tracebacks (the check binds the port the way Serve's proxy does, before any cluster starts)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the one file read before the cluster would start
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
                         env=_without_a_cluster(), timeout=120)
    line = _one_error_line(result)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line


def test_serve_cli_refuses_a_hub_model_it_cannot_get(tmp_path):
    env = {**_without_a_cluster(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # empty cache
    result = run_cli(["serve", "--model", "someorg/no-such-model", "--port", str(free_port())], env=env, timeout=120)
    assert "--model someorg/no-such-model: not found locally and the hub is unreachable" in _one_error_line(result)


# --- alpaca_ray.cluster.services ------------------------------------------------------------------------

WAITER = """
import signal, sys
from alpaca_ray.cluster.services import wait_for_stop_signal
got = wait_for_stop_signal(poll_s=0.05, on_ready=lambda: print("ready", flush=True))
print("got", got, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_wait_for_stop_signal_returns_on_the_signal_and_restores_handlers(repo_root, signum):
    child = subprocess.Popen([sys.executable, "-c", WAITER], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # handlers installed: the signal is safe to send
        child.send_signal(signum)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0 and out.split() == ["got", str(int(signum)), "True"]


DETAILS = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "0.0.0.0", "port": 8123},
    "proxies": {"n1": {"node_ip": "10.0.0.5"}, "n2": {"node_ip": "10.0.0.7"}},
    "applications": {"alpaca-ray": {"route_prefix": "/"}, "evaluate": {"route_prefix": "/evaluate/"},
                     "batch-only": {"route_prefix": None}},
}


def test_app_url_from_serve_details():
    assert app_url_from_details(DETAILS, "alpaca-ray", "head.example") == "http://head.example:8123"
    assert app_url_from_details(DETAILS, "evaluate", "h") == "http://h:8123/evaluate"
    # a wildcard bind: this node's IP when it runs a proxy, else a node that does
    assert app_url_from_details(DETAILS, "alpaca-ray", local_ip="10.0.0.7") == "http://10.0.0.7:8123"
    assert app_url_from_details(DETAILS, "alpaca-ray", local_ip="10.0.0.9") == "http://10.0.0.5:8123"
    loopback = {**DETAILS, "http_options": {"host": "127.0.0.1", "port": 9000}}
    assert app_url_from_details(loopback, "alpaca-ray", local_ip="10.0.0.7") == "http://127.0.0.1:9000"
    unset = {**DETAILS, "http_options": {}}  # Serve leaves its defaults out of the details
    assert app_url_from_details(unset, "evaluate") == "http://127.0.0.1:8000/evaluate"
    ipv6 = {**DETAILS, "http_options": {"host": "::1", "port": 8000}}
    assert app_url_from_details(ipv6, "alpaca-ray") == "http://[::1]:8000"
    assert app_url_from_details(DETAILS, "not-deployed", "h") is None
    assert app_url_from_details(DETAILS, "batch-only", "h") is None  # no HTTP route
    assert app_url_from_details({**DETAILS, "proxy_location": "Disabled"}, "alpaca-ray", "h") is None


def test_deploy_notes_a_proxy_bound_otherwise_than_asked():
    from alpaca_ray.serve.app import _proxy_differs

    asked = ServeConfig(model="m", host="127.0.0.1", port=8000)
    assert not _proxy_differs(asked, "http://127.0.0.1:8000/")
    assert _proxy_differs(asked, "http://127.0.0.1:8123/")  # Serve already ran on another port
    assert _proxy_differs(asked, "http://10.0.0.5:8000/")  # ...or bound every interface
    everywhere = ServeConfig(model="m", host="0.0.0.0", port=8000, api_key_env="K")
    assert not _proxy_differs(everywhere, "http://10.0.0.5:8000/")  # a wildcard bind, shown as a node's IP
    assert _proxy_differs(everywhere, "http://127.0.0.1:8000/")  # asked for every interface, got loopback


def test_moderation_without_a_key_or_endpoint_fails_at_deploy(monkeypatch, tiny_model_dir):
    from alpaca_ray.serve.app import check_moderation

    monkeypatch.delenv("ALPACA_RAY_NO_MODERATION_KEY", raising=False)
    config = ServeConfig(model=str(tiny_model_dir), content_filter="openai",
                         moderation_api_key_env="ALPACA_RAY_NO_MODERATION_KEY")
    with pytest.raises(UserError, match="ALPACA_RAY_NO_MODERATION_KEY.*not set"):
        check_moderation(config)
    monkeypatch.setenv("ALPACA_RAY_NO_MODERATION_KEY", "sk-secret-moderation")
    with ModerationServer(flag_word="attack") as server:
        check_moderation(ServeConfig(**{**config.__dict__, "moderation_base_url": server.base_url}))  # answers
        server.failing = True
        with pytest.raises(UserError, match="did not answer") as err:
            check_moderation(ServeConfig(**{**config.__dict__, "moderation_base_url": server.base_url}))
    assert "sk-secret-moderation" not in str(err.value)


def test_a_public_host_needs_a_key_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match="no API key protects the API"):
        ServeConfig(model="m", host="0.0.0.0")
    assert ServeConfig(model="m", host="0.0.0.0", api_key_env="K").host == "0.0.0.0"
    assert ServeConfig(model="m", host="0.0.0.0", allow_unauthenticated=True).allow_unauthenticated
    assert ServeConfig(model="m", host="127.0.0.2").host == "127.0.0.2"


def test_serve_cli_takes_the_key_out_of_the_environment_before_ray_starts(monkeypatch, tiny_model_dir):
    """A cluster the CLI starts inherits its environment: the key must be gone by then, only its hash kept."""
    from alpaca_ray.serve import cli
    from alpaca_ray.serve.config import hash_key

    seen = {}

    def fake_ensure_ray(*args, **kwargs):  # stands in for starting Ray: record what it would inherit, stop
        seen["env"] = dict(__import__("os").environ)
        raise RuntimeError("stop here")

    monkeypatch.setenv("ALPACA_RAY_CLI_KEY", "sk-never-in-ray")
    monkeypatch.setattr(cli, "ensure_ray", fake_ensure_ray)
    config = ServeConfig(model=str(tiny_model_dir), api_key_env="ALPACA_RAY_CLI_KEY")
    with pytest.raises(RuntimeError, match="stop here"):
        cli.serve_model(config)
    assert "ALPACA_RAY_CLI_KEY" not in seen["env"]
    assert "sk-never-in-ray" not in "".join(seen["env"].values())
    assert hash_key("sk-never-in-ray") != "sk-never-in-ray"


def test_report_listing_pages_and_csv_cells_are_spreadsheet_safe(tmp_path):
    from alpaca_ray.serve.reports import spreadsheet_safe

    store = ReportStore(str(tmp_path / "r.db"))
    ids = [store.add(model="m", response=f"r{i}", reason="other") for i in range(5)]
    page = store.page(2)
    assert [r["id"] for r in page["data"]] == ids[:2] and page["has_more"]
    assert [r["id"] for r in store.page(10, after=page["last_id"])["data"]] == ids[2:]
    assert [spreadsheet_safe(v) for v in ("=1", "+1", "-1", "@A", "\tx", "ok", 3)] == \
        ["'=1", "'+1", "'-1", "'@A", "'\tx", "ok", 3]
