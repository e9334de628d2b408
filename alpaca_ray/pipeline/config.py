"""The pipeline's typed config: one file with a section per stage, wired together through storage paths.

A ``configs/*.yaml`` file has a top-level ``output`` root and the sections ``generate``, ``train``,
``serve`` and (optionally) ``evaluate``, each with exactly the fields of that stage's config class (the
same names as its CLI flags). What one stage hands the next is filled in from the root unless the
section sets it::

    generate.output = ROOT/generate        train.data   = ROOT/generate/data.json
    train.output    = ROOT/train           serve.model  = ROOT/train/final
    evaluate.output = ROOT/evaluate        serve.served_model_name = ROOT's last name
    evaluate.model_a, model_a_base_url = the model this run served

An optional ``teacher:`` section deploys a teacher on the cluster for the run and points the generate stage
at it (and evaluate's ``model_b_base_url`` / ``judge_base_url`` when they say ``teacher``): ``{replay: FILE}``
replays recorded answers (offline, no key), ``{model: NAME_OR_PATH, engine, num_replicas, use_gpu}`` serves
an open model with the serve stage's app. It is removed before train, so its GPUs are free for training. Stage config classes are imported lazily and only to validate their sections; a
stage whose class does not exist (yet) gets its section's keys passed through as flags unchecked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Literal

from alpaca_ray.cluster import storage
from alpaca_ray.config import ConfigError, config_from_dict, option, read_config_file, validate

#: The stages in the order they run.
STAGES = ("generate", "train", "serve", "evaluate")

#: stage -> (module, class) of its config; imported only when a pipeline is validated.
CONFIG_CLASSES = {
    "generate": ("alpaca_ray.generate.config", "GenerateConfig"),
    "train": ("alpaca_ray.train.config", "TrainConfig"),
    "serve": ("alpaca_ray.serve.config", "ServeConfig"),
    "evaluate": ("alpaca_ray.evaluate.config", "EvaluateConfig"),
}

#: Fields that name a local file or directory the stage reads (made absolute when they exist here, since a
#: job runs in a copy of the working directory) or writes (always made absolute).
INPUT_PATH_FIELDS = {
    "generate": ("seed_tasks", "prompt_template"),
    "train": ("base_model", "data"),
    "serve": ("model", "filter_terms_file"),
    "evaluate": ("eval_set", "model_a_answers", "model_b_answers", "judge_template", "annotations",
                 "instruction_difficulty", "lc_gamed_annotations"),
}
TEACHER_PATH_FIELDS = ("replay", "model")
OUTPUT_PATH_FIELDS = {
    "generate": ("output",),
    "train": ("output", "storage_path"),
    "serve": ("reports_db",),
    "evaluate": ("output", "human_db"),
}


@dataclass
class PipelineConfig:
    """Every stage of a run, from one YAML file."""

    output: str = option("", "root directory or s3:// / gs:// URI every stage writes under "
                             "(ROOT/generate, ROOT/train, ROOT/evaluate, ROOT/pipeline_state.json)")
    stages: list[str] = option(default_factory=list, help="stages to run, in pipeline order (default: generate, "
                                                          "train, serve, and evaluate when its section is given)")
    address: str = option("", "Ray cluster to submit the jobs to: its dashboard URL (http://HEAD:8265); "
                              "empty: $RAY_ADDRESS, else a local cluster started for the run")
    local_num_cpus: int | None = option(None, "logical CPUs of the local cluster started when no address is "
                                              "given (default: the machine's cores, at least 8)")
    generate: dict = option(default_factory=dict, help="GenerateConfig fields", cli=False)
    train: dict = option(default_factory=dict, help="TrainConfig fields", cli=False)
    serve: dict = option(default_factory=dict, help="ServeConfig fields", cli=False)
    evaluate: dict | None = option(None, "EvaluateConfig fields; the stage runs only when this is given", cli=False)
    teacher: dict | None = option(None, "deploy a teacher on the cluster for this run (TeacherSection fields): "
                                        "{replay: FILE} or {model: NAME_OR_PATH, engine, num_replicas, use_gpu}; "
                                        "generate is pointed at it", cli=False)

    def __post_init__(self) -> None:
        sections = {s: getattr(self, s) for s in STAGES}
        validate(self, [
            (bool(self.output), "output: a root directory (or s3:// / gs:// URI) is required"),
            (all(s in STAGES for s in self.stages),
             f"stages: unknown stage(s) {[s for s in self.stages if s not in STAGES]}; known: {', '.join(STAGES)}"),
            (self.evaluate is not None or "evaluate" not in self.stages,
             "stages: 'evaluate' is listed but the config has no evaluate section"),
            *[(v is None or isinstance(v, dict), f"{s}: expected a mapping of {s} fields, got {type(v).__name__}")
              for s, v in [*sections.items(), ("teacher", self.teacher)]],
            (self.local_num_cpus is None or self.local_num_cpus >= 1, "local_num_cpus: must be >= 1"),
        ])

    @property
    def stage_names(self) -> list[str]:
        """The stages this run covers, in pipeline order."""
        wanted = self.stages or [s for s in STAGES if s != "evaluate" or self.evaluate is not None]
        return [s for s in STAGES if s in wanted]

    @property
    def state_path(self) -> str:
        return storage.join(self.output, "pipeline_state.json")


#: Written as evaluate's ``model_b_base_url`` or ``judge_base_url``: the run's deployed teacher.
TEACHER_URL = "teacher"

#: The Serve application name of a teacher model deployed for the run.
TEACHER_APP = "alpaca-ray-teacher"


@dataclass
class TeacherSection:
    """A teacher deployed on the cluster for the run: recorded answers, or an open model on Serve."""

    replay: str = option("", "JSONL of recorded answers to replay (offline, any key accepted): the bundled "
                             "alpaca_ray/data/teacher_replay.jsonl or a generate run's raw/ journal")
    model: str = option("", "an open model to deploy as the teacher with the serve stage's app: a hub name, "
                            "a path every node mounts, or an s3:// / gs:// model directory")
    engine: Literal["auto", "transformers", "vllm"] = option("auto", "the serve stage's engine for the model")
    num_replicas: int = option(1, "teacher replicas (each a serve replica)")
    use_gpu: bool = option(False, "one GPU per teacher replica")
    num_cpus_per_replica: float = option(1.0, "CPUs per teacher replica")
    route_prefix: str = option("/teacher", "where the teacher app answers on the cluster's Serve proxy")
    names: list[str] = option(default_factory=list, help="model names the replay teacher answers to (any when empty)")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.replay) != bool(self.model),
             "teacher: give exactly one of replay (recorded answers) or model (an open model to serve)"),
            (self.num_replicas >= 1, f"teacher.num_replicas must be >= 1, got {self.num_replicas}"),
            (self.route_prefix.startswith("/") and self.route_prefix != "/",
             "teacher.route_prefix must start with '/' and not be '/' (the served model answers there)"),
        ])

    def serve_values(self, serve: dict, served_model_name: str) -> dict:
        """The serve stage's flags that deploy this teacher beside (never over) the run's own app."""
        return {"model": self.model, "engine": self.engine, "num_replicas": self.num_replicas,
                "use_gpu": self.use_gpu, "num_cpus_per_replica": self.num_cpus_per_replica,
                "app_name": TEACHER_APP, "route_prefix": self.route_prefix, "served_model_name": served_model_name,
                "host": serve.get("host", "127.0.0.1"), "port": serve.get("port", 8000),
                "content_filter": "none", "blocking": False,
                # the run's own teacher, bound like the run's app; it answers any key (as the offline one does)
                "allow_unauthenticated": True}


@dataclass
class StageSpec:
    """One stage, wired and validated: what the job will be given."""

    name: str
    #: The section's fields after wiring: what goes into the job's flags.
    values: dict
    #: The stage's config class, which validates the section and turns it into the job's flags.
    config_class: type
    #: A hash of ``values``: a finished stage whose section changed since is run again.
    fingerprint: str


def load_config_class(stage: str) -> type:
    """The stage's config class (imported lazily, so the pipeline loads only the stages it runs)."""
    module_name, class_name = CONFIG_CLASSES[stage]
    return getattr(importlib.import_module(module_name), class_name)


