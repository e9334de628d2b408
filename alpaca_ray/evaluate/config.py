"""``EvaluateConfig``: every setting of the evaluate stage, one documented and validated dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from alpaca_ray.cluster import storage
from alpaca_ray.config import option, validate

#: The bundled evaluation set (user-oriented instructions written for this project).
BUNDLED_EVAL_SET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "eval_set.jsonl")


@dataclass
class EvaluateConfig:
    """Blind pairwise comparison of model A with model B, judged by an LLM (and optionally by people).

    The win rate reported is model A's against model B: put the model under test in A and the reference
    (the teacher, a published model's recorded answers) in B.
    """

    output: str = option("", "output directory (answers/, judgments/, report.json, report.md, report.png)")
    eval_set: str = option("", "evaluation set: a JSON/JSONL file (Alpaca, self-instruct, AlpacaEval or recorded-"
                           "answers format) or a Hugging Face datasets name (default: the bundled set of "
                           "user-oriented instructions, alpaca_ray/data/eval_set.jsonl)")
    eval_split: str = option("train", "split to read when --eval-set is a datasets name")
    limit: int | None = option(None, "evaluate only the first N items of the set (smoke runs)")

    model_a: str = option("", "model A's name at its OpenAI-compatible endpoint")
    model_a_base_url: str = option("", "model A's endpoint, e.g. http://127.0.0.1:8000/v1")
    model_a_api_key_env: str = option("", "name of the env var holding model A's API key (none sent if empty)")
    model_a_answers: str = option("", "recorded answers of model A (JSON/JSONL) instead of an endpoint")
    model_a_label: str = option("", "name shown for model A in the report (default: its model name or file)")

    model_b: str = option("", "model B's name at its OpenAI-compatible endpoint")
    model_b_base_url: str = option("", "model B's endpoint")
    model_b_api_key_env: str = option("", "name of the env var holding model B's API key (none sent if empty)")
    model_b_answers: str = option("", "recorded answers of model B (JSON/JSONL), e.g. a retired teacher's outputs")
    model_b_label: str = option("", "name shown for model B in the report (default: its model name or file)")

    answer_api: Literal["chat", "completions"] = option(
        "chat", "how models A and B are asked: 'completions' sends Alpaca's prompt template (for models trained "
        "on it, like ours), 'chat' sends the instruction (and input) as one user message")
    max_tokens: int = option(512, "most tokens per answer")
    temperature: float = option(0.0, "sampling temperature for the answers (0: greedy, repeatable)")

    judge_model: str = option("", "the judge's model name")
    judge_base_url: str = option("https://api.openai.com/v1", "the judge's OpenAI-compatible endpoint")
    judge_api_key_env: str = option("OPENAI_API_KEY", "name of the env var holding the judge's API key")
    judge_api: Literal["chat", "completions"] = option("chat", "API the judge is asked through")
    judge_template: str = option("", "file with a replacement judge prompt; it must contain {instruction}, {input}, "
                                 "{output_1} and {output_2} and ask for 'Winner: 1', 'Winner: 2' or 'Winner: tie'")
    judge_max_tokens: int = option(256, "most tokens per judge answer (verdict mode; logprobs mode asks for one)")
    judge_mode: Literal["verdict", "logprobs"] = option(
        "verdict", "how the judge answers: 'verdict' (it writes 'Winner: 1|2|tie'; a preference counts when it holds "
        "in both orders) or 'logprobs' (AlpacaEval 2's protocol: one token, m or M, and the preference is read from "
        "the two tokens' probabilities in the returned top_logprobs; the endpoint must return logprobs)")
    max_unparseable: float = option(0.1, "stop with the raw judge answers when more than this share of pairs got a "
                                    "judge answer naming no winner (instead of reporting them as ties)")

    annotations: str = option("", "an AlpacaEval annotations.json: build the whole report from its preferences "
                              "(model A = generator_2, model B = generator_1) without asking any model or judge")
    instruction_difficulty: str = option("", "AlpacaEval's instruction_difficulty.csv (index, instruction_difficulty) "
                                         "for the length-controlled win rate; without it a documented stand-in "
                                         "is used (model B's answer length) and the report says so")
    lc_gamed_annotations: str = option("", "AlpacaEval's df_gamed.csv (the baseline's verbose and concise answers, "
                                       "featurised): fitted beside the model's at weight 0.1 each, AlpacaEval's "
                                       "regularisation of the length-controlled win rate towards its baseline")
    lc_bootstrap_samples: int = option(200, "bootstrap resamples (each a refit) for the length-controlled win "
                                       "rate's 95 percent interval")

    requests_per_minute: int = option(600, "request budget per endpoint, shared by all workers")
    tokens_per_minute: int = option(1_000_000, "token budget per endpoint, shared by all workers")
    max_concurrency: int = option(8, "requests in flight at once per worker and endpoint")
    max_retries: int = option(6, "retries of a request after 429/5xx/time-outs")
    timeout_s: float = option(120.0, "seconds before one request times out")
    num_workers: int = option(2, "Ray Data workers calling the endpoints")

    bootstrap_samples: int = option(2000, "bootstrap resamples for the 95 percent confidence intervals")
    seed: int = option(0, "seed for the bootstrap and for the order pairs are shown to raters")

    human: bool = option(False, "serve the blind human rating page (Ray Serve) instead of judging with an LLM; "
                         "the next report includes the ratings")
    human_db: str = option("", "SQLite file of human ratings (default: OUTPUT/human_ratings.sqlite)")
    host: str = option("127.0.0.1", "host of the rating page (when Serve is not already running)")
    port: int = option(8000, "port of the rating page (when Serve is not already running)")
    app_name: str = option("alpaca-ray-evaluate", "Ray Serve application name of the rating page")
    route_prefix: str = option("/", "route prefix of the rating page")
    blocking: bool = option(True, "with --human: stay in the foreground until Ctrl-C, then shut the page down and "
                            "write the report; --no-blocking deploys, prints the URL and exits")

    def __post_init__(self) -> None:
        checks = [
            (bool(self.output), "output: an output directory is required (--output DIR)"),
            # Answers are journaled with append + fsync, which object stores do not offer.
            (not storage.is_remote(self.output), "output: must be a local or shared filesystem path "
             f"(got {self.output!r}); s3:// and gs:// are not supported for the answer journals"),
        ]
        if self.annotations:
            given = [f for f in ("model_a", "model_a_base_url", "model_a_answers", "model_b", "model_b_base_url",
                                 "model_b_answers") if getattr(self, f)]
            checks += [
                (os.path.exists(self.annotations), f"annotations: no such file {self.annotations!r}"),
                (not given, f"annotations: the file holds both models' answers; drop {', '.join(given)}"),
                (not self.human, "annotations: --human rates pairs of an evaluation set, not an annotations file"),
            ]
        else:
            for side in ("a", "b"):
                name, url, answers = (getattr(self, f"model_{side}{s}") for s in ("", "_base_url", "_answers"))
                flag = f"--model-{side}"
                checks += [
                    (bool(answers) != bool(name or url),
                     f"model_{side}: give either {flag} NAME with {flag}-base-url URL, or {flag}-answers FILE"
                     + (" (not both)" if answers and (name or url) else "")),
                    (bool(name) == bool(url) or bool(answers),
                     f"model_{side}: {flag} and {flag}-base-url go together"),
                ]
            if not self.human:
                checks.append((bool(self.judge_model), "judge_model: a judge is required (--judge-model NAME)"))
        checks += [
            (self.limit is None or self.limit > 0, "limit: must be positive"),
            (self.max_tokens > 0 and self.judge_max_tokens > 0, "max_tokens/judge_max_tokens: must be positive"),
            (self.requests_per_minute > 0 and self.tokens_per_minute > 0, "requests/tokens_per_minute: must be positive"),
            (self.max_concurrency > 0 and self.num_workers > 0, "max_concurrency/num_workers: must be positive"),
            (self.max_retries >= 0 and self.timeout_s > 0, "max_retries must be >= 0 and timeout_s positive"),
            (self.bootstrap_samples >= 100, "bootstrap_samples: use at least 100"),
            (0 < self.port < 65536, "port: must be in 1..65535"),
            (self.route_prefix.startswith("/"), "route_prefix: must start with '/'"),
            (not self.judge_template or os.path.exists(self.judge_template),
             f"judge_template: no such file {self.judge_template!r}"),
            (0.0 <= self.max_unparseable <= 1.0, "max_unparseable: a share of the pairs, in 0..1"),
            (self.lc_bootstrap_samples >= 0, "lc_bootstrap_samples: must be >= 0"),
            (not self.instruction_difficulty or os.path.exists(self.instruction_difficulty),
             f"instruction_difficulty: no such file {self.instruction_difficulty!r}"),
            (not self.lc_gamed_annotations or os.path.exists(self.lc_gamed_annotations),
             f"lc_gamed_annotations: no such file {self.lc_gamed_annotations!r}"),
        ]
        validate(self, checks)

    @property
    def eval_set_path(self) -> str:
        """The set to read: ``eval_set``, or the bundled one (resolved here, so jobs on other machines find it)."""
        return self.eval_set or BUNDLED_EVAL_SET

    @property
    def human_db_path(self) -> str:
        return self.human_db or os.path.join(self.output, "human_ratings.sqlite")

    def label(self, side: str) -> str:
        """The name of model ``side`` ("a" or "b") in reports."""
        explicit = getattr(self, f"model_{side}_label")
        if explicit:
            return explicit
        name = getattr(self, f"model_{side}")
        return name or os.path.basename(getattr(self, f"model_{side}_answers"))
