"""The transformers engine (batching, streaming, sampling) and the watermark, on the tiny model, without Ray."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import torch

from alpaca_ray.serve.engine import SamplingParams, TransformersEngine, held_back_suffix, sample_next
from alpaca_ray.serve.metrics import Metrics
from alpaca_ray.serve.watermark import (
    WatermarkDetector,
    WatermarkLogitsProcessor,
    detect_token_ids,
    green_list,
)
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def detector(tiny_model_dir) -> WatermarkDetector:
    return WatermarkDetector.from_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def engines(tiny_model_dir, detector):
    plain = TransformersEngine(str(tiny_model_dir), max_batch_size=16, batch_wait_timeout_s=0.05, metrics=Metrics())
    marked = TransformersEngine(str(tiny_model_dir), logits_processors=[WatermarkLogitsProcessor(detector.vocab_size)])
    return plain, marked


async def _answer(engine, prompt: str, **params) -> tuple[str, str, int, list[str]]:
    pieces, finish, tokens = [], None, 0
    async for delta in engine.generate(prompt, SamplingParams(**params)):
        pieces.append(delta.text)
        finish, tokens = delta.finish_reason, delta.completion_tokens
    return "".join(pieces), finish, tokens, pieces


def test_sampling_helpers():
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert sample_next(logits, 0.0, 1.0, None) == 1
    # top_p small enough keeps only the most likely token
    assert {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    assert held_back_suffix("hello ##", ["###"]) == 2 and held_back_suffix("hello", ["###"]) == 0


def test_batched_greedy_decoding_matches_one_at_a_time(engines):
    plain, _ = engines
    prompts = ["Name a color.", "Give three tips for staying healthy, please, in detail.", "Hi"]
    alone = [asyncio.run(_answer(plain, p, max_tokens=12 + i, temperature=0.0))[0] for i, p in enumerate(prompts)]
    before = len(plain.stats()["batches"])

    async def together():
        return await asyncio.gather(*(_answer(plain, p, max_tokens=12 + i, temperature=0.0)
                                      for i, p in enumerate(prompts)))

    batched = asyncio.run(together())
    assert [b[0] for b in batched] == alone  # left padding and dropping finished rows change nothing
    assert [b[2] for b in batched] == [12, 13, 14] and {b[1] for b in batched} == {"length"}
    assert max(plain.stats()["batches"][before:]) > 1  # they really shared a batch


def test_streams_pieces_stops_and_seeds(engines):
    plain, _ = engines
    text, finish, tokens, pieces = asyncio.run(_answer(plain, "Hello", max_tokens=30, seed=7))
    assert len(pieces) > 1 and "".join(pieces) == text and tokens == 30 and finish == "length"
    assert asyncio.run(_answer(plain, "Hello", max_tokens=30, seed=7))[0] == text  # seeded: reproducible
    stop = text[5:7]
    stopped, finish, _, _ = asyncio.run(_answer(plain, "Hello", max_tokens=30, seed=7, stop=[stop]))
    assert finish == "stop" and stopped == text[: text.find(stop)] and stop not in stopped


def test_green_lists_are_deterministic_and_sized(detector):
    first = green_list(17, detector.vocab_size)
    assert torch.equal(first, green_list(17, detector.vocab_size))
    assert len(first) == int(0.25 * detector.vocab_size) and not torch.equal(first, green_list(18, detector.vocab_size))


def test_detector_false_positive_rate_on_random_token_sequences(detector):
    rng = random.Random(0)
    z_scores = [detect_token_ids([rng.randrange(detector.vocab_size) for _ in range(200)], detector.vocab_size).z_score
                for _ in range(200)]
    # under the null hypothesis z is about N(0, 1): no sequence comes near the threshold of 4
    assert max(z_scores) < 4 and abs(sum(z_scores) / len(z_scores)) < 0.3


def test_watermarked_text_is_detected_and_plain_text_is_not(engines, detector):
    """200 tokens at temperature 1.0; threshold z = 4, a one-sided false-positive rate of about 3e-5."""
    plain, marked = engines

    async def texts(engine):
        return await asyncio.gather(*(_answer(engine, f"Instruction number {i}.", max_tokens=200, temperature=1.0,
                                              seed=i) for i in range(6)))

    # a random model sometimes ends early with EOS: judge the answers that got their 200 tokens
    watermarked = [detector.detect(t[0]) for t in asyncio.run(texts(marked)) if t[1] == "length"]
    unmarked = [detector.detect(t[0]) for t in asyncio.run(texts(plain)) if t[1] == "length"]
    assert len(watermarked) >= 3 and len(unmarked) >= 3
    assert all(d.watermarked and d.z_score > 4 for d in watermarked), [d.z_score for d in watermarked]
    assert not any(d.watermarked for d in unmarked), [d.z_score for d in unmarked]
    assert min(d.green_fraction for d in watermarked) > max(d.green_fraction for d in unmarked)


def test_watermark_cli_gives_z_and_verdict(engines, detector, tiny_model_dir, tmp_path):
    _, marked = engines
    async def stories():
        return await asyncio.gather(*(_answer(marked, "Write a story.", max_tokens=200, temperature=1.0, seed=s)
                                      for s in range(4)))

    text = next(answer for answer, finish, _, _ in asyncio.run(stories()) if finish == "length")
    path = tmp_path / "answer.txt"
    path.write_text(text, encoding="utf-8")
    result = run_cli(["watermark", "detect", str(path), "--model", str(tiny_model_dir), "--json"], check=True)
    detection = json.loads(result.stdout)
    assert detection["watermarked"] and detection["z_score"] > 4
    # without the deployment's key the green lists are other ones: nothing to see
    assert not WatermarkDetector(detector.tokenizer, detector.vocab_size, key=12345).detect(text).watermarked
    missing = run_cli(["watermark", "detect", str(tmp_path / "none.txt"), "--model", str(tiny_model_dir)])
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_fair_scheduler_gives_every_request_a_share_and_preempts_the_newest_rows():
    from alpaca_ray.serve.engine import FairScheduler, _Sequence

    def sequences(group: str, count: int) -> list[_Sequence]:
        return [_Sequence([1, 2], SamplingParams(), lambda delta: None, group) for _ in range(count)]

    scheduler = FairScheduler(max_rows=16)
    big, small = sequences("big", 40), sequences("small", 1)
    for sequence in big + small:
        scheduler.add(sequence)
    admit, preempt = scheduler.plan([])
    assert [s.group for s in admit].count("big") == 15 and small[0] in admit and not preempt
    running = big[:16]  # the big request holds the whole batch when a small one arrives
    for age, sequence in enumerate(running):
        sequence.tokens = [0] * (20 - age)
    scheduler = FairScheduler(max_rows=16)
    for sequence in big[16:] + small:
        scheduler.add(sequence)
    admit, preempt = scheduler.plan(running)
    assert admit == small and preempt == [running[-1]]  # the row with the fewest tokens gives way
    small[0].cancelled = True  # a cancelled waiting sequence is never admitted
    scheduler.add(small[0])
    assert scheduler.plan(big[:16])[0] == []


def test_a_small_request_is_not_held_up_by_a_big_one_and_preemption_changes_no_answer(engines):
    """A request of 20 greedy answers x 48 tokens holds the 16-row batch; a 4-token request sent while it
    runs takes a row at once (one big row is preempted and later resumes exactly where it was)."""
    plain, _ = engines
    prompts = [f"Question {i}: name a color." for i in range(20)]
    alone = [asyncio.run(_answer(plain, p, max_tokens=48, temperature=0.0))[0] for p in prompts[:3]]

    async def scenario():
        finished_big: list[int] = []

        async def big_one(i: int) -> str:
            pieces = []
            async for delta in plain.generate(prompts[i], SamplingParams(max_tokens=48, temperature=0.0), "big"):
                pieces.append(delta.text)
            finished_big.append(i)
            return "".join(pieces)

        big = [asyncio.create_task(big_one(i)) for i in range(20)]
        deadline = time.monotonic() + 60
        while plain.stats()["running"] < 16 and time.monotonic() < deadline:  # the big request fills the batch
            await asyncio.sleep(0.005)
        preemptions = plain.stats()["preemptions"]
        small = await _answer(plain, "Hi", max_tokens=4, temperature=0.0)
        done_when_small_finished = len(finished_big)
        assert plain.stats()["preemptions"] > preemptions
        return await asyncio.gather(*big), small, done_when_small_finished

    big_texts, small, done_when_small_finished = asyncio.run(scenario())
    assert small[2] == 4 or small[1] == "stop"
    assert done_when_small_finished == 0  # it did not wait for the big request's rows to end
    assert big_texts[:3] == alone  # preempted and resumed rows give the same greedy answers


def test_an_unstreamed_answer_arrives_whole_in_one_delta(engines):
    plain, _ = engines
    streamed = asyncio.run(_answer(plain, "Hello", max_tokens=20, seed=5))

    async def whole():
        return [d async for d in plain.generate("Hello", SamplingParams(max_tokens=20, seed=5), stream=False)]

    deltas = asyncio.run(whole())
    assert len(deltas) == 1 and deltas[0].text == streamed[0] and deltas[0].finish_reason == streamed[1]
    assert deltas[0].completion_tokens == streamed[2]


class LastTokens:
    """A logits processor that records each step's last token of row 0: the prompt's last, then every
    sampled token but the final one (the engine's own hook, so what it records is what the model was fed)."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, last_tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(last_tokens[0, 0]))
        return logits


def test_stop_token_ids_gather_every_eos_source():
    from types import SimpleNamespace

    from alpaca_ray.serve.engine import stop_token_ids

    assert stop_token_ids(SimpleNamespace(eos_token_id=2), SimpleNamespace(eos_token_id=[2, 5]),
                          SimpleNamespace(eos_token_id=7)) == {2, 5, 7}
    assert stop_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=3), None) == {3}


