"""The training loop that runs on every Ray Train worker: plan, model, step, eval, checkpoint, export.

nanoGPT-plain on purpose: one function reads top to bottom, and one optimizer step fits on a screen.
"""

from __future__ import annotations

import io
import json
import time

from alpaca_ray.cluster import storage
from alpaca_ray.train.config import TrainConfig
from alpaca_ray.train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    cosine_lr,
    epoch_units,
    make_plan,
    split_global_batch,
)


def read_examples(shard) -> dict[int, Example]:
    """All rows of a Ray Data shard, keyed by id (every worker sees the whole tokenized set)."""
    if shard is None:
        return {}
    return {int(row["id"]): Example(int(row["id"]), tuple(int(t) for t in row["input_ids"]), int(row["prompt_len"]),
                                    tuple(int(m) for m in row["loss_mask"]))
            for row in shard.iter_rows()}


def token_loss_sum(model, batch: dict, device, flatten_packed: bool):
    """Summed cross-entropy over the label tokens of one micro-batch (float32 logits for a stable loss)."""
    import torch.nn.functional as F

    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"].to(device)
    if flatten_packed and "position_ids" in inputs:
        # flash-attention's varlen path reads example boundaries from position_ids of a single row.
        inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
        labels = labels.reshape(1, -1)
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def batch_token_counts(micro_batches, examples: dict[int, Example], packed: bool) -> tuple[int, int, int]:
    """(real, computed, label) tokens of a whole global batch, known on every rank without communication."""
    real = computed = labels = 0
    for per_worker in micro_batches:
        for units in per_worker:
            rows = [sum(len(examples[i]) for i in unit) for unit in units] or [0]
            real += sum(rows)
            computed += max(1, len(rows)) * max(1, max(rows))
            labels += sum(examples[i].num_labels for unit in units for i in unit)
    return real, computed, labels


