"""Loading the base model and tokenizer, making room for a pad token, LoRA/QLoRA adapters (PEFT), and FSDP2
sharding. No Ray here: a single process with a world-size-1 process group can use all of it."""

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


def load_tokenizer(name_or_path: str, new_pad_token: bool = True, chat_template: str = ""):
    """The base model's tokenizer with a pad token when it has none: a new ``[PAD]`` (Alpaca), or with
    ``new_pad_token=False`` an existing token (adapters train on the base vocabulary, see
    :func:`alpaca_ray.train.data.reuse_pad_token`). ``chat_template`` (Jinja text) replaces its own."""
    from transformers import AutoTokenizer

    from alpaca_ray.train.data import add_pad_token, reuse_pad_token

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if chat_template:
        tokenizer.chat_template = chat_template
    add_pad_token(tokenizer) if new_pad_token else reuse_pad_token(tokenizer)
    if tokenizer.eos_token_id is None:
        from alpaca_ray.config import UserError

        raise UserError(f"{name_or_path}: the tokenizer has no EOS token; Alpaca training appends one to "
                        "every response so the model learns to stop")
    return tokenizer


def eos_token_ids(name_or_path: str, tokenizer) -> list[int]:
    """Every id that ends a sequence for a model directory or hub name (see
    :func:`alpaca_ray.chat.eos_token_ids`): the loss is taken up to the one that ends each assistant turn."""
    from transformers import AutoConfig, GenerationConfig

    from alpaca_ray.chat import eos_token_ids as union

    try:
        generation = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json: the tokenizer's and the config's EOS are all there is
        generation = None
    return union(tokenizer, AutoConfig.from_pretrained(name_or_path), generation)


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


def default_lora_targets(model_type: str | None) -> list[str]:
    """PEFT's per-architecture default adapter targets (Llama: ``q_proj``, ``v_proj``, as Alpaca-LoRA)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return list(DEFAULTS.get(model_type or "", []))


def lora_config(cfg, model_type: str | None):
    """PEFT's ``LoraConfig`` for a train config; raises ``ValueError`` when no targets are known."""
    from peft import LoraConfig

    targets = list(cfg.lora_target_modules) or default_lora_targets(model_type)
    if not targets:
        raise ValueError(f"PEFT has no default LoRA target modules for model type {model_type!r}: "
                         "name them with --lora-target-modules (or use all-linear)")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      bias="none", task_type="CAUSAL_LM")


def load_adapter_model(cfg, tokenizer, attn_implementation: str = "sdpa", device=None):
    """The frozen base with trainable LoRA adapters (a ``PeftModel``), ready for :func:`shard_model`.

    LoRA: the base is kept in the compute dtype (it gets no optimizer step, so it needs no fp32 master
    copy) and the adapters in float32. QLoRA: the base's linear layers in 4-bit NF4 with double
    quantization and bf16 compute (the QLoRA paper's setup), placed on ``device``; adapters in bf16.
    The vocabulary is the base's own (the pad token reuses a token), so the adapter fits the base as is.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"attn_implementation": attn_implementation}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        kwargs.update(dtype=torch.bfloat16, device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    else:
        kwargs["dtype"] = getattr(torch, cfg.dtype)
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)
    base.config.pad_token_id = tokenizer.pad_token_id
    if base.generation_config is not None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(base, lora_config(cfg, getattr(base.config, "model_type", None)),
                           autocast_adapter_dtype=not cfg.qlora)
    if cfg.qlora:
        for param in trainable_parameters(model):
            param.data = param.data.to(torch.bfloat16)
    return model


def build_model(cfg, attn_implementation: str, device, chat_template: str = ""):
    """(model, tokenizer) for a train config, before sharding: the full model, or the base with adapters."""
    tokenizer = load_tokenizer(cfg.base_model, new_pad_token=not cfg.lora, chat_template=chat_template)
    if cfg.lora:
        return load_adapter_model(cfg, tokenizer, attn_implementation, device), tokenizer
    return load_model(cfg.base_model, tokenizer, attn_implementation), tokenizer


def trainable_parameters(model) -> list:
    """The parameters the optimizer steps: every one for full fine-tuning, the adapters' with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def set_gradient_sync(model, sync: bool) -> None:
    """Reduce gradients on this backward or not (accumulation), on every FSDP unit of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)


def reshard(model) -> None:
    """Put every FSDP unit back in its sharded state. After a forward without backward (an eval pass), the
    root unit keeps its parameters unsharded, so ``named_parameters()`` would not give the sharded
    parameters the optimizer holds; ``model.state_dict()`` does this by itself, a bare parameter walk not."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_model(model, device_type: str, world_size: int, compute_dtype: str = "bfloat16",
                cpu_offload: bool = False, activation_checkpointing: bool = False, quantized_base: bool = False):
    """FSDP2: ``fully_shard`` each decoder layer, then the root; bf16 compute, fp32 gradient reduction.

    With LoRA a layer's unit holds frozen base weights and trainable adapters together: FSDP2 all-gathers
    both (in the compute dtype) and reduce-scatters only the adapters' gradients, so no separate wrapping
    is needed. A 4-bit base (``quantized_base``) cannot be flattened into FSDP's buffers (each packed
    weight carries its quantization state): its frozen parameters are left out of the units
    (``ignored_params``), so every GPU holds the whole 4-bit base and FSDP shards only the adapters.
    """
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
    if quantized_base:
        kwargs["ignored_params"] = {p for p in model.parameters() if not p.requires_grad}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
