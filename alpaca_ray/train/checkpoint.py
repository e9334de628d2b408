"""Sharded checkpoints (torch.distributed.checkpoint) through Ray Train, and the final export: full weights,
or a PEFT adapter directory (optionally also merged into the base). Ray is imported only where used."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

TRAINER_STATE = "trainer_state.json"


class AppState:
    """Model + optimizer state for DCP (the ``Stateful`` protocol): sharded, reshardable on load.

    ``adapters_only``: just the trainable parameters (the adapters) and their optimizer state. The frozen
    base is reloaded from the base model, unchanged; it is not even read here, since a 4-bit base's
    state dict carries quantization entries that are not parameters.
    """

    def __init__(self, model, optimizer, adapters_only: bool = False):
        self.model, self.optimizer, self.adapters_only = model, optimizer, adapters_only

    def _adapters(self) -> dict:
        from alpaca_ray.train.model import reshard

        reshard(self.model)  # the sharded parameters, the ones the optimizer holds
        return {name: param for name, param in self.model.named_parameters() if param.requires_grad}

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

        if self.adapters_only:
            # The (sharded) parameters themselves: DCP loads into them in place.
            return {"model": self._adapters(), "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, set_state_dict

        if not self.adapters_only:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            return
        adapters = self._adapters()
        missing = sorted(set(adapters) - set(state["model"]))
        if missing:
            raise RuntimeError(f"the checkpoint lacks {len(missing)} adapter tensor(s), e.g. {missing[0]}")
        with torch.no_grad():
            for name, param in adapters.items():
                if state["model"][name] is not param:
                    param.copy_(state["model"][name])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])


def save_and_report(model, optimizer, trainer_state: dict, metrics: dict, rank: int,
                    adapters_only: bool = False) -> None:
    """Every rank writes its shard to a temp dir and reports it; Ray merges them into one checkpoint.

    ``trainer_state`` (the next step to run) is what resuming needs besides the tensors; the data order
    and the LR follow from it, since both are functions of the step.
    """
    import ray.train
    import torch.distributed.checkpoint as dcp

    directory = tempfile.mkdtemp(prefix="alpaca-ray-ckpt-")
    try:
        dcp.save({"app": AppState(model, optimizer, adapters_only)}, checkpoint_id=directory)
        if rank == 0:
            with open(os.path.join(directory, TRAINER_STATE), "w") as handle:
                json.dump(trainer_state, handle)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_step_{trainer_state['step']:07d}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def restore(model, optimizer, adapters_only: bool = False) -> dict | None:
    """Load the latest checkpoint of this run, if any (resharding if the worker count changed)."""
    import ray.train
    import torch.distributed.checkpoint as dcp

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        dcp.load({"app": AppState(model, optimizer, adapters_only)}, checkpoint_id=directory)
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
    # An object store gets the model written to a local temp dir first, then uploaded as one tree (files of
    # an earlier export, say more weight shards, removed).
    with storage.written_dir(out_dir, prefix="alpaca-ray-final-") as local:
        config = model.config
        config.dtype = base_dtype
        config.save_pretrained(local)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(local)
        tokenizer.save_pretrained(local)
        save_torch_state_dict(state, local, max_shard_size="5GB")
        with open(os.path.join(local, "alpaca_ray.json"), "w") as handle:
            json.dump(metadata, handle, indent=2)


#: What a PEFT adapter directory holds (``PeftModel.save_pretrained``'s file names).
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_adapter(model, tokenizer, out_dir: str, metadata: dict, rank: int, base_model: str,
                   base_dtype=None, merged_dir: str | None = None) -> None:
    """Gather the adapters (a collective: every rank calls this) and save a PEFT adapter directory on rank 0.

    ``out_dir`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (what
    ``PeftModel.from_pretrained(base, out_dir)`` and vLLM's LoRA loader read), the tokenizer (its pad
    token) and ``alpaca_ray.json``. With ``merged_dir``, rank 0 also loads the unquantized base in
    ``base_dtype``, applies the saved adapter, merges it (``merge_and_unload``) and saves a standard model.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from alpaca_ray.cluster import storage
    from alpaca_ray.train.model import reshard

    reshard(model)
    # Each adapter's full tensor (an all-gather, in the same order on every rank); the frozen base stays put.
    gathered = {name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu()
                for name, param in model.named_parameters() if param.requires_grad}
    if rank != 0:
        return
    adapters = get_peft_model_state_dict(model, state_dict=gathered, save_embedding_layers=False)
    adapters = {name: tensor.contiguous().clone() for name, tensor in adapters.items()}
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = base_model
    peft_config.inference_mode = True
    with storage.written_dir(out_dir, prefix="alpaca-ray-adapter-") as local:
        peft_config.save_pretrained(local)
        save_file(adapters, os.path.join(local, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        tokenizer.save_pretrained(local)
        with open(os.path.join(local, "alpaca_ray.json"), "w") as handle:
            json.dump({**metadata, "adapter": True}, handle, indent=2)
        if merged_dir is not None:
            with storage.written_dir(merged_dir, prefix="alpaca-ray-merged-") as merged_local:
                merge_adapter(local, base_model, merged_local, base_dtype, tokenizer,
                              {**metadata, "adapter": False, "merged_from_adapter": True})


def merge_adapter(adapter_dir: str, base_model: str, out_dir: str, base_dtype, tokenizer, metadata: dict) -> None:
    """Base + adapter merged into one standard Hugging Face model (what serving without PEFT loads).

    The base is loaded unquantized even after QLoRA: merging into 4-bit weights would round the update away.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=base_dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id
    if merged.generation_config is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "alpaca_ray.json"), "w") as handle:
        json.dump(metadata, handle, indent=2)
