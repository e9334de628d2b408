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
    """``alpaca-ray generate``: ask a teacher model for self-instruct data, as Alpaca did, on Ray actors."""

    output: str = option("", "output directory: data.json, data.parquet, stats.json and raw/ (the journal of "
                             "every teacher response); re-running into it resumes")
    target: int | None = option(None, "number of instructions wanted in data.json (required unless --reprocess, "
                                      "where it caps the rebuilt dataset)")
    seed_tasks: str = option(BUNDLED_SEED_TASKS, "seed tasks in self-instruct JSONL (id, name, instruction, "
                                                 "instances: [{input, output}], is_classification): a file or an "
                                                 "https:// URL (fetched once into OUTPUT/sources/, its SHA-256 in "
                                                 "stats.json); default: the 175 bundled tasks")
    teacher_model: str = option("gpt-4o-mini", "teacher model name (Alpaca used text-davinci-003, now retired)")
    teacher_base_url: str = option("https://api.openai.com/v1", "OpenAI-compatible endpoint of the teacher")
    api: Literal["chat", "completions"] = option("chat", "chat (/chat/completions) or completions (/completions, "
                                                         "what Alpaca used)")
    api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the API key (the key "
                                                "itself is never written anywhere)")
    requests_per_minute: float = option(500.0, "request budget shared by all workers (0 = unlimited)")
    tokens_per_minute: float = option(200_000.0, "token budget (prompt + max_tokens) shared by all workers "
                                                 "(0 = unlimited)")
    num_workers: int = option(4, "long-lived Ray actors calling the teacher for the whole run")
    requests_per_worker: int = option(8, "requests each worker keeps in flight at once (async concurrency): "
                                         "num_workers x requests_per_worker are kept in flight until the target")
    resume: bool = option(False, "continue from OUTPUT/raw (re-running into a directory that has saved responses "
                                 "does this anyway; with --resume it is an error if there is nothing to resume)")
    reprocess: bool = option(False, "rebuild data.json, data.parquet and stats.json from OUTPUT/raw alone with the "
                                    "current parsing and filters; makes no API call and needs no key")
    dry_run: bool = option(False, "fetch and check the inputs, then print the plan (sources with their URLs and "
                                  "SHA-256, the first prompt, the request parameters) without calling the teacher")

    # -- the prompt (Alpaca's encode_prompt) ----------------------------------------------------------------
    prompt_template: str = option("", "file or https:// URL whose text replaces the built-in prompt header "
                                      "(Alpaca's prompt.txt; a URL is fetched once into OUTPUT/sources/)")
    num_prompt_instructions: int = option(3, "seed tasks shown in each prompt")
    system_prompt: str = option("", "optional system message (chat API only; Alpaca had none)")

    # -- sampling (Alpaca's decoding arguments) --------------------------------------------------------------
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling top_p")
    max_tokens: int = option(3072, "completion token budget per request")
    stop: list[str] = option(default_factory=lambda: ["\n20", "20.", "20."],
                             help="stop sequences (Alpaca's; the list ends before task 20)")
    logit_bias: dict = option(default_factory=dict,
                              help="token-id -> bias sent with every request (see --ban-end-of-text for Alpaca's)")
    ban_end_of_text: bool = option(False, "ban the teacher tokenizer's end-of-text token (logit_bias -100), as Alpaca "
                                          "did with {\"50256\": -100}, so an answer cannot end before its list does")
    end_of_text_token_id: int | None = option(None, "the token --ban-end-of-text bans; default: <|endoftext|> of the "
                                                    "teacher model's OpenAI tokenizer (50256 GPT-3, 100257 gpt-3.5/"
                                                    "gpt-4, 199999 gpt-4o and later); required for other models")
    shrink_max_tokens: bool = option(False, "when the endpoint rejects a request as longer than the model's context, "
                                            "resend it with max_tokens cut by 20% until it fits (Alpaca's "
                                            "openai_completion) instead of failing it")

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
    max_retry_after_s: float = option(60.0, "longest wait a server's Retry-After may impose; a longer one is cut "
                                            "to this, logged and counted in stats.json")
    timeout_s: float = option(300.0, "seconds to wait for one answer before retrying it")
    seed: int | None = option(None, "random seed for sampling the seed tasks of each prompt (request N of a run "
                                    "and of its resumptions draws from (seed, N); default: drawn once and kept "
                                    "in OUTPUT/raw/requests.json)")
    expected_kept_per_request: float = option(8.0, "first guess of instructions kept per request, until 3 answers "
                                                   "are in (then the observed rate decides when to stop sending)")
    max_answers_without_progress: int = option(20, "stop with an error after this many answers in a row add no "
                                                   "instruction (a teacher ignoring the format)")
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
            (self.max_retry_after_s >= 0, f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}"),
            (self.expected_kept_per_request > 0 and self.max_answers_without_progress >= 1,
             "expected_kept_per_request and max_answers_without_progress must be positive"),
            (not self.ban_end_of_text or self.end_of_text_id() is not None,
             f"ban_end_of_text: the end-of-text token of {self.teacher_model!r} is not known here; give its id "
             "with --end-of-text-token-id"),
            (self.end_of_text_token_id is None or self.end_of_text_token_id >= 0,
             "end_of_text_token_id must be >= 0"),
            (self.worker_num_cpus >= 0, "worker_num_cpus must be >= 0"),
            (set(self.price_per_million_tokens) <= {"input", "output"},
             'price_per_million_tokens takes {"input": X, "output": Y}'),
        ])

    def end_of_text_id(self) -> int | None:
        """The token ``ban_end_of_text`` bans: the configured id, else the teacher tokenizer's <|endoftext|>."""
        if self.end_of_text_token_id is not None:
            return self.end_of_text_token_id
        return end_of_text_token_id(self.teacher_model)


#: <|endoftext|> of OpenAI's tokenizers (tiktoken's encodings), by the model-name prefixes that use each.
END_OF_TEXT_TOKEN_IDS: dict[str, int] = {
    # r50k_base / p50k_base: GPT-3 and Codex (Alpaca's text-davinci-003: {"50256": -100})
    **dict.fromkeys(("text-davinci", "code-davinci", "davinci", "curie", "babbage", "ada", "text-curie",
                     "text-babbage", "text-ada"), 50256),
    # cl100k_base: gpt-3.5, gpt-4 and the GPT-3 replacements
    **dict.fromkeys(("gpt-3.5-turbo", "gpt-4", "gpt-4-turbo", "davinci-002", "babbage-002", "gpt-35-turbo"), 100257),
    # o200k_base: gpt-4o and later
    **dict.fromkeys(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"), 199999),
}


def end_of_text_token_id(model: str) -> int | None:
    """<|endoftext|>'s id for an OpenAI model name (its longest listed prefix), or None when unknown."""
    name = model.split("/")[-1].lower()
    for prefix in sorted(END_OF_TEXT_TOKEN_IDS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "-"):
            return END_OF_TEXT_TOKEN_IDS[prefix]
    return None
