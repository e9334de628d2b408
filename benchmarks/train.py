"""Train-stage throughput: this stage (Ray Train, FSDP2, packing) vs a plain Hugging Face ``Trainer``.

CPU (default): the same tiny Llama model and the same Alpaca-format data, in the same run:
  * reference: one process, ``transformers.Trainer`` with Alpaca's recipe (its collator pads each batch
    to its longest example, bf16, cosine 3% warmup, AdamW wd 0);
  * this stage with packing, and with length-grouped padded batches (2 Ray Train workers, 1 CPU each).
Printed: real tokens/s (prompt + response tokens, no padding) in the training steps, the real-token
share (real / computed tokens), and the ratio to the reference.

GPU (``--gpu``): one GPU, a ~1.1B-parameter Llama built from a config (random weights, no download),
sequence length 512, the stage's own FSDP2 wrapping, collation and loss, with and without packing;
prints tokens/s per GPU and MFU = 6 x params x tokens / time / peak (H100 bf16 dense peak by default).

LoRA (``--lora-comparison``, CPU): a ~100M-parameter Llama built from a config (random weights, no
download), full fine-tuning against LoRA (r 8 on q_proj/v_proj), each a short run of this stage on 2 Ray
Train workers in the same process: peak memory per worker (the largest RSS of any rank), mean step time,
trainable parameters, checkpoint size and final/ size.

GPU (``--gpu``): one GPU, no Ray (a world-size-1 NCCL group; the stage's own model building, FSDP2
sharding, step and loss), the ~1.1B Llama: tokens/s and peak GPU memory for full fine-tuning, LoRA and
QLoRA (4-bit NF4 base; needs bitsandbytes). ``--gpu --packing-comparison``: full fine-tuning with and
without packing, with MFU.

    python benchmarks/train.py                      # CPU comparison with the HF Trainer
    python benchmarks/train.py --model runs/smollm2 --dtype float32 --micro 1   # the same on a real model
    python benchmarks/train.py --lora-comparison    # CPU: full vs LoRA on a ~100M model
    python benchmarks/train.py --gpu                # on a GPU machine: full vs LoRA vs QLoRA
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_FILES = ("self_instruct_user_oriented_252.jsonl", "self_instruct_seed_tasks.jsonl")


def benchmark_records(count: int):
    """Real Alpaca-format data when ``../shared/data`` is there (varied lengths), else a synthetic set."""
    from alpaca_ray.records import AlpacaRecord

    if all((SHARED_DATA / name).exists() for name in SHARED_FILES):
        records = []
        for name in SHARED_FILES:  # English self-instruct tasks: each instance is one Alpaca example
            for line in (SHARED_DATA / name).read_text().splitlines():
                task = json.loads(line)
                records += [AlpacaRecord(task["instruction"], i.get("input", ""), i["output"])
                            for i in task["instances"] if i.get("output")]
        random.Random(0).shuffle(records)
        return records[:count], "../shared/data self-instruct tasks (" + ", ".join(SHARED_FILES) + ")"
    rng = random.Random(0)
    words = "the a model data train token batch pack ray worker loss step answer question list".split()
    records = [AlpacaRecord(instruction=" ".join(rng.choices(words, k=rng.randint(4, 30))),
                            input=" ".join(rng.choices(words, k=rng.choice([0, 0, rng.randint(3, 40)]))),
                            output=" ".join(rng.choices(words, k=int(rng.lognormvariate(3.5, 0.8)))))
               for _ in range(count)]
    return records, "synthetic"


def hf_trainer_reference(model_dir: str, records, max_length: int, per_device: int, accumulation: int,
                         dtype: str = "bfloat16") -> dict:
    """Alpaca's train.py in one process: HF Trainer, pad-to-longest collator, labels -100 on the prompt."""
    import torch
    from transformers import Trainer, TrainingArguments

    from alpaca_ray.train.data import IGNORE_INDEX, tokenize_record
    from alpaca_ray.train.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, tokenizer, "sdpa")
    rows = [tokenize_record(tokenizer, r.instruction, r.input, r.output, max_length) for r in records]
    rows = [r for r in rows if r["num_labels"] > 0]
    dataset = [{"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] * r["prompt_len"] + r["input_ids"][r["prompt_len"]:]}
               for r in rows]
    computed = []

    def collate(batch):  # Alpaca's DataCollatorForSupervisedDataset
        width = max(len(b["input_ids"]) for b in batch)
        computed.append(width * len(batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        for i, b in enumerate(batch):
            ids[i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
            labels[i, :len(b["labels"])] = torch.tensor(b["labels"])
        return {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(tokenizer.pad_token_id)}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_device,
                                 gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=2e-5,
                                 weight_decay=0.0, warmup_steps=0.03, lr_scheduler_type="cosine",
                                 bf16=dtype == "bfloat16",
                                 use_cpu=True, logging_steps=10_000, save_strategy="no", report_to=[],
                                 dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
        result = trainer.train()
    real = sum(len(r["input_ids"]) for r in rows)
    return {"tokens_per_s": real / result.metrics["train_runtime"], "real_token_share": real / sum(computed),
            "time_s": result.metrics["train_runtime"], "real_tokens": real}


def stage_run(model_dir: str, data_path: str, output: str, max_length: int, global_batch: int, micro: int,
              packing: bool, dtype: str = "bfloat16") -> dict:
    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.pipeline import run_train

    started = time.perf_counter()
    run_train(TrainConfig(base_model=model_dir, data=data_path, output=output, num_workers=2, epochs=1,
                          global_batch_size=global_batch, micro_batch_size=micro, max_length=max_length,
                          packing=packing, eval_fraction=0.0, checkpoint_every=10_000, max_failures=0,
                          dtype=dtype, prompt_format="alpaca"))  # the reference's tokens, whatever the model
    wall = time.perf_counter() - started
    steps = [json.loads(line) for line in open(os.path.join(output, "metrics.jsonl")) if '"loss"' in line]
    real, computed = sum(r["real_tokens"] for r in steps), sum(r["computed_tokens"] for r in steps)
    step_time = sum(r["time_s"] for r in steps[1:])  # the first step includes warm-up work
    return {"tokens_per_s": sum(r["real_tokens"] for r in steps[1:]) / step_time, "real_token_share": real / computed,
            "time_s": sum(r["time_s"] for r in steps), "wall_s": wall, "steps": len(steps)}


def cpu_benchmark(args) -> None:
    import ray

    from alpaca_ray.records import write_records
    from alpaca_ray.tiny import default_texts, make_tiny_model

    records, source = benchmark_records(args.examples)
    work = tempfile.mkdtemp(prefix="alpaca-ray-bench-")
    # A tokenizer with a real vocabulary (trained here on the data) gives realistic token counts.
    texts = default_texts() + [t for r in records for t in (r.instruction, r.input, r.output)]
    dtype = args.dtype or "bfloat16"
    model_dir = args.model or make_tiny_model(os.path.join(work, "model"), texts=texts, vocab_size=args.vocab_size,
                                              hidden_size=args.hidden_size)
    model_name = args.model or f"tiny Llama hidden {args.hidden_size}, vocab {args.vocab_size}"
    data_path = os.path.join(work, "data.jsonl")
    write_records(records, data_path)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    per_worker_micro = args.micro
    results = {
        "HF Trainer, pad to longest (reference)": hf_trainer_reference(
            model_dir, records, args.max_length, per_device=args.micro, accumulation=args.global_batch // args.micro,
            dtype=dtype),
        "alpaca-ray, packing": stage_run(model_dir, data_path, os.path.join(work, "packed"), args.max_length,
                                         args.global_batch, per_worker_micro, True, dtype),
        "alpaca-ray, length-grouped": stage_run(model_dir, data_path, os.path.join(work, "grouped"), args.max_length,
                                                args.global_batch, per_worker_micro, False, dtype),
    }
    ray.shutdown()
    reference = results["HF Trainer, pad to longest (reference)"]["tokens_per_s"]
    print(f"\ndata: {len(records)} examples from {source}; {model_name}; "
          f"max_length {args.max_length}; global batch {args.global_batch}; 1 epoch; {dtype}")
    print("| run | real tokens/s | vs reference | real-token share | train time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / reference:.2f}x | "
              f"{r['real_token_share']:.1%} | {r['time_s']:.1f} |")


def gpu_world_of_one(port: str):
    """A world-size-1 NCCL group on GPU 0 (the stage's FSDP2 code needs a process group); its device."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def gpu_llama_config():
    """The GPU benchmarks' ~1.1B Llama (TinyLlama's shape: 22 layers, hidden 2048, GQA 32/4, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def alpaca_like_examples(count: int, rng: random.Random) -> tuple[dict, dict]:
    """``count`` random-token examples with Alpaca-like lengths (prompt + response tokens: log-normal,
    median ~180, capped at 512); (lengths, examples) by id."""
    from alpaca_ray.train.data import Example

    lengths = {i: max(24, min(512, int(rng.lognormvariate(5.2, 0.6)))) for i in range(count)}
    examples = {i: Example(i, tuple(rng.randrange(3, 32000) for _ in range(n)), min(n - 1, 60))
                for i, n in lengths.items()}
    return lengths, examples


def gpu_benchmark(args) -> None:
    """One GPU, the stage's FSDP2 wrapping and step, a ~1.1B Llama from a config, seq 512."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from alpaca_ray.train.data import collate, pack_examples
    from alpaca_ray.train.loop import token_loss_sum
    from alpaca_ray.train.model import choose_attention, shard_model

    gpu_world_of_one("29517")
    config = gpu_llama_config()
    attn = choose_attention("auto", use_gpu=True)
    rng = random.Random(0)
    lengths, examples = alpaca_like_examples(5_000, rng)
    print(f"GPU: {torch.cuda.get_device_name(0)}; attention {attn}; peak {args.peak_tflops} TFLOP/s")
    print("| mode | params | micro batch | real tokens/s per GPU | real-token share | MFU (real) | MFU (computed) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for packed in (True, False):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
        params = sum(p.numel() for p in model.parameters())
        model = shard_model(model, "cuda", 1, "bfloat16", activation_checkpointing=args.activation_checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=True)
        order = list(lengths)
        units = pack_examples(order, lengths, 512) if packed else sorted(((i,) for i in order), key=lambda u: lengths[u[0]])
        if not packed:  # length-grouped micro-batches, shuffled
            batches = [units[k:k + args.micro] for k in range(0, len(units), args.micro)]
            rng.shuffle(batches)
        else:
            batches = [units[k:k + args.micro] for k in range(0, len(units), args.micro)]
        real = computed = 0
        for step, micro_batch in enumerate(batches[:args.steps + 3]):
            if step == 3:
                torch.cuda.synchronize()
                started, real, computed = time.perf_counter(), 0, 0
            batch = collate([[examples[i] for i in unit] for unit in micro_batch], 0, packed)
            loss = token_loss_sum(model, batch, "cuda", flatten_packed=packed and attn.startswith("flash"))
            (loss / max(1, batch["num_labels"])).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real += batch["num_real"]
            computed += batch["num_computed"]
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        peak = args.peak_tflops * 1e12
        print(f"| {'packing' if packed else 'length-grouped padding'} | {params / 1e9:.2f}B | {args.micro} | "
              f"{real / elapsed:.0f} | {real / computed:.1%} | {6 * params * real / elapsed / peak:.1%} | "
              f"{6 * params * computed / elapsed / peak:.1%} |")
        del model, optimizer
        torch.cuda.empty_cache()
    dist.destroy_process_group()


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def lora_cpu_benchmark(args) -> None:
    """Full fine-tuning vs LoRA of a ~100M Llama on 2 CPU Ray Train workers, in one run."""
    import ray

    from alpaca_ray.records import write_records
    from alpaca_ray.tiny import default_texts, make_tiny_model
    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.pipeline import run_train

    records, source = benchmark_records(args.examples)
    work = tempfile.mkdtemp(prefix="alpaca-ray-bench-lora-")
    texts = default_texts() + [t for r in records for t in (r.instruction, r.input, r.output)]
    model_dir = make_tiny_model(os.path.join(work, "model"), texts=texts, vocab_size=args.vocab_size,
                                hidden_size=768, num_layers=args.layers, num_heads=12)
    params = count_parameters(os.path.join(model_dir, "model.safetensors"))
    data_path = os.path.join(work, "data.jsonl")
    write_records(records, data_path)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = {}
    for name, extra in (("full fine-tuning", {}), ("LoRA r=8 (q_proj, v_proj)", {"lora": True})):
        output = os.path.join(work, "lora" if extra else "full")
        run_train(TrainConfig(base_model=model_dir, data=data_path, output=output, num_workers=2, epochs=1,
                              global_batch_size=args.global_batch, micro_batch_size=args.micro,
                              max_length=args.max_length, eval_fraction=0.0, max_steps=args.steps,
                              checkpoint_every=10_000, max_failures=0, dtype=args.dtype or "float32", **extra))
        steps = [json.loads(line) for line in open(os.path.join(output, "metrics.jsonl")) if '"loss"' in line]
        checkpoints = sorted(glob.glob(os.path.join(output, "ray_results", "train", "checkpoint_step_*")))
        final = os.path.join(output, "final")
        trainable = count_parameters(os.path.join(final, "adapter_model.safetensors")) if extra else params
        rows[name] = {"step_s": sum(r["time_s"] for r in steps[1:]) / max(1, len(steps) - 1),
                      "peak_gb": max(r["peak_memory_gb"] for r in steps), "trainable": trainable,
                      "checkpoint_mb": directory_size(checkpoints[-1]) / 2**20, "final_mb": directory_size(final) / 2**20,
                      "steps": len(steps)}
    ray.shutdown()
    load = os.getloadavg()
    full = rows["full fine-tuning"]
    print(f"\nmodel: Llama from a config, {params / 1e6:.0f}M parameters (hidden 768, {args.layers} layers, vocab "
          f"{args.vocab_size}); data: {source}; max_length {args.max_length}; global batch {args.global_batch}, "
          f"micro {args.micro}; 2 CPU workers (1 CPU each), FSDP2 over gloo, {args.dtype or 'float32'} compute; {full['steps']} steps "
          f"each (first excluded from the step time); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| run | trainable params | peak memory per worker (GB) | step time (s) | checkpoint (MB) | final/ (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['trainable'] / 1e6:.2f}M ({r['trainable'] / params:.2%}) | {r['peak_gb']:.2f} "
              f"({r['peak_gb'] / full['peak_gb']:.2f}x) | {r['step_s']:.2f} ({r['step_s'] / full['step_s']:.2f}x) | "
              f"{r['checkpoint_mb']:.1f} | {r['final_mb']:.1f} |")


def count_parameters(safetensors_path: str) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(safetensors_path).values())


def save_random_llama(config, directory: str) -> str:
    """A random Llama from ``config`` in bf16 with a small tokenizer: a base model the stage can load."""
    import torch
    from transformers import LlamaForCausalLM

    from alpaca_ray.tiny import default_texts, train_tiny_tokenizer

    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    train_tiny_tokenizer(default_texts(), 512).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def gpu_adapter_benchmark(args) -> None:
    """Full vs LoRA vs QLoRA on one GPU with the stage's functions (no Ray): tokens/s and peak memory."""
    import gc
    import importlib.util

    import torch
    import torch.distributed as dist

    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.data import collate, pack_examples
    from alpaca_ray.train.loop import make_optimizer, prepare_model, train_step
    from alpaca_ray.train.model import choose_attention, trainable_parameters

    device = gpu_world_of_one("29517")
    work = tempfile.mkdtemp(prefix="alpaca-ray-bench-gpu-")
    model_dir = save_random_llama(gpu_llama_config(), os.path.join(work, "base"))
    attn = choose_attention("auto", use_gpu=True)
    lengths, examples = alpaca_like_examples(2_000, random.Random(0))
    units = pack_examples(list(lengths), lengths, 512)
    batches = [units[k:k + args.micro] for k in range(0, len(units), args.micro)]
    flatten = attn.startswith("flash")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; attention {attn}; a 1.1B Llama from a "
          f"config (random weights); packed rows of 512 tokens, micro batch {args.micro}; {args.steps} timed steps "
          f"after 3 warm-up steps; LoRA r=8 on q_proj/v_proj (QLoRA: base in 4-bit NF4, adapters bf16)")
    print("| mode | trainable params | real tokens/s | peak GPU memory (GiB) | memory vs full | speed vs full |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = None
    for mode in ("full", "lora", "qlora"):
        if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            print("| qlora | - | - | - | - | - |  (bitsandbytes is not installed)")
            continue
        torch.manual_seed(0)
        cfg = TrainConfig(base_model=model_dir, data="-", output="-", use_gpu=True, num_workers=1,
                          global_batch_size=args.micro, micro_batch_size=args.micro,
                          activation_checkpointing=args.activation_checkpointing,
                          lora=mode != "full", qlora=mode == "qlora")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, _ = prepare_model(cfg, attn, device, 1)
        optimizer = make_optimizer(model, cfg)
        trainable = sum(p.numel() for p in trainable_parameters(model))
        real = 0
        for step, micro_batch in enumerate(batches[:args.steps + 3]):
            if step == 3:
                torch.cuda.synchronize()
                started, real = time.perf_counter(), 0
            batch = collate([[examples[i] for i in unit] for unit in micro_batch], 0, True)
            train_step(model, optimizer, [batch], batch["num_labels"], 1, device, flatten, 1.0, seed=step)
            real += batch["num_real"]
        torch.cuda.synchronize()
        tokens_per_s = real / (time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reference = reference or (tokens_per_s, peak)
        print(f"| {mode} | {trainable / 1e6:.1f}M | {tokens_per_s:.0f} | {peak:.1f} | {peak / reference[1]:.2f}x | "
              f"{tokens_per_s / reference[0]:.2f}x |", flush=True)
        del model, optimizer
        gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (~1.1B Llama, seq 512): full vs "
                                                           "LoRA vs QLoRA")
    parser.add_argument("--packing-comparison", action="store_true", help="with --gpu: packing vs padding instead")
    parser.add_argument("--lora-comparison", action="store_true", help="CPU: full vs LoRA on a ~100M model")
    parser.add_argument("--layers", type=int, default=10, help="--lora-comparison: decoder layers (10: ~100M)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: bfloat16 for the CPU comparison, float32 for "
                             "--lora-comparison; CPUs without AVX512-BF16 emulate bf16 slowly)")
    parser.add_argument("--model", help="CPU comparison: a model directory (e.g. runs/smollm2) instead of the tiny one")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per GPU mode")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    if args.gpu:
        gpu_benchmark(args) if args.packing_comparison else gpu_adapter_benchmark(args)
    elif args.lora_comparison:
        lora_cpu_benchmark(args)
    else:
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
