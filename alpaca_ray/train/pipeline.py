"""The Ray part of the train stage: Ray Data tokenizes, ``TorchTrainer`` runs ``train_loop_per_worker``.

Everything a user can get wrong (data, model path, batch sizes, a stale run) is checked here, on the
driver, before any worker starts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace

from alpaca_ray.cluster import storage
from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.config import UserError, config_to_dict
from alpaca_ray.hub import check_model_exists
from alpaca_ray.records import AlpacaRecord, ChatRecord, load_records, training_record_from_dict
from alpaca_ray.train.config import TrainConfig

RUN_NAME = "train"
#: Fields that decide the data order and schedule: a resumed run must keep them.
PLAN_FIELDS = ("base_model", "data", "epochs", "global_batch_size", "max_length", "packing", "seed",
               "eval_fraction", "eval_max_examples", "lr", "warmup_ratio",
               # what the checkpoint holds: full weights, or adapters of this shape on these modules
               "lora", "qlora", "lora_rank", "lora_target_modules", "prompt_format", "chat_template")


@dataclass
class DataReport:
    """What tokenization found, shown before training starts."""

    examples: int
    truncated: int
    dropped: int
    train: int
    eval: int
    packing: bool
    packing_note: str = ""
    mean_length: float = 0.0
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name_or_path: str, chat_template: str = ""):
    from alpaca_ray.train.model import load_tokenizer

    return load_tokenizer(name_or_path, chat_template=chat_template)


def tokenize_batch(batch: dict, base_model: str, max_length: int, prompt_format: str, eos_ids: list[int],
                   chat_template: str = "") -> dict:
    """Ray Data ``map_batches`` function: records -> token ids, loss mask, prompt length, truncation flag.

    A row is a conversation when its ``messages`` (JSON text) is not empty, else an Alpaca record, rendered
    in Alpaca's template or, with ``prompt_format="chat"``, as a two-turn chat in the model's template.
    """
    import numpy as np

    from alpaca_ray.prompts import alpaca_to_messages
    from alpaca_ray.train.data import tokenize_chat, tokenize_record

    tokenizer = _cached_tokenizer(base_model, chat_template)
    rows = []
    for messages, i, x, o in zip(batch["messages"], batch["instruction"], batch["input"], batch["output"]):
        if messages or prompt_format == "chat":
            turns = json.loads(messages) if messages else alpaca_to_messages(i, x, o)
            rows.append(tokenize_chat(tokenizer, turns, max_length, eos_ids))
        else:
            rows.append(tokenize_record(tokenizer, i, x, o, max_length))

    def ragged(key: str, dtype) -> np.ndarray:
        column = np.empty(len(rows), dtype=object)
        column[:] = [np.asarray(r[key], dtype=dtype) for r in rows]
        return column

    return {"id": batch["id"], "input_ids": ragged("input_ids", np.int32), "loss_mask": ragged("loss_mask", np.int8),
            "prompt_len": np.array([r["prompt_len"] for r in rows], dtype=np.int32),
            "length": np.array([len(r["input_ids"]) for r in rows], dtype=np.int32),
            "num_labels": np.array([r["num_labels"] for r in rows], dtype=np.int32),
            "truncated": np.array([r["truncated"] for r in rows], dtype=bool)}


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute local paths, since workers do not share the driver's working directory."""
    def absolute(path: str) -> str:
        return path if storage.is_remote(path) or not os.path.exists(path) else os.path.abspath(path)

    output = cfg.output if storage.is_remote(cfg.output) else os.path.abspath(cfg.output)
    storage_path = cfg.storage_path or storage.join(output, "ray_results")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    return replace(cfg, base_model=absolute(cfg.base_model), data=absolute(cfg.data), output=output,
                   storage_path=storage_path)


@dataclass
class ModelInfo:
    """What the driver learns of the base model before any worker starts."""

    base_dtype: str
    supports_packing: bool
    has_chat_template: bool
    eos_ids: list[int]


def read_chat_template(cfg: TrainConfig) -> str:
    """The ``--chat-template`` file's text ('' when none is given); read on the driver, so workers on other
    nodes need not see the file."""
    if not cfg.chat_template:
        return ""
    if not storage.exists(cfg.chat_template):
        raise UserError(f"--chat-template {cfg.chat_template}: no such file")
    text = storage.read_text(cfg.chat_template)
    if not text.strip():
        raise UserError(f"--chat-template {cfg.chat_template}: the file is empty")
    return text


