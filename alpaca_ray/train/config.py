"""The train stage's config: Stanford Alpaca's recipe as defaults, every choice a documented field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from alpaca_ray.config import option, validate

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD"]
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)

#: Alpaca trained with a per-device batch of 4 (4 GPUs x 4 x 8 accumulation steps = 128).
DEFAULT_MAX_MICRO_BATCH = 4


@dataclass
class TrainConfig:
    """Supervised fine-tuning of a causal LM on Alpaca-format data with FSDP2 on Ray Train."""

    base_model: str = option("", "base model: a Hugging Face hub name or a local directory (required)")
    data: str = option("", "training data: a JSON/JSONL/Parquet file or a `datasets` hub name (required) of Alpaca "
                           "records (instruction/input/output) or conversations (OpenAI `messages` or ShareGPT "
                           "`conversations`)")
    prompt_format: Literal["auto", "alpaca", "chat"] = option(
        "auto", "how examples are rendered: chat (the base model's chat template, loss on every assistant turn), "
                "alpaca (Stanford's template, loss on the response); auto: chat when the tokenizer has a chat "
                "template or the data holds conversations, else alpaca. Saved in final/ for serve")
    chat_template: str = option(
        "", "a Jinja chat template file to use instead of the tokenizer's own (it must end each assistant turn "
            "with the EOS token); saved with final/")
    output: str = option("", "output directory or object-store URI (s3://, gs://): final/, metrics.jsonl, "
                             "loss.png, checkpoints; on a cluster, a root every node reaches (required)")
    num_workers: int = option(2, "Ray Train workers (one per GPU with --use-gpu)")
    use_gpu: bool = option(False, "train on GPUs (NCCL) instead of CPUs (gloo)")
    epochs: int = option(3, "passes over the training data")
    lr: float = option(2e-5, "peak learning rate (AdamW, cosine decay after warmup)")
    global_batch_size: int = option(
        128, "sequences per optimizer step over all workers (= micro x accumulation x workers); with packing "
             "a sequence is one packed row of up to max_length tokens holding several examples")
    micro_batch_size: int | None = option(
        None, f"sequences per worker per forward pass (default: the largest divisor of "
              f"global/workers up to {DEFAULT_MAX_MICRO_BATCH})")
    max_length: int = option(512, "longest sequence in tokens; longer examples are truncated and counted")
    packing: bool = option(
        True, "pack several examples per sequence (each attends only to itself); falls back to "
              "length-grouped padded batches when the model cannot take packed position ids")
    resume: bool = option(False, "continue from the latest checkpoint in OUTPUT (same data order, LR, optimizer)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (smoke runs); the LR schedule "
                                         "still spans the full run")
    warmup_ratio: float = option(0.03, "share of the steps with a linear LR warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (Hugging Face Trainer's default)")
    dtype: Literal["bfloat16", "float32"] = option(
        "bfloat16", "compute dtype of the FSDP2 mixed-precision policy (gradients are reduced in float32)")
    seed: int = option(42, "seed of the data order, the eval split and initialisation of new embeddings")
    eval_fraction: float = option(0.02, "share of the data held out for the eval loss each epoch (0: none)")
    eval_max_examples: int = option(500, "cap on the held-out examples")
    checkpoint_every: int = option(200, "save a sharded checkpoint every this many steps (and at each epoch end)")
    keep_checkpoints: int = option(2, "checkpoints kept on storage")
    max_failures: int = option(1, "worker-group restarts from the latest checkpoint before giving up")
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    cpu_offload: bool = option(False, "keep sharded parameters and optimizer state in CPU memory (FSDP2 offload)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = option(
        "auto", "attention kernel (auto: flash_attention_2 on GPU when installed, else sdpa)")
    storage_path: str = option("", "Ray Train storage for checkpoints (default: OUTPUT/ray_results; use a "
                                   "shared path or s3:// URI on a multi-node cluster)")
    cpus_per_worker: int = option(1, "CPUs reserved per worker")
    placement_strategy: PlacementStrategy = option(
        "PACK", "how Ray places the workers over nodes (ScalingConfig.placement_strategy): PACK fills as few "
                "nodes as it can; SPREAD puts ranks on different nodes where it can; STRICT_SPREAD requires "
                "one rank per node")
    log_every: int = option(1, "write a metrics record (and print a line) every this many steps")
    verbose: bool = option(False, "also show Ray Data's execution lines and progress bars on the workers")
    lora: bool = option(
        False, "train low-rank adapters (PEFT LoRA) on a frozen base instead of every weight; final/ is then "
               "a PEFT adapter directory (LoRA learning rates are higher: Alpaca-LoRA used 3e-4)")
    qlora: bool = option(
        False, "LoRA on a base model loaded in 4-bit NF4 (bitsandbytes) on GPU workers, adapters in bf16; "
               "implies --lora and needs --use-gpu")
    lora_rank: int = option(8, "rank r of each adapter (Alpaca-LoRA: 8)")
    lora_alpha: int = option(16, "adapter scale numerator: updates are scaled by alpha / rank (Alpaca-LoRA: 16)")
    lora_dropout: float = option(0.05, "dropout on the adapters' input (Alpaca-LoRA: 0.05)")
    lora_target_modules: list[str] = option(
        default_factory=list, help="names of the modules that get adapters, e.g. q_proj v_proj, or all-linear "
                                   "(default: PEFT's choice for the architecture: q_proj v_proj on Llama)")
    merge: bool = option(False, "with --lora/--qlora, also export OUTPUT/merged: the adapters merged into the "
                                "base weights, a standard Hugging Face model")

    def __post_init__(self) -> None:
        validate(self, [
            (bool(self.base_model), "base_model is required (--base-model NAME_OR_PATH)"),
            (bool(self.data), "data is required (--data FILE_OR_DATASET)"),
            (bool(self.output), "output is required (--output DIR)"),
            (self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size}"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"micro_batch_size must be >= 1, got {self.micro_batch_size}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}"),
            (self.cpus_per_worker >= 1, f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.prompt_format in ("auto", "alpaca", "chat"),
             f"prompt_format must be auto, alpaca or chat, got {self.prompt_format!r}"),
            (self.placement_strategy in PLACEMENT_STRATEGIES,  # a config file bypasses argparse's choices
             f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}"),
            *batch_size_checks(self.global_batch_size, self.num_workers, self.micro_batch_size),
            *lora_checks(self),
        ])
        if self.qlora:
            self.lora = True  # QLoRA is LoRA on a quantized base: every LoRA code path applies

    @property
    def derived_micro_batch_size(self) -> int:
        return derive_micro_batch_size(self.global_batch_size, self.num_workers, self.micro_batch_size)

    @property
    def grad_accumulation(self) -> int:
        return self.global_batch_size // (self.derived_micro_batch_size * self.num_workers)


def lora_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """The adapter options: sensible ranges, and only where adapters are trained."""
    adapters = cfg.lora or cfg.qlora
    targets = cfg.lora_target_modules
    return [
        (cfg.lora_rank >= 1, f"lora_rank must be >= 1, got {cfg.lora_rank}"),
        (cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (isinstance(targets, (list, tuple)) and all(isinstance(t, str) and t.strip() for t in targets),
         f"lora_target_modules must be a list of module names, got {targets!r}"),
        (not cfg.merge or adapters, "merge applies to adapter runs: add --lora or --qlora"),
        (not cfg.qlora or cfg.use_gpu, "qlora needs GPU workers (--use-gpu): bitsandbytes' 4-bit kernels run on CUDA"),
        (not cfg.qlora or cfg.dtype == "bfloat16", f"qlora computes and keeps adapters in bfloat16, got dtype {cfg.dtype}"),
        (not cfg.qlora or not cfg.cpu_offload, "qlora keeps the 4-bit base on the GPU: drop --cpu-offload"),
    ]


def batch_size_checks(global_batch: int, workers: int, micro: int | None) -> list[tuple[bool, str]]:
    """Checks that global = micro x accumulation x workers has a whole-number solution."""
    if global_batch < 1 or workers < 1 or (micro is not None and micro < 1):
        return []  # reported by the plain range checks
    if micro is None:
        return [(global_batch % workers == 0,
                 f"global_batch_size {global_batch} is not divisible by num_workers {workers}")]
    return [(global_batch % (micro * workers) == 0,
             f"global_batch_size {global_batch} is not divisible by micro_batch_size {micro} x num_workers "
             f"{workers} = {micro * workers}; global = micro x gradient accumulation x workers")]


def derive_micro_batch_size(global_batch: int, workers: int, micro: int | None) -> int:
    """The micro batch: the one given, else the largest divisor of global/workers up to Alpaca's 4."""
    if micro is not None:
        return micro
    per_worker = global_batch // workers
    return max(d for d in range(1, min(per_worker, DEFAULT_MAX_MICRO_BATCH) + 1) if per_worker % d == 0)
