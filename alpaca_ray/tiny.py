"""A tiny Llama-architecture base model made locally, for tests and the offline quick start.

It downloads nothing: the tokenizer is a byte-level BPE trained here with ``tokenizers`` on the bundled
seed tasks (or any texts), and the weights are random from a ``LlamaConfig``. It has no pad token, like
LLaMA's, so the train stage's "add a pad token" path is exercised. It shows the machinery, not quality.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from collections.abc import Iterable

from alpaca_ray.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def default_texts() -> list[str]:
    """Texts to train the tiny tokenizer on: the Alpaca templates and the bundled seed tasks."""
    texts = [PROMPT_WITH_INPUT, PROMPT_NO_INPUT]
    seed_path = os.path.join(os.path.dirname(__file__), "data", "seed_tasks.jsonl")
    if os.path.exists(seed_path):
        with open(seed_path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    task = json.loads(line)
                    texts.append(task["instruction"])
                    for instance in task.get("instances", []):
                        texts += [instance.get("input", ""), instance.get("output", "")]
    return texts


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with BOS/EOS/UNK and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, model_max_length=2048
    )


def make_tiny_model(
    output_dir: str,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> str:
    """Write a tiny random ``LlamaForCausalLM`` and its tokenizer to ``output_dir``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(texts if texts is not None else default_texts(), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    from alpaca_ray.config import run_cli
    from alpaca_ray.gguf_model import DTYPES

    parser = argparse.ArgumentParser(prog="alpaca-ray init-model", description="Make a base model directory: "
                                     "the tiny random Llama model, or one converted from a GGUF file.")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--tiny", action="store_true", help="make the tiny random Llama model")
    kind.add_argument("--from-gguf", metavar="FILE", help="convert a GGUF file (llama.cpp's format) to a "
                      "Hugging Face model directory: safetensors weights, config, tokenizer, generation config")
    parser.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--dtype", choices=DTYPES, help=f"--from-gguf: dtype of the saved weights (default {DTYPES[0]})")
    tiny = parser.add_argument_group("--tiny options")
    defaults = {name: param.default for name, param in inspect.signature(make_tiny_model).parameters.items()}
    for name in ("vocab_size", "hidden_size", "num_layers", "seed"):
        tiny.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {defaults[name]}")
    args = parser.parse_args(argv)
    tiny_options = {name: getattr(args, name) for name in ("vocab_size", "hidden_size", "num_layers", "seed")
                    if getattr(args, name) is not None}
    if args.from_gguf and tiny_options:
        flag = "--" + next(iter(tiny_options)).replace("_", "-")
        parser.error(f"{flag} is a --tiny option; a GGUF file sets its own sizes")
    if args.tiny and args.dtype:
        parser.error("--dtype is a --from-gguf option")

    def body() -> int:
        if args.from_gguf:
            from alpaca_ray.gguf_model import convert_gguf

            print(convert_gguf(args.from_gguf, args.output, dtype=args.dtype or DTYPES[0]).summary())
            return 0
        path = make_tiny_model(args.output, **tiny_options)
        print(f"wrote a tiny Llama model to {path}")
        return 0

    return run_cli(body)