def inspect_model(cfg: TrainConfig, chat_template: str = "") -> ModelInfo:
    """The base model's dtype, packing support, chat template and EOS ids, without loading its weights."""
    check_model_exists(cfg.base_model, "--base-model")  # a missing path or an unreachable hub: one line
    import torch
    from transformers import AutoConfig

    from alpaca_ray.train.model import default_lora_targets, eos_token_ids, load_tokenizer, supports_packing

    try:
        model_config = AutoConfig.from_pretrained(cfg.base_model)
        tokenizer = load_tokenizer(cfg.base_model, chat_template=chat_template)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load base model {cfg.base_model!r}: {err}") from None
    if cfg.lora and not cfg.lora_target_modules and not default_lora_targets(model_config.model_type):
        raise UserError(f"{cfg.base_model}: PEFT has no default LoRA targets for model type "
                        f"{model_config.model_type!r}: name them with --lora-target-modules (or all-linear)")
    dtype = getattr(model_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    eos_ids = eos_token_ids(cfg.base_model, tokenizer)
    if tokenizer.chat_template:
        check_chat_template(cfg, tokenizer, eos_ids)
    return ModelInfo(str(dtype).removeprefix("torch."), supports_packing(model_config),
                     bool(tokenizer.chat_template), eos_ids)


def check_chat_template(cfg: TrainConfig, tokenizer, eos_ids: list[int]) -> None:
    """A template to train in must mark where assistant turns start and end each with an EOS token, or
    the model never learns to stop; checked on a probe conversation, before any worker starts."""
    from alpaca_ray.train.data import ChatTemplateError, assistant_spans, end_of_turn_strings

    probe = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
             {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hi again!"}]
    source = cfg.chat_template or f"{cfg.base_model}'s chat template"
    try:
        text, spans = assistant_spans(tokenizer, probe, eos_ids)
    except ChatTemplateError as err:
        raise UserError(f"{source}: {err}") from None
    except Exception as err:  # a Jinja error in the template itself
        raise UserError(f"{source} cannot render a conversation: {err}") from None
    ends = end_of_turn_strings(tokenizer, eos_ids)
    if not all(any(text[:end].endswith(e) for e in ends) for _, end in spans):
        raise UserError(f"{source} does not end an assistant turn with an EOS token ({', '.join(ends)}): a model "
                        "trained in it would never stop; use --chat-template FILE with one that does, or "
                        "--prompt-format alpaca")


def resolve_prompt_format(cfg: TrainConfig, info: ModelInfo, records: list) -> str:
    """``alpaca`` or ``chat``: the one asked for, or (``auto``) chat when the data holds conversations or the
    tokenizer has a chat template (an instruct model), else Alpaca's template (a base model)."""
    has_chats = any(isinstance(r, ChatRecord) for r in records)
    wanted = cfg.prompt_format
    if wanted == "auto":
        wanted = "chat" if has_chats or info.has_chat_template else "alpaca"
    if wanted == "chat" and not info.has_chat_template:
        what = "the data holds conversations, which are trained in a chat template, but " if has_chats else ""
        raise UserError(f"{what}{cfg.base_model} has no chat template: give one with --chat-template FILE (a Jinja "
                        "template that ends each assistant turn with the EOS token)"
                        + ("" if has_chats else ", or use --prompt-format alpaca"))
    if wanted == "alpaca" and has_chats:
        first = next(i for i, r in enumerate(records) if isinstance(r, ChatRecord))
        raise UserError(f"{cfg.data}: record {first + 1} is a conversation, and conversations are trained in the "
                        "model's chat template: drop --prompt-format alpaca")
    return wanted


def check_run_dir(cfg: TrainConfig) -> bool:
    """True when there is a checkpoint to resume; refuse to silently overwrite one without ``--resume``."""
    run_dir = storage.join(cfg.storage_path, RUN_NAME)
    has_checkpoint = storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    saved_config_path = storage.join(cfg.output, "train_config.json")
    if has_checkpoint and not cfg.resume:
        raise UserError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                        "or choose another --output")
    if has_checkpoint and storage.exists(saved_config_path):
        saved = json.loads(storage.read_text(saved_config_path))
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in PLAN_FIELDS
                   if k in saved and saved[k] != config_to_dict(cfg)[k]]
        if changed:
            raise UserError("cannot resume with a different data order or schedule; changed: " + "; ".join(changed))
    if not has_checkpoint and storage.exists(run_dir):
        storage.remove(run_dir)  # a run that died before its first checkpoint: nothing to keep
    if cfg.resume and not has_checkpoint:
        print(f"--resume: no checkpoint under {run_dir}; starting from step 0", file=sys.stderr)
    return has_checkpoint


