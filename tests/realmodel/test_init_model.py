"""``alpaca-ray init-model --from-gguf`` on the real SmolLM2-135M-Instruct GGUF (Q4_1, tied embeddings, ChatML).

One conversion for the whole session (the ``smollm2_dir`` fixture runs the real CLI); each test reads the
directory back with plain ``from_pretrained`` and compares it with transformers' own reading of the GGUF file.
"""

from __future__ import annotations

import copy
import json

import pytest

PROMPT = "Give three tips for staying healthy."
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    """The converted directory, loaded as any Hugging Face model is: no gguf_file, no quantizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def from_gguf(smollm2_gguf_file):
    """transformers' own reading of the GGUF file, in float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf_file.parent, smollm2_gguf_file.name
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def test_the_directory_is_a_standard_hugging_face_model(smollm2_dir, converted):
    import torch

    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= {path.name for path in smollm2_dir.iterdir()}
    assert not list(smollm2_dir.glob("*.gguf"))
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    model, tokenizer = converted
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.bfloat16  # the default --dtype, recorded in config.json
    assert len(tokenizer) == 49152 and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"


def test_embeddings_stay_tied_with_one_copy_saved(smollm2_dir, converted):
    from safetensors import safe_open

    model, _ = converted
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        shapes = [tuple(weights.get_slice(name).get_shape()) for name in names]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert shapes.count((49152, 576)) == 1


def test_weights_and_logits_equal_the_gguf_model(smollm2_dir, converted, from_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = converted
    reference, _ = from_gguf
    weights, reference_weights = model.state_dict(), reference.state_dict()
    assert set(weights) == set(reference_weights)
    for name, tensor in reference_weights.items():  # the dequantized weights, rounded to bfloat16 once
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name

    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = model(input_ids).logits.float()
        # bfloat16 arithmetic through 30 layers: close, and the same next token everywhere
        assert (logits - expected).abs().mean() < 0.25
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        # computed in float32, the saved weights give exactly the GGUF model's logits (its weights rounded alike)
        model32 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        rounded = copy.deepcopy(reference)  # not the shared fixture
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        assert torch.equal(model32(input_ids).logits, rounded(input_ids).logits)


def test_the_chat_template_and_tokenizer_are_kept(converted, from_gguf):
    _, tokenizer = converted
    _, gguf_tokenizer = from_gguf
    assert tokenizer.chat_template and tokenizer.chat_template == gguf_tokenizer.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert encoded == gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=True,
                                                         add_generation_prompt=True)["input_ids"]
    assert encoded.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # system and user turns
    assert tokenizer(PROMPT).input_ids == gguf_tokenizer(PROMPT).input_ids


def test_the_generation_config_names_the_eos_id_and_the_cli_says_what_it_wrote(smollm2_dir, converted):
    from transformers import GenerationConfig

    model, tokenizer = converted
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    # the file's tokenizer.ggml.eos_token_id, and no eot/eom id: one id, so a plain int as save_pretrained writes it
    assert generation["eos_token_id"] == 2 == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["pad_token_id"] == 2 and generation["bos_token_id"] == 1
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == model.generation_config.eos_token_id == 2

    summary = (smollm2_dir.parent / "init-model.stdout").read_text().strip().splitlines()[-1]
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert summary == (f"wrote {smollm2_dir}: llama (LlamaForCausalLM), {parameters:,} parameters in bfloat16, "
                       f"tied embeddings, eos_token_id 2, chat template kept")