def resolve_paths(config: PipelineConfig, base_dir: str | None = None) -> PipelineConfig:
    """Make local relative paths absolute (relative to ``base_dir``, default the current directory).

    Jobs run in a copy of the working directory on the cluster, so a relative path would point into
    that copy. Inputs that do not exist here (a hub name such as ``meta-llama/Llama-3.1-8B``) stay as
    they are.
    """
    base_dir = base_dir or os.getcwd()

    def absolute(path: str) -> str:
        if not isinstance(path, str) or not path or storage.is_remote(path) or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(base_dir, storage.local_path(path)))

    def exists_here(path: str) -> bool:
        return isinstance(path, str) and bool(path) and os.path.exists(absolute(path))

    changes: dict = {"output": absolute(config.output)}
    for stage in STAGES:
        section = getattr(config, stage)
        if not isinstance(section, dict):
            continue
        section = {k.replace("-", "_"): v for k, v in section.items()}
        for name in OUTPUT_PATH_FIELDS[stage]:
            if section.get(name):
                section[name] = absolute(section[name])
        for name in INPUT_PATH_FIELDS[stage]:
            if exists_here(section.get(name)):
                section[name] = absolute(section[name])
        changes[stage] = section
    if isinstance(config.teacher, dict):
        # The replay file is always local to the driver; a model may be a hub name.
        changes["teacher"] = {**config.teacher, **{name: absolute(config.teacher[name]) for name in TEACHER_PATH_FIELDS
                                                   if name == "replay" and config.teacher.get(name)
                                                   or exists_here(config.teacher.get(name))}}
    return dataclasses.replace(config, **changes)


