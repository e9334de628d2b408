"""Stand-in teachers for the generate tests: responders for ``alpaca_ray.openai_server.OpenAIServer``.

:class:`SelfInstructTeacher` answers each self-instruct prompt with a numbered task list in Alpaca's
format. Its instructions are random draws from a fixed vocabulary, so they are unique and survive the
ROUGE-L filter, except for the rejects it plants in every answer on purpose (one near-duplicate, one
too short, one blacklisted, one "Write a program"), which the parser and filters must drop. Faults are
injected by request number (429 with Retry-After, 500, slow answers, ``length`` stops, malformed text).
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable

from alpaca_ray.openai_server import Reply

# Plain words that are not in Alpaca's blacklist and do not start with punctuation.
VOCAB = """amber anchor apple arrow autumn badge bakery ballad bamboo banner barley basket beacon berry bicycle
blanket blossom bottle bracelet breeze bridge bucket budget cabin cactus candle canyon carpet castle cedar
census chapter cherry chimney cider circuit citrus clover cobalt comet compass copper coral cotton cradle
crystal cushion dairy dancer desert dialect dolphin dragon eclipse elbow ember engine falcon feather ferry
fiddle forest fossil fountain garden garlic glacier granite harbor harvest hazel helmet heron hollow honey
horizon island ivory jacket jasmine jigsaw journal jungle kettle kiosk ladder lagoon lantern lemon library
lily linen lobster magnet maple marble meadow melody meteor mirror monsoon mosaic mountain nectar needle
oasis olive orchard oyster paddle palace parcel pebble pepper pillar pioneer planet pocket poem pottery
prairie puzzle quarry quilt rabbit radish raven reef ribbon river rocket saddle saffron salmon satchel
season shadow shelter signal silver sketch sparrow spindle spruce stadium statue summit sunset table
teapot temple thistle thunder timber tonic tower trumpet tulip tunnel umbrella valley velvet village
violet voyage walnut warden whistle willow window winter yarrow zephyr""".split()
VERBS = ["Describe", "Explain", "Summarize", "Compare", "Classify", "Rewrite", "Suggest", "Evaluate",
         "Outline", "Recommend", "Analyze", "Translate", "Predict", "Propose", "Critique", "Rank"]

MALFORMED_TEXT = "I'm sorry, but I can't help with making a list like that. Is there anything else?"


def write_seed_tasks(path, count: int = 8) -> list[str]:
    """A small self-instruct seed file (a third with inputs); returns its instructions."""
    rng = random.Random(1234)
    instructions = []
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            words = rng.sample(VOCAB, 5)
            instruction = f"Tell me a short story about the {words[0]} and the {words[1]} near the {words[2]}."
            instance = {"input": f"{words[3]} {words[4]}" if index % 3 == 0 else "",
                        "output": f"Once upon a time a {words[0]} met a {words[1]}."}
            handle.write(json.dumps({"id": f"seed_task_{index}", "name": f"story_{index}", "instruction": instruction,
                                     "instances": [instance], "is_classification": False}) + "\n")
            instructions.append(instruction)
    return instructions


def task_block(number: int, instruction: str, task_input: str, output: str) -> str:
    return (f"{number}. Instruction: {instruction}\n{number}. Input:\n{task_input or '<noinput>'}\n"
            f"{number}. Output:\n{output}\n")


class SelfInstructTeacher:
    """A deterministic responder writing well-formed self-instruct lists, with injectable faults.

    ``faults`` maps a request's arrival number (0-based) to a :class:`Reply` sent instead of an answer,
    or to ``"length"`` (a list cut off mid-task, ``finish_reason="length"``) or ``"malformed"`` (prose).
    Every answer holds ``good_tasks`` keepable tasks plus the 4 planted rejects. ``delay_s`` is the
    latency of every answer, or ``(low, high)`` for one drawn uniformly per answer (seeded).
    """

    def __init__(self, good_tasks: int = 10, repeat_label: bool = False, delay_s: float | tuple[float, float] = 0.0,
                 faults: dict[int, Reply | str] | None = None, seed: int = 0,
                 on_request: Callable[[int], None] | None = None):
        self.good_tasks, self.repeat_label, self.delay_s = good_tasks, repeat_label, delay_s
        self.faults = dict(faults or {})
        self.seed, self.on_request = seed, on_request
        self.lock = threading.Lock()
        self.count = 0
        self.answered = 0  # answers with a task list (not faults)

    def instruction(self, rng: random.Random) -> str:
        words = rng.sample(VOCAB, 7)
        return f"{rng.choice(VERBS)} {' '.join(words)}."

    def answer_text(self, first: int, rng: random.Random, length_cut: bool = False) -> str:
        blocks, number = [], first
        good = [self.instruction(rng) for _ in range(self.good_tasks)]
        near_duplicate = good[0].rstrip(".") + " " + rng.choice(VOCAB) + "."  # F = 16/17 against good[0]
        rejects = [near_duplicate, f"Sort the {rng.choice(VOCAB)}.",
                   f"Draw a picture of a {rng.choice(VOCAB)} beside a {rng.choice(VOCAB)}.",
                   f"Write a program that sorts {rng.choice(VOCAB)} and {rng.choice(VOCAB)} lists."]
        for index, instruction in enumerate(good[:1] + rejects + good[1:]):
            task_input = "" if index % 3 else f"The {rng.choice(VOCAB)} is next to the {rng.choice(VOCAB)}."
            blocks.append(task_block(number, instruction, task_input, f"An answer about {rng.choice(VOCAB)}."))
            number += 1
            if number >= 20:
                break
        text = "###\n".join(blocks)
        if length_cut:
            text += f"###\n{number}. Instruction: Describe the {rng.choice(VOCAB)} and"
        # Completions continue after the prompt's "4. Instruction:"; chat models often repeat it.
        return text if self.repeat_label else text[len(f"{first}. Instruction:"):]

    def __call__(self, kind: str, body: dict) -> Reply:
        with self.lock:
            number = self.count
            self.count += 1
        if self.on_request:
            self.on_request(number)
        fault = self.faults.get(number)
        if isinstance(fault, Reply):
            return fault
        prompt = body.get("prompt") if kind == "completions" else body["messages"][-1]["content"]
        match = re.search(r"(\d+)\. Instruction:\s*$", prompt or "")
        first = int(match.group(1)) if match else 4
        rng = random.Random(self.seed * 1_000_003 + number)
        delay = self.delay_s if not isinstance(self.delay_s, tuple) else rng.uniform(*self.delay_s)
        if fault == "malformed":
            return Reply(MALFORMED_TEXT, delay_s=delay)
        with self.lock:
            self.answered += 1
        if fault == "length":
            return Reply(self.answer_text(first, rng, length_cut=True), finish_reason="length", delay_s=delay)
        return Reply(self.answer_text(first, rng), delay_s=delay)
