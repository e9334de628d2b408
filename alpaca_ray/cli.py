"""``alpaca-ray VERB ...``: one table maps each verb to the stage function that runs it.

Stage modules are imported only when their verb is used, so ``alpaca-ray --help`` is instant and a
stage's heavy dependencies (torch, Ray Serve) load only for that stage.
"""

from __future__ import annotations

import importlib
import sys

#: verb -> ("module:function", one-line help). Each function takes ``argv`` and returns an exit status.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("alpaca_ray.generate.cli:main", "ask a teacher model for self-instruct data (Ray Data)"),
    "dedup": ("alpaca_ray.dedup.cli:main", "drop near-duplicate instructions with Alpaca's exact ROUGE-L rule"),
    "train": ("alpaca_ray.train.cli:main", "supervised fine-tuning with FSDP2 on Ray Train"),
    "serve": ("alpaca_ray.serve.cli:main", "serve a model: OpenAI-compatible API and web demo (Ray Serve)"),
    "reports": ("alpaca_ray.serve.cli:reports_main", "read back the responses users reported in the demo"),
    "watermark": ("alpaca_ray.serve.cli:watermark_main", "detect the output watermark in a text file"),
    "evaluate": ("alpaca_ray.evaluate.cli:main", "blind pairwise comparison of two models"),
    "teacher": ("alpaca_ray.teacher.cli:main", "an offline teacher replaying recorded responses over the OpenAI API"),
    "init-model": ("alpaca_ray.tiny:main", "make a base model: a tiny Llama locally, or one from a GGUF file"),
    "pipeline": ("alpaca_ray.pipeline.cli:main", "run every stage as Ray jobs from one config file"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: alpaca-ray COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'alpaca-ray COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from alpaca_ray import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"alpaca-ray: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[verb][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