def app_host(serve: dict, cluster_ip: str = "127.0.0.1") -> str:
    """The host a client reaches the serve stage's proxy at: ``cluster_ip`` when the proxy binds every
    interface (what other nodes need), loopback when it binds only loopback (the head alone reaches it)."""
    host = serve.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        return cluster_ip
    return "127.0.0.1" if host == "localhost" else host


def served_base_url(serve: dict, cluster_ip: str = "127.0.0.1") -> str:
    """Where the serve stage's app answers (without ``/v1``), as a client on the cluster sees it."""
    prefix = (serve.get("route_prefix") or "/").rstrip("/")
    return f"http://{app_host(serve, cluster_ip)}:{serve.get('port', 8000)}{prefix}"


def wire_sections(config: PipelineConfig) -> dict[str, dict]:
    """Each stage's fields with the hand-over paths filled in from the root (explicit values win)."""
    root = config.output
    generate = {k.replace("-", "_"): v for k, v in config.generate.items()}
    train = {k.replace("-", "_"): v for k, v in config.train.items()}
    serve = {k.replace("-", "_"): v for k, v in config.serve.items()}
    generate.setdefault("output", storage.join(root, "generate"))
    train.setdefault("data", storage.join(generate["output"], "data.json"))
    train.setdefault("output", storage.join(root, "train"))
    serve.setdefault("model", storage.join(train["output"], "final"))
    # Clients ask for the model by name: name it after the run (runs/quickstart -> "quickstart").
    serve.setdefault("served_model_name", os.path.basename(root.rstrip("/")) or "alpaca-ray")
    # The pipeline deploys and moves on: the app stays up on the cluster after the serve job exits.
    serve["blocking"] = False
    if not storage.is_remote(root):
        serve.setdefault("reports_db", storage.join(root, "serve", "reports.db"))
    wired = {"generate": generate, "train": train, "serve": serve}
    if config.evaluate is not None:
        evaluate = {k.replace("-", "_"): v for k, v in config.evaluate.items()}
        evaluate.setdefault("output", storage.join(root, "evaluate"))
        if not any(evaluate.get(k) for k in ("model_a", "model_a_base_url", "model_a_answers")):
            # Model A is the model this run served; its name is known once it is deployed.
            evaluate["model_a_base_url"] = served_base_url(serve) + "/v1"
        wired["evaluate"] = evaluate
    return wired


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_specs(config: PipelineConfig) -> list[StageSpec]:
    """Wire and validate every stage of the run; one :class:`ConfigError` lists all problems."""
    wired = wire_sections(config)
    problems: list[str] = []
    if config.teacher is not None:
        try:
            teacher = config_from_dict(TeacherSection, config.teacher, source="teacher")
            if teacher.replay and not storage.exists(teacher.replay):
                problems.append(f"teacher.replay: no such file {teacher.replay}")
        except ConfigError as err:
            problems.append(str(err))
        if wired["generate"].get("teacher_base_url"):
            problems.append("generate.teacher_base_url is set but so is the teacher section (which starts the "
                            "offline teacher and points generate at it): remove one")
    specs = []
    for stage in config.stage_names:
        values = wired[stage]
        cls = load_config_class(stage)
        # The teacher's URL is only known once it is started; validate with a stand-in.
        check = dict(values)
        if stage == "generate" and config.teacher is not None:
            check["teacher_base_url"] = "http://127.0.0.1:1/v1"
        for name in ("model_b_base_url", "judge_base_url"):
            if stage == "evaluate" and check.get(name) == TEACHER_URL:
                if config.teacher is None:
                    problems.append(f"evaluate.{name}: 'teacher' names the run's teacher, but there is no "
                                    "teacher section")
                check[name] = "http://127.0.0.1:1/v1"
        if stage == "evaluate" and check.get("model_a_base_url") and not check.get("model_a"):
            check["model_a"] = "served-model"
        try:
            config_from_dict(cls, check, source=f"{stage} section")
        except ConfigError as err:
            problems.append(str(err))
        hidden = [f.name for f in dataclasses.fields(cls) if f.name in values and not f.metadata.get("cli", True)]
        if hidden:
            problems.append(f"{stage}: field(s) {', '.join(hidden)} cannot be passed to a job as flags")
        uses_teacher = stage == "generate" or TEACHER_URL in (values.get("model_b_base_url"),
                                                               values.get("judge_base_url"))
        specs.append(StageSpec(stage, values, cls, fingerprint(
            {**values, "teacher": config.teacher} if uses_teacher else values)))
    if problems:
        raise ConfigError("invalid pipeline config:\n  - " + "\n  - ".join(p.replace("\n", "\n    ") for p in problems))
    return specs


def load_pipeline_config(path: str, overrides: dict | None = None, base_dir: str | None = None,
                         resolve: bool = True) -> PipelineConfig:
    """Read ``path`` (YAML or JSON), apply ``overrides`` (top-level fields), make local paths absolute
    (unless ``resolve`` is false: the paths then stay as written, for :func:`portable_config`)."""
    values = read_config_file(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = config_from_dict(PipelineConfig, values, source=path)
    return resolve_paths(config, base_dir) if resolve else config
