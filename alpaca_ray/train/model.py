"""Loading the base model and tokenizer, making room for a pad token, and FSDP2 sharding."""

from __future__ import annotations

import importlib.util

#: Architectures whose transformers 5.x implementation turns packed ``position_ids`` (restarting at 0 per
#: example, no attention mask) into a block-diagonal causal mask (SDPA/eager) or flash-attention varlen.
#: The packing-equivalence test checks this on Llama; the others share Llama's attention code.
PACKING_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2", "smollm3",
})


def choose_attention(requested: str, use_gpu: bool) -> str:
    """``auto``: flash-attention 2 on a GPU when the package is installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if use_gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str):
    """The base model's tokenizer with a pad token added when it has none (Alpaca adds ``[PAD]``)."""
    from transformers import AutoTokenizer

    from alpaca_ray.train.data import add_pad_token

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    add_pad_token(tokenizer)
    if tokenizer.eos_token_id is None:
        from alpaca_ray.config import UserError

        raise UserError(f"{name_or_path}: the tokenizer has no EOS token; Alpaca training appends one to "
                        "every response so the model learns to stop")
    return tokenizer


def supports_packing(config) -> bool:
    return getattr(config, "model_type", None) in PACKING_MODEL_TYPES


def load_model(name_or_path: str, tokenizer, attn_implementation: str = "sdpa"):
    """``AutoModelForCausalLM.from_pretrained`` in float32 (FSDP keeps fp32 master weights and computes in
    bf16), with the embeddings grown for added tokens, new rows set to the mean of the old ones (Alpaca's
    ``smart_tokenizer_and_embedding_resize``: deterministic, so every rank builds identical weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for embedding in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
                              if e is not None}.values():
                weight = embedding.weight
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def decoder_layers(model):
    """The repeated transformer blocks (each becomes one FSDP unit)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and \
                type(module[0]).__name__.endswith(("DecoderLayer", "Block", "Layer")):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def shard_model(model, device_type: str, world_size: int, compute_dtype: str = "bfloat16",
                cpu_offload: bool = False, activation_checkpointing: bool = False):
    """FSDP2: ``fully_shard`` each decoder layer, then the root; bf16 compute, fp32 gradient reduction."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        # Non-reentrant checkpointing keeps parameter names unchanged (no wrapper prefix in checkpoints).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(device_type, (world_size,))
    dtype = getattr(torch, compute_dtype)
    kwargs = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
