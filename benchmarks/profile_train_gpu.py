"""Where a GPU training step's time goes: the stage's own model preparation and step, one GPU, no Ray.

Times each phase of the step (collate, forward+backward, clip, optimizer) with CUDA synchronisation
between them, for a few micro-batch sizes, then prints the torch profiler's top operators for one size.
Used to explain the MFU of ``benchmarks/train.py --gpu``.

    python benchmarks/profile_train_gpu.py [--micro 4 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.data import collate, pack_examples
    from alpaca_ray.train.loop import make_optimizer, prepare_model, token_loss_sum
    from alpaca_ray.train.model import choose_attention, trainable_parameters
    from benchmarks.train import alpaca_like_examples, gpu_llama_config, gpu_world_of_one, save_random_llama

    device = gpu_world_of_one("29518")
    model_dir = save_random_llama(gpu_llama_config(), os.path.join(tempfile.mkdtemp(), "base"))
    attn = choose_attention("auto", use_gpu=True)
    lengths, examples = alpaca_like_examples(2_000, random.Random(0))
    units = pack_examples(list(lengths), lengths, 512)
    cfg = TrainConfig(base_model=model_dir, data="-", output="-", use_gpu=True, num_workers=1,
                      global_batch_size=4, micro_batch_size=4)
    model, _ = prepare_model(cfg, attn, device, 1)
    optimizer = make_optimizer(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"attention {attn}; {params / 1e9:.2f}B params; torch {torch.__version__}")
    print("| micro | collate ms | fwd+bwd ms | clip ms | optimizer ms | step ms | tokens/s | MFU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def timed(fn):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - begin) * 1e3

    def one_step(micro_batch):
        batch, t_collate = timed(lambda: collate([[examples[i] for i in u] for u in micro_batch], 0, True))
        _, t_fb = timed(lambda: (token_loss_sum(model, batch, device, attn.startswith("flash"))
                                 / max(1, batch["num_labels"])).backward())
        _, t_clip = timed(lambda: torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0))
        _, t_opt = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        return batch["num_real"], (t_collate, t_fb, t_clip, t_opt)

    for micro in args.micro:
        batches = [units[k:k + micro] for k in range(0, len(units), micro)]
        for b in batches[:2]:
            one_step(b)  # warm-up
        rows = [one_step(b) for b in batches[2:2 + args.steps]]
        real = sum(r[0] for r in rows)
        phases = [sum(r[1][k] for r in rows) / len(rows) for k in range(4)]
        step_ms = sum(phases)
        tokens_per_s = real / (step_ms * len(rows) / 1e3)
        print(f"| {micro} | {phases[0]:.1f} | {phases[1]:.1f} | {phases[2]:.1f} | {phases[3]:.1f} | {step_ms:.1f} | "
              f"{tokens_per_s:.0f} | {6 * params * tokens_per_s / (args.peak_tflops * 1e12):.1%} |", flush=True)

    from torch.profiler import ProfilerActivity, profile

    batches = [units[k:k + args.micro[0]] for k in range(0, len(units), args.micro[0])]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches[:3]:
            one_step(b)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
