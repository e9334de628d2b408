"""``GenerateConfig``: every choice of the self-instruct recipe, with Stanford Alpaca's as the defaults.

Alpaca's ``generate_instruction.py`` fixed these in code (3 seed tasks a prompt, a list of 20, temperature
1.0, top_p 1.0, 3072 max tokens, stop at ``"\\n20"``, its filters and its ROUGE-L 0.7 rule); here each one
is a field, so a recipe can change it and the run's ``stats.json`` records what was used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from alpaca_ray.cluster import storage
from alpaca_ray.config import option, validate

BUNDLED_SEED_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                  "seed_tasks.jsonl")

#: Alpaca's keyword blacklist: tasks a text-only model cannot do (matched as whole words, any case).
ALPACA_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


@dataclass
class GenerateConfig:
    """``alpaca-ray generate``: ask a teacher model for self-instruct data, as Alpaca did, on Ray Data."""

    output: str = option("", "output directory: data.json, data.parquet, stats.json and raw/ (the journal of "
                             "every teacher response); re-running into it resumes")
    target: int | None = option(None, "number of instructions wanted in data.json (required unless --reprocess, "
                                      "where it caps the rebuilt dataset)")
    seed_tasks: str = option(BUNDLED_SEED_TASKS, "seed tasks in self-instruct JSONL (id, name, instruction, "
                                                 "instances: [{input, output}], is_classification); default: the "
                                                 "175 bundled tasks")
    teacher_model: str = option("gpt-4o-mini", "teacher model name (Alpaca used text-davinci-003, now retired)")
    teacher_base_url: str = option("https://api.openai.com/v1", "OpenAI-compatible endpoint of the teacher")
    api: Literal["chat", "completions"] = option("chat", "chat (/chat/completions) or completions (/completions, "
                                                         "what Alpaca used)")
    api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the API key (the key "
                                                "itself is never written anywhere)")
    requests_per_minute: float = option(500.0, "request budget shared by all workers (0 = unlimited)")
    tokens_per_minute: float = option(200_000.0, "token budget (prompt + max_tokens) shared by all workers "
                                                 "(0 = unlimited)")
    num_workers: int = option(4, "Ray Data actors calling the teacher")
    requests_per_worker: int = option(8, "requests each worker keeps in flight at once (async concurrency)")
    resume: bool = option(False, "continue from OUTPUT/raw (re-running into a directory that has saved responses "
                                 "does this anyway; with --resume it is an error if there is nothing to resume)")
    reprocess: bool = option(False, "rebuild data.json, data.parquet and stats.json from OUTPUT/raw alone with the "
                                    "current parsing and filters; makes no API call")

    # -- the prompt (Alpaca's encode_prompt) ----------------------------------------------------------------
    prompt_template: str = option("", "file whose text replaces the built-in prompt header (Alpaca's prompt.txt)")
    num_prompt_instructions: int = option(3, "seed tasks shown in each prompt")
    system_prompt: str = option("", "optional system message (chat API only; Alpaca had none)")

    # -- sampling (Alpaca's decoding arguments) --------------------------------------------------------------
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling top_p")
    max_tokens: int = option(3072, "completion token budget per request")
    stop: list[str] = option(default_factory=lambda: ["\n20", "20.", "20."],
                             help="stop sequences (Alpaca's; the list ends before task 20)")
    logit_bias: dict = option(default_factory=dict,
                              help="token-id -> bias; Alpaca used {\"50256\": -100} to ban GPT-3's <|endoftext|>, "
                                   "a token id that means something else to current tokenizers")

    # -- parsing filters (Alpaca's post_process_gpt3_response) -------------------------------------------------
    min_instruction_words: int = option(3, "drop instructions of this many words or fewer")
    max_instruction_words: int = option(150, "drop instructions of more words than this")
    blacklist: list[str] = option(default_factory=lambda: list(ALPACA_BLACKLIST),
                                  help="drop instructions containing any of these (whole words, any case)")
    banned_prefixes: list[str] = option(default_factory=lambda: ["Write a program"],
                                        help="drop instructions starting with any of these (case-sensitive)")
    drop_punctuation_start: bool = option(True, "drop instructions starting with punctuation")
    drop_non_ascii_start: bool = option(True, "drop instructions starting with a non-ASCII character")
    similarity_threshold: float = option(0.7, "drop an instruction whose ROUGE-L F against any kept one (seed "
                                              "tasks included) is above this")

    # -- the calls ---------------------------------------------------------------------------------------------
    max_retries: int = option(6, "retries of a request after a 429, 5xx, time-out or dropped connection")
    timeout_s: float = option(300.0, "seconds to wait for one answer before retrying it")
    seed: int | None = option(None, "random seed for sampling the seed tasks of each prompt")
    expected_kept_per_request: float = option(8.0, "first guess of instructions kept per request, to size the "
                                                   "first round of requests (later rounds use the observed rate)")
    max_requests_per_round: int = option(256, "most requests launched in one round before the target is checked")
    max_rounds_without_progress: int = option(3, "stop with an error after this many rounds in a row keep nothing")
    worker_num_cpus: float = option(0.1, "logical CPUs each worker reserves (they mostly wait on the network)")
    price_per_million_tokens: dict = option(default_factory=dict,
                                            help='USD per million tokens, {"input": X, "output": Y}, for a model '
                                                 "missing from the built-in price table")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.output), "output is required (--output DIR)"),
            (self.target is not None or self.reprocess, "target is required (--target N): how many instructions "
                                                         "data.json should hold"),
            (self.target is None or (isinstance(self.target, int) and self.target >= 1),
             f"target must be a whole number >= 1, got {self.target!r}"),
            (not storage.is_remote(self.output), f"output must be a local or shared-filesystem directory (workers "
                                                 f"append to its raw/ journal), got {self.output!r}"),
            (bool(self.teacher_model), "teacher_model is empty"),
            (str(self.teacher_base_url).startswith(("http://", "https://")),
             f"teacher_base_url must start with http:// or https://, got {self.teacher_base_url!r}"),
            (self.api in ("chat", "completions"), f"api must be 'chat' or 'completions', got {self.api!r}"),
            (self.requests_per_minute >= 0 and self.tokens_per_minute >= 0,
             "requests_per_minute and tokens_per_minute must be >= 0 (0 = unlimited)"),
            (self.num_workers >= 1 and self.requests_per_worker >= 1,
             "num_workers and requests_per_worker must be >= 1"),
            (self.num_prompt_instructions >= 1, "num_prompt_instructions must be >= 1"),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.min_instruction_words < self.max_instruction_words,
             "need 0 <= min_instruction_words < max_instruction_words"),
            (0.0 < self.similarity_threshold <= 1.0, "similarity_threshold must be in (0, 1]"),
            (self.max_retries >= 0 and self.timeout_s > 0, "max_retries must be >= 0 and timeout_s > 0"),
            (self.expected_kept_per_request > 0 and self.max_requests_per_round >= 1
             and self.max_rounds_without_progress >= 1,
             "expected_kept_per_request, max_requests_per_round and max_rounds_without_progress must be positive"),
            (self.worker_num_cpus >= 0, "worker_num_cpus must be >= 0"),
            (set(self.price_per_million_tokens) <= {"input", "output"},
             'price_per_million_tokens takes {"input": X, "output": Y}'),
        ])