def test_generation_stops_at_any_eos_id_and_never_shows_its_text(tiny_model_dir, tmp_path):
    """A token the tiny model generates greedily is made an extra EOS, once through the generation config
    and once through the model config (each a list): the answer ends just before it, finish_reason stop."""
    import shutil

    recorder = LastTokens()
    engine = TransformersEngine(str(tiny_model_dir), logits_processors=[recorder])
    eos = engine.tokenizer.eos_token_id
    for prompt in ("Give three tips for staying healthy.", "Name a color.", "Write a poem about the sea."):
        recorder.seen.clear()
        text, finish, _, _ = asyncio.run(_answer(engine, prompt, max_tokens=16, temperature=0.0))
        generated = recorder.seen[1:]  # after the prompt's last token
        special = set(engine.tokenizer.all_special_ids)
        cut = next((k for k in range(2, len(generated)) if generated[k] not in generated[:k]
                    and generated[k] not in special and engine.tokenizer.decode([generated[k]]).strip()), None)
        if finish == "length" and cut is not None:
            break
    assert cut is not None, "the tiny model repeated itself on every prompt"
    expected = engine.tokenizer.decode(generated[:cut], skip_special_tokens=True)
    for config_file in ("generation_config.json", "config.json"):
        model_dir = tmp_path / config_file
        shutil.copytree(tiny_model_dir, model_dir)
        values = json.loads((model_dir / config_file).read_text())
        values["eos_token_id"] = [eos, generated[cut]]
        (model_dir / config_file).write_text(json.dumps(values))
        stopping = TransformersEngine(str(model_dir))
        assert stopping.eos_ids == {eos, generated[cut]}
        answer, finish, tokens, _ = asyncio.run(_answer(stopping, prompt, max_tokens=16, temperature=0.0))
        assert (answer, finish, tokens) == (expected, "stop", cut + 1), config_file
        assert text.startswith(answer) and len(text) > len(answer)  # its text is left out, the rest unsaid


