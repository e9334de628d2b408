"""``ServeConfig``: every setting of the serve stage, documented and validated in one place."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Literal

from alpaca_ray.chat import check_prompt_format
from alpaca_ray.cluster import storage
from alpaca_ray.cluster.sqlite_store import remote_path_message
from alpaca_ray.config import UserError, config_from_dict, config_to_dict, option, validate
from alpaca_ray.hub import looks_like_path


@dataclass
class ServeConfig:
    """How to serve a model on Ray Serve: the OpenAI-compatible API, the demo page and its safety features."""

    model: str = option("", "model to serve: a local HF model dir (e.g. the train stage's OUTPUT/final), "
                            "an s3:// or gs:// URI of one (each replica caches it on its node), or a Hugging "
                            "Face hub name")
    host: str = option("127.0.0.1", "address Serve's HTTP proxy binds; keep the loopback default unless "
                                    "an API key protects the API")
    port: int = option(8000, "port of Serve's HTTP proxy (one per Ray cluster)")
    num_replicas: int = option(1, "number of model replicas (ignored when --autoscaling is given)")
    autoscaling: dict | None = option(None, "Ray Serve autoscaling_config as JSON, e.g. "
                                            '\'{"min_replicas": 1, "max_replicas": 4}\'')
    use_gpu: bool = option(False, "give each replica one GPU and run the model on it")
    num_cpus_per_replica: float = option(1.0, "CPUs reserved per replica")
    api_key_env: str | None = option(None, "name of the env var holding the API key that every /v1 route "
                                           "requires (read once by this process; only its SHA-256 reaches the "
                                           "cluster)")
    allow_unauthenticated: bool = option(False, "allow a --host other than loopback without --api-key-env "
                                                "(anyone who reaches the port can use the model and read reports)")
    blocking: bool = option(True, "stay in the foreground until SIGINT/SIGTERM, then delete the app; "
                                  "--no-blocking deploys, waits until healthy, prints the URL and exits")
    app_name: str = option("alpaca-ray", "Serve application name")
    route_prefix: str = option("/", "route prefix of the application on the proxy")
    engine: Literal["auto", "transformers", "vllm"] = option(
        "auto", "generation engine: transformers (CPU/GPU), vllm (GPU, needs the vllm extra), or auto "
                "(vllm when installed and --use-gpu, else transformers)")
    served_model_name: str = option("", "model id reported by /v1/models (default: the model dir's name)")
    prompt_format: Literal["auto", "alpaca", "chat"] = option(
        "auto", "how /v1/chat/completions prompts the model: chat (the whole conversation in the tokenizer's chat "
                "template), alpaca (Alpaca's template: the last user message is the instruction, the rest of "
                "the conversation its input), or auto (what training recorded in the model dir's "
                "alpaca_ray.json, else chat when the tokenizer has a chat template, else alpaca)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype "
                                                                      "(auto: bf16 on GPU, fp32 on CPU)")
    max_batch_size: int = option(16, "most sequences decoded together in one batch")
    batch_wait_timeout_s: float = option(0.01, "how long the engine waits for more requests to fill a batch")
    max_ongoing_requests: int = option(128, "requests a replica accepts at once (queued for the engine)")
    max_sequences_per_request: int = option(256, "most answers one request may ask for (prompt list length x n); "
                                                 "more is a 400")
    max_body_bytes: int = option(2_000_000, "largest request body in bytes; a larger one is answered 413")
    max_report_field_chars: int = option(20_000, "longest text a report may hold in each field (response, "
                                                 "instruction, input, prompt, model); longer is a 400")
    default_max_tokens: int = option(256, "max_tokens when a request does not give one")
    max_tokens_limit: int = option(2048, "largest max_tokens a request may ask for")
    reports_db: str = option("reports.db", "SQLite file the demo's reports go to (made absolute at start)")
    content_filter: Literal["none", "terms", "openai"] = option(
        "terms", "content filter on prompts and responses: an offline term/regex list, the OpenAI "
                 "moderation API (any compatible base URL) or none")
    filter_terms: list[str] = option(default_factory=list, help="extra regexes (case-insensitive) the "
                                     "offline filter flags, on top of the bundled list")
    filter_terms_file: str = option("", "file of regexes, one a line, replacing the bundled list")
    moderation_base_url: str = option("https://api.openai.com/v1", "base URL of the moderation API")
    moderation_model: str = option("omni-moderation-latest", "moderation model name")
    moderation_api_key_env: str = option("OPENAI_API_KEY", "env var holding the moderation API key")
    watermark: bool = option(False, "watermark every response (Kirchenbauer et al. 2023 green list)")
    watermark_gamma: float = option(0.25, "fraction of the vocabulary in each green list")
    watermark_delta: float = option(2.0, "logit bias added to green tokens")
    watermark_key: int = option(15485863, "secret hash key seeding the green lists (detector needs the same)")
    watermark_z_threshold: float = option(4.0, "z-score above which text is called watermarked "
                                               "(4.0: one-sided false-positive rate about 3e-5)")
    ready_timeout_s: float = option(600.0, "how long to wait for the app to become healthy")
    max_replicas_per_node: int | None = option(None, "most model replicas Serve places on one node (1 spreads "
                                                     "the replicas over distinct nodes; default: no limit)")
    proxy_location: Literal["EveryNode", "HeadOnly"] = option(
        "EveryNode", "where Serve runs HTTP proxies: on every node with a replica, or only on the head "
                     "(applies when this starts Serve; a running Serve keeps its own)")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.model), "model is required (--model DIR_OR_NAME)"),
            (1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}"),
            (self.num_replicas >= 1, f"num_replicas must be >= 1, got {self.num_replicas}"),
            (self.autoscaling is None or isinstance(self.autoscaling, dict),
             "autoscaling must be a mapping (Ray Serve autoscaling_config)"),
            (self.num_cpus_per_replica > 0, "num_cpus_per_replica must be > 0"),
            (self.route_prefix.startswith("/"), f"route_prefix must start with '/', got {self.route_prefix!r}"),
            (bool(self.app_name), "app_name must not be empty"),
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0"),
            (self.max_ongoing_requests >= 1, "max_ongoing_requests must be >= 1"),
            (self.max_sequences_per_request >= 1, "max_sequences_per_request must be >= 1"),
            (self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.max_report_field_chars >= 1, "max_report_field_chars must be >= 1"),
            (is_loopback(self.host) or bool(self.api_key_env) or self.allow_unauthenticated,
             f"host {self.host} is reachable from other machines but no API key protects the API: set "
             "--api-key-env NAME, or pass --allow-unauthenticated on a network you trust"),
            (1 <= self.default_max_tokens <= self.max_tokens_limit,
             "default_max_tokens must be in 1..max_tokens_limit"),
            (0 < self.watermark_gamma < 1, f"watermark_gamma must be in (0, 1), got {self.watermark_gamma}"),
            (self.watermark_delta >= 0, "watermark_delta must be >= 0"),
            (self.watermark_z_threshold > 0, "watermark_z_threshold must be > 0"),
            (self.ready_timeout_s > 0, "ready_timeout_s must be > 0"),
            (self.max_replicas_per_node is None or (type(self.max_replicas_per_node) is int  # not a bool
                                                    and 1 <= self.max_replicas_per_node <= 100),
             f"max_replicas_per_node must be an integer in 1..100 (Ray Serve's limit), got {self.max_replicas_per_node!r}"),
            (self.proxy_location in ("EveryNode", "HeadOnly"),
             f"proxy_location must be EveryNode or HeadOnly, got {self.proxy_location!r}"),
            (not storage.is_remote(self.reports_db), remote_path_message(self.reports_db, "reports_db")),
            (not (self.engine == "vllm" and self.watermark),
             "the watermark needs the transformers engine (--engine transformers or auto)"),
        ])

    @property
    def model_id(self) -> str:
        """The model name clients pass as ``model`` (and /v1/models lists)."""
        if self.served_model_name:
            return self.served_model_name
        if storage.is_remote(self.model):  # an exported model on an object store: named like a local one
            name, parent = storage.basename(self.model), storage.basename(storage.dirname(self.model))
            return parent if name == "final" and parent else name
        path = self.model.rstrip("/")
        if os.path.isdir(path):
            name = os.path.basename(path)
            # the train stage's OUTPUT/final/ is better known by OUTPUT's name
            return os.path.basename(os.path.dirname(path)) if name == "final" else name
        return path


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the proxy reachable from this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, a ``--host``/``--port`` that Serve's HTTP proxy could not bind, by binding it the
    way the proxy does. Else Ray's proxy actor fails to bind, is restarted and fails again, with a traceback
    each time. Only for a cluster whose Serve is not running yet: a running one keeps its own proxy."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(proxy_bind_problem(host, port, err)) from None


def proxy_bind_problem(host: str, port: int, err: OSError) -> str:
    """Why Serve's HTTP proxy cannot bind ``host:port``, and what to do, in one line."""
    code = err.errno
    if code == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use by another program (another alpaca-ray serve or Ray "
                "Serve?): stop it or pass a free --port; to add this app to a cluster that already runs Serve, "
                "set RAY_ADDRESS to that cluster")
    if code == errno.EADDRNOTAVAIL:
        return (f"cannot bind {host}:{port} for Serve's HTTP proxy: {host} is not an address of this machine; "
                "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    if code == errno.EACCES:
        return (f"cannot bind {host}:{port} for Serve's HTTP proxy: permission denied (ports below 1024 need "
                "root); pass a --port of 1024 or more")
    return f"cannot bind {host}:{port} for Serve's HTTP proxy: {err.strerror or err}; pass another --host/--port"


def hash_key(key: str) -> str:
    """What replicas compare API keys by: SHA-256, so the key itself never travels to them."""
    return hashlib.sha256(key.encode()).hexdigest()


def resolve_config(config: ServeConfig) -> ServeConfig:
    """Make local paths absolute, since replicas do not share the caller's working directory."""
    values = config_to_dict(config)
    if storage.is_remote(config.model):
        # Replicas copy the model to their own node's disk (storage.cached_local_copy); check it is there now.
        config_uri = storage.join(config.model, "config.json")
        try:  # a LoRA run's final/ is a PEFT adapter directory: adapter_config.json instead
            found = storage.exists(config_uri) or storage.exists(storage.join(config.model, "adapter_config.json"))
        except OSError as err:
            raise UserError(f"--model {config.model}: cannot reach it: {err}") from None
        if not found:
            raise UserError(f"--model {config.model}: not a model directory (no {config_uri}); give the train "
                            "stage's OUTPUT/final on the object store")
        if not config.served_model_name:
            values["served_model_name"] = config.model_id
    model = os.path.expanduser(config.model)
    looks_local = looks_like_path(config.model) or os.path.exists(model)
    if looks_local and not os.path.exists(model):
        raise UserError(f"--model: no such model directory: {config.model} (give the train stage's OUTPUT/final "
                        "or a Hugging Face model dir or hub name)")
    if looks_local and not any(os.path.isfile(os.path.join(model, name)) for name in ("config.json",
                                                                                      "adapter_config.json")):
        raise UserError(f"--model {config.model}: not a model directory (no config.json there); give the train "
                        "stage's OUTPUT/final or a Hugging Face model dir or hub name")
    if os.path.isdir(model):  # a model that cannot be prompted as asked fails here, not in a replica
        check_prompt_format(model, config.prompt_format)
    if config.content_filter == "terms" and config.filter_terms_file:
        from alpaca_ray.serve.content_filter import read_terms

        read_terms(config.filter_terms_file)  # a missing or unreadable file fails here, not in a replica
    if os.path.isdir(model):
        values["model"] = os.path.abspath(model)
        if not config.served_model_name:
            values["served_model_name"] = config.model_id
    values["reports_db"] = os.path.abspath(config.reports_db)
    if config.filter_terms_file:
        values["filter_terms_file"] = os.path.abspath(config.filter_terms_file)
    return config_from_dict(ServeConfig, values)


def api_key_hash(config: ServeConfig) -> str | None:
    """The SHA-256 of the API key named by ``api_key_env``; the key itself never leaves this process."""
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise UserError(f"api_key_env names {config.api_key_env!r} but that environment variable is not set")
    return hash_key(key)


def take_api_key_hash(config: ServeConfig) -> str | None:
    """Like :func:`api_key_hash`, and then remove the key from this process's environment.

    A Ray cluster this process starts inherits its environment (GCS, raylet, every worker, every replica):
    with the variable gone first, only the hash ever reaches the cluster.
    """
    key_hash = api_key_hash(config)
    if config.api_key_env:
        os.environ.pop(config.api_key_env, None)
    return key_hash
