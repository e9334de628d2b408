"""LoRA without Ray: the config and CLI, the frozen base and trainable adapters, adapters-only optimizer
state and checkpoints (exact round trip), in one process with a world-size-1 gloo group and FSDP2."""

from __future__ import annotations

import pytest

from alpaca_ray.config import ConfigError, config_from_args, make_parser
from alpaca_ray.train.config import TrainConfig

REQUIRED = {"base_model": "m", "data": "d", "output": "o"}


def test_lora_flags_and_recipe_keys_build_the_config():
    args = make_parser("t", "", TrainConfig).parse_args(
        ["--base-model", "m", "--data", "d", "--output", "o", "--lora", "--lora-rank", "16", "--lora-alpha", "32",
         "--lora-dropout", "0.1", "--lora-target-modules", "q_proj", "k_proj", "--merge"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.lora, cfg.qlora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.merge) == \
        (True, False, 16, 32, 0.1, True)
    assert cfg.lora_target_modules == ["q_proj", "k_proj"]
    assert TrainConfig(**REQUIRED, qlora=True, use_gpu=True).lora is True  # QLoRA is LoRA on a 4-bit base


def test_bad_adapter_options_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(**REQUIRED, qlora=True, lora_rank=0, lora_alpha=0, lora_dropout=1.0,
                    lora_target_modules=[""], dtype="float32")
    message = str(err.value)
    for expected in ("lora_rank must be >= 1", "lora_alpha must be > 0", "lora_dropout must be in [0, 1)",
                     "lora_target_modules must be a list of module names", "qlora needs GPU workers (--use-gpu)",
                     "qlora computes and keeps adapters in bfloat16"):
        assert expected in message
    with pytest.raises(ConfigError, match="merge applies to adapter runs"):
        TrainConfig(**REQUIRED, merge=True)


def test_default_targets_follow_the_architecture_and_an_unknown_one_must_name_them():
    from alpaca_ray.train.model import default_lora_targets, lora_config

    assert default_lora_targets("llama") == ["q_proj", "v_proj"]  # Alpaca-LoRA's choice
    assert default_lora_targets("gpt2") == ["c_attn"]
    cfg = TrainConfig(**REQUIRED, lora=True)
    assert set(lora_config(cfg, "llama").target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="--lora-target-modules"):
        lora_config(cfg, "no-such-architecture")
    assert lora_config(TrainConfig(**REQUIRED, lora=True, lora_target_modules=["all-linear"]),
                       "no-such-architecture").target_modules == "all-linear"


def test_adapter_training_reuses_a_pad_token_instead_of_growing_the_vocabulary(tiny_model_dir):
    from alpaca_ray.train.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir), new_pad_token=False)
    assert tokenizer.pad_token == tokenizer.unk_token != tokenizer.eos_token  # as Alpaca-LoRA: UNK, not EOS
    assert len(tokenizer) == len(load_tokenizer(str(tiny_model_dir))) - 1


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_adapters_alone_train_and_checkpoint_exactly(tiny_model_dir, gloo_world_of_one, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from alpaca_ray.train.checkpoint import AppState
    from alpaca_ray.train.data import Example, collate
    from alpaca_ray.train.loop import make_optimizer, prepare_model, token_loss_sum, train_step

    cfg = TrainConfig(base_model=str(tiny_model_dir), data="d", output="o", lora=True, lr=1e-2, num_workers=1,
                      global_batch_size=2, lora_target_modules=["q_proj", "v_proj", "lm_head"])  # lm_head: the root unit
    model, tokenizer = prepare_model(cfg, "sdpa", torch.device("cpu"), 1)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {named[n].dtype for n in trainable} == {torch.float32}
    assert {p.dtype for n, p in named.items() if n not in trainable} == {torch.bfloat16}  # no fp32 master copy
    base_before = {n: p.full_tensor().clone() for n, p in named.items() if n not in trainable}

    optimizer = make_optimizer(model, cfg)
    ids = tokenizer("Name the colour number 3.\nblue")["input_ids"]
    batch = collate([[Example(0, tuple(ids), 6)]] * 2, tokenizer.pad_token_id, packed=True)
    losses = [float(train_step(model, optimizer, [batch], batch["num_labels"], 1, "cpu", False, 1.0, seed=s)[0])
              for s in range(4)]
    assert losses[-1] < losses[0]
    assert {id(p) for p in optimizer.state} == {id(named[n]) for n in trainable}  # moments of adapters only
    assert all(torch.equal(named[n].full_tensor(), w) for n, w in base_before.items())  # the base is frozen

    model.eval()  # an eval pass, as at an epoch end: FSDP2's root unit stays unsharded after it
    with torch.no_grad():
        token_loss_sum(model, batch, "cpu", False)
    model.train()
    dcp.save({"app": AppState(model, optimizer, adapters_only=True)}, checkpoint_id=str(tmp_path / "ckpt"))
    saved = {n: named[n].full_tensor().clone() for n in trainable}
    moments = {n: optimizer.state[named[n]]["exp_avg"].full_tensor().clone() for n in trainable}
    stored = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    assert stored < sum(w.numel() for w in base_before.values()) * 2  # far less than the bf16 base alone

    cfg_fresh = TrainConfig(**{**cfg.__dict__, "seed": 7})  # other initial adapters, then the checkpoint
    fresh, _ = prepare_model(cfg_fresh, "sdpa", torch.device("cpu"), 1)
    fresh_optimizer = make_optimizer(fresh, cfg_fresh)
    fresh_named = dict(fresh.named_parameters())
    some = next(n for n in trainable if ".lora_A." in n)
    assert not torch.equal(fresh_named[some].full_tensor(), saved[some])
    dcp.load({"app": AppState(fresh, fresh_optimizer, adapters_only=True)}, checkpoint_id=str(tmp_path / "ckpt"))
    for n in trainable:
        assert torch.equal(fresh_named[n].full_tensor(), saved[n]), n
        assert torch.equal(fresh_optimizer.state[fresh_named[n]]["exp_avg"].full_tensor(), moments[n]), n
    # the next step is the same from the restored state as from the original one
    a = train_step(model, optimizer, [batch], batch["num_labels"], 1, "cpu", False, 1.0, seed=99)[0]
    b = train_step(fresh, fresh_optimizer, [batch], batch["num_labels"], 1, "cpu", False, 1.0, seed=99)[0]
    assert float(a) == float(b)