def read_dataset(cfg: TrainConfig) -> list[AlpacaRecord | ChatRecord]:
    """Every record, Alpaca or conversation, validated (errors name the file, line and field); an empty set
    is an error."""
    records = load_records(cfg.data, parse=training_record_from_dict)
    if not records:
        raise UserError(f"{cfg.data}: the dataset is empty: no records to train on")
    return records


def record_row(index: int, record: AlpacaRecord | ChatRecord) -> dict:
    """One row for Ray Data: a conversation travels as JSON text (one column type for every row)."""
    if isinstance(record, ChatRecord):
        return {"id": index, "messages": json.dumps(list(record.messages)), "instruction": "", "input": "",
                "output": ""}
    return {"id": index, "messages": "", **record.to_dict(with_extra=False)}


def prepare_data(cfg: TrainConfig, records: list, info: ModelInfo, prompt_format: str, chat_template: str = ""):
    """Tokenize records with Ray Data, count truncations, drop (and count) examples with no response
    token left, and split train/eval."""
    import ray

    from alpaca_ray.train.data import split_train_eval

    supports_packing = info.supports_packing
    rows = [record_row(i, r) for i, r in enumerate(records)]
    dataset = ray.data.from_items(rows).map_batches(
        tokenize_batch, fn_kwargs={"base_model": cfg.base_model, "max_length": cfg.max_length,
                                   "prompt_format": prompt_format, "eos_ids": info.eos_ids,
                                   "chat_template": chat_template},
        batch_size=512).materialize()
    stats = dataset.select_columns(["id", "length", "num_labels", "truncated"]).take_all()
    stats.sort(key=lambda r: r["id"])
    kept = [int(r["id"]) for r in stats if r["num_labels"] > 0]
    if not kept:
        raise UserError(f"{cfg.data}: no example has a response token within max_length={cfg.max_length}")
    train_pos, eval_pos = split_train_eval(len(kept), cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    train_ids, eval_ids = {kept[p] for p in train_pos}, {kept[p] for p in eval_pos}
    packing = cfg.packing and supports_packing
    report = DataReport(
        examples=len(records), truncated=sum(bool(r["truncated"]) for r in stats), dropped=len(records) - len(kept),
        train=len(train_ids), eval=len(eval_ids), packing=packing,
        packing_note="" if packing == cfg.packing else "the model cannot take packed sequences: "
                                                       "length-grouped padded batches instead",
        mean_length=sum(int(r["length"]) for r in stats) / len(stats))
    # Materialized here, so workers only read blocks: a lazy filter would need CPUs the workers hold.
    train_ds = dataset.filter(lambda row: row["id"] in train_ids).materialize()
    eval_ds = dataset.filter(lambda row: row["id"] in eval_ids).materialize() if eval_ids else None
    for split in (train_ds, eval_ds):
        if split is not None and not cfg.verbose:
            # Each worker's read of a split runs under the split's own DataContext (copied from the driver's):
            # its progress bar would be redrawn on the driver under every later log line of the run.
            split.context.enable_progress_bars = False
    return train_ds, eval_ds, report


def throughput_summary(metrics_path: str) -> dict:
    """Whole-run real-token share (real / computed tokens) and real tokens/s from ``metrics.jsonl``."""
    if not storage.exists(metrics_path):
        return {}
    from alpaca_ray.train.loop import parse_metrics

    steps = [r for r in parse_metrics(storage.read_text(metrics_path)) if "loss" in r]
    if not steps:
        return {}
    real, computed = sum(r["real_tokens"] for r in steps), sum(r["computed_tokens"] for r in steps)
    return {"steps": len(steps), "real_token_share": real / computed,
            "tokens_per_s": real / sum(r["time_s"] for r in steps)}


@contextlib.contextmanager
def ray_data_quiet(quiet: bool):
    """Ray Data's INFO lines (about ten for each of the four small datasets tokenizing makes) kept out of
    the log unless ``--verbose``."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def scaling_config(cfg: TrainConfig):
    """Ray Train's ``ScalingConfig``: how many workers, what each holds, and how they spread over nodes."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker},
                         placement_strategy=cfg.placement_strategy)


