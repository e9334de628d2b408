"""Alpaca's self-instruct prompt: a header, three seed tasks as a numbered list, and ``4. Instruction:``.

The header is a template the user can replace (``--prompt-template FILE_OR_URL``: the Alpaca recipe names
Stanford's ``prompt.txt`` at a pinned commit); this module's default says what Alpaca's ``prompt.txt``
asks for, in its own words. The list that follows is built exactly as
Alpaca's ``encode_prompt`` builds it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from alpaca_ray.config import UserError

DEFAULT_HEADER = """\
Come up with 20 varied task instructions. Each one will be handed to a GPT model, and we will judge how \
well the model carries it out.

The requirements are:
1. Vary the verb from one instruction to the next, so the set stays diverse.
2. Vary the phrasing as well: mix questions with instructions written as commands.
3. Vary the kind of task: include open-ended generation, classification, editing and other types of task.
4. A GPT language model must be able to do the task. For instance, do not ask for visual or audio output, \
and do not ask for actions in the world, such as waking someone at 5pm or setting a reminder.
5. Write the instructions in English.
6. Keep each instruction to one or two sentences; either a command or a question is fine.
7. Give each instruction a suitable input: a concrete example for the task, with realistic content rather \
than a bare placeholder. The input should make the task substantial, ideally in no more than 100 words.
8. Some instructions need no input, for example a question about general knowledge such as "what is the \
highest mountain in the world". For those, write "<noinput>" in the input field.
9. The output must be a fitting answer to the instruction and its input, in fewer than 100 words.

List of 20 tasks:
"""

NO_INPUT = "<noinput>"


@dataclass(frozen=True)
class SeedExample:
    """One seed task as shown in a prompt (Alpaca uses a task's first instance)."""

    id: str
    instruction: str
    input: str
    output: str


def read_header(path: str | None, name: str | None = None) -> str:
    """The prompt header: the text of ``path``, or :data:`DEFAULT_HEADER` when no file is given.

    ``name`` is what errors call the file (the URL a cached copy came from)."""
    if not path:
        return DEFAULT_HEADER
    name = name or path
    try:
        # Read as Alpaca's encode_prompt reads prompt.txt (open().read(): universal newlines).
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise UserError(f"{name}: no such prompt template file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{name}: cannot read the prompt template: {err}") from None
    if not text.strip():
        raise UserError(f"{name}: the prompt template is empty")
    return text


def encode_prompt(examples: Sequence[SeedExample], header: str = DEFAULT_HEADER) -> str:
    """The prompt for one request, exactly as Alpaca's ``encode_prompt`` lays it out."""
    prompt = header + "\n"
    for number, example in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", example.instruction).strip().rstrip(":")
        task_input = NO_INPUT if example.input.lower() == "" else example.input
        prompt += "###\n"
        prompt += f"{number}. Instruction: {instruction}\n"
        prompt += f"{number}. Input:\n{task_input}\n"
        prompt += f"{number}. Output:\n{example.output}\n"
    prompt += "###\n"
    prompt += f"{len(examples) + 1}. Instruction:"
    return prompt


def sample_examples(seed_examples: Sequence[SeedExample], k: int, rng: random.Random) -> list[SeedExample]:
    """``k`` distinct seed tasks at random (Alpaca: ``random.sample(seed_instruction_data, 3)``)."""
    return rng.sample(list(seed_examples), k)
