"""LoRA and QLoRA on one GPU through the train stage's library functions, without Ray (world size 1, NCCL).

Skipped without CUDA; QLoRA also without bitsandbytes. Run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def nccl_world_of_one(tmp_path_factory):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def colour_batches(tokenizer, count: int = 16, rows_per_batch: int = 4):
    from alpaca_ray.train.data import Example, collate, pack_examples, tokenize_record
    from tests.support.train_data import make_colour_records

    examples = {}
    for i, record in enumerate(make_colour_records(count)):
        row = tokenize_record(tokenizer, record.instruction, record.input, record.output, 256)
        examples[i] = Example(i, tuple(row["input_ids"]), row["prompt_len"])
    rows = pack_examples(list(examples), {i: len(e) for i, e in examples.items()}, 256)
    return [collate([[examples[i] for i in unit] for unit in rows[k:k + rows_per_batch]], tokenizer.pad_token_id,
                    packed=True) for k in range(0, len(rows), rows_per_batch)]


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapters_train_on_gpu_and_export_a_merged_model_that_answers_alike(mode, tiny_model_dir, nccl_world_of_one,
                                                                            tmp_path):
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA needs bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_ray.prompts import format_prompt
    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.loop import export, make_optimizer, prepare_model, train_step

    device = torch.device("cuda", 0)
    cfg = TrainConfig(base_model=str(tiny_model_dir), data="d", output=str(tmp_path), use_gpu=True, num_workers=1,
                      global_batch_size=4, lr=5e-3, merge=True, lora_target_modules=["q_proj", "v_proj", "lm_head"],
                      **{mode: True})
    model, tokenizer = prepare_model(cfg, "sdpa", device, 1)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if mode == "qlora":
        assert type(q_proj.base_layer).__name__ == "Linear4bit"  # the frozen base is 4-bit NF4
        assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
        assert {p.dtype for p in trainable.values()} == {torch.bfloat16}
    else:
        assert {p.dtype for p in trainable.values()} == {torch.float32}
        assert q_proj.base_layer.weight.dtype == torch.bfloat16

    optimizer = make_optimizer(model, cfg)
    batches = colour_batches(tokenizer)
    losses = []
    for epoch in range(10):
        for k, batch in enumerate(batches):
            loss, _ = train_step(model, optimizer, [batch], batch["num_labels"], 1, device, False, 1.0,
                                 seed=epoch * 100 + k)
            losses.append(float(loss) / batch["num_labels"])
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses

    export(model, tokenizer, cfg, str(tmp_path), torch.float32, {"prompt_template": "alpaca"}, 0)
    final, merged_dir = tmp_path / "final", tmp_path / "merged"
    assert (final / "adapter_model.safetensors").exists() and (merged_dir / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)
    # Both on the unquantized base, on CPU in float32: the adapter applied, and merged into the weights.
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    for n in range(4):
        inputs = tokenizer(format_prompt(f"Name colour number {n}."), return_tensors="pt")
        a = on_base.generate(**inputs, max_new_tokens=8, do_sample=False)
        b = merged.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert a.tolist() == b.tolist()
    assert os.path.getsize(final / "adapter_model.safetensors") < os.path.getsize(merged_dir / "model.safetensors")