def parse_metrics(text: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` text, one JSON object a line."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def truncate_metrics(path: str, start_step: int) -> None:
    """On resume, drop records of steps the resumed run will redo, so each step appears once."""
    if not storage.exists(path):
        return
    kept = [r for r in parse_metrics(storage.read_text(path)) if r.get("step", 0) <= start_step]
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss(records: list[dict], png_path: str) -> None:
    """Train and eval loss against step, as a PNG written to ``png_path`` (a path or a URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()  # rendered in memory, then written through storage: the root may be an object store
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(png_path, image.getvalue())


def evaluate(model, eval_examples: dict[int, Example], cfg: TrainConfig, micro: int, pad_id: int, packed: bool,
             rank: int, world: int, device, flatten: bool) -> float:
    """Mean loss per response token over the held-out set; every rank runs the same number of passes."""
    import torch
    import torch.distributed as dist

    units = epoch_units(list(eval_examples), {i: len(e) for i, e in eval_examples.items()}, 0, cfg.seed,
                        cfg.max_length, packed)
    chunks = [units[k:k + micro] for k in range(0, len(units), micro)]
    passes = -(-len(chunks) // world)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for p in range(passes):
            k = p * world + rank
            chunk = chunks[k] if k < len(chunks) else []
            batch = collate([[eval_examples[i] for i in unit] for unit in chunk], pad_id, packed)
            totals[0] += token_loss_sum(model, batch, device, flatten).double()
            totals[1] += batch["num_labels"]
    model.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def prepare_model(cfg: TrainConfig, attn: str, device, world: int, chat_template: str = ""):
    """(sharded model in train mode, tokenizer) on this rank: the same on every rank, from the seed."""
    import torch

    from alpaca_ray.train.model import build_model, shard_model

    torch.manual_seed(cfg.seed)  # new embedding rows and adapter initialisation are identical on every rank
    model, tokenizer = build_model(cfg, attn, device, chat_template)
    model = shard_model(model, "cuda" if cfg.use_gpu else "cpu", world, cfg.dtype, cfg.cpu_offload,
                        cfg.activation_checkpointing, quantized_base=cfg.qlora)
    model.train()
    return model, tokenizer


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters only: with LoRA its state holds the adapters' moments, no more."""
    import torch

    from alpaca_ray.train.model import trainable_parameters

    return torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


def peak_memory_gb(device) -> float:
    """This process's peak memory so far: GPU memory allocated on a GPU, else the resident set (RSS)."""
    import resource
    import sys

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step (dropout, e.g. LoRA's): a function of the step, so a resumed run
    draws the same masks as an uninterrupted one."""
    return (seed * 1_000_003 + step) * 4099 + rank


def train_step(model, optimizer, local_batches: list[dict], label_tokens: int, world: int, device, flatten: bool,
               max_grad_norm: float, seed: int | None = None):
    """One optimizer step over this rank's micro-batches; returns (this rank's loss sum, global grad norm).

    The loss is a mean over the global batch's label tokens (``label_tokens``, all ranks together);
    FSDP averages gradients over ranks, hence the ``x world``.
    """
    import torch

    from alpaca_ray.train.model import set_gradient_sync, trainable_parameters

    if seed is not None:
        torch.manual_seed(seed)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for a, batch in enumerate(local_batches):
        set_gradient_sync(model, a == len(local_batches) - 1)  # reduce-scatter once per step
        loss = token_loss_sum(model, batch, device, flatten)
        (loss * world / max(1, label_tokens)).backward()
        loss_sum += loss.detach().double()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def export(model, tokenizer, cfg: TrainConfig, output: str, base_dtype, metadata: dict, rank: int) -> None:
    """``OUTPUT/final``: the full model, or with LoRA the adapter directory (plus ``OUTPUT/merged`` with
    ``--merge``). A collective: every rank calls it."""
    from alpaca_ray.train.checkpoint import export_adapter, export_final

    final = storage.join(output, "final")
    if cfg.lora:
        export_adapter(model, tokenizer, final, metadata, rank, cfg.base_model, base_dtype,
                       merged_dir=storage.join(output, "merged") if cfg.merge else None)
    else:
        export_final(model, tokenizer, final, base_dtype, metadata, rank)


def step_line(record: dict, last_step: int, started: float, first_step: int) -> str:
    """The one line printed for a logged step: where the run is, its loss, speed and time left."""
    done = record["step"] - first_step
    left = (time.perf_counter() - started) / max(1, done) * (last_step - record["step"])
    return (f"step {record['step']}/{last_step} (epoch {record['epoch']}): loss {record['loss']:.4f}, "
            f"lr {record['lr']:.2e}, grad norm {record['grad_norm']:.2f}, {record['tokens_per_s']:.0f} tokens/s, "
            f"{left / 60:.1f} min left")


def quiet_worker_logs() -> None:
    """One line per logged step is the training log. Ray Data's execution lines and progress bars, Ray
    Train's line for every report and checkpoint, and the weight-loading/saving bars of transformers and
    the hub would bury it (each printed by both workers), so only warnings are kept (``--verbose`` keeps
    all). ``print`` still shows: Ray Train's patched print writes to the worker's stdout as well as to the
    root logger, which this quiets."""
    import logging

    import huggingface_hub.utils
    import ray.data
    import transformers

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function; ``loop_config`` carries the config and what the driver resolved."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from alpaca_ray.train.checkpoint import restore, save_and_report

    if loop_config.get("node_check") is not None:  # a node started after the preflight: check it first
        loop_config["node_check"].verify()
    cfg = TrainConfig(**loop_config["train_config"])
    packed, attn = loop_config["packing"], loop_config["attn_implementation"]
    flatten = packed and attn.startswith("flash")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.use_gpu:
        torch.cuda.set_device(device)  # FSDP2's mesh and NCCL use the current device
    micro, accumulation = cfg.derived_micro_batch_size, cfg.grad_accumulation

    # Data: the same plan on every rank (see data.py), so resuming replays the same order.
    if not cfg.verbose:
        quiet_worker_logs()
    examples = read_examples(ray.train.get_dataset_shard("train"))
    eval_examples = read_examples(ray.train.get_dataset_shard("eval")) if loop_config["has_eval"] else {}
    lengths = {i: len(e) for i, e in examples.items()}
    plan = make_plan(list(examples), lengths, cfg.epochs, cfg.seed, cfg.max_length, packed, cfg.global_batch_size)
    epoch_ends = {sum(plan.steps_per_epoch[:e + 1]) for e in range(cfg.epochs)}
    last_step = min(plan.total_steps, cfg.max_steps or plan.total_steps)

    # Model: full fp32 weights on every rank, then sharded; bf16 compute, fp32 master weights and reduction.
    # LoRA: the frozen base in the compute dtype (4-bit with QLoRA) plus adapters, which alone are trained.
    model, tokenizer = prepare_model(cfg, attn, device, world, loop_config.get("chat_template", ""))
    optimizer = make_optimizer(model, cfg)
    state = restore(model, optimizer, adapters_only=cfg.lora)
    start_step = state["step"] if state else 0

    # Rank 0 writes every file of the run to the storage root (a shared path or an object store): its node
    # may be gone when anyone reads them.
    output = cfg.output
    metrics: storage.AppendLog | None = None
    if rank == 0:
        storage.makedirs(output)
        metrics_path = storage.join(output, "metrics.jsonl")
        truncate_metrics(metrics_path, start_step)
        metrics = storage.AppendLog(metrics_path)
        if state:
            print(f"resumed from checkpoint at step {start_step}/{plan.total_steps}", flush=True)
    pad_id = tokenizer.pad_token_id

    def log_eval(step: int, epoch: int) -> float:
        eval_loss = evaluate(model, eval_examples, cfg, micro, pad_id, packed, rank, world, device, flatten)
        if metrics is not None:
            metrics.append(json.dumps({"step": step, "epoch": epoch, "eval_loss": eval_loss}) + "\n")
            print(f"step {step}/{last_step} (epoch {epoch}): eval loss {eval_loss:.4f}", flush=True)
        return eval_loss

    if eval_examples and start_step == 0:
        log_eval(0, 0)  # before any update: the baseline the fall is measured from
    run_started = time.perf_counter()

    for step in range(start_step, last_step):
        epoch, units = plan.batch(step)
        micro_batches = split_global_batch(units, lengths, world, micro, accumulation)
        real, computed, label_tokens = batch_token_counts(micro_batches, examples, packed)
        lr = cosine_lr(step, plan.total_steps, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        local_batches = [collate([[examples[i] for i in unit] for unit in per_worker[rank]], pad_id, packed)
                         for per_worker in micro_batches]
        loss_sum, grad_norm = train_step(model, optimizer, local_batches, label_tokens, world, device, flatten,
                                         cfg.max_grad_norm, seed=step_seed(cfg.seed, step, rank))
        dist.all_reduce(loss_sum)
        elapsed = time.perf_counter() - started
        peak = torch.tensor(peak_memory_gb(device), dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record = {"step": step + 1, "epoch": epoch, "loss": float(loss_sum) / max(1, label_tokens), "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": real / elapsed,
                  "real_token_share": real / computed, "real_tokens": real, "computed_tokens": computed,
                  "time_s": elapsed, "peak_memory_gb": float(peak)}
        done = step + 1 == last_step
        if metrics is not None and ((step + 1) % cfg.log_every == 0 or done):
            metrics.append(json.dumps(record) + "\n")
            print(step_line(record, last_step, run_started, start_step), flush=True)

        if eval_examples and (step + 1 in epoch_ends or done):
            record["eval_loss"] = log_eval(step + 1, epoch)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in epoch_ends or done:
            if metrics is not None:
                # Before the checkpoint exists: a run resumed from it then finds every record up to it.
                metrics.flush()
            save_and_report(model, optimizer, {"step": step + 1, "epoch": epoch}, record, rank,
                            adapters_only=cfg.lora)
            if metrics is not None:
                plot_loss(parse_metrics(metrics.text()), storage.join(output, "loss.png"))
                print(f"step {step + 1}/{last_step}: checkpoint saved", flush=True)

    metadata = {"prompt_template": loop_config.get("prompt_format", "alpaca"), "base_model": cfg.base_model,
                "train_config": loop_config["train_config"], "steps": last_step,
                "total_steps": plan.total_steps, "packing": packed,
                "finetuning": "qlora" if cfg.qlora else "lora" if cfg.lora else "full"}
    export(model, tokenizer, cfg, output, getattr(torch, loop_config["base_dtype"]), metadata, rank)
    if metrics is not None:
        print(f"exported {storage.join(output, 'final')}", flush=True)
        metrics.flush()
        plot_loss(parse_metrics(metrics.text()), storage.join(output, "loss.png"))
    dist.barrier()
