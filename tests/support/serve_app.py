"""The serve stage's app for tests: configs for the session's Serve proxy, tiny chat models (a copy of the tiny
model with a chat template) and the app on a real HTTP port without Ray (for the browser)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from alpaca_ray.serve.config import ServeConfig
from alpaca_ray.serve.metrics import parse_prometheus

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def app_config(model_dir: Path, port: int, app_name: str, route_prefix: str, reports_db: Path,
                **overrides) -> ServeConfig:
    """A config for a test app: small batches wait a little longer so concurrent callers share them."""
    values = dict(model=str(model_dir), port=port, app_name=app_name, route_prefix=route_prefix,
                  reports_db=str(reports_db), batch_wait_timeout_s=0.05, num_cpus_per_replica=0.5,
                  ready_timeout_s=180)
    values.update(overrides)
    return ServeConfig(**values)


def metrics_of(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "metrics", timeout=30) as response:
        return parse_prometheus(response.read().decode())


def batches_larger_than_one(metrics: dict[str, float]) -> float:
    """How many engine batches held more than one sequence (from the batch-size histogram)."""
    return metrics["alpaca_ray_serve_batch_size_count"] - metrics['alpaca_ray_serve_batch_size_bucket{le="1"}']


#: A ChatML-like template for the tiny model, ending each turn with its EOS ``</s>`` and starting with its
#: BOS ``<s>`` (as Llama's templates do: tokenizing its text again with special tokens would add a second).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def make_chat_model(model_dir: Path, output: Path, chat_template: str = TINY_CHAT_TEMPLATE,
                    prompt_template: str | None = None) -> Path:
    """A copy of ``model_dir`` whose tokenizer has ``chat_template``; with ``prompt_template``, also the
    train stage's ``alpaca_ray.json`` recording it."""
    import json
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, output)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(output))
    if prompt_template is not None:
        (output / "alpaca_ray.json").write_text(json.dumps({"prompt_template": prompt_template}))
    return output


class InProcessServer:
    """The app of an ``AlpacaService`` on a real loopback HTTP port (uvicorn on a thread), no Ray: for the
    browser tests of the demo page, which need a URL."""

    def __init__(self, service):
        import socket
        import threading

        import uvicorn

        from alpaca_ray.serve.app import create_api

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(create_api(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # uvicorn sets it once it listens
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
