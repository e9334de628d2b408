"""Sharded checkpoints (torch.distributed.checkpoint) through Ray Train, and the final full-weight export."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TRAINER_STATE = "trainer_state.json"


class AppState:
    """Model + optimizer state for DCP (the ``Stateful`` protocol): sharded, reshardable on load."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def save_and_report(model, optimizer, trainer_state: dict, metrics: dict, rank: int) -> None:
    """Every rank writes its shard to a temp dir and reports it; Ray merges them into one checkpoint.

    ``trainer_state`` (the next step to run) is what resuming needs besides the tensors; the data order
    and the LR follow from it, since both are functions of the step.
    """
    import ray.train
    import torch.distributed.checkpoint as dcp

    directory = tempfile.mkdtemp(prefix="alpaca-ray-ckpt-")
    try:
        dcp.save({"app": AppState(model, optimizer)}, checkpoint_id=directory)
        if rank == 0:
            with open(os.path.join(directory, TRAINER_STATE), "w") as handle:
                json.dump(trainer_state, handle)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_step_{trainer_state['step']:07d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def restore(model, optimizer) -> dict | None:
    """Load the latest checkpoint of this run, if any (resharding if the worker count changed)."""
    import ray.train
    import torch.distributed.checkpoint as dcp

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        dcp.load({"app": AppState(model, optimizer)}, checkpoint_id=directory)
        with open(os.path.join(directory, TRAINER_STATE)) as handle:
            return json.load(handle)


def export_final(model, tokenizer, out_dir: str, base_dtype, metadata: dict, rank: int) -> None:
    """Gather the full weights (a collective: every rank calls this) and save a standard HF model on rank 0.

    ``model.safetensors`` holds the base model's architecture in its own dtype; tied weights are saved
    once (as ``save_pretrained`` does), so ``from_pretrained`` and vLLM load it unchanged.
    """
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from alpaca_ray.cluster import storage

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    # clone(): gathered tensors can be views of one flat buffer, which safetensors refuses to save.
    state = {name: (tensor.to(base_dtype) if tensor.is_floating_point() else tensor).clone()
             for name, tensor in state.items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    # An object store gets the model written to a local temp dir first, then uploaded as one tree.
    local = out_dir if storage.is_posix(out_dir) else tempfile.mkdtemp(prefix="alpaca-ray-final-")
    os.makedirs(local, exist_ok=True)
    config = model.config
    config.dtype = base_dtype
    config.save_pretrained(local)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(local)
    tokenizer.save_pretrained(local)
    save_torch_state_dict(state, local, max_shard_size="5GB")
    with open(os.path.join(local, "alpaca_ray.json"), "w") as handle:
        json.dump(metadata, handle, indent=2)
    if local != out_dir:
        try:
            # Files of an earlier export (say, more weight shards) would otherwise stay next to this one.
            storage.remove(out_dir)
            storage.upload_dir(local, out_dir)
        finally:
            shutil.rmtree(local, ignore_errors=True)