def test_a_prompt_given_as_token_ids_is_used_as_it_is(engines):
    """Ids reach the model unchanged (a doubled BOS no text could give), checked against the model's own
    greedy ``generate`` from the same ids; text prompts are tokenized with the special tokens."""
    plain, _ = engines
    ids = plain.tokenizer("Name a color.")["input_ids"]
    assert plain.count_prompt_tokens(ids) == len(ids) == plain.count_prompt_tokens("Name a color.")
    as_text = asyncio.run(_answer(plain, "Name a color.", max_tokens=8, temperature=0.0))
    assert asyncio.run(_answer(plain, ids, max_tokens=8, temperature=0.0))[:3] == as_text[:3]
    doubled = [plain.tokenizer.bos_token_id, *ids]
    answer = asyncio.run(_answer(plain, doubled, max_tokens=8, temperature=0.0))[0]
    with torch.inference_mode():
        reference = plain.model.generate(torch.tensor([doubled]), max_new_tokens=8, do_sample=False,
                                         pad_token_id=plain.pad_id)
    assert answer == plain.tokenizer.decode(reference[0, len(doubled):], skip_special_tokens=True)
    for bad in ([], [plain.vocab_size], [-1]):
        with pytest.raises(ValueError, match="prompt"):
            asyncio.run(_answer(plain, bad, max_tokens=2))
