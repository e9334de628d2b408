"""A tiny Llama-architecture base model made locally, for tests and the offline quick start.

It downloads nothing: the tokenizer is a byte-level BPE trained here with ``tokenizers`` on the bundled
seed tasks (or any texts), and the weights are random from a ``LlamaConfig``. It has no pad token, like
LLaMA's, so the train stage's "add a pad token" path is exercised. It shows the machinery, not quality.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(prog="alpaca-ray init-model", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", required=True, help="make the tiny Llama model (the only kind)")
    parser.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.output, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                           num_layers=args.num_layers, seed=args.seed)
    print(f"wrote a tiny Llama model to {path}")
    return 0
