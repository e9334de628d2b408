"""``alpaca-ray serve`` as a user runs it: through ``ray job submit`` (--no-blocking) and in the foreground."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.support.ray_head import free_port

URL_LINE = re.compile(r"serving '[^']*' at (http://\S+/) ")


@pytest.mark.job
def test_serve_job_no_blocking_leaves_the_app_running(ray_head, tiny_model_dir, tmp_path):
    result = ray_head.submit(["python", "jobs/serve.py", "--model", str(tiny_model_dir), "--no-blocking",
                              "--port", str(free_port()), "--app-name", "serve-job-test", "--route-prefix", "/serve-job",
                              "--num-cpus-per-replica", "0.5", "--reports-db", str(tmp_path / "reports.db")],
                             timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    match = URL_LINE.search(output)
    assert match, output[-3000:]
    url = match.group(1)
    # the job has ended; the app it deployed still answers on that cluster's proxy (it goes with the head
    # node at the end of the session)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, max_tokens=5,
                                           messages=[{"role": "user", "content": "Name a color."}])
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


@pytest.mark.ray
def test_serve_blocking_until_sigterm_then_deletes_the_app(ray_env, serve_port, tiny_model_dir, tmp_path):
    from ray import serve

    app_name = "serve-blocking-test"
    command = [sys.executable, "-m", "alpaca_ray.cli", "serve", "--model", str(tiny_model_dir), "--port",
               str(serve_port), "--app-name", app_name, "--route-prefix", "/serve-blocking",
               "--num-cpus-per-replica", "0.5", "--reports-db", str(tmp_path / "reports.db"),
               # flag the replacement character, which this random byte-level model writes often and prompts lack
               "--filter-terms", "\ufffd"]
    process = subprocess.Popen(command, env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 240
        lines = []
        while url is None and time.monotonic() < deadline:  # read output until the URL line (bounded)
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            match = URL_LINE.search(line)
            url = match.group(1) if match else None
        assert url, "".join(lines)[-3000:]
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        refused = client.completions.create(model=model, prompt="Hi", max_tokens=40, seed=0)
        assert refused.choices[0].finish_reason == "content_filter" and "\ufffd" not in refused.choices[0].text
        streamed = list(client.completions.create(model=model, prompt="Hi", max_tokens=40, seed=0, stream=True))
        assert streamed[-1].choices[0].finish_reason == "content_filter"
        assert "\ufffd" not in "".join(c.choices[0].text for c in streamed)  # the flagged piece is never sent
        assert app_name in serve.status().applications
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output[-3000:]
        assert f"deleting app {app_name!r}" in output
        assert app_name not in serve.status().applications
    finally:
        if process.poll() is None:
            process.kill()
