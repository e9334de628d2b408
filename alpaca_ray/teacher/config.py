"""The offline teacher's typed config (``alpaca-ray teacher`` flags and the pipeline's ``teacher:`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_ray.config import option, validate


@dataclass
class TeacherConfig:
    """Serve recorded responses over the OpenAI completions and chat protocols."""

    replay: str = option("", "JSONL file (or a directory of them) whose lines have 'text' and optionally "
                             "'finish_reason': the bundled teacher_replay.jsonl, or a generate run's raw/ journal")
    host: str = option("127.0.0.1", "interface to bind (0.0.0.0 to reach it from other machines)")
    port: int = option(0, "port to bind; 0 picks a free one (the URL is printed)")
    model: list[str] = option(default_factory=list, help="model names to answer to (any name when none is given; "
                                                         "others get 404 model_not_found)")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.replay), "replay: a recorded-responses file is required (e.g. alpaca_ray/data/teacher_replay.jsonl)"),
            (0 <= self.port <= 65535, f"port: {self.port} is not a port number (0-65535)"),
            (all(isinstance(m, str) and m for m in self.model), "model: names must be non-empty strings"),
        ])
