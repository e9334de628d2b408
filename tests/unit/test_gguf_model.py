"""``alpaca-ray init-model --from-gguf`` on small GGUF files written here with ``gguf.GGUFWriter``.

A 2-layer Llama with untied embeddings and three distinct end-of-sequence ids, converted in float32 through
the real CLI (the real SmolLM2 file, tied and in bfloat16, is in tests/realmodel/test_init_model.py), and the
files the command must refuse with one clear line: missing, not GGUF, truncated, an unknown architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 32, 64, 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eom|>"]


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict:
    """A valid 2-layer Llama GGUF (float32 tensors, untied output, byte-level BPE); returns what it holds."""
    from gguf import GGUFWriter, TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["Ġt"] + SPECIALS  # every byte, one merge, the special tokens
    ids = {token: index for index, token in enumerate(tokens)}
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = HIDDEN // HEADS
    tensors = {"token_embd.weight": weight(len(tokens), HIDDEN),
               "output_norm.weight": 1 + weight(HIDDEN), "output.weight": weight(len(tokens), HIDDEN)}
    for layer in range(LAYERS):
        tensors |= {f"blk.{layer}.attn_norm.weight": 1 + weight(HIDDEN),
                    f"blk.{layer}.attn_q.weight": weight(HIDDEN, HIDDEN),
                    f"blk.{layer}.attn_k.weight": weight(KV_HEADS * head_dim, HIDDEN),
                    f"blk.{layer}.attn_v.weight": weight(KV_HEADS * head_dim, HIDDEN),
                    f"blk.{layer}.attn_output.weight": weight(HIDDEN, HIDDEN),
                    f"blk.{layer}.ffn_norm.weight": 1 + weight(HIDDEN),
                    f"blk.{layer}.ffn_gate.weight": weight(FFN, HIDDEN),
                    f"blk.{layer}.ffn_up.weight": weight(FFN, HIDDEN),
                    f"blk.{layer}.ffn_down.weight": weight(HIDDEN, FFN)}

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if token in SPECIALS else TokenType.NORMAL for token in tokens])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(ids["<|endoftext|>"])
    writer.add_eos_token_id(ids["<|endoftext|>"])
    writer.add_eot_token_id(ids["<|im_end|>"])
    writer.add_eom_token_id(ids["<|eom|>"])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"ids": ids, "tensors": tensors}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


def test_float32_conversion_is_exact_and_keeps_untied_embeddings_and_every_eos_id(tiny_gguf, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, written = tiny_gguf
    output = tmp_path / "model"
    result = run_cli(["init-model", "--from-gguf", str(path), "--output", str(output), "--dtype", "float32"],
                     check=True)
    ids = written["ids"]
    eos_ids = [ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|eom|>"]]  # EOS, end of turn, end of message
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {output}: llama (LlamaForCausalLM), ")
    assert f"in float32, untied embeddings, eos_token_id {eos_ids}, chat template none in the file" in summary

    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos_ids
    assert GenerationConfig.from_pretrained(output).eos_token_id == eos_ids
    config = json.loads((output / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    assert "quantization_config" not in config

    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        embed, head = weights.get_tensor("model.embed_tokens.weight"), weights.get_tensor("lm_head.weight")
        assert len(list(weights.keys())) == 3 + 9 * LAYERS
    assert embed.dtype == head.dtype == torch.float32
    assert torch.equal(embed, torch.from_numpy(written["tensors"]["token_embd.weight"]))
    assert torch.equal(head, torch.from_numpy(written["tensors"]["output.weight"]))

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "to tell the truth <|im_end|>"
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    assert input_ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert ids["<|im_end|>"] in input_ids[0].tolist()  # the special token stays whole
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


def assert_refused(result, *phrases: str) -> None:
    """Exit status 2, and the last line of stderr is the one error line, holding every phrase."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]


def refuse(path: Path, output: Path):
    result = run_cli(["init-model", "--from-gguf", str(path), "--output", str(output)], timeout=120)
    assert not output.exists()  # nothing written for a file that cannot be converted
    return result


def test_a_missing_file_is_refused(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    assert_refused(refuse(missing, tmp_path / "out"), str(missing), "no such file")


def test_a_text_file_is_refused(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 98362432\n")
    assert_refused(refuse(text, tmp_path / "out"), str(text), "is not a GGUF file", "b'vers'")


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_a_truncated_file_is_refused(tiny_gguf, tmp_path, where):
    path, _ = tiny_gguf
    data = path.read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: len(data) - 1000] if where == "tensor data" else data[:2000])
    phrase = "tensors need" if where == "tensor data" else "header runs past the end"
    assert_refused(refuse(truncated, tmp_path / "out"), str(truncated), "truncated or corrupt GGUF file", phrase)


def test_an_architecture_transformers_cannot_load_is_refused(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "mystery.gguf"
    writer = GGUFWriter(str(path), "alpaca-ray-mystery")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_refused(refuse(path, tmp_path / "out"), str(path), "cannot load GGUF models of architecture",
                   "'alpaca-ray-mystery'")