def run_train(cfg: TrainConfig) -> dict:
    """Fine-tune ``cfg.base_model`` on ``cfg.data``; returns a summary (paths, counts, last metrics)."""
    cfg = resolve_paths(cfg)
    chat_template = read_chat_template(cfg)
    info = inspect_model(cfg, chat_template)
    records = read_dataset(cfg)
    prompt_format = resolve_prompt_format(cfg, info, records)
    has_checkpoint = check_run_dir(cfg)
    # Ray Train only now: bad input above is refused without the seconds its import takes.
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from alpaca_ray.train.loop import train_loop_per_worker
    from alpaca_ray.train.model import choose_attention

    # A new local cluster gets enough logical CPUs for the workers plus Ray Data, even on a small machine.
    ensure_ray(local_num_cpus=max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker + 2))
    # On a cluster: every node sees the root the checkpoints, metrics and final/ go to (and has HF_TOKEN
    # where the ranks download a gated model) before any GPU is spent.
    node_check = preflight_stage("train", cfg.output, config_to_dict(cfg),
                                 say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"tokenizing {len(records)} records with Ray Data...", file=sys.stderr, flush=True)
    with ray_data_quiet(not cfg.verbose):
        train_ds, eval_ds, report = prepare_data(cfg, records, info, prompt_format, chat_template)
    print(f"prompt format: {prompt_format}"
          + (f" ({'--chat-template ' + cfg.chat_template if cfg.chat_template else 'the model chat template'}, "
             "loss on assistant turns)" if prompt_format == "chat" else " (Alpaca's template, loss on the response)"),
          file=sys.stderr)
    print(f"data: {report.examples} examples, {report.train} train / {report.eval} eval, "
          f"{report.truncated} truncated to max_length={cfg.max_length}, {report.dropped} dropped "
          f"(prompt alone fills max_length), mean length {report.mean_length:.0f} tokens; "
          f"{'packing' if report.packing else 'length-grouped batches'}", file=sys.stderr)
    if report.packing_note:
        print(f"warning: {report.packing_note}", file=sys.stderr)
    if report.truncated:
        print(f"warning: {report.truncated} example(s) longer than max_length={cfg.max_length} were truncated",
              file=sys.stderr)

    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "train_config.json"), json.dumps(config_to_dict(cfg), indent=2))
    loop_config = {"train_config": config_to_dict(cfg), "packing": report.packing, "base_dtype": info.base_dtype,
                   "prompt_format": prompt_format, "chat_template": chat_template,
                   "attn_implementation": choose_attention(cfg.attn_implementation, cfg.use_gpu),
                   "has_eval": eval_ds is not None, "node_check": node_check}
    datasets = {"train": train_ds, **({"eval": eval_ds} if eval_ds is not None else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(storage_path=cfg.storage_path, name=RUN_NAME,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets=datasets,
        # Every worker reads the whole (small, tokenized) set and takes its part of a global plan:
        # the data order then does not depend on how Ray Data streamed the rows, which resume relies on.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    finally:
        finish(node_check)
    if result.error:
        raise result.error
    metrics_path = storage.join(cfg.output, "metrics.jsonl")
    summary = {**throughput_summary(metrics_path), "output": cfg.output, "final": storage.join(cfg.output, "final"),
               "metrics": metrics_path, "resumed": has_checkpoint, "data": vars(report),
               "last_metrics": result.metrics,
               **({"merged": storage.join(cfg.output, "merged")} if cfg.merge else {})}
    storage.write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2, default=str))
    if "real_token_share" in summary:
        print(f"trained {summary['steps']} steps: {summary['tokens_per_s']:.0f} real tokens/s, "
              f"real-token share {summary['real_token_share']:.1%} "
              f"({'packing' if report.packing else 'length-grouped padding'})", file=sys.stderr)
    return summary
